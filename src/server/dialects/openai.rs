//! OpenAI's image API: `POST /v1/images/generations`, as the `openai` clients call it (`client.images.generate`),
//! answered from the same queue, keys and limits as the hosted endpoints.
//!
//! The request maps onto a hosted one: `prompt`, `n` → `samples` (1–4), `size` `"WxH"` → `img_width` ×
//! `img_height` (held to the server's size ranges; `"auto"` or none: 1024×1024). OpenAI has no seed, steps or
//! scheduler; `seed`, `negative_prompt`, `scheduler`, `num_inference_steps` and `guidance_scale` are accepted as
//! extensions (the client's `extra_body`) with the hosted API's meaning, types, ranges and defaults, so that an image
//! can be reproduced or compared with the hosted endpoint's. `model`, `quality`, `style`, `user`,
//! `safety_identifier`, `moderation`, `background` and `complexity` are accepted and ignored: there is one model, and
//! the rest steer services this server does not have (the answer says `"background": "opaque"`).
//!
//! The answer is `{"created", "data": [{"b64_json", "revised_prompt"}], "size", "output_format", "background"}`:
//! PNG by default (as OpenAI's), carrying A1111's `parameters` text chunk, or JPEG with `output_format: "jpeg"`
//! (`output_compression` is its quality, default 100). `revised_prompt` is the prompt as used (unchanged).
//! `response_format: "url"` is refused: the server keeps no files to serve, and a URL would need a public address it
//! does not know. Streaming and the GIF / SVG / WebP formats are refused too. Every error has OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, which the clients raise as `BadRequestError`,
//! `AuthenticationError`, … with those fields.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::server::decode::{self, Mode, Ranges};
use crate::server::errors::ApiError;
use crate::server::handlers::AppState;
use crate::server::queue::{Finished, Outcome};
use crate::server::respond::{GENERATION_TIME_HEADER, SEED_HEADER};
use crate::GenerateRequest;

/// OpenAI's image generation route.
pub const GENERATIONS_PATH: &str = "/v1/images/generations";

/// The most images one request may ask for (the hosted API's `samples` range; OpenAI's is 10).
pub const MAX_N: u64 = 4;

/// The size `"auto"` (or none) stands for: SDXL's native size.
pub const AUTO_SIZE: (u32, u32) = (1024, 1024);

/// The hosted fields accepted as extensions, passed through with the hosted API's meaning.
const EXTENSIONS: [&str; 5] = ["seed", "negative_prompt", "scheduler", "num_inference_steps", "guidance_scale"];

/// This dialect's routes: the generations route, and OpenAI-shaped answers for its other image routes and methods.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(GENERATIONS_PATH, post(generations).fallback(method_not_allowed))
        .route("/v1/images/{*rest}", any(other_image_route))
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error` or `server_error`.
    pub kind: &'static str,
    /// The request field at fault, by its OpenAI name.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl OpenAiError {
    /// 400 for the request field `param`.
    pub fn invalid(param: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some(code),
            retry_after: None,
        }
    }

    /// 400 for a body that is not a JSON object (no one field at fault).
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self { param: None, code: None, ..Self::invalid("", "", message) }
    }
}

impl From<ApiError> for OpenAiError {
    /// The server's own errors in OpenAI's words: the status and message stay; `type` and `code` follow OpenAI's
    /// (an unknown key is `invalid_request_error` / `invalid_api_key`, as OpenAI answers it); `param` is the field
    /// the message names, by its OpenAI name.
    fn from(e: ApiError) -> Self {
        let (kind, code) = match e.status {
            StatusCode::UNAUTHORIZED => ("invalid_request_error", Some("invalid_api_key")),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", Some("rate_limit_exceeded")),
            StatusCode::NOT_FOUND => ("invalid_request_error", Some("unknown_url")),
            StatusCode::SERVICE_UNAVAILABLE => ("server_error", Some("service_unavailable")),
            s if s.is_server_error() => ("server_error", None),
            StatusCode::BAD_REQUEST => ("invalid_request_error", Some("invalid_value")),
            _ => ("invalid_request_error", None),
        };
        let message = if e.status == StatusCode::UNAUTHORIZED {
            "Invalid or missing API key: send it as `Authorization: Bearer KEY` (the client's api_key)".to_string()
        } else {
            e.message
        };
        let param = (e.status == StatusCode::BAD_REQUEST).then(|| named_field(&message)).flatten().map(openai_name);
        Self { status: e.status, message, kind, param, code, retry_after: e.retry_after }
    }
}

/// The first `field` a server message names in backquotes.
fn named_field(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// A hosted field's name in the OpenAI request.
fn openai_name(field: String) -> String {
    match field.as_str() {
        "samples" => "n".into(),
        "img_width" | "img_height" => "size".into(),
        _ => field,
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut response =
            (self.status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string())
                .into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The image encoding asked for (`output_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// With A1111's `parameters` text chunk.
    Png,
    /// With this quality (`output_compression`, 0–100).
    Jpeg(u8),
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpeg(_) => "jpeg",
        }
    }
}

