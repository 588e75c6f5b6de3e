//! OpenAI's image API (`POST /v1/images/generations`) as its clients see it: real generations with the tiny model,
//! compared with the hosted endpoint's for the same request, and every error in OpenAI's shape. The real `openai`
//! Python client drives the same route in `scripts/clients/test_openai.py`.
//!
//! Only 127.0.0.1 is ever contacted; every request has a read timeout.

mod common;
#[path = "common/tiny_server.rs"]
mod tiny_server;

use common::http::*;

use std::net::SocketAddr;

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use dreamshaper::sampling::ProgressFn;
use dreamshaper::server::{ApiKeys, Engine, Ranges, Server, ServerConfig};
use dreamshaper::{Error, GenerateRequest, Generation};
use serde_json::{json, Value};

const ROUTE: &str = "/v1/images/generations";
const KEY: &str = "openai-test-key";

fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ranges: Ranges::Open,
        max_queue: 2,
        model_name: "tiny-sdxl".into(),
        api_keys: ApiKeys::new([KEY]).unwrap(),
        ..ServerConfig::default()
    }
}

fn tiny_server() -> Server {
    tiny_server::tiny_server(config())
}

/// Fails or panics on request, otherwise answers 8×8 images at once; for the error paths of a generation.
struct StandIn;

impl Engine for StandIn {
    fn generate(&mut self, request: &GenerateRequest, _: &mut ProgressFn) -> dreamshaper::Result<Generation> {
        match request.prompt.as_str() {
            "fail" => return Err(Error::Service("the stand-in engine failed on purpose".into())),
            "panic" => panic!("the stand-in engine panicked on purpose"),
            _ => {}
        }
        let images = vec![image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30])); request.samples as usize];
        let latents = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        Ok(Generation { images, seed: request.resolve_seed(), latents, warnings: Vec::new(), loras: Vec::new() })
    }
}

/// POST to the OpenAI route as the `openai` client does: JSON, `Authorization: Bearer KEY`.
fn images(addr: SocketAddr, body: &Value) -> Reply {
    let bearer = format!("Bearer {KEY}");
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    call(addr, "POST", ROUTE, &headers, body.to_string().as_bytes())
}

/// An OpenAI error answer: the status, and `error` with exactly `message`, `type`, `param` and `code`.
fn openai_error(r: &Reply, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let error = &v["error"];
    let mut keys: Vec<&str> = error.as_object().expect("error object").keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert!(!error["message"].as_str().unwrap().is_empty());
    error.clone()
}

fn b64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text.as_str().expect("base64 string")).unwrap()
}

#[test]
fn generations_are_pngs_equal_to_the_hosted_endpoints_images() {
    let server = tiny_server();
    let addr = server.addr();
    let body = json!({"prompt": "a lighthouse at dusk", "n": 2, "size": "64x72", "response_format": "b64_json",
        "model": "gpt-image-1", "quality": "high", "style": "vivid", "user": "u-1", "background": "auto",
        "moderation": "low", "seed": 4242, "scheduler": "Euler a", "num_inference_steps": 3,
        "guidance_scale": 6.5, "negative_prompt": "fog"});
    let r = images(addr, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-seed-value"), Some("4242"));
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!((v["size"].as_str(), v["output_format"].as_str()), (Some("64x72"), Some("png")));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let mut pixels = Vec::new();
    for item in data {
        assert_eq!(item["revised_prompt"], "a lighthouse at dusk");
        let png = b64(&item["b64_json"]);
        let decoder = png::Decoder::new(std::io::Cursor::new(&png)).read_info().unwrap();
        let text = &decoder.info().uncompressed_latin1_text;
        let parameters = text.iter().find(|t| t.keyword == "parameters").expect("parameters chunk");
        assert!(parameters.text.contains("Negative prompt: fog") && parameters.text.contains("Seed: 4242"));
        let image = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (64, 72));
        pixels.push(image);
    }
    assert_ne!(pixels[0], pixels[1], "two samples");

    // The hosted endpoint, same request: its JPEGs are exactly these pixels through the same JPEG encoder.
    let hosted = json!({"prompt": "a lighthouse at dusk", "samples": 2, "img_width": 64, "img_height": 72,
        "seed": 4242, "scheduler": "Euler a", "num_inference_steps": 3, "guidance_scale": 6.5,
        "negative_prompt": "fog", "base64": true});
    let h = post_with(addr, &[("x-api-key", KEY)], &hosted);
    assert_eq!(h.status, 200, "{}", h.text());
    let hosted_images = h.json()["images"].as_array().unwrap().clone();
    for (image, jpeg) in pixels.iter().zip(&hosted_images) {
        assert_eq!(dreamshaper::server::respond::jpeg(image).unwrap(), b64(jpeg), "same image as the hosted endpoint");
    }

    // No seed (OpenAI has none): a random one, reported, and reproducing the image when sent back.
    let random = json!({"prompt": "a castle", "size": "64x64", "scheduler": "Euler", "num_inference_steps": 2});
    let first = images(addr, &random);
    assert_eq!(first.status, 200, "{}", first.text());
    let seed: i64 = first.header("x-seed-value").unwrap().parse().unwrap();
    let mut again = random.clone();
    again["seed"] = json!(seed);
    let again = images(addr, &again);
    assert_eq!(again.json()["data"][0]["b64_json"], first.json()["data"][0]["b64_json"]);

    // JPEG on request, at the quality asked.
    let mut jpeg = random.clone();
    (jpeg["seed"], jpeg["output_format"], jpeg["output_compression"]) = (json!(seed), json!("jpeg"), json!(90));
    let j = images(addr, &jpeg);
    assert_eq!(j.status, 200, "{}", j.text());
    let v = j.json();
    assert_eq!(v["output_format"], "jpeg");
    let png = b64(&first.json()["data"][0]["b64_json"]);
    let png = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgb8();
    assert_eq!(b64(&v["data"][0]["b64_json"]), dreamshaper::server::respond::jpeg(&png).unwrap());
    server.shutdown().unwrap();
}

