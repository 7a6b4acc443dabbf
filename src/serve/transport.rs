//! HTTP/1.1 on hyper, on a small tokio runtime of its own: keep-alive, pipelining in order,
//! bounded heads and output, and every refusal a JSON body.
//!
//! The runtime has as many threads as the dataflow's workers leave cores (see
//! [`super::http::event_loops_beside`]): on two cores shared with the workers, one thread that
//! answers every ready connection in turn keeps the wait of each request to one pass over the
//! others; answers are rendered from memory and cached per watermark, so a pass costs little.
//! A request whose answer waits on the workers (a peek) must not hold that thread: it is
//! answered on tokio's blocking pool, at most [`MAX_WAITING`] at once, and the connection's
//! later requests wait for it (answers stay in order).
//!
//! Each socket is wrapped in a [`Guarded`], which hands hyper whole, valid request heads only
//! and writes the JSON answers hyper has none for (400, 408, 431); the service answers 413 to a
//! request with a body and everything else through the [`Handler`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::guard::{error_response, Guarded};

/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 2048;
/// Requests waiting on the workers at once; more are answered 503.
pub const MAX_WAITING: usize = 64;
/// The most a connection buffers, for input hyper has been handed and for output not yet
/// taken by the client (hyper's `max_buf_size`; a response larger than this is still sent
/// whole, but the next one waits for it).
const MAX_BUFFERED: usize = 64 * 1024;

/// One request, as the handler sees it.
pub struct Request {
    pub method: String,
    /// The path and query, as sent.
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

/// What the server asks of the application.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `request`.
    fn respond(&self, request: &Request) -> Response;
    /// Whether answering `request` may wait on something outside memory. Such requests are
    /// answered on the blocking pool; the others on the runtime's threads, which must not block.
    fn waits(&self, request: &Request) -> bool;
    /// Called about once a second on the runtime, for figures measured over time.
    fn tick(&self) {}
}

/// `PORT` or `:PORT` alone means that port on 127.0.0.1; anything else is bound as given.
pub fn bind_address(text: &str) -> String {
    match text.strip_prefix(':').unwrap_or(text).parse::<u16>() {
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(_) => text.to_string(),
    }
}

/// Binds `address` and serves its connections with `handler` on a runtime of `threads` threads
/// (at least one) until the process ends. Fails at once if the address cannot be bound.
///
/// One thread is a current-thread runtime on a thread of its own: every connection is served
/// by that thread in turn, with no work-stealing scheduler to wake, which is what one core left
/// by the workers can give.
pub fn listen<H: Handler>(address: &str, handler: H, threads: usize) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(bind_address(address))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = builder.max_blocking_threads(MAX_WAITING).thread_name("clickagg-http").enable_io().enable_time().build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let shared = Arc::new(Shared { handler, open: Arc::new(AtomicUsize::new(0)), waiting: AtomicUsize::new(0) });
    let ticking = Arc::clone(&shared);
    let serving = async move {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                ticking.handler.tick();
            }
        });
        accept(listener, shared).await
    };
    // The runtime serves until the process ends, driven by a thread of its own (a current-thread
    // runtime runs its tasks only there).
    std::thread::Builder::new().name("clickagg-http".into()).spawn(move || runtime.block_on(serving))?;
    Ok(local)
}

struct Shared<H> {
    handler: H,
    /// Connections open.
    open: Arc<AtomicUsize>,
    /// Requests being answered on the blocking pool.
    waiting: AtomicUsize,
}

/// Counts one open connection while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept<H: Handler>(listener: tokio::net::TcpListener, shared: Arc<Shared<H>>) {
    let mut builder = http1::Builder::new();
    builder.keep_alive(true).half_close(true).max_buf_size(MAX_BUFFERED).header_read_timeout(None);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, or a connection reset before it was accepted: try again soon.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.try_write(&error_response(503, "too many connections"));
            continue;
        }
        let open = Open(Arc::clone(&shared.open));
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let connection = builder.serve_connection(
            TokioIo::new(Guarded::new(stream)),
            service_fn(move |request| answer(request, Arc::clone(&shared))),
        );
        tokio::spawn(async move {
            // An error here is the client's (a reset, a timeout): the connection just ends.
            let _ = connection.await;
            drop(open);
        });
    }
}

