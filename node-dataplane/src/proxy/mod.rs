//! The node proxy's data path. One [`state::ProxyState`] per node; per enrolled
//! pod, the listeners of [`listeners`] in the pod's network namespace:
//!
//! - [`outbound`]: the pod's captured connections, to Service endpoints and
//!   workloads, over HBONE ([`pool`], the client side) or in plaintext;
//! - [`inbound`]: the HBONE server (mTLS + HTTP/2 CONNECT) for the pod;
//! - [`inbound_passthrough`]: plaintext from outside the mesh;
//! - [`inbound_conn`]: what both inbound listeners do with a connection:
//!   authorize it and serve it at L4 or at [`l7`];
//! - [`routing`]: Gateway API routes (HTTPRoute, GRPCRoute on Services), decided
//!   per request here at the source;
//! - [`record`]: the one record (metrics, counters, access log) of each connection.

pub mod access_log;
pub mod conns;
pub mod copy;
pub mod counters;
pub mod h2;
pub mod handshakes;
pub mod idle;
pub mod inbound;
pub mod inbound_conn;
pub mod inbound_passthrough;
pub mod l7;
pub mod lb;
pub mod listeners;
pub mod local;
pub mod node_addresses;
pub mod orig_dst;
pub mod outbound;
pub mod policies;
pub mod pool;
pub mod ports;
pub mod record;
pub mod request_authn;
pub mod route_table;
pub mod routing;
pub mod sniff;
pub mod state;
pub mod tls;
pub mod tunnel;
