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
use crate::server::jobs::{Status, View};
use crate::server::respond::SEED_HEADER;

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
    let (id, view) = state.jobs.submit(request).await?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    let body = json!({
        "request_id": id,
        // As the hosted service answers: queued when submitted (the worker may already have taken it; a poll
        // says so).
        "status": "QUEUED",
        "status_url": urls.status,
        "poll_url": urls.status,
        "response_url": urls.response,
        "cancel_url": urls.cancel,
        "queue_position": view.queue_position.unwrap_or(0),
    });
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// `GET /v2/requests/{id}/status`: 200, or 422 for a failed job (as the hosted service answers).
async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let view = state.jobs.status(&id).await?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    let code = if view.status == Status::Failed { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    Ok((code, Json(status_body(&id, &view, &urls))).into_response())
}

/// `GET /v2/requests/{id}`: the result.
async fn result(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let view = state.jobs.status(&id).await?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    match (&view.status, &view.result) {
        (Status::Completed, Some(result)) => {
            let links: Vec<String> = (0..result.images).map(|n| urls.output(n)).collect();
            let body = json!({
                "request_id": id,
                "status": "COMPLETED",
                "error": null,
                "metrics": {"inference_time": result.inference_time, "queue_time": result.queue_time},
                "output": if links.len() == 1 { json!(links[0]) } else { json!(links) },
                "seed": result.seed,
            });
            Ok((StatusCode::OK, Json(body)).into_response())
        }
        (Status::Failed, _) => {
            let body = json!({
                "request_id": id,
                "status": "FAILED",
                "error": view.error,
                "metrics": {},
                "output": null,
            });
            Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response())
        }
        _ => {
            let mut answer = status_body(&id, &view, &urls);
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
    let view = state.jobs.cancel(&id).await?;
    let urls = Urls::new(&base_url(&state, &headers), &id);
    Ok((StatusCode::OK, Json(status_body(&id, &view, &urls))).into_response())
}

/// `GET /v2/requests/{id}/output/{n}.jpg`.
async fn output(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.keys.check(&headers)?;
    let n = file.strip_suffix(".jpg").and_then(|n| n.parse::<usize>().ok());
    let Some(n) = n else {
        let message = format!("no such output `{file}`: the images are `output/0.jpg`, `output/1.jpg` …");
        return Err(ApiError::new(StatusCode::NOT_FOUND, message));
    };
    let (jpeg, seed) = state.jobs.output(&id, n).await?;
    let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], jpeg).into_response();
    response.headers_mut().insert(SEED_HEADER, HeaderValue::from(seed));
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
    let jpeg = state.jobs.preview(&id).await?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], jpeg).into_response())
}

fn status_body(id: &str, view: &View, urls: &Urls) -> Value {
    let p = &view.progress;
    let mut body = json!({
        "request_id": id,
        "status": view.status.as_str(),
        "queue_position": view.queue_position,
        "progress": {
            "step": p.step,
            "total": p.total,
            "eta_seconds": p.eta_seconds,
            "stage": p.stage,
            "fraction": p.fraction,
        },
        "status_url": urls.status,
        "response_url": urls.response,
    });
    if let Some(error) = &view.error {
        body["error"] = json!(error);
    }
    if let (Status::Processing, Some(evaluation)) = (view.status, view.preview_evaluation) {
        body["preview_url"] = json!(urls.preview);
        body["preview_evaluation"] = json!(evaluation);
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
