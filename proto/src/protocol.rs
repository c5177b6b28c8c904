//! What a Service port declares about its protocol: `appProtocol`, else an
//! Istio-style port name (`http`, `http-*`, `http2`, `grpc*`, `tcp*`, ...).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    Http1,
    Http2,
    /// Not HTTP (tcp, tls, https, databases, websockets declared as such).
    Opaque,
    /// Nothing declared: the node proxy sniffs.
    Unknown,
}

pub fn declared(app_protocol: &str, port_name: &str) -> Declared {
    let p = if app_protocol.is_empty() {
        port_name.split('-').next().unwrap_or("")
    } else {
        app_protocol
    };
    match p.to_ascii_lowercase().as_str() {
        "http" => Declared::Http1,
        "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c" => Declared::Http2,
        "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" | "kubernetes.io/ws"
        | "kubernetes.io/wss" => Declared::Opaque,
        _ => Declared::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations() {
        assert_eq!(declared("", "http-web"), Declared::Http1);
        assert_eq!(declared("", "http"), Declared::Http1);
        assert_eq!(declared("", "grpc-api"), Declared::Http2);
        assert_eq!(declared("kubernetes.io/h2c", "x"), Declared::Http2);
        assert_eq!(declared("tcp", "http"), Declared::Opaque);
        assert_eq!(declared("", "tcp-db"), Declared::Opaque);
        assert_eq!(declared("", "web"), Declared::Unknown);
        assert_eq!(declared("", ""), Declared::Unknown);
    }
}
