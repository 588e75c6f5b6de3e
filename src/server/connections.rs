//! The server's own accept loop, in front of the routes: what keeps a hostile or careless client from exhausting
//! the process before any key is checked.
//!
//! - **A cap on open connections** ([`Limits::max_connections`], well below the file-descriptor limit). When it is
//!   reached, a new connection is still accepted, and the oldest connection that has no request in progress is
//!   closed to make room: first those that never completed a request (silent or slow-header sockets), then idle
//!   keep-alive ones. A fresh client sends its request at once and is answered before it could become the oldest,
//!   so `/health` and real requests keep being served however many idle sockets an attacker opens. Only when every
//!   open connection has a request in progress is the new one refused (503, JSON). Running out of descriptors anyway
//!   (other files, a low limit) closes an idle connection too, instead of spinning on `accept`.
//! - **A header timeout** ([`Limits::header_timeout`]): a request's headers must arrive within it, and a keep-alive
//!   connection waiting for its next request is closed after it too (hyper starts the same timer on an idle
//!   connection), so it is also the idle timeout.
//! - **A header size cap** ([`Limits::max_header_bytes`]): larger heads are answered 431 before more is buffered.
//! - **hyper's own rejections as JSON.** hyper answers requests it cannot parse (400, 414 URI too long, 431) itself,
//!   with an empty body; `AutoAnswers` replaces those answers, on their way out, with the same status and a JSON
//!   `{"error": …}` body carrying an `x-request-id` like every other answer, and logs them.
//!
//! Shutdown is in two phases: while the last generation finishes, connections are still accepted so `/health` and
//! `/ready` can say the server is shutting down; then no more are, open ones finish their current answer and are
//! closed, and whatever is still open after the grace period is dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

use super::logging::{RequestIds, REQUEST_ID_HEADER};
use super::metrics::Metrics;

/// The default [`Limits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default [`Limits::max_header_bytes`]: the request line and every header together (nginx's default buffers
/// hold 32 KiB; a hosted-API request's head is a few hundred bytes).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 << 10;
/// The default [`Limits::body_timeout`].
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// The most connections [`default_max_connections`] allows, however high the descriptor limit.
pub const MAX_DEFAULT_CONNECTIONS: usize = 1024;

/// Connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; see the module documentation for what happens at the cap.
    pub max_connections: usize,
    /// A request's head must arrive within this; also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// Larger request heads are answered 431.
    pub max_header_bytes: usize,
    /// A request body must arrive within this, or the request is answered 408 (a slow-body client would otherwise
    /// hold its connection, and a place under the cap, as long as it likes).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            body_timeout: DEFAULT_BODY_TIMEOUT,
        }
    }
}

/// Half the process's open-file limit (the rest is for the model's files, image fetches and the listener), at
/// most [`MAX_DEFAULT_CONNECTIONS`]; 256 where the limit cannot be read.
pub fn default_max_connections() -> usize {
    match open_file_limit() {
        Some(limit) => (limit / 2).clamp(16, MAX_DEFAULT_CONNECTIONS as u64) as usize,
        None => 256,
    }
}

/// The process's soft open-file limit.
pub fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
            return Some(limit.rlim_cur as u64);
        }
        None
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the process's soft open-file limit to its hard limit (a server's sockets should not run out at a
/// distribution's conservative 1024 default). Returns the (new) soft limit.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit / setrlimit read and write the struct they are given and nothing else.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
        Some(limit.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// What one connection's task shares with the registry.
#[derive(Default)]
struct Activity {
    /// Requests received and not yet fully answered (the answer's body still being written counts).
    in_flight: AtomicUsize,
    /// Requests fully answered.
    answered: AtomicU64,
    /// Told to close: evicted at the cap, or still open after the shutdown grace period.
    close: Notify,
}

/// Holds a request in flight from the moment hyper hands it over until its answer's body is dropped (written, or
/// abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Entry {
    accepted: Instant,
    activity: Arc<Activity>,
}

