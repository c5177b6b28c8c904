//! A tiny application for the capture tests, run inside pod network namespaces.
//!
//! `server --listen ADDR`: for each connection, reads to EOF and answers with the
//! hex SHA-256 of what it received.
//! `client --connect ADDR --bytes N [--parallel P]`: sends N deterministic bytes on
//! each of P connections, half-closes, checks the server's SHA-256, and prints
//! `peer=<getpeername>` and `ok` (exit 1 on any mismatch).
//! `get --connect ADDR --path P`: one HTTP/1.1 GET, printed as JSON (status,
//! headers, body), for images whose busybox wget shows no body for an error status.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Server {
        #[arg(long)]
        listen: SocketAddr,
        /// Count accepted connections in this file (rewritten after each one).
        #[arg(long)]
        count_file: Option<std::path::PathBuf>,
    },
    /// HTTP server (HTTP/1.1 and h2c prior knowledge): answers every request with
    /// 200, body `<method> <path-and-query>`, header `x-app: testapp`, and echoes the
    /// request header `x-echo`.
    ///
    /// With `--name N` every response also carries `x-served-by: N`; with
    /// `--fail-every K` every K-th request (1st, K+1-th, ...) gets a 503 instead;
    /// a path `/delay/<ms>` is answered after that many milliseconds; gRPC requests
    /// (content-type `application/grpc`) get `grpc-status: 0` in trailers.
    Http {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0)]
        fail_every: usize,
        /// Count requests whose path starts with `/count` in this file (rewritten after
        /// each one).
        #[arg(long)]
        count_file: Option<std::path::PathBuf>,
    },
    /// A real gRPC server (tonic) with one unary method, `/weft.test.Echo/Call`
    /// (also served as `/weft.test.Other/Call`): it answers with `--name` (in the
    /// `nonce` of a `weft.v1.Ack`).
    GrpcServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// `count` unary calls from a real gRPC client (tonic) over ONE channel (one
    /// HTTP/2 connection), `concurrency` at a time, to `method`. Prints one JSON
    /// line: `{"served_by": {name: n}, "codes": {grpc code: n}}`.
    GrpcCalls {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "/weft.test.Echo/Call")]
        method: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Many HTTP requests to `connect` over ONE connection (HTTP/1.1 keep-alive, or
    /// h2c prior knowledge with `--h2`), `concurrency` at a time (HTTP/2 only).
    /// Prints one JSON line: `{"status": {code: n}, "served_by": {name: n},
    /// "errors": n, "header": {value of --show-header: n}}`.
    Requests {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Request headers, `name:value`.
        #[arg(long)]
        header: Vec<String>,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A response header whose values are counted.
        #[arg(long)]
        show_header: Option<String>,
        /// The Host header / :authority.
        #[arg(long, default_value = "echo")]
        host: String,
        /// gRPC-shaped requests: POST, `content-type: application/grpc`, `te: trailers`.
        #[arg(long)]
        grpc: bool,
        /// Requests sent first and left out of the latency figures.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
    },
    /// One HTTP/1.1 request (`Connection: close`) to `connect`; prints one JSON line
    /// `{"status", "headers": {lower-case name: value}, "body"}`, or exits 1 with
    /// the error (busybox wget shows no body for an error status).
    Get {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        /// The Host header (default: the address).
        #[arg(long)]
        host: Option<String>,
        /// An extra request header, `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Echo server: writes back whatever it reads.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Minimal TCP relay (the benchmarks' floor for a user-space hop): every accepted
    /// connection is joined to a new connection to `connect` by two threads copying
    /// with blocking reads and writes (no TLS, no framing, half-close propagated).
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        connect: SocketAddr,
    },
    /// Request/response latency over one connection: prints `p50_us p99_us`.
    Rr {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 10000)]
        count: usize,
    },
    /// Traffic through a disruption (an agent roll-out, a crash) against an `echo`
    /// server: one long-lived connection exchanging a line every interval, and a
    /// new short connection every interval, for `seconds`. Prints one JSON line:
    /// `{"new_ok", "new_failed", "long_lived_ok", "long_lived_error",
    /// "failures": [[ms, error], ...]}` (the first failures, with when they were).
    Flow {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// No long-lived connection (for a client that must be denied).
        #[arg(long)]
        no_long_lived: bool,
    },
    /// Connect + first byte latency (a new connection each time): prints `p50_us p99_us`.
    Cfb {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// A SPIFFE Workload API client (the `spiffe` crate): prints, as JSON, the
    /// caller's X.509-SVID SPIFFE ID and chain length, a JWT-SVID for `--audience`
    /// and the result of validating it, or the error of the first call that failed.
    Spiffe {
        /// `unix:///path/to/socket`.
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value = "weft-test")]
        audience: String,
    },
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Keep the connection open this long before finishing (a long-lived flow).
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Send this text, repeated, instead of the binary pattern (to look for it
        /// in packet captures).
        #[arg(long)]
        text: Option<String>,
        /// Connections made one after another by each parallel worker.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
    },
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    s.write_all(hex::encode(h.finalize()).as_bytes())?;
    s.shutdown(Shutdown::Write)
}

