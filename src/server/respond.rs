//! Successful answers in the hosted API's two forms: the JPEG itself, or JSON with base64 JPEGs.
//!
//! - `base64: false` and one sample: the body is the JPEG, `Content-Type: image/jpeg`.
//! - `base64: true`: `{"image": "<base64 JPEG>", "status": "Success", "infer_time": <seconds>}`.
//! - more than one sample: always the JSON form (one body cannot hold several JPEGs), with every image in
//!   `"images"` and the first one also in `"image"`.
//!
//! Every answer carries `x-seed-value` (the seed used, also when `-1` was sent) and `x-generation-time` (seconds).

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

use super::errors::ApiError;
use super::queue::Finished;

pub const SEED_HEADER: &str = "x-seed-value";
pub const GENERATION_TIME_HEADER: &str = "x-generation-time";

/// JPEG quality of the answers.
pub const JPEG_QUALITY: u8 = 90;

pub fn jpeg(image: &RgbImage) -> Result<Vec<u8>, ApiError> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
        .encode_image(image)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("JPEG encoding failed: {e}")))?;
    Ok(bytes)
}

/// The answer for a finished job (CPU work: JPEG encoding; call from a blocking context).
pub fn success(finished: &Finished, base64: bool) -> Result<Response, ApiError> {
    let jpegs = finished.images.iter().map(jpeg).collect::<Result<Vec<_>, _>>()?;
    let mut response = match jpegs.as_slice() {
        [] => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "generation produced no image")),
        [only] if !base64 => {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"))], only.clone()).into_response()
        }
        all => {
            let encoded: Vec<String> =
                all.iter().map(|j| base64::engine::general_purpose::STANDARD.encode(j)).collect();
            let mut body = serde_json::json!({
                "image": encoded[0],
                "status": "Success",
                "infer_time": round_ms(finished.elapsed.as_secs_f64()),
            });
            if encoded.len() > 1 {
                body["images"] = serde_json::json!(encoded);
            }
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body.to_string()).into_response()
        }
    };
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static(SEED_HEADER), HeaderValue::from(finished.seed));
    let time = format!("{:.3}", finished.elapsed.as_secs_f64());
    headers.insert(HeaderName::from_static(GENERATION_TIME_HEADER), HeaderValue::from_str(&time).expect("digits"));
    Ok(response)
}

fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn finished(n: usize) -> Finished {
        Finished {
            images: vec![RgbImage::new(16, 8); n],
            seed: 42,
            elapsed: Duration::from_millis(1234),
            waited: Duration::ZERO,
            evaluations: 0,
        }
    }

    #[test]
    fn jpeg_or_json() {
        let r = success(&finished(1), false).unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "image/jpeg");
        assert_eq!(r.headers()[SEED_HEADER], "42");
        assert_eq!(r.headers()[GENERATION_TIME_HEADER], "1.234");
        let r = success(&finished(1), true).unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = success(&finished(2), false).unwrap();
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