/// Frees a place on the blocking pool when the request using it is answered (or panics).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The answer to one request: 413 to one with a body, else the handler's, on the blocking pool
/// when it waits.
async fn answer<H: Handler>(request: hyper::Request<Incoming>, shared: Arc<Shared<H>>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    if !request.body().is_end_stream() {
        return Ok(response(failure(413, "request bodies are not accepted: every endpoint is a GET"), false));
    }
    let request = Request {
        method: request.method().as_str().to_string(),
        target: request.uri().path_and_query().map_or_else(|| request.uri().to_string(), |p| p.as_str().to_string()),
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect(),
    };
    if !shared.handler.waits(&request) {
        return Ok(response(shared.handler.respond(&request), true));
    }
    if shared.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING {
        shared.waiting.fetch_sub(1, Ordering::SeqCst);
        return Ok(response(failure(503, &format!("more than {MAX_WAITING} filtered queries at once")), true));
    }
    let on_pool = Arc::clone(&shared);
    let answered = tokio::task::spawn_blocking(move || {
        let _place = Waiting(&on_pool.waiting);
        on_pool.handler.respond(&request)
    })
    .await;
    Ok(match answered {
        Ok(answer) => response(answer, true),
        Err(_) => response(failure(500, "the query failed"), false),
    })
}

fn failure(status: u16, message: &str) -> Response {
    Response { status, content_type: "application/json", body: serde_json::json!({ "error": message, "status": status }).to_string() }
}

