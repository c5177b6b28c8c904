//! The node proxy's ports, bound inside every enrolled pod's network namespace.

/// Outbound: captured connections of the pod's applications (`127.0.0.1` / `[::1]`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext: connections from outside the mesh, steered here by sk_lookup.
pub const INBOUND_PLAIN_PORT: u16 = 15006;
/// Inbound HBONE: mTLS + HTTP/2 CONNECT from other nodes' proxies.
pub const HBONE_PORT: u16 = 15008;

/// Whether `port` is one of the proxy's own: never a destination. A connection
/// addressed to one would be proxied back into the same listener, again and again.
pub fn is_proxy_port(port: u16) -> bool {
    matches!(port, OUTBOUND_PORT | INBOUND_PLAIN_PORT | HBONE_PORT)
}