/// A request mapped to the hosted one, with how to encode the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub request: GenerateRequest,
    pub format: Format,
}

/// Maps an OpenAI request body onto a checked hosted request (the hosted decoder checks every field it shares, so
/// types, ranges and scheduler names are refused exactly as on the hosted endpoint, under OpenAI's names).
pub fn map_request(body: &[u8], ranges: Ranges) -> Result<Mapped, OpenAiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| OpenAiError::bad_body(format!("We could not parse the JSON body of your request: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(OpenAiError::bad_body("The request body must be a JSON object"));
    };
    let given = |name: &str| fields.get(name).filter(|v| !v.is_null());

    let prompt = match given("prompt") {
        None => {
            let message = "Missing required parameter: 'prompt'.";
            return Err(OpenAiError::invalid("prompt", "missing_required_parameter", message));
        }
        Some(Value::String(p)) => p.clone(),
        Some(other) => return Err(wrong_type("prompt", "a string", other)),
    };
    let n = match given("n") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_N).contains(&n) => n,
            _ => {
                let message = format!("Invalid 'n': must be an integer between 1 and {MAX_N} on this server, got {v}.");
                return Err(OpenAiError::invalid("n", "invalid_value", message));
            }
        },
    };
    let (width, height) = match given("size") {
        None => AUTO_SIZE,
        Some(Value::String(s)) => parse_size(s)?,
        Some(other) => return Err(wrong_type("size", "a string \"WIDTHxHEIGHT\" or \"auto\"", other)),
    };
    one_of(&fields, "response_format", &["b64_json"], |v| {
        if v == "url" {
            "response_format \"url\" is not supported by this server: it keeps no image files to serve. Use \
             \"b64_json\" (the default here): the image is in the answer, base64-encoded."
                .to_string()
        } else {
            format!("Invalid 'response_format': {v:?}. Supported value: 'b64_json'.")
        }
    })?;
    let format = match given("output_format") {
        None => Format::Png,
        Some(Value::String(f)) if f == "png" => Format::Png,
        Some(Value::String(f)) if f == "jpeg" || f == "jpg" => Format::Jpeg(match given("output_compression") {
            None => 100,
            Some(v) => match v.as_u64() {
                Some(q) if q <= 100 => q as u8,
                _ => {
                    let message = format!("Invalid 'output_compression': must be an integer from 0 to 100, got {v}.");
                    return Err(OpenAiError::invalid("output_compression", "invalid_value", message));
                }
            },
        }),
        Some(v) => {
            let message = format!("Invalid 'output_format': {v}. Supported values on this server: 'png', 'jpeg'.");
            return Err(OpenAiError::invalid("output_format", "invalid_value", message));
        }
    };
    if given("stream").is_some_and(|v| v != &Value::Bool(false)) {
        let message = "Streaming is not supported by this server: leave 'stream' out or false.";
        return Err(OpenAiError::invalid("stream", "invalid_value", message));
    }

    // The hosted request, decoded by the hosted decoder: its type, range and scheduler checks, its defaults.
    let mut hosted = Map::new();
    hosted.insert("prompt".into(), Value::String(prompt));
    hosted.insert("samples".into(), json!(n));
    hosted.insert("img_width".into(), json!(width));
    hosted.insert("img_height".into(), json!(height));
    for name in EXTENSIONS {
        if let Some(v) = given(name) {
            hosted.insert(name.into(), v.clone());
        }
    }
    let size_text = format!("{width}x{height}");
    let from_hosted = |e: ApiError| {
        let mut e = OpenAiError::from(e);
        if e.param.as_deref() == Some("size") {
            let message = e.message.replace("`img_width`", "the width").replace("`img_height`", "the height");
            e.message = format!("Invalid 'size' {size_text:?}: {message}");
        }
        e
    };
    let request = decode::parse(Value::Object(hosted).to_string().as_bytes()).map_err(from_hosted)?;
    let request = decode::check(request, ranges, Mode::TextToImage).map_err(from_hosted)?;
    Ok(Mapped { request, format })
}

