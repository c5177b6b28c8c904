//! The node proxy's data path.

pub mod orig_dst;
pub mod outbound;