/// The open connections, and the counters `/metrics` shows.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    /// Connections closed, for `trim_after_floods`.
    closed: AtomicU64,
}

/// A snapshot of [`Connections`]' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    pub open: usize,
    /// Idle connections closed to make room at the cap (or when descriptors ran out).
    pub evicted: u64,
    /// Connections refused because every open one had a request in progress.
    pub refused: u64,
    /// Connections closed because a request head did not arrive in time (or an idle keep-alive one timed out).
    pub header_timeouts: u64,
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.lock().len(),
            evicted: self.evicted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            header_timeouts: self.header_timeouts.load(Ordering::Relaxed),
        }
    }

    fn register(&self) -> (u64, Arc<Activity>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::default());
        self.lock().insert(id, Entry { accepted: Instant::now(), activity: activity.clone() });
        (id, activity)
    }

    fn remove(&self, id: u64) {
        if self.lock().remove(&id).is_some() {
            self.closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the connection least likely to be a client waiting for an answer: one with no request in progress,
    /// preferring those that never completed a request, oldest first. False when every connection is busy.
    fn evict_one(&self) -> bool {
        let mut open = self.lock();
        let victim = open
            .iter()
            .filter(|(_, e)| e.activity.in_flight.load(Ordering::SeqCst) == 0)
            .min_by_key(|(_, e)| (e.activity.answered.load(Ordering::SeqCst) > 0, e.accepted))
            .map(|(id, _)| *id);
        match victim.and_then(|id| open.remove(&id)) {
            Some(entry) => {
                entry.activity.close.notify_one();
                self.closed.fetch_add(1, Ordering::Relaxed);
                self.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Tells every open connection to close now (the shutdown grace period is over).
    fn close_all(&self) {
        for entry in self.lock().drain().map(|(_, e)| e) {
            entry.activity.close.notify_one();
        }
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Registered<'a> {
    connections: &'a Connections,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

/// Everything the accept loop needs.
pub struct Accepting {
    pub listener: TcpListener,
    pub router: Router,
    pub limits: Limits,
    pub ids: Arc<RequestIds>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
}

/// Serves until `stop_accepting` resolves, then asks open connections to finish their current answer and close
/// (`closing` is told), and returns once they have, or `grace` later with the rest dropped.
pub async fn serve(accepting: Accepting, stop_accepting: impl std::future::Future<Output = ()>, grace: Duration) {
    let Accepting { listener, router, limits, ids, metrics, connections } = accepting;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2)
        // One flat buffer per write, so [`AutoAnswers`] sees each answer's head whole.
        .writev(false);
    let http = Arc::new(http);
    let (closing, _) = watch::channel(false);
    let trimming = tokio::spawn(trim_after_floods(connections.clone()));
    tokio::pin!(stop_accepting);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop_accepting => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_out_of_descriptors(&e) => {
                // Make room rather than spin: the next accept can then succeed.
                if !connections.evict_one() {
                    tracing::warn!("accept failed: {e}; every connection is busy");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("accept failed: {e}");
                continue;
            }
        };
        if connections.stats().open >= limits.max_connections && !connections.evict_one() {
            connections.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(refuse(stream, ids.next_id(), limits.max_connections));
            continue;
        }
        let _ = stream.set_nodelay(true);
        let task = Connection {
            http: http.clone(),
            router: router.clone(),
            ids: ids.clone(),
            metrics: metrics.clone(),
            connections: connections.clone(),
            closing: closing.subscribe(),
            limits,
        };
        tokio::spawn(task.run(stream, peer));
    }
    drop(listener);
    trimming.abort();
    let _ = closing.send(true);
    let drained = async {
        while connections.stats().open > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("closing connections still open {grace:?} after the last generation");
        connections.close_all();
    }
}

/// Once many connections have closed (a flood of idle or slow clients has gone), returns their freed buffers to
/// the operating system, so the server's memory goes back to its baseline rather than staying at the flood's peak.
async fn trim_after_floods(connections: Arc<Connections>) {
    const CLOSED_BEFORE_TRIM: u64 = 64;
    let (mut trimmed_at, mut seen) = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let closed = connections.closed.load(Ordering::Relaxed);
        // During a long flood, every so many closes; after one, once a second has passed without a close.
        let quiet = closed == seen;
        seen = closed;
        if closed - trimmed_at >= CLOSED_BEFORE_TRIM || (quiet && closed > trimmed_at) {
            trimmed_at = closed;
            let _ = tokio::task::spawn_blocking(super::queue::release_free_memory).await;
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// Answers a connection over the cap 503 (best effort: the socket is new, its send buffer empty) and closes it.
async fn refuse(stream: TcpStream, request_id: String, max: usize) {
    let message = format!(
        "too many connections: all {max} open connections have a request in progress (--max-connections); retry later"
    );
    let answer = json_answer(503, "Service Unavailable", &message, &request_id, Some(1));
    let _ = stream.try_write(&answer);
    tracing::warn!(request_id = %request_id, "{message}");
}

/// A complete HTTP/1.1 answer with a JSON error body, closing the connection.
fn json_answer(status: u16, reason: &str, message: &str, request_id: &str, retry_after: Option<u64>) -> Vec<u8> {
    let body = serde_json::json!({ "error": message }).to_string();
    let retry = retry_after.map(|s| format!("retry-after: {s}\r\n")).unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{REQUEST_ID_HEADER}: \
         {request_id}\r\n{retry}connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One connection's task.
struct Connection {
    http: Arc<hyper::server::conn::http1::Builder>,
    router: Router,
    ids: Arc<RequestIds>,
    metrics: Arc<Metrics>,
    connections: Arc<Connections>,
    closing: watch::Receiver<bool>,
    limits: Limits,
}

impl Connection {
    async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let (id, activity) = self.connections.register();
        let _registered = Registered { connections: &self.connections, id };
        let service = {
            let (router, activity) = (self.router.clone(), activity.clone());
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let in_flight = InFlight::begin(&activity);
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await.unwrap_or_else(|never: Infallible| match never {});
                    // The request stays in flight until its answer's body has been written (or dropped).
                    Ok::<_, Infallible>(response.map(|body| {
                        Body::new(body.map_frame(move |frame| {
                            let _in_flight = &in_flight;
                            frame
                        }))
                    }))
                }
            })
        };
        let io = TokioIo::new(AutoAnswers::new(stream, self.ids.clone(), self.metrics.clone(), self.limits, peer));
        let connection = self.http.serve_connection(io, service);
        tokio::pin!(connection);
        let mut closing = self.closing.clone();
        let shutdown_started = async move {
            let _ = closing.wait_for(|closing| *closing).await;
        };
        let served = tokio::select! {
            served = connection.as_mut() => served,
            _ = activity.close.notified() => return,
            _ = shutdown_started => {
                connection.as_mut().graceful_shutdown();
                tokio::select! {
                    served = connection.as_mut() => served,
                    _ = activity.close.notified() => return,
                }
            }
        };
        if let Err(e) = served {
            if e.is_timeout() {
                self.connections.header_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, "closed: no complete request head within {:?}", self.limits.header_timeout);
            } else {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        }
    }
}

/// The TCP stream, with hyper's own error answers (request heads it could not parse) replaced by JSON ones.
///
/// Every answer the routes produce carries `x-request-id` (the logging layer adds it); an answer head without it
/// that says 4xx/5xx can only be hyper's automatic one, written just before it closes the connection.
struct AutoAnswers {
    stream: TcpStream,
    /// Our replacement answer, and how much of it has been written.
    replacement: Vec<u8>,
    written: usize,
    ids: Arc<RequestIds>,
    metrics: Arc<Metrics>,
    limits: Limits,
    peer: SocketAddr,
}

impl AutoAnswers {
    fn new(stream: TcpStream, ids: Arc<RequestIds>, metrics: Arc<Metrics>, limits: Limits, peer: SocketAddr) -> Self {
        Self { stream, replacement: Vec::new(), written: 0, ids, metrics, limits, peer }
    }

    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.replacement.len() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.replacement[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// The JSON answer standing in for `head` when it is one of hyper's automatic error answers.
    fn replace(&self, head: &[u8]) -> Option<Vec<u8>> {
        let status = automatic_error_status(head)?;
        let request_id = self.ids.next_id();
        let (reason, message) = match status {
            431 => (
                "Request Header Fields Too Large",
                format!(
                    "request head too large: at most {} bytes of request line and headers",
                    self.limits.max_header_bytes
                ),
            ),
            414 => ("URI Too Long", "request URI too long".to_string()),
            400 => (
                "Bad Request",
                "malformed HTTP request: the request line, a header (e.g. a NUL byte or a bad Content-Length) or its \
                 framing could not be parsed"
                    .to_string(),
            ),
            _ => ("Error", "the HTTP request was rejected".to_string()),
        };
        tracing::info!(request_id = %request_id, peer = %self.peer, status, "request rejected by the HTTP parser: {message}");
        self.metrics.record_request("(unparsed)", status);
        Some(json_answer(status, reason, &message, &request_id, None))
    }
}

/// The status of an automatic hyper answer: a complete 4xx/5xx head without `x-request-id`.
fn automatic_error_status(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.1 ").or_else(|| bytes.strip_prefix(b"HTTP/1.0 "))?;
    let status: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let ours = head.lines().any(|line| line.starts_with(REQUEST_ID_HEADER));
    (!ours).then_some(status)
}

impl AsyncRead for AutoAnswers {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AutoAnswers {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        if this.replacement.is_empty() {
            if let Some(replacement) = this.replace(buf) {
                this.replacement = replacement;
                // hyper's bytes count as written; ours go out instead (now, or in the flush that follows).
                if let Poll::Ready(Err(e)) = this.poll_replacement(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(buf.len()));
            }
        } else {
            // After the replacement hyper writes nothing more (it closes the connection); never send its bytes.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_automatic_answers_are_recognised_and_ours_are_not() {
        let hyper = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_error_status(hyper), Some(431));
        let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_error_status(bad), Some(400));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-request-id: 1-2\r\n\r\n{}";
        assert_eq!(automatic_error_status(ours), None);
        let fine = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_error_status(fine), None);
        assert_eq!(automatic_error_status(b"HTTP/1.1 431 Request Hea"), None, "an incomplete head");
        assert_eq!(automatic_error_status(b"\xff\xd8\xff\xe0 JPEG bytes"), None);
    }

    #[test]
    fn eviction_prefers_idle_connections_that_never_completed_a_request() {
        let connections = Connections::default();
        let (_, busy) = connections.register();
        let _held = InFlight::begin(&busy);
        let (_, keep_alive) = connections.register();
        drop(InFlight::begin(&keep_alive));
        let (silent_id, _silent) = connections.register();
        assert!(connections.evict_one());
        assert!(!connections.lock().contains_key(&silent_id), "the silent one goes first");
        assert!(connections.evict_one(), "then the idle keep-alive one");
        assert!(!connections.evict_one(), "never one with a request in progress");
        assert_eq!(connections.stats(), ConnectionStats { open: 1, evicted: 2, refused: 0, header_timeouts: 0 });
    }

    #[test]
    fn default_connection_cap_is_below_the_descriptor_limit() {
        let cap = default_max_connections() as u64;
        if let Some(limit) = open_file_limit() {
            assert!(cap <= limit / 2 || cap == 16, "{cap} of {limit}");
        }
        assert!(cap <= MAX_DEFAULT_CONNECTIONS as u64);
    }
}