/// `"WIDTHxHEIGHT"` (`x` or `X`), or `"auto"`: [`AUTO_SIZE`]. The ranges are checked with the request's.
fn parse_size(size: &str) -> Result<(u32, u32), OpenAiError> {
    if size == "auto" {
        return Ok(AUTO_SIZE);
    }
    let parsed = size
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)));
    parsed.ok_or_else(|| {
        let message = format!("Invalid 'size': {size:?}: must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\".");
        OpenAiError::invalid("size", "invalid_value", message)
    })
}

/// A string field that, when given, must be one of `accepted`; `refusal` words the message for another value.
fn one_of(
    fields: &Map<String, Value>,
    name: &str,
    accepted: &[&str],
    refusal: impl Fn(&str) -> String,
) -> Result<(), OpenAiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(v)) if accepted.contains(&v.as_str()) => Ok(()),
        Some(Value::String(v)) => Err(OpenAiError::invalid(name, "invalid_value", refusal(v))),
        Some(other) => Err(wrong_type(name, "a string", other)),
    }
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> OpenAiError {
    let message = format!("Invalid type for '{name}': expected {expected}, but got {got}.");
    OpenAiError::invalid(name, "invalid_type", message)
}

/// `POST /v1/images/generations`: key, content type, body, mapping and checks, queue, generation, answer.
pub async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    state.keys.check(&headers)?;
    decode::check_content_type(&headers)?;
    let bytes = decode::read_body(body, &headers, state.max_body_bytes, state.body_timeout).await?;
    let Mapped { request, format } = map_request(&bytes, state.ranges)?;
    let ticket = state.queue.submit(request.clone()).map_err(ApiError::from)?;
    // A client that disconnects drops this future, and with it the ticket, which cancels the job.
    let outcome = ticket.outcome().await;
    state.metrics.record_outcome(&outcome);
    match outcome {
        Outcome::Done(finished) => {
            let model = state.model_name.clone();
            let answer = tokio::task::spawn_blocking(move || answer(&finished, &request, format, &model));
            answer.await.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the answer failed: {e}"))
            })?
        }
        Outcome::Failed(error) => {
            tracing::warn!(%error, "generation failed");
            Err(ApiError::from_generation(&error).into())
        }
        Outcome::Panicked(message) => {
            tracing::error!(%message, "generation panicked");
            let message = format!("generation failed: internal error ({message})");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).into())
        }
        Outcome::ShuttingDown => Err(ApiError::shutting_down().into()),
    }
}

/// The answer for a finished job (CPU work: image encoding; call from a blocking context). The seed and generation
/// time are also in the hosted endpoint's headers.
pub fn answer(
    finished: &Finished,
    request: &GenerateRequest,
    format: Format,
    model: &str,
) -> Result<Response, OpenAiError> {
    let encoding_failed = |e: String| {
        OpenAiError::from(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the image failed: {e}")))
    };
    let parameters = crate::output::a1111_parameters(request, finished.seed, model, &[]);
    let mut data = Vec::with_capacity(finished.images.len());
    for image in &finished.images {
        let bytes = match format {
            Format::Png => crate::output::png_bytes(image, &parameters).map_err(|e| encoding_failed(e.to_string()))?,
            Format::Jpeg(quality) => {
                let mut bytes = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality.max(1))
                    .encode_image(image)
                    .map_err(|e| encoding_failed(e.to_string()))?;
                bytes
            }
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        data.push(json!({"b64_json": b64, "revised_prompt": request.prompt}));
    }
    if data.is_empty() {
        return Err(encoding_failed("the generation produced no image".into()));
    }
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let body = json!({
        "created": created,
        "data": data,
        "size": format!("{}x{}", request.img_width, request.img_height),
        "output_format": format.name(),
        "background": "opaque",
    });
    let mut response =
        ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static(SEED_HEADER), HeaderValue::from(finished.seed));
    let time = format!("{:.3}", finished.elapsed.as_secs_f64());
    headers.insert(HeaderName::from_static(GENERATION_TIME_HEADER), HeaderValue::from_str(&time).expect("digits"));
    Ok(response)
}

/// A method other than POST on the generations route.
async fn method_not_allowed() -> OpenAiError {
    ApiError::method_not_allowed().into()
}

