//! One log line per request (method, path, status, time, seed, request id), the `x-request-id` header on every
//! answer, and the request counted in `/metrics` by its route pattern. A request whose client went away before the
//! answer is logged as such. Lines are text or, with `--log-format json`, one JSON object each ([`init`]).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::metrics::Metrics;
use super::respond::SEED_HEADER;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Request ids: a random per-process prefix and a counter, e.g. `3f9c2a01-000007`.
pub struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        Self { prefix: h.finish() as u32, counter: AtomicU64::new(1) }
    }
}

impl RequestIds {
    pub fn next_id(&self) -> String {
        format!("{:08x}-{:06}", self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }
}

/// Logs when dropped without an answer: the client disconnected and the request's future was dropped.
struct Pending {
    id: String,
    method: Method,
    path: String,
    started: Instant,
    answered: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.answered {
            tracing::info!(
                request_id = %self.id,
                method = %self.method,
                path = %self.path,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "client disconnected before the answer"
            );
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `message`, and each field: `request_id`, `status`, …).
    Json,
}

/// Log lines to stderr; `RUST_LOG` filters (default `info`).
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// What the logging layer shares.
#[derive(Clone)]
pub struct RequestLog {
    pub ids: Arc<RequestIds>,
    pub metrics: Arc<Metrics>,
}

pub async fn log_requests(State(log): State<RequestLog>, request: Request, next: Next) -> Response {
    let ids = &log.ids;
    let route = request.extensions().get::<MatchedPath>().map_or("(unmatched)", |m| m.as_str()).to_string();
    let mut pending = Pending {
        id: ids.next_id(),
        method: request.method().clone(),
        path: request.uri().path().chars().take(200).collect(),
        started: Instant::now(),
        answered: false,
    };
    let mut response = next.run(request).await;
    pending.answered = true;
    let status = response.status().as_u16();
    log.metrics.record_request(&route, status);
    let seed = response.headers().get(SEED_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    tracing::info!(
        request_id = %pending.id,
        method = %pending.method,
        path = %pending.path,
        status,
        elapsed_ms = pending.started.elapsed().as_millis() as u64,
        seed = %seed,
        "request"
    );
    if let Ok(value) = HeaderValue::from_str(&pending.id) {
        response.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
    }
    response
}
