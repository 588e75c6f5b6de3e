//! Errors as the hosted API shows them: a status code and a JSON body `{"error": "<message>"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::queue::Rejected;
use crate::Error;

/// An HTTP error answer. The message names the offending field and what it accepts where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None }
    }

    /// 400: a bad parameter or an unreadable body.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: a key is required and the request has none or a wrong one.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Invalid or missing API key: send it in the `x-api-key` header")
    }

    /// 404 for a model slug this server does not serve.
    pub fn model_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Model not found")
    }

    /// 404 for any other path.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
    }

    /// 406: the body is not declared as JSON.
    pub fn not_json(content_type: Option<&str>) -> Self {
        let got = match content_type {
            Some(t) => format!("got `{t}`"),
            None => "none was given".to_string(),
        };
        Self::new(StatusCode::NOT_ACCEPTABLE, format!("Content-Type must be application/json, {got}"))
    }

    /// 413: the body is larger than the server accepts.
    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than the limit of {limit} bytes"))
    }

    /// 429: every place in the queue is taken.
    pub fn queue_full(capacity: usize, retry_after: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("Too many requests: the queue is full ({capacity} waiting); retry in {retry_after} s"),
            retry_after: Some(retry_after),
        }
    }

    /// 503: the server is shutting down and will not run this request.
    pub fn shutting_down() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "The server is shutting down")
    }

    /// The status of an error raised by the pipeline for one request: the caller's fault (400) or the server's (500).
    /// Every variant is listed, so that a new one gets its status decided here.
    pub fn from_generation(error: &Error) -> Self {
        match error {
            // What the request asked for: a field out of range, a scheduler that does not exist or that cannot run
            // with this model's scheduler config (another scheduler can).
            Error::InvalidRequest { .. }
            | Error::UnknownScheduler { .. }
            | Error::UnsupportedSchedulerConfig { .. } => Self::bad_request(error.to_string()),
            Error::Cancelled => Self::new(StatusCode::SERVICE_UNAVAILABLE, "generation cancelled"),
            // The server's model, files, tokenizer, worker or tensors: nothing the caller can change.
            Error::Io { .. }
            | Error::Model { .. }
            | Error::ConfigKey { .. }
            | Error::NotFound(_)
            | Error::ComponentLoad { .. }
            | Error::Tokenizer(_)
            | Error::Output { .. }
            | Error::Service(_)
            | Error::Tensor(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("generation failed: {error}")),
        }
    }
}

/// The queue's refusal: 429 with `Retry-After` when full, 503 when shutting down.
impl From<Rejected> for ApiError {
    fn from(rejected: Rejected) -> Self {
        match rejected {
            Rejected::Full { capacity, retry_after } => ApiError::queue_full(capacity, retry_after),
            Rejected::Closed => ApiError::shutting_down(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response =
            (self.status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_map_to_client_or_server_faults() {
        let client = [
            Error::invalid("seed", "bad"),
            Error::UnknownScheduler { name: "x".into(), valid: vec!["UniPC"] },
            Error::UnsupportedSchedulerConfig {
                scheduler: "UniPC",
                key: "solver_type",
                value: "\"x\"".into(),
                accepted: "bh1, bh2".into(),
            },
        ];
        for e in &client {
            let api = ApiError::from_generation(e);
            assert_eq!(api.status, StatusCode::BAD_REQUEST, "{e}");
            assert_eq!(api.message, e.to_string());
        }
        let server = [
            Error::io("weights.safetensors", std::io::Error::other("disk gone")),
            Error::model("unet/config.json", "bad layout"),
            Error::config_key("unet/config.json", "norm_num_groups", "must be at least 1"),
            Error::NotFound("model folder".into()),
            Error::ComponentLoad {
                component: "unet",
                source: Box::new(Error::NotFound("x".into())),
                hint: String::new(),
            },
            Error::Tokenizer("bad vocabulary".into()),
            Error::output("out.png", "disk full"),
            Error::Service("the generation worker stopped".into()),
            Error::Tensor(candle_core::Error::Msg("out of memory".into())),
        ];
        for e in &server {
            let api = ApiError::from_generation(e);
            assert_eq!(api.status, StatusCode::INTERNAL_SERVER_ERROR, "{e}");
            assert!(api.message.contains(&e.to_string()), "{}", api.message);
        }
        assert_eq!(ApiError::from_generation(&Error::Cancelled).status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn retry_after_header_on_429() {
        let r = ApiError::queue_full(2, 7).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
