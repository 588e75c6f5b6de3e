//! From HTTP request to a checked [`GenerateRequest`]: the content type (406), the body size (413), the JSON and
//! each field's type (400), then the hosted API's ranges and scheduler names (400). Every 400 names the field and
//! what it accepts.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::errors::ApiError;
use crate::{Error, GenerateRequest};

/// 406 unless the request says its body is JSON (`application/json`, parameters such as `charset` allowed, or a
/// `+json` type).
pub fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::not_json(None));
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::not_json(Some(&text)))
    }
}

/// The whole body, or 413 as soon as it is known to be over `limit` bytes (a `Content-Length` above it is refused
/// before anything is read), or 408 when it has not all arrived within `timeout`.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await.map_err(|_| {
        let message = format!("the request body did not arrive within {timeout:?}");
        ApiError::new(axum::http::StatusCode::REQUEST_TIMEOUT, message)
    })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!("could not read the request body: {e}"))),
    }
}

/// What each field accepts, for type errors (a string where a number belongs, a negative count, …).
fn accepted(field: &str) -> Option<String> {
    Some(match field {
        "prompt" | "negative_prompt" => "must be a string".into(),
        "samples" => "must be an integer between 1 and 4".into(),
        "scheduler" => format!("must be one of {}", scheduler_list()),
        "num_inference_steps" => "must be an integer between 20 and 100".into(),
        "guidance_scale" => "must be a number between 1 and 25".into(),
        "seed" => format!("must be an integer between -1 and {}", crate::request::MAX_SEED),
        "img_width" | "img_height" => "must be a multiple of 8 between 512 and 2048".into(),
        "base64" => "must be true or false".into(),
        "image" => "must be a string: the base64 of a PNG, JPEG or WebP image".into(),
        "strength" => "must be a number in (0, 1]".into(),
        "mask" => "must be a string: the base64 of a PNG, JPEG or WebP mask".into(),
        "prompt_syntax" => "must be \"a1111\" or \"none\"".into(),
        "emphasis" => "must be \"original\" or \"no-norm\"".into(),
        "eta" => "must be a number".into(),
        "loras" => "must be a list of {\"name\": string, \"weight\": number}".into(),
        "scheduler_options" => "must be an object of scheduler config keys".into(),
        "hires" => "must be an object {\"scale\", \"strength\", \"steps\"}".into(),
        _ => return None,
    })
}

fn scheduler_list() -> String {
    crate::schedulers::names().iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// Parses a JSON body into a request (unknown fields are ignored). Errors name the field at fault. The body must be
/// a JSON object: serde would otherwise read an array as the fields in declaration order.
pub fn parse(body: &[u8]) -> Result<GenerateRequest, ApiError> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') | None => {}
        Some(_) => {
            let kind = match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Array(_)) => "an array",
                Ok(serde_json::Value::String(_)) => "a string",
                Ok(serde_json::Value::Number(_)) => "a number",
                Ok(serde_json::Value::Bool(_)) => "a boolean",
                Ok(_) => "null",
                Err(e) => return Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
            };
            return Err(ApiError::bad_request(format!("invalid request: the body must be a JSON object, got {kind}")));
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let request: GenerateRequest = match serde_path_to_error::deserialize(&mut deserializer) {
        Ok(r) => r,
        Err(e) => return Err(json_error(e)),
    };
    deserializer.end().map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    Ok(request)
}

fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let field = e.path().iter().next().map(|segment| segment.to_string());
    let inner = e.into_inner();
    if !inner.is_data() {
        return ApiError::bad_request(format!("malformed JSON: {inner}"));
    }
    match field.as_deref().and_then(|f| accepted(f).map(|a| (f.to_string(), a))) {
        Some((field, accepted)) => ApiError::bad_request(format!("invalid request: `{field}` {accepted} ({inner})")),
        None => {
            let text = inner.to_string();
            if let Some(field) = field.filter(|f| !f.is_empty() && f != "?") {
                // A field without a description above (e.g. inside `loras`): still say which one.
                ApiError::bad_request(format!("invalid request: `{field}`: {text}"))
            } else if text.starts_with("invalid type") {
                ApiError::bad_request(format!("invalid request: the body must be a JSON object ({text})"))
            } else {
                // "missing field `prompt`", "duplicate field `seed`": serde names the field itself.
                ApiError::bad_request(format!("invalid request: {text}"))
            }
        }
    }
}

/// Which ranges requests are held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ranges {
    /// Exactly the hosted API's (the default, and the only choice offered by `--help`).
    #[default]
    Hosted,
    /// Open ranges for few-step models (`--open-ranges`): steps 1–100, guidance 0–25, sizes any multiple of 8 from 64
    /// to 2048; every other field as hosted.
    Open,
}