fn client(
    addr: SocketAddr,
    bytes: usize,
    hold_ms: u64,
    text: Option<&str>,
) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut sent = 0;
    let mut chunk = vec![0u8; 1 << 16];
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        for (j, b) in chunk[..n].iter_mut().enumerate() {
            *b = match text {
                Some(t) if !t.is_empty() => t.as_bytes()[(sent + j) % t.len()],
                _ => pattern(sent + j),
            };
        }
        s.write_all(&chunk[..n])
            .map_err(|e| format!("write: {e}"))?;
        h.update(&chunk[..n]);
        sent += n;
    }
    if hold_ms > 0 {
        // Hold the connection open, noticing if the peer (or the mesh) closes it:
        // the server sends nothing before our EOF, so any read result is a close.
        s.set_read_timeout(Some(std::time::Duration::from_millis(hold_ms)))
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Ok(0) => return Err("connection closed by the peer while held open".into()),
            Ok(_) => return Err("unexpected data while held open".into()),
            Err(e) => return Err(format!("connection broken while held open: {e}")),
        }
        s.set_read_timeout(None).map_err(|e| e.to_string())?;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let want = hex::encode(h.finalize());
    if answer != want {
        return Err(format!(
            "checksum mismatch: server saw {answer:?}, sent {want}"
        ));
    }
    Ok(peer.to_string())
}

/// One exchange with an echo server on `s`: `msg` out, the same back.
fn exchange(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other(format!(
            "echoed {:?}, sent {:?}",
            String::from_utf8_lossy(&back),
            String::from_utf8_lossy(msg)
        )));
    }
    Ok(())
}

/// See `Cmd::Flow`.
fn flow(addr: SocketAddr, seconds: u64, interval_ms: u64, long_lived: bool) -> String {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let interval = Duration::from_millis(interval_ms.max(1));
    let timeout = Some(Duration::from_secs(2));
    let failures: Arc<Mutex<Vec<(u128, String)>>> = Arc::default();
    let fail = {
        let failures = failures.clone();
        move |what: String| {
            let mut f = failures.lock().unwrap_or_else(|p| p.into_inner());
            if f.len() < 20 {
                f.push((start.elapsed().as_millis(), what));
            }
        }
    };
    let long = long_lived.then(|| {
        let fail = fail.clone();
        std::thread::spawn(move || -> Result<(), String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("long-lived connect: {e}"))?;
            let _ = s.set_nodelay(true);
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            let mut i = 0u64;
            while Instant::now() < end {
                if let Err(e) = exchange(&mut s, format!("ping{i:06}\n").as_bytes()) {
                    let msg = format!("long-lived connection, exchange {i}: {e}");
                    fail(msg.clone());
                    return Err(msg);
                }
                i += 1;
                std::thread::sleep(interval);
            }
            Ok(())
        })
    });
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut i = 0u64;
    while Instant::now() < end {
        let r = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            exchange(&mut s, format!("new{i:06}\n").as_bytes())
        });
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                fail(format!("new connection {i}: {e}"));
            }
        }
        i += 1;
        std::thread::sleep(interval);
    }
    let long = long.map(|t| {
        t.join()
            .unwrap_or_else(|_| Err("long-lived thread panicked".into()))
    });
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    serde_json::json!({
        "new_ok": ok,
        "new_failed": failed,
        "long_lived_ok": long.as_ref().map(|r| r.is_ok()),
        "long_lived_error": long.and_then(|r| r.err()),
        "failures": failures,
    })
    .to_string()
}

