//! The hosted service's v2 submit-and-poll job API, as its official Python SDK (`segmind`, `segmind/v2.py`) speaks
//! it:
//!
//! - `POST /v2/{slug}` (the v1 slugs, the v1 body and key): queues the job and answers at once with `request_id`,
//!   `status: "QUEUED"` and absolute `status_url`, `response_url` (also `poll_url`, `cancel_url`), built from
//!   `--public-url` or the request's `Host`. Errors before queueing are v1's (400, 401, 404, 406, 413, 429, 503).
//! - `GET /v2/requests/{id}/status`: `status` (`QUEUED`, `PROCESSING`, `COMPLETED`, `FAILED`), `queue_position`,
//!   `progress: {step, total, eta_seconds, stage, fraction}`, `preview_url` once a preview exists, and `error` on
//!   `FAILED` (then HTTP 422, as the hosted service answers a failed job; the SDK reads the body either way).
//! - `GET /v2/requests/{id}` (the `response_url`): `{status: "COMPLETED", error: null, metrics: {inference_time,
//!   queue_time}, output, seed}` where `output` is the absolute URL of the JPEG, a list of them for several samples;
//!   422 with the error for a failed job, 202 with the status while it is not done.
//! - `GET /v2/requests/{id}/output/{n}.jpg`: the n-th image (from 0); `GET /v2/requests/{id}/preview.jpg`: the
//!   latest preview of a running job (a status poll asks the worker for a fresh one).
//! - `POST /v2/requests/{id}/cancel` or `DELETE /v2/requests/{id}`: a queued or running job becomes `FAILED` with
//!   `error: "cancelled"` (a running generation stops at its next model evaluation); 409 once it has ended.
//!
//! Every route needs the key, as v1 does. Polls are cheap: a short lock on the job store, none across a generation.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::server::decode::{self, Mode};
use crate::server::errors::ApiError;
use crate::server::handlers::{self, AppState, IMG2IMG_PATH, INPAINT_PATH, MODEL_PATH};
use crate::server::jobs::{self, End, Snapshot};
use crate::server::queue::JobState;
use crate::server::respond::{self, SEED_HEADER};

/// This dialect's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/{slug}", post(submit))
        .route("/v2/requests/{id}", get(result).delete(cancel))
        .route("/v2/requests/{id}/status", get(status))
        .route("/v2/requests/{id}/cancel", post(cancel))
        .route("/v2/requests/{id}/output/{file}", get(output))
        .route("/v2/requests/{id}/preview.jpg", get(preview))
}

/// The endpoint a v2 slug stands for: the v1 slugs.
fn mode(slug: &str) -> Option<Mode> {
    let v1 = |path: &str| path.strip_prefix("/v1/").is_some_and(|s| s == slug);
    if v1(MODEL_PATH) {
        Some(Mode::TextToImage)
    } else if v1(IMG2IMG_PATH) {
        Some(Mode::ImageToImage)
    } else if v1(INPAINT_PATH) {
        Some(Mode::Inpaint)
    } else {
        None
    }
}

/// `POST /v2/{slug}`: v1's checks, then the job is queued and its URLs returned.
async fn submit(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let mode = mode(&slug).ok_or_else(ApiError::model_not_found)?;
    decode::check_content_type(&headers)?;
    let bytes = decode::read_body(body, &headers, state.max_body_bytes, state.body_timeout).await?;
    let mut request = decode::parse(&bytes)?;
    if mode != Mode::TextToImage {
        handlers::fetch_urls(&mut request, &state).await?;
    }
    let request = decode::check(request, state.ranges, mode)?;
    let id = jobs::new_id();
    let snapshot = state.jobs.submit(id.clone(), request, &state.queue, state.metrics.clone())?;
    let base = base_url(&state, &headers);
    let urls = Urls::new(&base, &id);
    let body = json!({
        "request_id": id,
        "status": "QUEUED",
        "status_url": urls.status,
        "poll_url": urls.status,
        "response_url": urls.response,
        "cancel_url": urls.cancel,
        "queue_position": state.queue.position(snapshot.queue_id),
    });
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// `GET /v2/requests/{id}/status`.
async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let snapshot = state.jobs.get(&id)?;
    if snapshot.end.is_none() {
        // Made by the worker at its next evaluation, for the next poll.
        snapshot.progress.request_preview();
    }
    let urls = Urls::new(&base_url(&state, &headers), &id);
    Ok(status_answer(&state, &id, &snapshot, &urls))
}

/// `GET /v2/requests/{id}`: the result.
async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let snapshot = state.jobs.get(&id)?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    match &snapshot.end {
        Some(End::Completed(output)) => {
            let links: Vec<String> = (0..output.jpegs.len()).map(|n| urls.output(n)).collect();
            let body = json!({
                "request_id": id,
                "status": "COMPLETED",
                "error": null,
                "metrics": {
                    "inference_time": round_ms(output.inference_time),
                    "queue_time": round_ms(output.queue_time),
                },
                "output": if links.len() == 1 { json!(links[0]) } else { json!(links) },
                "seed": output.seed,
            });
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        Some(End::Failed(message)) => {
            let body = json!({
                "request_id": id,
                "status": "FAILED",
                "error": message,
                "metrics": {},
                "output": null,
            });
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
        }
        None => {
            let mut answer = status_body(&state, &id, &snapshot, &urls);
            answer["output"] = Value::Null;
            Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
        }
    }
}

