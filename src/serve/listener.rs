//! A small HTTP/1.1 server: a thread per connection, keep-alive, bounded request heads, read
//! timeouts for clients that never finish, and each response written in one piece with
//! TCP_NODELAY (a head and a body written apart would wait on the peer's delayed ACK, 40 ms).
//!
//! Only GET without a body is served, which is all the API needs; a request with a body is
//! refused rather than read.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 2048;
/// A client that sends nothing for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One parsed request.
pub struct Request {
    pub method: String,
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What a handler answers.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Binds `address` and serves each connection on its own thread with `handler`.
pub fn listen<H>(address: &str, handler: H) -> std::io::Result<SocketAddr>
where
    H: Fn(&Request) -> Response + Send + Sync + 'static,
{
    let listener = TcpListener::bind(address)?;
    let local = listener.local_addr()?;
    let handler = Arc::new(handler);
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("clickagg-http-accept".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = write_response(&mut stream, &busy(), false);
                continue;
            }
            let handler = Arc::clone(&handler);
            let open = Arc::clone(&open);
            let spawned = std::thread::Builder::new().name("clickagg-http".into()).spawn(move || {
                serve_connection(stream, &*handler);
                open.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                // Out of threads: the stream was moved into the failed closure and is closed.
                eprintln!("clickagg: could not start a thread for an HTTP connection");
            }
        }
    })?;
    Ok(local)
}

fn busy() -> Response {
    Response { status: 503, content_type: "application/json", body: r#"{"error":"too many connections","status":503}"#.into() }
}

fn serve_connection(stream: TcpStream, handler: &dyn Fn(&Request) -> Response) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        match read_request(&mut reader) {
            Ok(Some(request)) => {
                let keep_alive = !request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                let response = handler(&request);
                if write_response(&mut writer, &response, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
            Ok(None) => return,
            Err(response) => {
                let _ = write_response(&mut writer, &response, false);
                return;
            }
        }
    }
}

fn failure(status: u16, message: &str) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: serde_json::json!({ "error": message, "status": status }).to_string(),
    }
}

/// Reads one request head. `Ok(None)`: the client closed or went idle between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, Response> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let read = reader
            .by_ref()
            .take((MAX_HEAD_BYTES + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head);
        match read {
            Ok(0) if head.is_empty() => return Ok(None),
            Ok(0) => return Err(failure(400, "the request ended before its head did")),
            Ok(_) => {}
            Err(e) if head.is_empty() && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ok(None),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(failure(408, "the request head did not arrive in time"))
            }
            Err(_) => return Ok(None),
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(failure(431, &format!("the request head is longer than {MAX_HEAD_BYTES} bytes")));
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // Blank lines between requests are tolerated (RFC 9112 §2.2).
                head.clear();
                continue;
            }
            break;
        }
    }
    let text = std::str::from_utf8(&head).map_err(|_| failure(400, "the request head is not UTF-8"))?;
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(failure(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Err(failure(400, "malformed request line"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| failure(400, "malformed header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let request = Request { method: method.to_string(), target: target.to_string(), headers };
    let has_body = request.header("content-length").is_some_and(|l| l != "0") || request.header("transfer-encoding").is_some();
    if has_body {
        return Err(failure(413, "request bodies are not accepted: every endpoint is a GET"));
    }
    if version == "HTTP/1.0" && !request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("keep-alive")) {
        let mut request = request;
        request.headers.push(("connection".into(), "close".into()));
        return Ok(Some(request));
    }
    Ok(Some(request))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_response(stream: &mut TcpStream, response: &Response, keep_alive: bool) -> std::io::Result<()> {
    let mut bytes = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: {}\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    bytes.extend_from_slice(response.body.as_bytes());
    stream.write_all(&bytes)?;
    stream.flush()
}
