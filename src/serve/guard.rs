//! What stands between a client's socket and hyper: request heads handed on only when whole and
//! well formed, and the answers hyper has none for.
//!
//! hyper answers a malformed or oversized head itself, with an empty body, and closes a client
//! that goes silent without a word; this API promises a JSON body on every error and a 408 to a
//! client that began a request and did not finish it. So [`Guarded`] reads the socket, finds where
//! each head ends, checks it with the parser hyper uses, and passes on only complete, valid
//! heads. At the first bad one (or a silence of [`IDLE_TIMEOUT`]) it tells hyper the input has
//! ended; hyper answers what came before, in order, and closes, and the JSON error is written
//! before the socket is shut.
//!
//! It also bounds what a connection holds: at most one head of [`MAX_HEAD_BYTES`] plus one read
//! of input, and no read while hyper has not taken what it was given (hyper reads the next
//! request only once the answer to the last is queued, and queues at most `max_buf_size` of
//! output). A client that stops reading stops being read; one whose answers make no progress for
//! [`IDLE_TIMEOUT`] is cut off.
//!
//! Every endpoint is a GET without a body, so after a whole head the next byte starts the next
//! head. A request that announces a body is answered 413 by the service, which closes the
//! connection; the body is never handed on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Longest request head (request line and headers) accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in a head (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// A client that sends nothing while a request is awaited, or takes none of its answers, for
/// this long is disconnected (with a 408 if it had begun a request).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last answer, how long what the client still sends is read and dropped, so that
/// closing does not reset the connection under that answer.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A client's socket as hyper sees it; see the module's documentation.
pub struct Guarded {
    stream: TcpStream,
    /// Bytes read and not yet handed on; `input[..ready]` are whole, valid heads.
    input: Vec<u8>,
    ready: usize,
    /// Where the head being read starts, where its current line starts, and how far `input`
    /// has been searched for its end.
    head_start: usize,
    line_start: usize,
    scanned: usize,
    /// The head being read has a line that is not blank (blank lines before a head are allowed).
    head_has_content: bool,
    /// The client has closed its side.
    hung_up: bool,
    /// Reading has ended: what to write before closing (empty: nothing), and how much of it is
    /// written.
    ending: Option<(Vec<u8>, usize)>,
    /// Fires [`IDLE_TIMEOUT`] after the last progress, or [`LINGER`] after the shutdown.
    timer: Pin<Box<Sleep>>,
    last_progress: Instant,
    shutdown: Shutdown,
}

#[derive(PartialEq)]
enum Shutdown {
    Open,
    /// The write side is shut; the client's last bytes are read and dropped until this instant.
    Lingering(Instant),
    Done,
}

impl Guarded {
    pub fn new(stream: TcpStream) -> Guarded {
        let now = Instant::now();
        Guarded {
            stream,
            input: Vec::new(),
            ready: 0,
            head_start: 0,
            line_start: 0,
            scanned: 0,
            head_has_content: false,
            hung_up: false,
            ending: None,
            timer: Box::pin(tokio::time::sleep_until(now + IDLE_TIMEOUT)),
            last_progress: now,
            shutdown: Shutdown::Open,
        }
    }

    /// Whether `deadline` has passed; if not, the task is woken when it does.
    fn due(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        if Instant::now() >= deadline {
            return true;
        }
        // The timer is moved only when it fires early or is due later than `deadline`: progress
        // does not touch it, so a busy connection costs no timer work per request.
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    fn idle_for_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last_progress + IDLE_TIMEOUT;
        self.due(deadline, cx)
    }

    /// Ends the input after the heads already found, with `answer` to write before closing.
    fn end(&mut self, answer: Vec<u8>) {
        self.input.truncate(self.ready);
        self.ending = Some((answer, 0));
    }

    /// Searches the new input for the ends of heads, checking each whole head.
    fn scan(&mut self) {
        while let Some(offset) = memchr::memchr(b'\n', &self.input[self.scanned..]) {
            let newline = self.scanned + offset;
            self.scanned = newline + 1;
            let line = &self.input[self.line_start..newline];
            let blank = line.is_empty() || line == b"\r";
            self.line_start = newline + 1;
            if !blank {
                self.head_has_content = true;
                continue;
            }
            if !self.head_has_content {
                continue;
            }
            if newline + 1 - self.head_start > MAX_HEAD_BYTES {
                return self.end(error_response(431, &format!("the request head is longer than {MAX_HEAD_BYTES} bytes")));
            }
            let announces_body = match check_head(&self.input[self.head_start..newline + 1]) {
                Ok(announces_body) => announces_body,
                Err(answer) => return self.end(answer),
            };
            self.ready = newline + 1;
            self.head_start = newline + 1;
            self.head_has_content = false;
            if announces_body {
                // The service refuses it and closes; what follows is its body, not a head.
                return self.end(Vec::new());
            }
        }
        self.scanned = self.input.len();
        if self.input.len() - self.head_start > MAX_HEAD_BYTES {
            self.end(error_response(431, &format!("the request head is longer than {MAX_HEAD_BYTES} bytes")));
        }
    }