/// See `Cmd::Get`.
fn http_get(
    addr: SocketAddr,
    path: &str,
    host: &str,
    headers: &[String],
) -> Result<serde_json::Value, String> {
    use std::time::Duration;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weft-testapp\r\n{extra}Connection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    // The head, then the body: Content-Length bytes, or up to EOF.
    let (head_len, mut want) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            break (i + 4, len);
        }
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("read (after {:?}): {e}", String::from_utf8_lossy(&buf)))?;
        if n == 0 {
            return Err(format!(
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    loop {
        if want.is_some_and(|w| buf.len() >= head_len + w) {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                want = want.map(|w| w.min(buf.len() - head_len));
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("reading the body: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&buf[..head_len - 4]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut headers = serde_json::Map::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
        }
    }
    let end = want.map_or(buf.len(), |w| head_len + w);
    Ok(serde_json::json!({
        "status": status,
        "headers": headers,
        "body": String::from_utf8_lossy(&buf[head_len..end]),
    }))
}

fn percentiles(mut v: Vec<u128>) -> (f64, f64) {
    v.sort_unstable();
    let at = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    (at(0.5), at(0.99))
}

fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Copies `from` to `to` until EOF, then half-closes `to`.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 128 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn relay(down: TcpStream, to: SocketAddr) -> std::io::Result<()> {
    let up = TcpStream::connect(to)?;
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let (down2, up2) = (down.try_clone()?, up.try_clone()?);
    std::thread::spawn(move || pipe(down, up));
    std::thread::spawn(move || pipe(up2, down2));
    Ok(())
}

fn rr(addr: SocketAddr, size: usize, count: usize) -> std::io::Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let req = vec![7u8; size];
    let mut resp = vec![0u8; size];
    let mut lat = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let t = std::time::Instant::now();
        s.write_all(&req)?;
        s.read_exact(&mut resp)?;
        if i >= count / 10 {
            lat.push(t.elapsed().as_nanos()); // first 10 % are warm-up
        }
    }
    Ok(percentiles(lat))
}

fn cfb(addr: SocketAddr, count: usize) -> std::io::Result<(f64, f64)> {
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        let t = std::time::Instant::now();
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_nanos());
    }
    Ok(percentiles(lat))
}