/// The ranges and a known scheduler name.
pub fn validate(request: &GenerateRequest, ranges: Ranges) -> Result<(), ApiError> {
    let invalid = |e: Error| ApiError::bad_request(e.to_string());
    match ranges {
        Ranges::Hosted => request.validate_hosted().map_err(invalid)?,
        Ranges::Open => {
            for (field, v) in [("img_width", request.img_width), ("img_height", request.img_height)] {
                if !(64..=2048).contains(&v) || v % 8 != 0 {
                    let message = format!("must be a multiple of 8 between 64 and 2048 (open ranges), got {v}");
                    return Err(invalid(Error::invalid(field, message)));
                }
            }
            if !(1..=100).contains(&request.num_inference_steps) {
                let message = format!("must be between 1 and 100 (open ranges), got {}", request.num_inference_steps);
                return Err(invalid(Error::invalid("num_inference_steps", message)));
            }
            if !(0.0..=25.0).contains(&request.guidance_scale) {
                let message = format!("must be between 0 and 25 (open ranges), got {}", request.guidance_scale);
                return Err(invalid(Error::invalid("guidance_scale", message)));
            }
            // Every other field: the hosted ranges.
            let mut rest = request.clone();
            (rest.img_width, rest.img_height, rest.num_inference_steps, rest.guidance_scale) = (512, 512, 20, 7.5);
            rest.validate_hosted().map_err(invalid)?;
        }
    }
    // The library's own lookup (case-insensitive, with its aliases).
    if crate::schedulers::lookup(&request.scheduler).is_err() {
        let e =
            Error::invalid("scheduler", format!("must be one of {}, got {:?}", scheduler_list(), request.scheduler));
        return Err(invalid(e));
    }
    Ok(())
}

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `POST /v1/sdxl1.0-dreamshaper`: `image` and `strength` are not its fields, and are ignored like any other
    /// unknown field.
    TextToImage,
    /// `POST /v1/sdxl-img2img`: `image` is required; the output has its size. `mask` is ignored.
    ImageToImage,
    /// `POST /v1/sdxl-inpaint`: `image` and `mask` are required.
    Inpaint,
}

/// [`parse`] then [`validate`], for the text-to-image endpoint.
pub fn decode(body: &[u8], ranges: Ranges) -> Result<GenerateRequest, ApiError> {
    decode_for(body, ranges, Mode::TextToImage)
}

/// [`parse`] then [`validate`], for the endpoint `mode`. For image to image, the input image's size (read from its
/// header: the pixels are decoded by the worker) stands for `img_width` / `img_height` and is held to the same
/// ranges, so an oversized input is refused before it is queued.
pub fn decode_for(body: &[u8], ranges: Ranges, mode: Mode) -> Result<GenerateRequest, ApiError> {
    check(parse(body)?, ranges, mode)
}