/// `POST /v2/requests/{id}/cancel`, `DELETE /v2/requests/{id}`: answered with the job's status (`FAILED`,
/// `cancelled`).
async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let snapshot = state.jobs.cancel(&id)?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    let body = status_body(&state, &id, &snapshot, &urls);
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// `GET /v2/requests/{id}/output/{n}.jpg`.
async fn output(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let snapshot = state.jobs.get(&id)?;
    let Some(End::Completed(output)) = &snapshot.end else {
        let message = format!("request `{id}` has no output: it is {}", status_name(&snapshot));
        return Err(ApiError::new(StatusCode::CONFLICT, message));
    };
    let n = file.strip_suffix(".jpg").and_then(|n| n.parse::<usize>().ok());
    let Some(jpeg) = n.and_then(|n| output.jpegs.get(n)) else {
        let count = output.jpegs.len();
        let message = format!("request `{id}` has {count} image(s): `output/0.jpg` … `output/{}.jpg`", count - 1);
        return Err(ApiError::new(StatusCode::NOT_FOUND, message));
    };
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], jpeg.clone()).into_response();
    response.headers_mut().insert(SEED_HEADER, HeaderValue::from(output.seed));
    Ok(response)
}

/// `GET /v2/requests/{id}/preview.jpg`: the latest preview (from the engine's preview decoder); 404 until one has
/// been made.
async fn preview(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let snapshot = state.jobs.get(&id)?;
    let Some((image, _)) = snapshot.progress.snapshot().preview else {
        snapshot.progress.request_preview();
        let message = format!("request `{id}` has no preview yet (one is made at the next model evaluation)");
        return Err(ApiError::new(StatusCode::NOT_FOUND, message));
    };
    let jpeg = respond::jpeg(&image)?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], jpeg).into_response())
}

/// The status answer: 200, or 422 for a failed job (as the hosted service answers).
fn status_answer(state: &AppState, id: &str, snapshot: &Snapshot, urls: &Urls) -> Response {
    let code = match snapshot.end {
        Some(End::Failed(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    (code, Json(status_body(state, id, snapshot, urls))).into_response()
}

fn status_name(snapshot: &Snapshot) -> &'static str {
    match &snapshot.end {
        Some(End::Completed(_)) => "COMPLETED",
        Some(End::Failed(_)) => "FAILED",
        // Finished but not yet stored (its JPEGs are being encoded): still processing.
        None => match snapshot.progress.snapshot().state {
            JobState::Queued => "QUEUED",
            JobState::Running | JobState::Finished => "PROCESSING",
        },
    }
}

fn status_body(state: &AppState, id: &str, snapshot: &Snapshot, urls: &Urls) -> Value {
    let progress = snapshot.progress.snapshot();
    let status = status_name(snapshot);
    let completed = status == "COMPLETED";
    let mut body = json!({
        "request_id": id,
        "status": status,
        "queue_position": if status == "QUEUED" { json!(state.queue.position(snapshot.queue_id)) } else { Value::Null },
        "progress": {
            "step": if completed { progress.steps } else { progress.step },
            "total": progress.steps,
            "eta_seconds": if completed { Some(0.0) } else { progress.eta_seconds.map(round_ms) },
            "stage": if completed { "done" } else { progress.stage },
            "fraction": if completed { 1.0 } else { round_ms(progress.fraction()) },
        },
        "status_url": urls.status,
        "response_url": urls.response,
    });
    if let Some(End::Failed(message)) = &snapshot.end {
        body["error"] = json!(message);
    }
    if status == "PROCESSING" {
        if let Some((_, evaluation)) = &progress.preview {
            body["preview_url"] = json!(urls.preview);
            body["preview_evaluation"] = json!(evaluation);
        }
    }
    body
}

/// A job's absolute URLs.
struct Urls {
    status: String,
    response: String,
    cancel: String,
    preview: String,
}

impl Urls {
    fn new(base: &str, id: &str) -> Self {
        let job = format!("{base}/v2/requests/{id}");
        Self {
            status: format!("{job}/status"),
            cancel: format!("{job}/cancel"),
            preview: format!("{job}/preview.jpg"),
            response: job,
        }
    }

    fn output(&self, n: usize) -> String {
        format!("{}/output/{n}.jpg", self.response)
    }
}

/// `--public-url`, or `http://` and the request's `Host` (the SDK's HTTP client has base URL `…/v1`, so URLs must
/// be absolute). A `Host` with characters no host name has falls back to the address the server is reached at
/// locally.
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(public) = &state.public_url {
        return public.to_string();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c)));
    match host {
        Some(host) => format!("http://{host}"),
        None => "http://localhost".into(),
    }
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_v1_slugs() {
        assert_eq!(mode("sdxl1.0-dreamshaper"), Some(Mode::TextToImage));
        assert_eq!(mode("sdxl-img2img"), Some(Mode::ImageToImage));
        assert_eq!(mode("sdxl-inpaint"), Some(Mode::Inpaint));
        assert_eq!(mode("sdxl1.0-txt2img"), None);
        assert_eq!(mode("requests"), None);
    }

    #[test]
    fn urls_are_absolute() {
        let urls = Urls::new("https://gpu.example", "abc");
        assert_eq!(urls.status, "https://gpu.example/v2/requests/abc/status");
        assert_eq!(urls.response, "https://gpu.example/v2/requests/abc");
        assert_eq!(urls.cancel, "https://gpu.example/v2/requests/abc/cancel");
        assert_eq!(urls.output(1), "https://gpu.example/v2/requests/abc/output/1.jpg");
    }
}