fn http_server(
    listen: SocketAddr,
    name: Option<String>,
    fail_every: usize,
    count_file: Option<std::path::PathBuf>,
) {
    let name: &'static Option<String> = Box::leak(Box::new(name));
    let count_file: &'static Option<std::path::PathBuf> = Box::leak(Box::new(count_file));
    let counted: &'static std::sync::atomic::AtomicUsize =
        Box::leak(Box::new(std::sync::atomic::AtomicUsize::new(0)));
    let seen: &'static std::sync::atomic::AtomicUsize =
        Box::leak(Box::new(std::sync::atomic::AtomicUsize::new(0)));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1)
        }
    };
    rt.block_on(async move {
        let l = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind {listen}: {e}");
                std::process::exit(1)
            }
        };
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let (Some(f), true) =
                            (count_file, req.uri().path().starts_with("/count"))
                        {
                            let c = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            let _ = std::fs::write(f, c.to_string());
                        }
                        if let Some(ms) = req
                            .uri()
                            .path()
                            .strip_prefix("/delay/")
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        }
                        let grpc = req
                            .headers()
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        let echo = req.headers().get("x-echo").cloned();
                        let seen_headers: Vec<String> = req
                            .headers()
                            .iter()
                            .filter(|(k, _)| {
                                k.as_str().starts_with("x-") || k.as_str() == "authorization"
                            })
                            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("")))
                            .collect();
                        let line = format!(
                            "{} {}",
                            req.method(),
                            req.uri()
                                .path_and_query()
                                .map(|p| p.as_str())
                                .unwrap_or("/")
                        );
                        // Drain the request body.
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        let body = match name {
                            Some(_) => format!("{line}\n{}", seen_headers.join(" ")),
                            None => line,
                        };
                        let mut r =
                            http::Response::new(TestBody::new(bytes::Bytes::from(body), grpc));
                        r.headers_mut()
                            .insert("x-app", http::HeaderValue::from_static("testapp"));
                        if let Some(v) = echo {
                            r.headers_mut().insert("x-echo", v);
                        }
                        if let Some(v) = name
                            .as_deref()
                            .and_then(|n| http::HeaderValue::from_str(n).ok())
                        {
                            r.headers_mut().insert("x-served-by", v);
                        }
                        if grpc {
                            r.headers_mut().insert(
                                "content-type",
                                http::HeaderValue::from_static("application/grpc"),
                            );
                        }
                        if fail_every > 0 && n.is_multiple_of(fail_every) {
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
}

fn spiffe_client(endpoint: &str, audience: &str) -> serde_json::Value {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return serde_json::json!({"error": format!("runtime: {e}")}),
    };
    rt.block_on(async {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            serde_json::json!({"error": format!("{what}: {e}")})
        };
        let client = match spiffe::WorkloadApiClient::connect_to(endpoint).await {
            Ok(c) => c,
            Err(e) => return fail("connect", &e),
        };
        let svid = match client.fetch_x509_svid().await {
            Ok(s) => s,
            Err(e) => return fail("fetch_x509_svid", &e),
        };
        let jwt = match client.fetch_jwt_svid([audience], None).await {
            Ok(j) => j,
            Err(e) => return fail("fetch_jwt_svid", &e),
        };
        let valid = match client.validate_jwt_token(audience, jwt.token()).await {
            Ok(v) => v.spiffe_id().to_string(),
            Err(e) => return fail("validate_jwt_token", &e),
        };
        serde_json::json!({
            "x509_spiffe_id": svid.spiffe_id().to_string(),
            "x509_chain": svid.cert_chain().len(),
            "jwt_spiffe_id": jwt.spiffe_id().to_string(),
            "jwt": jwt.token(),
            "validated_spiffe_id": valid,
        })
    })
}