#[test]
fn every_error_has_openais_shape() {
    let server = Server::start(config(), || Ok(StandIn)).unwrap();
    let addr = server.addr();
    let ok = json!({"prompt": "x", "size": "64x64", "num_inference_steps": 1});

    // Keys: none or a wrong one is 401 (invalid_api_key); Bearer, x-api-key and Basic are all accepted.
    let none = call(addr, "POST", ROUTE, &[("content-type", "application/json")], ok.to_string().as_bytes());
    let e = openai_error(&none, 401);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("invalid_request_error"), Some("invalid_api_key")));
    let wrong = [("content-type", "application/json"), ("authorization", "Bearer nope")];
    openai_error(&call(addr, "POST", ROUTE, &wrong, ok.to_string().as_bytes()), 401);
    let x_api_key = [("content-type", "application/json"), ("x-api-key", KEY)];
    assert_eq!(call(addr, "POST", ROUTE, &x_api_key, ok.to_string().as_bytes()).status, 200);
    assert_eq!(images(addr, &ok).status, 200);

    // Parameters: 400 naming the OpenAI param.
    for (body, param) in [
        (json!({"n": 1}), "prompt"),
        (json!({"prompt": "x", "n": 9}), "n"),
        (json!({"prompt": "x", "size": "64x60"}), "size"),
        (json!({"prompt": "x", "size": "huge"}), "size"),
        (json!({"prompt": "x", "response_format": "url"}), "response_format"),
        (json!({"prompt": "x", "output_format": "gif"}), "output_format"),
        (json!({"prompt": "x", "stream": true}), "stream"),
        (json!({"prompt": "x", "scheduler": "nope"}), "scheduler"),
        (json!({"prompt": "x", "seed": -7}), "seed"),
        (json!({"prompt": "x", "guidance_scale": 99}), "guidance_scale"),
    ] {
        let e = openai_error(&images(addr, &body), 400);
        assert_eq!((e["param"].as_str(), e["type"].as_str()), (Some(param), Some("invalid_request_error")), "{body}");
    }
    let e = openai_error(&images(addr, &json!({"prompt": "x", "response_format": "url"})), 400);
    assert!(e["message"].as_str().unwrap().contains("b64_json"), "{e}");

    // The body and the request line.
    let bearer = format!("Bearer {KEY}");
    let json_headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let e = openai_error(&call(addr, "POST", ROUTE, &json_headers, b"{\"prompt\": "), 400);
    assert!(e["param"].is_null());
    openai_error(&call(addr, "POST", ROUTE, &json_headers, b"[1]"), 400);
    let text = [("content-type", "text/plain"), ("authorization", bearer.as_str())];
    openai_error(&call(addr, "POST", ROUTE, &text, b"x"), 406);
    openai_error(&call(addr, "GET", ROUTE, &[("authorization", bearer.as_str())], b""), 405);
    let e = openai_error(&call(addr, "POST", "/v1/images/edits", &json_headers, b"{}"), 404);
    assert!(e["message"].as_str().unwrap().contains(ROUTE), "{e}");
    openai_error(&call(addr, "POST", "/v1/images/edits", &[], b"{}"), 401);

    // Generation failures: 500 server_error, and the server keeps serving.
    for prompt in ["fail", "panic"] {
        let e = openai_error(&images(addr, &json!({"prompt": prompt})), 500);
        assert_eq!(e["type"], "server_error");
    }
    assert_eq!(images(addr, &ok).status, 200);
    server.shutdown().unwrap();
}
