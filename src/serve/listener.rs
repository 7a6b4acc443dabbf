//! A small HTTP/1.1 server: a few event loops (epoll, through mio) that each own a share of the
//! connections and answer their requests in the order they arrive.
//!
//! Why not a thread per connection: on two cores shared with the dataflow's workers, 200
//! runnable connection threads are scheduled unfairly — for 100 ms at a time a few are served
//! over and over while the rest wait, and that wait is the p99. A loop that serves every ready
//! connection in turn bounds a request's wait by one pass over the others, each of which costs
//! microseconds (answers are rendered from memory and cached per watermark).
//!
//! A request whose answer waits on something else — a peek at the workers' filter
//! arrangements — must not stall a loop: [`Handler::waits`] sends it to a thread of its own, and
//! its answer comes back to the loop through the loop's inbox.
//!
//! Keep-alive and pipelining, bounded request heads, idle and slow clients cut off after
//! [`IDLE_TIMEOUT`], each response written in one piece with TCP_NODELAY (a head and a body
//! written apart would wait on the peer's delayed ACK, 40 ms). Only GET without a body is
//! served, which is all the API needs; a request with a body is refused rather than read.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

/// Longest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 2048;
/// Requests waiting on the workers at once, each on its own thread; more are answered 503.
pub const MAX_WAITING: usize = 64;
/// A client that sends nothing for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a response that closes the connection, how long what the client still sends is read
/// and dropped, so that closing does not reset the connection under the response.
const LINGER: Duration = Duration::from_secs(2);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONNECTION: usize = 2;

/// One parsed request.
pub struct Request {
    pub method: String,
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        !self
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
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
    /// answered on a thread of their own; the others on the event loop, which must never block.
    fn waits(&self, request: &Request) -> bool;
}

/// Binds `address` and serves its connections with `handler` on `event_loops` threads (at least
/// one) until the process ends.
pub fn listen<H: Handler>(
    address: &str,
    handler: H,
    event_loops: usize,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let shared = Arc::new(Shared {
        handler,
        open: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
    });
    let mut loops = Vec::with_capacity(event_loops);
    for _ in 0..event_loops.max(1) {
        loops.push(EventLoop::new(Arc::clone(&shared))?);
    }
    let doors: Vec<Door> = loops.iter().map(|l| l.door.clone()).collect();
    loops[0].accept_from(TcpListener::from_std(listener), doors)?;
    for (index, event_loop) in loops.into_iter().enumerate() {
        std::thread::Builder::new()
            .name(format!("clickagg-http-{index}"))
            .spawn(move || event_loop.run())?;
    }
    Ok(local)
}

struct Shared<H> {
    handler: H,
    /// Connections open across the loops.
    open: AtomicUsize,
    /// Requests being answered on threads of their own.
    waiting: AtomicUsize,
}

/// What reaches a loop from outside it: a connection accepted by loop 0, or the answer to a
/// request that waited on its own thread.
enum Delivery {
    Connection(TcpStream),
    Answer {
        slot: usize,
        generation: u64,
        bytes: Vec<u8>,
        keep_alive: bool,
    },
}

/// A loop's inbox and the waker that makes it look.
#[derive(Clone)]
struct Door {
    inbox: Arc<Mutex<Vec<Delivery>>>,
    waker: Arc<Waker>,
}

impl Door {
    fn deliver(&self, delivery: Delivery) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.push(delivery);
        }
        let _ = self.waker.wake();
    }
}

#[derive(PartialEq)]
enum Phase {
    /// Reading requests; answers are written as they are made.
    Reading,
    /// A request is being answered on its own thread; what follows it waits.
    Waiting,
    /// The last response is being written; then the connection closes.
    Closing,
    /// The response is written; what the client still sends is read and dropped.
    Lingering,
}

struct Connection {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    /// When the client last sent something, or the connection last changed phase.
    heard: Instant,
    /// Tells this connection from an earlier one in the same slot, for answers that arrive late.
    generation: u64,
    /// The client has closed its side; it is still owed the answers to what it sent.
    hung_up: bool,
    /// Registered for writability too, because a write fell short.
    awaits_writable: bool,
}

impl Connection {
    /// Queues `response`; the connection closes after it unless `keep_alive`.
    fn answer(&mut self, response: &Response, keep_alive: bool) {
        self.output.extend_from_slice(&render(response, keep_alive));
        if !keep_alive {
            self.phase = Phase::Closing;
        }
    }
}

