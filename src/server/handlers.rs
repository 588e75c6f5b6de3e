//! The routes: the hosted endpoints (text to image, image to image, inpainting), other model slugs, `/health`
//! (liveness), `/ready` (readiness), and JSON 404/405 for everything else.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::ApiKeys;
use super::connections::Connections;
use super::decode::{self, Mode, Ranges};
use super::errors::ApiError;
use super::metrics::Metrics;
use super::queue::{Outcome, Queue};
use super::respond;

/// The hosted text-to-image endpoint this server answers.
pub const MODEL_PATH: &str = "/v1/sdxl1.0-dreamshaper";

/// The hosted image-to-image endpoint: the same request with `image` (base64) and `strength`.
pub const IMG2IMG_PATH: &str = "/v1/sdxl-img2img";

/// The hosted inpainting endpoint: the same request with `image`, `mask` (base64) and `strength`.
pub const INPAINT_PATH: &str = "/v1/sdxl-inpaint";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub queue: Queue,
    pub keys: ApiKeys,
    pub max_body_bytes: usize,
    /// A request body must arrive within this (408).
    pub body_timeout: std::time::Duration,
    pub ranges: Ranges,
    pub allow_image_urls: bool,
    /// Shown by `/health`: a hub id or a file name, never a path.
    pub model_name: Arc<str>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    /// The LoRA directory (`--lora-dir`), if any: names only are ever shown to clients.
    pub lora_dir: Option<Arc<std::path::Path>>,
    /// The v2 job API's jobs.
    pub jobs: super::jobs::Jobs,
    /// `--public-url` without its trailing `/`.
    pub public_url: Option<Arc<str>>,
}

/// `POST /v1/sdxl1.0-dreamshaper`: key, content type, body, checks, queue, generation, answer.
pub async fn generate(state: State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    serve(state, headers, body, Mode::TextToImage).await
}

/// `POST /v1/sdxl-img2img`: as the text-to-image endpoint, with the input image.
pub async fn img2img(state: State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    serve(state, headers, body, Mode::ImageToImage).await
}

/// `POST /v1/sdxl-inpaint`: as image to image, with the mask.
pub async fn inpaint(state: State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    serve(state, headers, body, Mode::Inpaint).await
}

async fn serve(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    decode::check_content_type(&headers)?;
    let bytes = decode::read_body(body, &headers, state.max_body_bytes, state.body_timeout).await?;
    let mut request = decode::parse(&bytes)?;
    if mode != Mode::TextToImage {
        fetch_urls(&mut request, &state).await?;
    }
    let request = decode::check(request, state.ranges, mode)?;
    let base64 = request.base64;
    let ticket = state.queue.submit(request)?;
    // If the client disconnects, this future is dropped here, and with it the ticket, which cancels the job.
    let outcome = ticket.outcome().await;
    state.metrics.record_outcome(&outcome);
    match outcome {
        Outcome::Done(finished) => {
            tokio::task::spawn_blocking(move || respond::success(&finished, base64)).await.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the answer failed: {e}"))
            })?
        }
        Outcome::Failed(error) => {
            tracing::warn!(%error, "generation failed");
            Err(ApiError::from_generation(&error))
        }
        Outcome::Panicked(message) => {
            tracing::error!(%message, "generation panicked");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("generation failed: internal error ({message})"),
            ))
        }
        Outcome::ShuttingDown => Err(ApiError::shutting_down()),
    }
}

/// Replaces `image` / `mask` URLs by the fetched images (base64), when the server allows it; otherwise 400.
pub async fn fetch_urls(request: &mut crate::GenerateRequest, state: &AppState) -> Result<(), ApiError> {
    for (field, slot) in [("image", &mut request.image), ("mask", &mut request.mask)] {
        let Some(url) = slot.clone().filter(|v| super::fetch::is_url(v)) else {
            continue;
        };
        if !state.allow_image_urls {
            return Err(ApiError::bad_request(format!(
                "invalid request: `{field}` is a URL: this server fetches images only when started with \
                 --allow-image-urls; send the image itself, base64-encoded"
            )));
        }
        let limit = state.max_body_bytes;
        let fetched = tokio::task::spawn_blocking(move || super::fetch::fetch(field, &url, limit))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("fetching `{field}` failed: {e}")))?;
        let bytes = fetched.map_err(|e| ApiError::bad_request(e.to_string()))?;
        use base64::Engine;
        *slot = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Ok(())
}

/// Any other path under `/v1/`: a model this server does not serve (after the key check, like the real one).
pub async fn other_model(State(state): State<AppState>, headers: HeaderMap) -> ApiError {
    match state.keys.check(&headers) {
        Err(e) => e,
        Ok(()) => ApiError::model_not_found(),
    }
}

/// `GET /health`: whether the model is loaded and how many requests wait. 503 while shutting down.
pub async fn health(State(state): State<AppState>) -> Response {
    let status = state.queue.status();
    let body = serde_json::json!({
        "status": if status.closed { "shutting_down" } else { "ok" },
        "model": &*state.model_name,
        "model_loaded": true,
        "queue_length": status.waiting,
        "running": status.running,
        "max_queue": status.capacity,
        "completed": status.completed,
        "cancelled": status.cancelled,
    });
    let code = if status.closed { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (code, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /ready`: whether this replica should be sent work (for load balancers and readiness probes). 200 while the
/// model is loaded (it is, once the server listens), the server is not shutting down and a request would be queued
/// rather than answered 429; 503 with the reason otherwise. `/health` is liveness: it stays 200 while the queue is
/// full.
pub async fn ready(State(state): State<AppState>) -> Response {
    let status = state.queue.status();
    let in_system = status.waiting + usize::from(status.running);
    let reason = if status.closed {
        Some("shutting_down")
    } else if in_system > status.capacity {
        Some("queue_full")
    } else {
        None
    };
    let body = serde_json::json!({
        "ready": reason.is_none(),
        "reason": reason,
        "queue_length": status.waiting,
        "running": status.running,
        "max_queue": status.capacity,
    });
    let code = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /metrics`: Prometheus text; behind the key when one is set (or served key-less on `--metrics-addr`).
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    Ok(metrics_text(&state))
}

/// The exposition answer, for `/metrics` on either listener.
pub fn metrics_text(state: &AppState) -> Response {
    let text = state.metrics.render(state.queue.status(), state.connections.stats());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found()
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