fn main() {
    match Args::parse().cmd {
        Cmd::Http {
            listen,
            name,
            fail_every,
            count_file,
        } => http_server(listen, name, fail_every, count_file),
        Cmd::GrpcServer { listen, name } => {
            if let Err(e) = grpc::serve(listen, name) {
                eprintln!("grpc-server: {e}");
                std::process::exit(1)
            }
        }
        Cmd::GrpcCalls {
            connect,
            method,
            count,
            concurrency,
        } => match grpc::calls(connect, &method, count, concurrency) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("grpc-calls to {connect}: {e}");
                std::process::exit(1)
            }
        },
        Cmd::Requests {
            connect,
            path,
            count,
            h2,
            concurrency,
            header,
            method,
            show_header,
            host,
            grpc,
            warmup,
        } => {
            let o = RequestsOpts {
                grpc,
                warmup,
                path,
                count,
                h2,
                concurrency,
                headers: header,
                method,
                show_header,
                host,
            };
            match requests(connect, o) {
                Ok(v) => println!("{v}"),
                Err(e) => {
                    eprintln!("requests to {connect}: {e}");
                    std::process::exit(1)
                }
            }
        }
        Cmd::Flow {
            connect,
            seconds,
            interval_ms,
            no_long_lived,
        } => {
            println!("{}", flow(connect, seconds, interval_ms, !no_long_lived));
        }
        Cmd::Get {
            connect,
            path,
            host,
            headers,
        } => match http_get(
            connect,
            &path,
            &host.unwrap_or_else(|| connect.to_string()),
            &headers,
        ) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("get http://{connect}{path}: {e}");
                std::process::exit(1)
            }
        },
        Cmd::Echo { listen } => {
            let l = TcpListener::bind(listen).unwrap_or_else(|e| {
                eprintln!("bind {listen}: {e}");
                std::process::exit(1)
            });
            for s in l.incoming().flatten() {
                std::thread::spawn(move || echo(s));
            }
        }
        Cmd::Relay { listen, connect } => {
            let l = TcpListener::bind(listen).unwrap_or_else(|e| {
                eprintln!("bind {listen}: {e}");
                std::process::exit(1)
            });
            for s in l.incoming().flatten() {
                if let Err(e) = relay(s, connect) {
                    eprintln!("relay to {connect}: {e}");
                }
            }
        }
        Cmd::Rr {
            connect,
            size,
            count,
        } => match rr(connect, size, count) {
            Ok((p50, p99)) => println!("{p50:.1} {p99:.1}"),
            Err(e) => {
                eprintln!("rr: {e}");
                std::process::exit(1)
            }
        },
        Cmd::Cfb { connect, count } => match cfb(connect, count) {
            Ok((p50, p99)) => println!("{p50:.1} {p99:.1}"),
            Err(e) => {
                eprintln!("cfb: {e}");
                std::process::exit(1)
            }
        },
        Cmd::Server { listen, count_file } => {
            let l = match TcpListener::bind(listen) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("bind {listen}: {e}");
                    std::process::exit(1);
                }
            };
            println!("listening {listen}");
            let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for s in l.incoming().flatten() {
                if let Some(f) = &count_file {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let _ = std::fs::write(f, n.to_string());
                }
                std::thread::spawn(move || {
                    let _ = serve(s);
                });
            }
        }
        Cmd::Spiffe { endpoint, audience } => println!("{}", spiffe_client(&endpoint, &audience)),
        Cmd::Client {
            connect,
            bytes,
            parallel,
            hold_ms,
            text,
            repeat,
        } => {
            let text: &'static Option<String> = Box::leak(Box::new(text));
            let handles: Vec<_> = (0..parallel)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut last = Ok(String::new());
                        for _ in 0..repeat.max(1) {
                            last = client(connect, bytes, hold_ms, text.as_deref());
                            if last.is_err() {
                                break;
                            }
                        }
                        last
                    })
                })
                .collect();
            let mut failed = false;
            for h in handles {
                match h.join() {
                    Ok(Ok(peer)) => println!("peer={peer}"),
                    Ok(Err(e)) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                    Err(_) => failed = true,
                }
            }
            if failed {
                std::process::exit(1);
            }
            println!("ok");
        }
    }
}

/// A response body: the text, then (for gRPC) trailers with `grpc-status: 0`.
struct TestBody {
    data: Option<bytes::Bytes>,
    trailers: bool,
}

impl TestBody {
    fn new(data: bytes::Bytes, grpc: bool) -> Self {
        Self {
            data: Some(data),
            trailers: grpc,
        }
    }
}