struct EventLoop<H> {
    poll: Poll,
    shared: Arc<Shared<H>>,
    door: Door,
    listener: Option<(TcpListener, Vec<Door>, usize)>,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
    generations: u64,
    swept: Instant,
}

impl<H: Handler> EventLoop<H> {
    fn new(shared: Arc<Shared<H>>) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let door = Door {
            inbox: Arc::new(Mutex::new(Vec::new())),
            waker,
        };
        Ok(EventLoop {
            poll,
            shared,
            door,
            listener: None,
            connections: Vec::new(),
            free: Vec::new(),
            generations: 0,
            swept: Instant::now(),
        })
    }

    /// Makes this loop the one that accepts, handing connections to `doors` in turn.
    fn accept_from(&mut self, mut listener: TcpListener, doors: Vec<Door>) -> std::io::Result<()> {
        self.poll
            .registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        self.listener = Some((listener, doors, 0));
        Ok(())
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_secs(1))) {
                if e.kind() != ErrorKind::Interrupted {
                    eprintln!("clickagg: the HTTP event loop stopped: {e}");
                    return;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.open_door(),
                    Token(token) => {
                        let slot = token - FIRST_CONNECTION;
                        if event.is_read_closed() {
                            // A short read may have taken the last bytes without seeing the end.
                            if let Some(connection) =
                                self.connections.get_mut(slot).and_then(|c| c.as_mut())
                            {
                                connection.hung_up = true;
                            }
                        }
                        self.serve(
                            slot,
                            event.is_readable() || event.is_read_closed() || event.is_error(),
                        )
                    }
                }
            }
            if self.swept.elapsed() >= Duration::from_secs(1) {
                self.sweep();
            }
        }
    }

    fn accept(&mut self) {
        let Some((listener, doors, next)) = self.listener.as_mut() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.shared.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        self.shared.open.fetch_sub(1, Ordering::SeqCst);
                        let _ = stream.write(&render(&failure(503, "too many connections"), false));
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    *next = (*next + 1) % doors.len();
                    doors[*next].deliver(Delivery::Connection(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // A connection reset before it was accepted, or out of descriptors: the next
                // readiness event retries.
                Err(_) => return,
            }
        }
    }

    fn open_door(&mut self) {
        let deliveries = match self.door.inbox.lock() {
            Ok(mut inbox) => std::mem::take(&mut *inbox),
            Err(_) => return,
        };
        for delivery in deliveries {
            match delivery {
                Delivery::Connection(stream) => self.adopt(stream),
                Delivery::Answer {
                    slot,
                    generation,
                    bytes,
                    keep_alive,
                } => {
                    let Some(connection) = self.connections.get_mut(slot).and_then(|c| c.as_mut())
                    else {
                        continue;
                    };
                    if connection.generation != generation || connection.phase != Phase::Waiting {
                        continue;
                    }
                    connection.output.extend_from_slice(&bytes);
                    connection.phase = if keep_alive {
                        Phase::Reading
                    } else {
                        Phase::Closing
                    };
                    self.serve(slot, false);
                }
            }
        }
    }

    fn adopt(&mut self, mut stream: TcpStream) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.connections.push(None);
            self.connections.len() - 1
        });
        // Edge-triggered. Writability only once a write falls short: registered from the start,
        // every ACK that frees send buffer would wake the loop for nothing.
        let registered = self.poll.registry().register(
            &mut stream,
            Token(slot + FIRST_CONNECTION),
            Interest::READABLE,
        );
        if registered.is_err() {
            self.free.push(slot);
            self.shared.open.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.generations += 1;
        self.connections[slot] = Some(Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            phase: Phase::Reading,
            heard: Instant::now(),
            generation: self.generations,
            hung_up: false,
            awaits_writable: false,
        });
        // Bytes may have arrived before registration; edge-triggered readiness would not say so.
        self.serve(slot, true);
    }

    /// Reads what `slot`'s client sent (when `readable` says there is something), answers every
    /// complete request in order, and writes.
    fn serve(&mut self, slot: usize, readable: bool) {
        let mut read = if readable {
            Inflow::More
        } else {
            Inflow::Drained
        };
        loop {
            let Some(connection) = self.connections.get_mut(slot).and_then(|c| c.as_mut()) else {
                return;
            };
            if read == Inflow::More {
                read = read_available(connection);
            }
            let before = connection.input.len();
            if connection.phase == Phase::Reading {
                self.answer_requests(slot);
            }
            let Some(connection) = self.connections.get_mut(slot).and_then(|c| c.as_mut()) else {
                return;
            };
            // Edge-triggered readiness will not say again that unread bytes are waiting.
            if read != Inflow::More || connection.input.len() == before {
                break;
            }
        }
        let Some(connection) = self.connections.get_mut(slot).and_then(|c| c.as_mut()) else {
            return;
        };
        let flushed = write_pending(connection);
        let token = Token(slot + FIRST_CONNECTION);
        if let Ok(flushed) = flushed {
            if flushed == connection.awaits_writable {
                let interest = if flushed {
                    Interest::READABLE
                } else {
                    Interest::READABLE | Interest::WRITABLE
                };
                if self
                    .poll
                    .registry()
                    .reregister(&mut connection.stream, token, interest)
                    .is_ok()
                {
                    connection.awaits_writable = !flushed;
                }
            }
        }
        let done = match (flushed, &connection.phase) {
            (Err(()), _) => true,
            (Ok(true), Phase::Closing) => {
                let _ = connection.stream.shutdown(std::net::Shutdown::Write);
                connection.input = Vec::new();
                connection.phase = Phase::Lingering;
                connection.heard = Instant::now();
                connection.hung_up
            }
            (_, Phase::Lingering) => connection.hung_up,
            (Ok(true), Phase::Reading) => connection.hung_up,
            _ => false,
        };
        if done {
            self.close(slot);
        }
    }

    fn answer_requests(&mut self, slot: usize) {
        let Some(connection) = self.connections.get_mut(slot).and_then(|c| c.as_mut()) else {
            return;
        };
        while connection.phase == Phase::Reading {
            let request = match take_request(&mut connection.input) {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(response) => {
                    connection
                        .output
                        .extend_from_slice(&render(&response, false));
                    connection.phase = Phase::Closing;
                    return;
                }
            };
            let keep_alive = request.keep_alive();
            if !self.shared.handler.waits(&request) {
                connection.answer(&self.shared.handler.respond(&request), keep_alive);
                continue;
            }
            if self.shared.waiting.fetch_add(1, Ordering::SeqCst) >= MAX_WAITING {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                let busy = failure(
                    503,
                    &format!("more than {MAX_WAITING} filtered queries at once"),
                );
                connection.answer(&busy, keep_alive);
                continue;
            }
            connection.phase = Phase::Waiting;
            let (shared, door, generation) = (
                Arc::clone(&self.shared),
                self.door.clone(),
                connection.generation,
            );
            let spawned = std::thread::Builder::new()
                .name("clickagg-http-wait".into())
                .spawn(move || {
                    let bytes = render(&shared.handler.respond(&request), keep_alive);
                    shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    door.deliver(Delivery::Answer {
                        slot,
                        generation,
                        bytes,
                        keep_alive,
                    });
                });
            if spawned.is_err() {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                connection.output.extend_from_slice(&render(
                    &failure(503, "could not start a thread for this query"),
                    false,
                ));
                connection.phase = Phase::Closing;
            }
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut connection) = self.connections[slot].take() {
            let _ = self.poll.registry().deregister(&mut connection.stream);
            self.free.push(slot);
            self.shared.open.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Cuts off clients that went silent: 408 to one that began a request and did not finish
    /// it, a plain close to one idle between requests or not reading its answers.
    fn sweep(&mut self) {
        self.swept = Instant::now();
        for slot in 0..self.connections.len() {
            let Some(connection) = self.connections[slot].as_mut() else {
                continue;
            };
            let idle = connection.heard.elapsed();
            let unsent = connection.output.len() > connection.written;
            let close = match connection.phase {
                Phase::Waiting => false,
                Phase::Lingering => idle >= LINGER,
                Phase::Reading if idle >= IDLE_TIMEOUT && !unsent => {
                    if connection.input.iter().all(|b| b.is_ascii_whitespace()) {
                        true
                    } else {
                        connection.input.clear();
                        connection.output.extend_from_slice(&render(
                            &failure(408, "the request head did not arrive in time"),
                            false,
                        ));
                        connection.phase = Phase::Closing;
                        self.serve(slot, false);
                        false
                    }
                }
                Phase::Reading | Phase::Closing => idle >= IDLE_TIMEOUT,
            };
            if close {
                self.close(slot);
            }
        }
    }
}

/// What a read left: the socket is drained (or closed, which [`Connection::hung_up`] records),
/// or it may hold more than the input may take until requests are taken off it.
#[derive(PartialEq)]
enum Inflow {
    Drained,
    More,
}

/// Reads what the socket holds. A read that fills less than the buffer has drained it: a byte
/// that arrives later raises a new edge, so the read that would say `WouldBlock` is skipped.
/// Stops early when the input holds more than a head may be, so that a client cannot make it
/// grow without bound.
fn read_available(connection: &mut Connection) -> Inflow {
    let mut buffer = [0u8; 8192];
    loop {
        if connection.input.len() > 2 * MAX_HEAD_BYTES {
            return Inflow::More;
        }
        match connection.stream.read(&mut buffer) {
            Ok(0) => {
                connection.hung_up = true;
                return Inflow::Drained;
            }
            Ok(n) => {
                connection.heard = Instant::now();
                if connection.phase != Phase::Lingering {
                    connection.input.extend_from_slice(&buffer[..n]);
                }
                if n < buffer.len() {
                    return Inflow::Drained;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Inflow::Drained,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                connection.hung_up = true;
                return Inflow::Drained;
            }
        }
    }
}

/// Writes what is pending. `Ok(true)`: all of it is written; `Err`: the connection failed.
fn write_pending(connection: &mut Connection) -> Result<bool, ()> {
    while connection.written < connection.output.len() {
        match connection
            .stream
            .write(&connection.output[connection.written..])
        {
            Ok(0) => return Err(()),
            Ok(n) => {
                connection.written += n;
                connection.heard = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Err(()),
        }
    }
    connection.output.clear();
    connection.written = 0;
    Ok(true)
}

fn failure(status: u16, message: &str) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: serde_json::json!({ "error": message, "status": status }).to_string(),
    }
}

/// Takes one complete request head off the front of `input`. `Ok(None)`: not all of it has
/// arrived yet. Blank lines before a request are skipped (RFC 9112 §2.2).
fn take_request(input: &mut Vec<u8>) -> Result<Option<Request>, Response> {
    let start = input
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(input.len());
    input.drain(..start);
    let Some(end) = head_end(input) else {
        if input.len() > MAX_HEAD_BYTES {
            return Err(failure(
                431,
                &format!("the request head is longer than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        return Ok(None);
    };
    if end > MAX_HEAD_BYTES {
        return Err(failure(
            431,
            &format!("the request head is longer than {MAX_HEAD_BYTES} bytes"),
        ));
    }
    let head: Vec<u8> = input.drain(..end).collect();
    parse_head(&head).map(Some)
}

/// Where the head ends: just past its first empty line, whether lines end in CRLF or LF.
fn head_end(input: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for newline in memchr::memchr_iter(b'\n', input) {
        let line = &input[line_start..newline];
        if line.is_empty() || line == b"\r" {
            return Some(newline + 1);
        }
        line_start = newline + 1;
    }
    None
}

fn parse_head(head: &[u8]) -> Result<Request, Response> {
    let text =
        std::str::from_utf8(head).map_err(|_| failure(400, "the request head is not UTF-8"))?;
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(failure(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || parts.next().is_some() {
        return Err(failure(400, "malformed request line"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| failure(400, "malformed header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut request = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    };
    let has_body = request.header("content-length").is_some_and(|l| l != "0")
        || request.header("transfer-encoding").is_some();
    if has_body {
        return Err(failure(
            413,
            "request bodies are not accepted: every endpoint is a GET",
        ));
    }
    if version == "HTTP/1.0"
        && !request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("keep-alive"))
    {
        request.headers.push(("connection".into(), "close".into()));
    }
    Ok(request)
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

/// The response's bytes, head and body together, so that they leave in one write.
fn render(response: &Response, keep_alive: bool) -> Vec<u8> {
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
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_taken_whole_one_at_a_time() {
        let mut input = b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\n\nGET /c".to_vec();
        let first = take_request(&mut input)
            .ok()
            .flatten()
            .expect("first request");
        assert_eq!(
            (
                first.method.as_str(),
                first.target.as_str(),
                first.header("host")
            ),
            ("GET", "/a", Some("x"))
        );
        let second = take_request(&mut input)
            .ok()
            .flatten()
            .expect("second request");
        assert_eq!(second.target, "/b");
        assert!(
            matches!(take_request(&mut input), Ok(None)),
            "a head without its blank line is not complete"
        );
        assert_eq!(input, b"GET /c");
    }

    #[test]
    fn oversized_bodied_and_malformed_heads_are_refused() {
        let status = |bytes: &[u8]| match take_request(&mut bytes.to_vec()) {
            Err(response) => response.status,
            Ok(Some(_)) => 200,
            Ok(None) => 0,
        };
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\nX: {}", "j".repeat(MAX_HEAD_BYTES)).as_bytes()),
            431
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            413
        );
        assert_eq!(status(b"NONSENSE\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\n\xff: x\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\n"), 0);
    }

    /// Echoes the target; `/wait...` waits off the loop, 100 ms (`/wait/long`: 2 s); `/big` is a 4 MB body, more
    /// than a socket buffer takes, so that writes fall short and resume on writability.
    struct Echo;

    impl Handler for Echo {
        fn respond(&self, request: &Request) -> Response {
            let body = match request.target.as_str() {
                "/big" => "b".repeat(4 << 20),
                target if target.starts_with("/wait") => {
                    std::thread::sleep(Duration::from_millis(if target == "/wait/long" {
                        2000
                    } else {
                        100
                    }));
                    target.to_string()
                }
                target => target.to_string(),
            };
            Response {
                status: 200,
                content_type: "text/plain",
                body,
            }
        }

        fn waits(&self, request: &Request) -> bool {
            request.target.starts_with("/wait")
        }
    }

    /// Reads one response off `stream` (which must not be read past it): its body.
    fn read_response(stream: &mut std::io::BufReader<std::net::TcpStream>) -> String {
        use std::io::BufRead;
        let mut length = 0;
        loop {
            let mut line = String::new();
            assert!(
                stream.read_line(&mut line).unwrap() > 0,
                "the connection closed before a response"
            );
            if let Some(value) = line.strip_prefix("Content-Length: ") {
                length = value.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    }

    fn connect(
        address: SocketAddr,
    ) -> (std::net::TcpStream, std::io::BufReader<std::net::TcpStream>) {
        let stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = std::io::BufReader::new(stream.try_clone().unwrap());
        (stream, reader)
    }

    #[test]
    fn loops_answer_many_keep_alive_connections_each_in_order() {
        let address = listen("127.0.0.1:0", Echo, 3).unwrap();
        let clients: Vec<_> = (0..40)
            .map(|client| {
                std::thread::spawn(move || {
                    let (mut stream, mut reader) = connect(address);
                    for request in 0..25 {
                        let target = format!("/c{client}/r{request}");
                        stream
                            .write_all(
                                format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
                            )
                            .unwrap();
                        assert_eq!(read_response(&mut reader), target);
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
        let address = listen("127.0.0.1:0", Echo, 2).unwrap();
        let (mut stream, mut reader) = connect(address);
        stream
            .write_all(
                b"GET /a HTTP/1.1\r\n\r\nGET /wait/b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
            )
            .unwrap();
        for expected in ["/a", "/wait/b", "/c"] {
            assert_eq!(read_response(&mut reader), expected);
        }
        // The loop stayed free while /wait/b was answered elsewhere: a second client got through.
        let (mut other, mut other_reader) = connect(address);
        stream
            .write_all(b"GET /wait/long HTTP/1.1\r\n\r\n")
            .unwrap();
        let started = Instant::now();
        other.write_all(b"GET /quick HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut other_reader), "/quick");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a waiting request held up the loop"
        );
        assert_eq!(read_response(&mut reader), "/wait/long");
    }

    #[test]
    fn a_client_that_closes_its_side_still_gets_its_answers_then_the_end() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        for target in ["/now", "/wait/later"] {
            let (mut stream, mut reader) = connect(address);
            stream
                .write_all(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes())
                .unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(read_response(&mut reader), target);
            let mut rest = Vec::new();
            reader.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        }
        // Connection: close is honoured after the response.
        let (mut stream, mut reader) = connect(address);
        stream
            .write_all(b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut reader), "/bye");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_response_larger_than_the_socket_buffer_reaches_a_slow_reader_whole() {
        let address = listen("127.0.0.1:0", Echo, 1).unwrap();
        let (mut stream, mut reader) = connect(address);
        stream
            .write_all(b"GET /big HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The one loop serves others while that response waits on its reader.
        let (mut other, mut other_reader) = connect(address);
        other.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut other_reader), "/other");
        let body = read_response(&mut reader);
        assert_eq!(body.len(), 4 << 20);
        assert!(body.bytes().all(|b| b == b'b'));
        assert_eq!(read_response(&mut reader), "/after");
    }

    #[test]
    fn http_1_0_closes_unless_asked_to_keep_alive() {
        let request = take_request(&mut b"GET / HTTP/1.0\r\n\r\n".to_vec())
            .ok()
            .flatten()
            .unwrap();
        assert!(!request.keep_alive());
        let request =
            take_request(&mut b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec())
                .ok()
                .flatten()
                .unwrap();
        assert!(request.keep_alive());
    }
}