/// [`validate`] for the endpoint `mode` (see [`decode_for`]), an already parsed request.
pub fn check(mut request: GenerateRequest, ranges: Ranges, mode: Mode) -> Result<GenerateRequest, ApiError> {
    match mode {
        Mode::TextToImage => (request.image, request.strength, request.mask) = (None, None, None),
        Mode::ImageToImage | Mode::Inpaint => {
            let Some(image) = &request.image else {
                return Err(ApiError::bad_request("invalid request: `image` is required (base64 of the input image)"));
            };
            let bad = |e: Error| ApiError::bad_request(e.to_string());
            let (width, height) = crate::input_image::base64_dimensions("image", image).map_err(bad)?;
            (request.img_width, request.img_height) = (width, height);
            if mode == Mode::ImageToImage {
                request.mask = None;
                request.strength.get_or_insert(crate::request::DEFAULT_IMG2IMG_STRENGTH);
            } else {
                let Some(mask) = &request.mask else {
                    let message =
                        "invalid request: `mask` is required (base64 of the mask: white repaints, black keeps)";
                    return Err(ApiError::bad_request(message));
                };
                let size = crate::input_image::base64_dimensions("mask", mask).map_err(bad)?;
                if size != (width, height) {
                    let message = format!("is {}×{}, but the image is {width}×{height}", size.0, size.1);
                    return Err(bad(Error::invalid("mask", message)));
                }
                request.strength.get_or_insert(crate::request::DEFAULT_INPAINT_STRENGTH);
            }
        }
    }
    validate(&request, ranges)?;
    if let Some(strength) = request.strength {
        if !(strength > 0.0 && strength <= 1.0) {
            let e = Error::invalid("strength", format!("must be in (0, 1], got {strength}"));
            return Err(ApiError::bad_request(e.to_string()));
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn message(body: &str) -> String {
        let e = decode(body.as_bytes(), Ranges::Hosted).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
        e.message
    }

    #[test]
    fn type_errors_name_the_field_and_its_range() {
        let m = message(r#"{"prompt": "x", "samples": "3"}"#);
        assert!(m.contains("`samples`") && m.contains("between 1 and 4"), "{m}");
        let m = message(r#"{"prompt": "x", "seed": -2.5}"#);
        assert!(m.contains("`seed`") && m.contains("999999999999999"), "{m}");
        let m = message(r#"{"prompt": "x", "img_width": -512}"#);
        assert!(m.contains("`img_width`") && m.contains("512 and 2048"), "{m}");
        let m = message(r#"{"prompt": 3}"#);
        assert!(m.contains("`prompt`"), "{m}");
        let m = message(r#"{"prompt": "x", "prompt_syntax": "compel"}"#);
        assert!(m.contains("`prompt_syntax`") && m.contains("a1111"), "{m}");
        let m = message(r#"{"prompt": "x", "emphasis": "strong"}"#);
        assert!(m.contains("`emphasis`") && m.contains("no-norm"), "{m}");
        let m = message(r#"{"prompt": "x", "loras": [{"name": 3}]}"#);
        assert!(m.contains("`loras`"), "{m}");
    }

    #[test]
    fn structure_errors() {
        assert!(message(r#"{"samples": 2}"#).contains("missing field `prompt`"));
        assert!(message("[1, 2]").contains("JSON object"));
        // An array is not read as the fields in order (serde's default for structs).
        assert!(message(r#"["a cat", "", 1]"#).contains("must be a JSON object, got an array"));
        assert!(message(r#" "a cat""#).contains("got a string"));
        assert!(message("[1, 2").contains("malformed JSON"));
        assert!(message(r#"{"prompt": "x"#).contains("malformed JSON"));
        assert!(message(r#"{"prompt": "x"} trailing"#).contains("malformed JSON"));
        assert!(message("").contains("malformed JSON"));
    }

    #[test]
    fn ranges_and_scheduler() {
        let m = message(r#"{"prompt": "x", "num_inference_steps": 19, "scheduler": "Euler"}"#);
        assert!(m.contains("`num_inference_steps`") && m.contains("between 20 and 100"), "{m}");
        let m = message(r#"{"prompt": "x", "scheduler": "NoSuch"}"#);
        assert!(m.contains("`scheduler`") && m.contains("Euler"), "{m}");
        // The library's lookup: any case, its aliases.
        for name in ["euler", "k_euler", "EulerDiscreteScheduler", "DDIM"] {
            let body = format!(r#"{{"prompt": "x", "scheduler": "{name}"}}"#);
            assert!(decode(body.as_bytes(), Ranges::Hosted).is_ok(), "{name}");
        }
        let r = decode(br#"{"prompt": "x", "scheduler": "euler", "img_width": 512, "whatever": [1]}"#, Ranges::Hosted);
        assert_eq!(r.unwrap().img_width, 512);
    }

    #[test]
    fn open_ranges_only_open_sizes_steps_and_guidance() {
        let small =
            br#"{"prompt": "x", "scheduler": "Euler", "img_width": 64, "img_height": 72, "num_inference_steps": 2}"#;
        assert!(decode(small, Ranges::Hosted).is_err());
        assert!(decode(small, Ranges::Open).is_ok());
        let turbo = br#"{"prompt": "x", "scheduler": "Euler a", "num_inference_steps": 1, "guidance_scale": 0}"#;
        assert!(decode(turbo, Ranges::Hosted).is_err());
        assert!(decode(turbo, Ranges::Open).is_ok());
        for bad in [
            r#"{"prompt": "x", "scheduler": "Euler", "img_width": 60}"#,
            r#"{"prompt": "x", "scheduler": "Euler", "img_height": 4096}"#,
            r#"{"prompt": "x", "scheduler": "Euler", "num_inference_steps": 0}"#,
            r#"{"prompt": "x", "scheduler": "Euler", "samples": 5}"#,
            r#"{"prompt": "x", "scheduler": "Euler", "guidance_scale": -0.5}"#,
            r#"{"prompt": "x", "scheduler": "Euler", "guidance_scale": 26}"#,
            r#"{"prompt": "x", "scheduler": "nope"}"#,
        ] {
            assert!(decode(bad.as_bytes(), Ranges::Open).is_err(), "{bad}");
        }
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(check_content_type(&h).unwrap_err().status, StatusCode::NOT_ACCEPTABLE);
        for ok in ["application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"] {
            h.insert(header::CONTENT_TYPE, ok.parse().unwrap());
            assert!(check_content_type(&h).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "json"] {
            h.insert(header::CONTENT_TYPE, bad.parse().unwrap());
            assert_eq!(check_content_type(&h).unwrap_err().status, StatusCode::NOT_ACCEPTABLE, "{bad}");
        }
    }
}
