//! The node proxy's data path.

pub mod access_log;
pub mod conns;
pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod l7;
pub mod lb;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod policies;
pub mod state;
pub mod tls;
pub mod tunnel;