    /// Hands up to `buf`'s room of whole heads on.
    fn hand_on(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.ready.min(buf.remaining());
        buf.put_slice(&self.input[..n]);
        self.input.drain(..n);
        self.ready -= n;
        self.head_start -= n;
        self.line_start -= n;
        self.scanned -= n;
    }

    /// The input holds the start of a request, not only blank lines.
    fn began_a_request(&self) -> bool {
        self.input[self.ready..].iter().any(|b| !b.is_ascii_whitespace())
    }

    /// Writes what is left of the ending's answer; `Ready` once it is all written or cannot be.
    fn poll_write_ending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some((answer, written)) = self.ending.as_mut() else { return Poll::Ready(()) };
            if *written >= answer.len() {
                return Poll::Ready(());
            }
            match Pin::new(&mut self.stream).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(n)) if n > 0 => *written += n,
                Poll::Ready(_) => {
                    *written = answer.len();
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    let deadline = self.last_progress + IDLE_TIMEOUT;
                    return if self.due(deadline, cx) { Poll::Ready(()) } else { Poll::Pending };
                }
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                this.hand_on(buf);
                return Poll::Ready(Ok(()));
            }
            if this.ending.is_some() || this.hung_up {
                // The end of the input: hyper answers what it has and closes.
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.hung_up = true,
                Poll::Ready(Ok(())) => {
                    this.last_progress = Instant::now();
                    this.input.extend_from_slice(read.filled());
                    this.scan();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if !this.idle_for_too_long(cx) {
                        return Poll::Pending;
                    }
                    let answer = if this.began_a_request() {
                        error_response(408, "the request head did not arrive in time")
                    } else {
                        Vec::new()
                    };
                    this.end(answer);
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.stalled(cx),
            done => {
                this.last_progress = Instant::now();
                done
            }
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stalled(cx),
            done => {
                this.last_progress = Instant::now();
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    /// Writes the ending's answer, shuts the write side, and reads what the client still sends
    /// until it closes or [`LINGER`] passes.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.shutdown {
                Shutdown::Done => return Poll::Ready(Ok(())),
                Shutdown::Open => {
                    ready!(this.poll_write_ending(cx));
                    let _ = ready!(Pin::new(&mut this.stream).poll_shutdown(cx));
                    this.shutdown = if this.hung_up { Shutdown::Done } else { Shutdown::Lingering(Instant::now() + LINGER) };
                }
                Shutdown::Lingering(until) => {
                    let mut chunk = [0u8; READ_CHUNK];
                    let mut read = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                        Poll::Ready(Ok(())) if !read.filled().is_empty() => continue,
                        Poll::Ready(_) => this.shutdown = Shutdown::Done,
                        Poll::Pending if this.due(until, cx) => this.shutdown = Shutdown::Done,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }
}

impl Guarded {
    /// A write that cannot proceed: an error once the client has taken nothing for
    /// [`IDLE_TIMEOUT`], which ends the connection.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.idle_for_too_long(cx) {
            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client took no answer for the idle timeout")))
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Guarded {
    /// hyper may drop the connection without shutting it (after an error): the ending's answer
    /// still goes out if the socket takes it at once.
    fn drop(&mut self) {
        if let Some((answer, written)) = &self.ending {
            if *written < answer.len() {
                let _ = self.stream.try_write(&answer[*written..]);
            }
        }
    }
}

/// Checks one whole head with the parser hyper uses (httparse, and `http`'s URI rules), so that
/// hyper is never handed one it would refuse with an empty body. `Ok(true)`: the request
/// announces a body.
fn check_head(head: &[u8]) -> Result<bool, Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => {
            return Err(error_response(431, &format!("the request has more than {MAX_HEADERS} header lines")))
        }
        Err(httparse::Error::Version) => return Err(error_response(400, "only HTTP/1.0 and HTTP/1.1 are served")),
        Ok(httparse::Status::Partial) | Err(_) => return Err(error_response(400, "malformed request head")),
    }
    let target = request.path.unwrap_or("");
    if hyper::Uri::try_from(target).is_err() {
        return Err(error_response(400, "malformed request target"));
    }
    Ok(request.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding") || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    }))
}

/// A whole response with a JSON error body that closes the connection, for the answers written
/// here rather than by hyper.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let body = serde_json::json!({ "error": message, "status": status }).to_string();
    let mut bytes = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_and_oversized_heads_get_json_answers() {
        let status = |head: &[u8]| match check_head(head) {
            Ok(false) => 200,
            Ok(true) => 413,
            Err(answer) => {
                let text = String::from_utf8(answer).unwrap();
                let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
                body["status"].as_u64().unwrap() as u16
            }
        };
        assert_eq!(status(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(status(b"\r\nGET / HTTP/1.0\n\n"), 200);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), 200);
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n"), 413);
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 413);
        assert_eq!(status(b"NONSENSE\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\n\xff: x\r\n\r\n"), 400);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
    }
}
