//! HTTP/2 settings of both HBONE sides: large windows and frames for bulk streams,
//! no server push, and a cap on streams per connection (the client pool opens
//! another connection when one is full).

/// Streams one HBONE connection carries at most.
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// Large HTTP/2 DATA frames: fewer frames (and TLS records) per byte in bulk transfers.
const MAX_FRAME: u32 = 256 << 10;

/// The client side (the source node).
pub fn client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    b
}

/// The server side (the destination node).
pub fn server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_STREAMS_PER_CONN as u32)
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(1 << 20);
    b
}