/// `answer` as hyper sends it; the connection closes after it unless `keep_alive` (and the
/// client's own wish, which hyper honours).
fn response(answer: Response, keep_alive: bool) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = hyper::StatusCode::from_u16(answer.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(answer.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !keep_alive {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};
    use std::time::Instant;

    /// Echoes the target; `/wait...` waits on the blocking pool, 100 ms (`/wait/long`: 2 s);
    /// `/big` is a 4 MB body, more than a socket buffer takes.
    struct Echo;

    impl Handler for Echo {
        fn respond(&self, request: &Request) -> Response {
            let body = match request.target.as_str() {
                "/big" => "b".repeat(4 << 20),
                target if target.starts_with("/wait") => {
                    std::thread::sleep(Duration::from_millis(if target == "/wait/long" { 2000 } else { 100 }));
                    target.to_string()
                }
                target => target.to_string(),
            };
            Response { status: 200, content_type: "text/plain", body }
        }

        fn waits(&self, request: &Request) -> bool {
            request.target.starts_with("/wait")
        }
    }

    /// Reads one response off `stream`: its status and body.
    fn read_response(stream: &mut std::io::BufReader<std::net::TcpStream>) -> (u16, String) {
        let mut length = 0;
        let mut status = 0;
        loop {
            let mut line = String::new();
            assert!(stream.read_line(&mut line).unwrap() > 0, "the connection closed before a response");
            if line.starts_with("HTTP/1.1 ") {
                status = line[9..12].parse().unwrap();
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    fn body(stream: &mut std::io::BufReader<std::net::TcpStream>) -> String {
        read_response(stream).1
    }

    fn connect(address: SocketAddr) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = std::io::BufReader::new(stream.try_clone().unwrap());
        (stream, reader)
    }

    fn rest(reader: &mut std::io::BufReader<std::net::TcpStream>) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        rest
    }

    #[test]
    fn a_port_alone_means_loopback() {
        assert_eq!(bind_address("8080"), "127.0.0.1:8080");
        assert_eq!(bind_address(":8080"), "127.0.0.1:8080");
        assert_eq!(bind_address("0.0.0.0:80"), "0.0.0.0:80");
        assert_eq!(bind_address("localhost:80"), "localhost:80");
    }

    #[test]
    fn many_keep_alive_connections_are_each_answered_in_order() {
        let address = listen("127.0.0.1:0", Echo, 2).unwrap();
        let clients: Vec<_> = (0..40)
            .map(|client| {
                std::thread::spawn(move || {
                    let (mut stream, mut reader) = connect(address);
                    for request in 0..25 {
                        let target = format!("/c{client}/r{request}");
                        stream.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
                        assert_eq!(body(&mut reader), target);
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_around_one_that_waits() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        let (mut stream, mut reader) = connect(address);
        stream.write_all(b"GET /a HTTP/1.1\r\n\r\nGET /wait/b HTTP/1.1\r\n\r\n\r\nGET /c HTTP/1.1\n\n").unwrap();
        for expected in ["/a", "/wait/b", "/c"] {
            assert_eq!(body(&mut reader), expected);
        }
        // The one thread stayed free while /wait/long was answered elsewhere.
        let (mut other, mut other_reader) = connect(address);
        stream.write_all(b"GET /wait/long HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        other.write_all(b"GET /quick HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(body(&mut other_reader), "/quick");
        assert!(started.elapsed() < Duration::from_secs(1), "a waiting request held up the runtime");
        assert_eq!(body(&mut reader), "/wait/long");
    }

    #[test]
    fn a_client_that_closes_its_side_still_gets_its_answers_then_the_end() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        for target in ["/now", "/wait/later"] {
            let (mut stream, mut reader) = connect(address);
            stream.write_all(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(body(&mut reader), target);
            assert!(rest(&mut reader).is_empty());
        }
        for close in [&b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n"[..], b"GET /bye HTTP/1.0\r\n\r\n"] {
            let (mut stream, mut reader) = connect(address);
            stream.write_all(close).unwrap();
            assert_eq!(body(&mut reader), "/bye");
            assert!(rest(&mut reader).is_empty());
        }
        let (mut stream, mut reader) = connect(address);
        stream.write_all(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert_eq!(body(&mut reader), "/one");
        stream.write_all(b"GET /two HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(body(&mut reader), "/two");
    }

    #[test]
    fn a_response_larger_than_the_socket_buffer_reaches_a_slow_reader_whole() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        let (mut stream, mut reader) = connect(address);
        stream.write_all(b"GET /big HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (mut other, mut other_reader) = connect(address);
        other.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(body(&mut other_reader), "/other");
        let big = body(&mut reader);
        assert_eq!(big.len(), 4 << 20);
        assert!(big.bytes().all(|b| b == b'b'));
        assert_eq!(body(&mut reader), "/after");
    }

    #[test]
    fn bad_heads_and_bodies_get_json_errors_after_the_good_requests_before_them() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        let cases: [(&[u8], u16); 5] = [
            (b"GET /ok HTTP/1.1\r\n\r\nNONSENSE\r\n\r\n", 400),
            (b"GET /ok HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\xff\xfe: x\r\n\r\n", 400),
            (b"GET /ok HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 413),
            (b"GET /ok HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 413),
            (b"GET /ok HTTP/1.1\r\n\r\nGET http://[::1/ HTTP/1.1\r\n\r\n", 400),
        ];
        for (bytes, status) in cases {
            let (mut stream, mut reader) = connect(address);
            stream.write_all(bytes).unwrap();
            assert_eq!(read_response(&mut reader), (200, "/ok".to_string()));
            let (got, body) = read_response(&mut reader);
            assert_eq!(got, status, "{}", String::from_utf8_lossy(bytes));
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["status"], status);
            let rest = rest(&mut reader);
            assert!(rest.is_empty(), "{}: then {}", String::from_utf8_lossy(bytes), String::from_utf8_lossy(&rest));
        }
        let (mut stream, mut reader) = connect(address);
        stream.write_all(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "j".repeat(20_000)).as_bytes()).unwrap();
        assert_eq!(read_response(&mut reader).0, 431);
    }

    /// A client that pipelines without reading is read only as far as a few answers: the rest
    /// waits in its own socket buffers, not in the server.
    #[test]
    fn a_client_that_does_not_read_stops_being_read() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        // 30 MB of requests: more than the socket buffers of both ends hold.
        let request = b"GET /big HTTP/1.1\r\n\r\n".repeat(1_500_000);
        let mut sent = 0;
        while sent < request.len() {
            match writer.write(&request[sent..]) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        // Their answers would be terabytes; the server stopped reading long before.
        assert!(sent < request.len(), "the server read all {} bytes of requests", request.len());
        // What it did read is still answered, in order, to a reader that comes back.
        let mut reader = std::io::BufReader::new(stream);
        reader.get_ref().set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(body(&mut reader).len(), 4 << 20);
    }
}