impl hyper::body::Body for TestBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        if self.trailers {
            self.trailers = false;
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::trailers(t))));
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.trailers
    }

    /// Exact without trailers, so HTTP/1.1 answers carry a Content-Length.
    fn size_hint(&self) -> hyper::body::SizeHint {
        match (&self.data, self.trailers) {
            (Some(d), false) => hyper::body::SizeHint::with_exact(d.len() as u64),
            (None, false) => hyper::body::SizeHint::with_exact(0),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

struct RequestsOpts {
    grpc: bool,
    warmup: usize,
    path: String,
    count: usize,
    h2: bool,
    concurrency: usize,
    headers: Vec<String>,
    method: String,
    show_header: Option<String>,
    host: String,
}

fn requests(addr: SocketAddr, o: RequestsOpts) -> Result<serde_json::Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io = hyper_util::rt::TokioIo::new(tcp);
        enum Sender {
            H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
            H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
        }
        let sender = if o.h2 {
            let (s, c) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(c);
            Sender::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(c);
            Sender::H1(s)
        };
        let build = |o: &RequestsOpts| -> Result<http::Request<http_body_util::Empty<bytes::Bytes>>, String> {
            let uri = if o.h2 {
                format!("http://{}{}", o.host, o.path)
            } else {
                o.path.clone()
            };
            let method = if o.grpc { "POST" } else { o.method.as_str() };
            let mut b = http::Request::builder().method(method).uri(uri);
            if o.grpc {
                b = b
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
            }
            if !o.h2 {
                b = b.header("host", o.host.as_str());
            }
            for h in &o.headers {
                let (k, v) = h.split_once(':').ok_or(format!("header {h:?}: want name:value"))?;
                b = b.header(k.trim(), v.trim());
            }
            b.body(http_body_util::Empty::new()).map_err(|e| e.to_string())
        };
        let mut status: std::collections::BTreeMap<String, usize> = Default::default();
        let mut served: std::collections::BTreeMap<String, usize> = Default::default();
        let mut shown: std::collections::BTreeMap<String, usize> = Default::default();
        let mut errors = 0usize;
        let mut last_error = String::new();
        let mut count_resp = |r: Result<http::response::Parts, String>| match r {
            Ok(p) => {
                *status.entry(p.status.as_u16().to_string()).or_default() += 1;
                let by = p
                    .headers
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                *served.entry(by).or_default() += 1;
                if let Some(h) = &o.show_header {
                    let v = p
                        .headers
                        .get(h.as_str())
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_string();
                    *shown.entry(v).or_default() += 1;
                }
            }
            Err(e) => {
                errors += 1;
                last_error = e;
            }
        };
        let mut lat_us: Vec<f64> = Vec::new();
        let started = std::time::Instant::now();
        let mut measured_from = started;
        match sender {
            Sender::H1(mut s) => {
                for i in 0..o.count + o.warmup {
                    if i == o.warmup {
                        measured_from = std::time::Instant::now();
                    }
                    let t = std::time::Instant::now();
                    if let Err(e) = s.ready().await {
                        count_resp(Err(format!("connection: {e}")));
                        break;
                    }
                    match s.send_request(build(&o)?).await {
                        Ok(resp) => {
                            let (parts, body) = resp.into_parts();
                            match body.collect().await {
                                Ok(_) => {
                                    if i >= o.warmup {
                                        lat_us.push(t.elapsed().as_nanos() as f64 / 1000.0);
                                        count_resp(Ok(parts));
                                    }
                                }
                                Err(e) => count_resp(Err(e.to_string())),
                            }
                        }
                        Err(e) => {
                            count_resp(Err(e.to_string()));
                            break;
                        }
                    }
                }
            }
            Sender::H2(s) => {
                let total = o.count + o.warmup;
                let mut set = tokio::task::JoinSet::new();
                let mut sent = 0;
                while sent < total || !set.is_empty() {
                    while sent < total && set.len() < o.concurrency.max(1) {
                        if sent == o.warmup {
                            measured_from = std::time::Instant::now();
                        }
                        let mut s = s.clone();
                        let req = build(&o)?;
                        let counted = sent >= o.warmup;
                        set.spawn(async move {
                            let t = std::time::Instant::now();
                            let r = s.send_request(req).await.map_err(|e| e.to_string())?;
                            let (parts, body) = r.into_parts();
                            body.collect().await.map_err(|e| e.to_string())?;
                            Ok::<_, String>((parts, counted, t.elapsed()))
                        });
                        sent += 1;
                    }
                    if let Some(j) = set.join_next().await {
                        match j.map_err(|e| e.to_string())? {
                            Ok((parts, true, took)) => {
                                lat_us.push(took.as_nanos() as f64 / 1000.0);
                                count_resp(Ok(parts));
                            }
                            Ok((_, false, _)) => {}
                            Err(e) => count_resp(Err(e)),
                        }
                    }
                }
            }
        }
        let secs = measured_from.elapsed().as_secs_f64().max(1e-9);
        lat_us.sort_by(f64::total_cmp);
        let at = |q: f64| {
            lat_us
                .get(((lat_us.len() as f64 * q) as usize).min(lat_us.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        Ok(serde_json::json!({
            "rps": lat_us.len() as f64 / secs,
            "p50_us": at(0.5),
            "p99_us": at(0.99),
            "status": status,
            "served_by": served,
            "header": shown,
            "errors": errors,
            "last_error": last_error,
        }))
    })
}

/// A real gRPC server and client (tonic, no generated code: a `weft.v1.Ack` message
/// carries the server's name both ways).
mod grpc {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
    use weft_proto::pb::Ack;

    #[derive(Clone)]
    struct Echo(std::sync::Arc<str>);

    impl tonic::server::NamedService for Echo {
        const NAME: &'static str = "weft.test.Echo";
    }

    struct Unary(std::sync::Arc<str>);

    impl tonic::server::UnaryService<Ack> for Unary {
        type Response = Ack;
        type Future = BoxFuture<tonic::Response<Ack>, tonic::Status>;

        fn call(&mut self, _req: tonic::Request<Ack>) -> Self::Future {
            let nonce = self.0.to_string();
            Box::pin(async move { Ok(tonic::Response::new(Ack { nonce })) })
        }
    }

    impl Service<http::Request<tonic::body::Body>> for Echo {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            let name = self.0.clone();
            Box::pin(async move {
                let path = req.uri().path().to_string();
                if path != "/weft.test.Echo/Call" && path != "/weft.test.Other/Call" {
                    return Ok(tonic::Status::unimplemented(path).into_http());
                }
                let mut g =
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<Ack, Ack>::default());
                Ok(g.unary(Unary(name), req).await)
            })
        }
    }

    pub fn serve(listen: SocketAddr, name: String) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            // The router serves any path it is given to the one service.
            let echo = Echo(name.into());
            tonic::transport::Server::builder()
                .add_service(echo.clone())
                .add_service(Other(echo))
                .serve(listen)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// `weft.test.Other`: the same service under a second name, so routes can
    /// match on the service part of a method.
    #[derive(Clone)]
    struct Other(Echo);

    impl tonic::server::NamedService for Other {
        const NAME: &'static str = "weft.test.Other";
    }

    impl Service<http::Request<tonic::body::Body>> for Other {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            self.0.call(req)
        }
    }

    pub fn calls(
        addr: SocketAddr,
        method: &str,
        count: usize,
        concurrency: usize,
    ) -> Result<serde_json::Value, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let path: http::uri::PathAndQuery = method.parse().map_err(|e| format!("{method}: {e}"))?;
        rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut served: BTreeMap<String, usize> = BTreeMap::new();
            let mut codes: BTreeMap<String, usize> = BTreeMap::new();
            let mut set = tokio::task::JoinSet::new();
            let mut sent = 0;
            while sent < count || !set.is_empty() {
                while sent < count && set.len() < concurrency.max(1) {
                    let mut g = tonic::client::Grpc::new(channel.clone());
                    let path = path.clone();
                    set.spawn(async move {
                        g.ready()
                            .await
                            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        g.unary(
                            tonic::Request::new(Ack::default()),
                            path,
                            tonic_prost::ProstCodec::<Ack, Ack>::default(),
                        )
                        .await
                        .map(|r| r.into_inner().nonce)
                    });
                    sent += 1;
                }
                if let Some(j) = set.join_next().await {
                    match j.map_err(|e| e.to_string())? {
                        Ok(name) => {
                            *served.entry(name).or_default() += 1;
                            *codes.entry("OK".into()).or_default() += 1;
                        }
                        Err(s) => *codes.entry(format!("{:?}", s.code())).or_default() += 1,
                    }
                }
            }
            Ok(serde_json::json!({"served_by": served, "codes": codes}))
        })
    }
}