/// OpenAI's other image routes (edits, variations): not served (after the key check, like every route here).
async fn other_image_route(State(state): State<AppState>, headers: HeaderMap) -> OpenAiError {
    if let Err(e) = state.keys.check(&headers) {
        return e.into();
    }
    let message = format!("This server implements only {GENERATIONS_PATH} of OpenAI's image API.");
    OpenAiError { message, ..ApiError::not_found().into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: Value) -> OpenAiError {
        map_request(body.to_string().as_bytes(), Ranges::Hosted).expect_err("refused")
    }

    #[test]
    fn openai_fields_map_to_the_hosted_request() {
        let body = json!({"prompt": "a cat", "n": 2, "size": "512x768", "response_format": "b64_json",
            "model": "dall-e-3", "quality": "hd", "style": "vivid", "user": "u", "background": "transparent",
            "seed": 7, "scheduler": "euler", "num_inference_steps": 20, "guidance_scale": 5,
            "negative_prompt": "blurry"});
        let Mapped { request: r, format } = map_request(body.to_string().as_bytes(), Ranges::Hosted).unwrap();
        assert_eq!((r.samples, r.img_width, r.img_height, r.seed), (2, 512, 768, 7));
        assert_eq!((r.scheduler.as_str(), r.num_inference_steps, r.guidance_scale), ("euler", 20, 5.0));
        assert_eq!((r.prompt.as_str(), r.negative_prompt.as_str(), format), ("a cat", "blurry", Format::Png));
        // Defaults: one image, 1024², a random seed, the hosted defaults.
        let Mapped { request: r, .. } =
            map_request(br#"{"prompt": "x", "size": "auto", "n": null}"#, Ranges::Hosted).unwrap();
        let hosted = GenerateRequest::new("x");
        assert_eq!((r.samples, r.img_width, r.img_height, r.seed), (1, 1024, 1024, -1));
        assert_eq!((r.scheduler, r.num_inference_steps), (hosted.scheduler, hosted.num_inference_steps));
        let jpeg = json!({"prompt": "x", "output_format": "jpeg", "output_compression": 80});
        assert_eq!(map_request(jpeg.to_string().as_bytes(), Ranges::Hosted).unwrap().format, Format::Jpeg(80));
    }

    #[test]
    fn errors_name_the_openai_param() {
        let cases = [
            (json!({"n": 1}), "prompt", "missing_required_parameter"),
            (json!({"prompt": 3}), "prompt", "invalid_type"),
            (json!({"prompt": "x", "n": 9}), "n", "invalid_value"),
            (json!({"prompt": "x", "n": 0}), "n", "invalid_value"),
            (json!({"prompt": "x", "n": "2"}), "n", "invalid_value"),
            (json!({"prompt": "x", "size": "big"}), "size", "invalid_value"),
            (json!({"prompt": "x", "size": "256x256"}), "size", "invalid_value"),
            (json!({"prompt": "x", "size": "1024x1020"}), "size", "invalid_value"),
            (json!({"prompt": "x", "response_format": "url"}), "response_format", "invalid_value"),
            (json!({"prompt": "x", "output_format": "webp"}), "output_format", "invalid_value"),
            (
                json!({"prompt": "x", "output_format": "jpeg", "output_compression": 101}),
                "output_compression",
                "invalid_value",
            ),
            (json!({"prompt": "x", "stream": true}), "stream", "invalid_value"),
            (json!({"prompt": "x", "seed": "7"}), "seed", "invalid_value"),
            (json!({"prompt": "x", "scheduler": "nope"}), "scheduler", "invalid_value"),
            (json!({"prompt": "x", "num_inference_steps": 2}), "num_inference_steps", "invalid_value"),
        ];
        for (body, param, code) in cases {
            let e = refused(body.clone());
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!((e.param.as_deref(), e.code), (Some(param), Some(code)), "{body}: {}", e.message);
            assert_eq!(e.kind, "invalid_request_error");
        }
        assert!(refused(json!({"prompt": "x", "response_format": "url"})).message.contains("b64_json"));
        let e = refused(json!({"prompt": "x", "size": "256x256"}));
        assert!(e.message.contains("256x256") && e.message.contains("512 and 2048"), "{}", e.message);
        assert!(map_request(br#"{"prompt": "x", "size": "64x64"}"#, Ranges::Open).is_ok());
        for body in ["[1]", "{", ""] {
            let e = map_request(body.as_bytes(), Ranges::Hosted).unwrap_err();
            assert_eq!((e.status, e.param.as_ref()), (StatusCode::BAD_REQUEST, None), "{body}");
        }
    }

    #[test]
    fn server_errors_in_openai_shape() {
        let e = OpenAiError::from(ApiError::unauthorized());
        assert_eq!((e.status, e.code), (StatusCode::UNAUTHORIZED, Some("invalid_api_key")));
        let r = OpenAiError::from(ApiError::queue_full(2, 7)).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let e = OpenAiError::from(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "boom"));
        assert_eq!((e.kind, e.param), ("server_error", None));
    }
}
