//! The node proxy's data path.

pub mod inbound;
pub mod orig_dst;
pub mod outbound;
