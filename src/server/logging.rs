//! One log line per request (method, path, status, time, seed, request id), and the `x-request-id` header on every
//! answer. A request whose client went away before the answer is logged as such.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;

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

pub async fn log_requests(State(ids): State<Arc<RequestIds>>, request: Request, next: Next) -> Response {
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
