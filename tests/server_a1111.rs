//! AUTOMATIC1111's API (`/sdapi/v1/*`) as an A1111 client sees it: in-process servers on ephemeral loopback ports,
//! the tiny model for real generations (compared with the hosted v1 endpoint's images for the same request), a
//! gated stand-in engine for progress and interrupt, and every route's answer and error shape.
//!
//! Only 127.0.0.1 is ever contacted; every request has a read timeout and every loop a bound in count and time.

mod common;
#[path = "common/tiny_server.rs"]
mod tiny_server;

use common::http::*;
use tiny_server::tiny_server;

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use dreamshaper::sampling::ProgressFn;
use dreamshaper::server::{ApiKeys, Engine, Ranges, Server, ServerConfig};
use dreamshaper::{Control, Error, GenerateRequest, Generation};
use serde_json::{json, Value};

fn config(ranges: Ranges) -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ranges,
        max_queue: 2,
        model_name: "tiny-sdxl".into(),
        ..ServerConfig::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    call(addr, "POST", path, &all, body.to_string().as_bytes())
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    call(addr, "GET", path, headers, b"")
}

/// The `parameters` text chunk of a PNG.
fn png_parameters(png: &[u8]) -> String {
    let reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
    let info = reader.info();
    let latin1 = info.uncompressed_latin1_text.iter().find(|c| c.keyword == "parameters").map(|c| c.text.clone());
    latin1
        .or_else(|| info.utf8_text.iter().find(|c| c.keyword == "parameters").map(|c| c.get_text().unwrap()))
        .expect("a parameters chunk")
}

/// FastAPI's validation error: 422 `{"detail": [{"loc": ["body", field], "msg", "type"}]}`; returns the message.
fn validation_error(r: &Reply, field: Option<&str>) -> String {
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    let detail = &v["detail"][0];
    if let Some(field) = field {
        assert_eq!(detail["loc"], json!(["body", field]), "{v}");
    }
    detail["msg"].as_str().expect("msg").to_string()
}

/// A1111's exception answer: `{"error", "detail", "body", "errors"}`; returns the detail.
fn http_error(r: &Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    for key in ["error", "detail", "body", "errors"] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    v["detail"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// Real generations with the tiny model.

#[test]
fn txt2img_matches_the_v1_endpoint_and_carries_its_parameters() {
    let server = tiny_server(config(Ranges::Open));
    let addr = server.addr();
    let body = json!({"prompt": "a photo of a Grumpy cat", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 6,
        "width": 64, "height": 64, "seed": 1234, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
        "batch_size": 2, "eta": 1.0, "styles": [], "override_settings": {}, "hr_checkpoint_name": null});
    let r = post(addr, "/sdapi/v1/txt2img", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 1234);
    assert_eq!(info["all_seeds"], json!([1234, 1234]), "one batch from one seed");
    assert_eq!((info["width"].as_u64(), info["height"].as_u64()), (Some(64), Some(64)));
    assert_eq!(info["sampler_name"], "DPM++ 2M");
    assert_eq!(info["extra_generation_params"]["Schedule type"], "Karras");
    assert_eq!(v["parameters"]["steps"], 2);
    assert_eq!(v["parameters"]["sampler_name"], "DPM++ 2M");
    assert!(v["parameters"].get("init_images").is_none(), "txt2img's parameters have no img2img fields");
    // The v1 endpoint with the same request: the same pixels (its JPEG against our PNG, within JPEG's loss).
    let v1 = json!({"prompt": "a photo of a Grumpy cat", "negative_prompt": "blurry", "num_inference_steps": 2,
        "guidance_scale": 6, "img_width": 64, "img_height": 64, "seed": 1234, "scheduler": "DPM++ 2M Karras",
        "samples": 2, "base64": true});
    let reference = post(addr, PATH, &[], &v1).json();
    let jpegs = reference["images"].as_array().unwrap();
    for (i, encoded) in images.iter().enumerate() {
        let png = unb64(encoded.as_str().unwrap());
        let text = png_parameters(&png);
        assert_eq!(text, info["infotexts"][i].as_str().unwrap());
        assert!(text.starts_with("a photo of a Grumpy cat\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, "));
        assert!(text.contains("Schedule type: Karras, CFG scale: 6, Seed: 1234, Size: 64x64, Model: tiny-sdxl"));
        assert!(text.ends_with(&format!("Batch size: 2, Batch pos: {i}")), "{text}");
        let ours = image::load_from_memory(&png).unwrap().to_rgb8();
        let theirs = image::load_from_memory(&unb64(jpegs[i].as_str().unwrap())).unwrap().to_rgb8();
        // Our PNG through the server's own JPEG encoder must give the v1 JPEG byte for byte: the pixels are equal.
        let reencoded = dreamshaper::server::respond::jpeg(&ours).unwrap();
        assert_eq!(reencoded, unb64(jpegs[i].as_str().unwrap()), "image {i}: the same pixels as v1's");
        assert_eq!(ours.dimensions(), theirs.dimensions());
    }
}

#[test]
fn img2img_inpainting_and_hires_match_the_v1_requests() {
    let server = tiny_server(config(Ranges::Open));
    let addr = server.addr();
    let input = std::fs::read(common::root().join("tests/fixtures/img2img_input.png")).unwrap();
    let (w, h) = image::load_from_memory(&input).unwrap().to_rgb8().dimensions();
    let a1111 = json!({"prompt": "a cat", "init_images": [format!("data:image/png;base64,{}", b64(&input))],
        "denoising_strength": 0.5, "steps": 4, "cfg_scale": 5, "seed": 9, "sampler_name": "Euler a",
        "width": 512, "height": 512, "include_init_images": false});
    let r = post(addr, "/sdapi/v1/img2img", &[], &a1111);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["parameters"]["init_images"], Value::Null, "the input is not sent back");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["width"].as_u64(), info["height"].as_u64()), (Some(w as u64), Some(h as u64)));
    assert_eq!(info["denoising_strength"], 0.5);
    assert!(info["comments"].as_str().unwrap().contains("width / height 512×512 ignored"), "{info}");
    let png = unb64(v["images"][0].as_str().unwrap());
    assert!(png_parameters(&png).contains("Denoising strength: 0.5"));
    let v1 = json!({"prompt": "a cat", "image": b64(&input), "strength": 0.5, "num_inference_steps": 4,
        "guidance_scale": 5, "seed": 9, "scheduler": "Euler a", "base64": true});
    let reference =
        call(addr, "POST", "/v1/sdxl-img2img", &[("content-type", "application/json")], v1.to_string().as_bytes());
    let ours = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), (w, h));
    assert_eq!(dreamshaper::server::respond::jpeg(&ours).unwrap(), unb64(reference.json()["image"].as_str().unwrap()));

    // Inpainting: a mask makes img2img inpaint, as A1111's does.
    let mask = image::RgbImage::from_fn(w, h, |x, _| if x < w / 2 { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) });
    let mut mask_png = Vec::new();
    image::DynamicImage::ImageRgb8(mask)
        .write_to(&mut std::io::Cursor::new(&mut mask_png), image::ImageFormat::Png)
        .unwrap();
    let mut inpaint = a1111.clone();
    inpaint["mask"] = json!(b64(&mask_png));
    inpaint["denoising_strength"] = json!(0.9);
    let r = post(addr, "/sdapi/v1/img2img", &[], &inpaint);
    assert_eq!(r.status, 200, "{}", r.text());
    let ours = image::load_from_memory(&unb64(r.json()["images"][0].as_str().unwrap())).unwrap().to_rgb8();
    let v1 = json!({"prompt": "a cat", "image": b64(&input), "mask": b64(&mask_png), "strength": 0.9,
        "num_inference_steps": 4, "guidance_scale": 5, "seed": 9, "scheduler": "Euler a", "base64": true});
    let reference =
        call(addr, "POST", "/v1/sdxl-inpaint", &[("content-type", "application/json")], v1.to_string().as_bytes());
    assert_eq!(reference.status, 200, "{}", reference.text());
    assert_eq!(dreamshaper::server::respond::jpeg(&ours).unwrap(), unb64(reference.json()["image"].as_str().unwrap()));

    // The hires fix: enable_hr, hr_scale, denoising_strength, hr_second_pass_steps.
    let hires = json!({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
        "enable_hr": true, "hr_scale": 1.5, "denoising_strength": 0.7, "hr_second_pass_steps": 2,
        "hr_upscaler": "Latent"});
    let r = post(addr, "/sdapi/v1/txt2img", &[], &hires);
    assert_eq!(r.status, 200, "{}", r.text());
    let png = unb64(r.json()["images"][0].as_str().unwrap());
    let text = png_parameters(&png);
    assert!(
        text.contains("Denoising strength: 0.7, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent"),
        "{text}"
    );
    let ours = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), (96, 96));
    let v1 = json!({"prompt": "a cat", "num_inference_steps": 2, "img_width": 64, "img_height": 64, "seed": 3,
        "guidance_scale": 7, "scheduler": "Euler", "hires": {"scale": 1.5, "strength": 0.7, "steps": 2}, "base64": true});
    let reference = post(addr, PATH, &[], &v1).json();
    assert_eq!(dreamshaper::server::respond::jpeg(&ours).unwrap(), unb64(reference["image"].as_str().unwrap()));
}

#[test]
fn request_errors_take_a1111s_shapes() {
    let server = tiny_server(ServerConfig { api_keys: ApiKeys::new(["k"]).unwrap(), ..config(Ranges::Open) });
    let addr = server.addr();
    let basic = format!("Basic {}", b64(b"user:k"));
    let auth = [("authorization", basic.as_str())];
    let ok = json!({"prompt": "x", "steps": 1, "width": 64, "height": 64});
    // Keys: HTTP Basic with the key as password (webuiapi's set_auth), x-api-key; 401 with a Basic challenge.
    for path in ["/sdapi/v1/samplers", "/sdapi/v1/progress", "/sdapi/v1/options", "/sdapi/v1/loras"] {
        let r = get(addr, path, &[]);
        assert!(http_error(&r, 401).contains("Incorrect username or password"));
        assert_eq!(r.header("www-authenticate"), Some("Basic"));
        assert_eq!(get(addr, path, &auth).status, 200, "{path}");
    }
    assert_eq!(http_error(&post(addr, "/sdapi/v1/txt2img", &[], &ok), 401), "Incorrect username or password");
    let wrong = format!("Basic {}", b64(b"user:nope"));
    assert_eq!(post(addr, "/sdapi/v1/txt2img", &[("authorization", &wrong)], &ok).status, 401);
    assert_eq!(post(addr, "/sdapi/v1/interrupt", &[("x-api-key", "k")], &json!({})).status, 200);
    // Field errors: 422 naming the field.
    let cases = [
        (json!({"prompt": "x", "sampler_name": "Nope"}), "sampler_name", "unknown sampler"),
        (json!({"prompt": "x", "sampler_index": "DPM fast"}), "sampler_index", "not available"),
        (json!({"prompt": "x", "scheduler": "Exponential"}), "scheduler", "not available"),
        (json!({"prompt": "x", "scheduler": "nope"}), "scheduler", "unknown schedule type"),
        (json!({"prompt": "x", "sampler_name": "Euler", "scheduler": "Karras"}), "scheduler", "Karras"),
        (json!({"prompt": "x", "steps": "many"}), "steps", "invalid type"),
        (json!({"prompt": "x", "batch_size": 3, "n_iter": 2}), "n_iter", "between 1 and 4"),
        (json!({"prompt": "x", "batch_size": 5}), "batch_size", "between 1 and 4"),
        (json!({"prompt": "x", "script_name": "X/Y/Z plot"}), "script_name", "not found"),
        (json!({"prompt": "x", "enable_hr": true, "hr_upscaler": "ESRGAN_4x"}), "hr_upscaler", "Latent"),
        (json!({"prompt": "x", "enable_hr": true, "hr_resize_x": 1024}), "hr_resize_x", "hr_scale"),
    ];
    for (body, field, says) in cases {
        let m = validation_error(&post(addr, "/sdapi/v1/txt2img", &auth, &body), Some(field));
        assert!(m.contains(says), "{body}: {m}");
    }
    // Ranges (the server's, open here), named by A1111's field names.
    let m = validation_error(&post(addr, "/sdapi/v1/txt2img", &auth, &json!({"prompt": "x", "width": 60})), None);
    assert!(m.contains("`width`") && m.contains("multiple of 8"), "{m}");
    let m = validation_error(&post(addr, "/sdapi/v1/txt2img", &auth, &json!({"prompt": "x", "steps": 0})), None);
    assert!(m.contains("`steps`"), "{m}");
    // Bodies: not JSON, not an object, not declared JSON.
    let r = call(addr, "POST", "/sdapi/v1/txt2img", &[("content-type", "application/json"), auth[0]], b"{");
    assert!(validation_error(&r, None).contains("JSON"));
    assert!(validation_error(&post(addr, "/sdapi/v1/txt2img", &auth, &json!([1])), None).contains("dictionary"));
    let r = call(addr, "POST", "/sdapi/v1/txt2img", &[("content-type", "text/plain"), auth[0]], b"{}");
    http_error(&r, 406);
    // img2img without an image, with two, with an unreadable one, with an inverted mask.
    let m = validation_error(&post(addr, "/sdapi/v1/img2img", &auth, &json!({"prompt": "x"})), Some("init_images"));
    assert!(m.contains("required"), "{m}");
    let two = json!({"prompt": "x", "init_images": ["a", "b"]});
    validation_error(&post(addr, "/sdapi/v1/img2img", &auth, &two), Some("init_images"));
    let m = validation_error(
        &post(addr, "/sdapi/v1/img2img", &auth, &json!({"prompt": "x", "init_images": ["%%%"]})),
        None,
    );
    assert!(m.contains("init_images"), "{m}");
    let inverted = json!({"prompt": "x", "init_images": ["a"], "mask": "b", "inpainting_mask_invert": 1});
    validation_error(&post(addr, "/sdapi/v1/img2img", &auth, &inverted), Some("inpainting_mask_invert"));
    // Wrong methods and unknown routes keep the server's JSON answers.
    assert_eq!(get(addr, "/sdapi/v1/txt2img", &auth).status, 405);
    assert_eq!(get(addr, "/sdapi/v1/nothing-here", &auth).status, 404);
}

#[test]
fn lists_options_and_loras() {
    let dir = common::root().join("models/tiny-sdxl-loras");
    let server = tiny_server(ServerConfig { lora_dir: Some(dir.clone()), ..config(Ranges::Open) });
    let addr = server.addr();
    let samplers = get(addr, "/sdapi/v1/samplers", &[]).json();
    let names: Vec<&str> = samplers.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    for name in ["DPM++ 2M", "Euler a", "Euler", "DPM++ SDE", "DDIM", "UniPC"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let dpm = samplers.as_array().unwrap().iter().find(|s| s["name"] == "DPM++ 2M").unwrap();
    assert_eq!(dpm["aliases"], json!(["k_dpmpp_2m"]));
    assert_eq!(dpm["options"]["scheduler"], "karras");
    let schedulers = get(addr, "/sdapi/v1/schedulers", &[]).json();
    let labels: Vec<&str> = schedulers.as_array().unwrap().iter().map(|s| s["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["Automatic", "Uniform", "Karras", "SGM Uniform", "Simple", "Normal"]);
    let karras = &schedulers[2];
    assert_eq!((karras["name"].as_str(), karras["default_rho"].as_f64()), (Some("karras"), Some(7.0)));
    let models = get(addr, "/sdapi/v1/sd-models", &[]).json();
    assert_eq!(models[0]["title"], "tiny-sdxl");
    assert_eq!(models[0]["model_name"], "tiny-sdxl");
    let options = get(addr, "/sdapi/v1/options", &[]).json();
    assert_eq!(options["sd_model_checkpoint"], "tiny-sdxl");
    assert_eq!(options["samples_format"], "png");
    // What clients send: accepted (ignored); another checkpoint: refused.
    let r = post(
        addr,
        "/sdapi/v1/options",
        &[],
        &json!({"sd_model_checkpoint": "tiny-sdxl", "CLIP_stop_at_last_layers": 2}),
    );
    assert_eq!((r.status, r.text().as_str()), (200, "null"));
    let r = post(addr, "/sdapi/v1/options", &[], &json!({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}));
    assert!(http_error(&r, 404).contains("not found"));
    let r = call(addr, "POST", "/sdapi/v1/options", &[("content-type", "application/json")], b"[1]");
    validation_error(&r, None);
    // LoRAs: names in the directory, never its path.
    let loras = get(addr, "/sdapi/v1/loras", &[]);
    assert!(!loras.text().contains(dir.to_str().unwrap()), "no file-system path: {}", loras.text());
    let expected = dreamshaper::adapters::requested::available_in_dir(&dir);
    assert!(!expected.is_empty());
    let names: Vec<String> =
        loras.json().as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, expected);
    assert_eq!(loras.json()[0]["path"], format!("{}.safetensors", expected[0]));
    let scripts = get(addr, "/sdapi/v1/scripts", &[]).json();
    assert_eq!(scripts, json!({"txt2img": [], "img2img": []}));
    // Without --lora-dir: an empty list.
    let bare = tiny_server(config(Ranges::Open));
    assert_eq!(get(bare.addr(), "/sdapi/v1/loras", &[]).json(), json!([]));
}

// ---------------------------------------------------------------------------------------------------------------
// Progress and interrupt, with a gated stand-in engine.

/// Evaluates `steps` times per job, each after a go-ahead from the test; a preview latents tensor each step.
struct Gated {
    go: Arc<Mutex<mpsc::Receiver<()>>>,
    started: mpsc::Sender<()>,
}

impl Engine for Gated {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> dreamshaper::Result<Generation> {
        self.started.send(()).unwrap();
        let steps = request.num_inference_steps as usize;
        progress(&dreamshaper::Progress::Stage("denoising"));
        for step in 0..steps {
            self.go.lock().unwrap().recv_timeout(Duration::from_secs(30)).unwrap();
            let p =
                dreamshaper::Progress::Step { step, steps, evaluation: step + 1, evaluations: steps, latents: None };
            if progress(&p) == Control::Stop {
                return Err(Error::Cancelled);
            }
        }
        let images = vec![image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30])); request.samples as usize];
        let latents = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        Ok(Generation { images, seed: request.resolve_seed(), latents, warnings: Vec::new(), loras: Vec::new() })
    }
}

#[test]
fn progress_reports_the_running_job_and_interrupt_stops_it() {
    let (go_tx, go_rx) = mpsc::channel();
    let (started_tx, started) = mpsc::channel();
    let go = Arc::new(Mutex::new(go_rx));
    let server = Server::start(config(Ranges::Open), move || Ok(Gated { go, started: started_tx })).unwrap();
    let addr = server.addr();
    let idle = get(addr, "/sdapi/v1/progress", &[]).json();
    assert_eq!((idle["progress"].as_f64(), idle["eta_relative"].as_f64()), (Some(0.0), Some(0.0)));
    assert_eq!(idle["state"]["job_count"], 0);
    assert_eq!(idle["current_image"], Value::Null);

    let body = json!({"prompt": "x", "steps": 4, "width": 64, "height": 64, "seed": 5});
    let client = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &[], &body));
    started.recv_timeout(Duration::from_secs(30)).unwrap();
    go_tx.send(()).unwrap();
    go_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let running = loop {
        let p = get(addr, "/sdapi/v1/progress?skip_current_image=true", &[]).json();
        if p["state"]["sampling_step"] == 1 {
            break p;
        }
        assert!(Instant::now() < deadline, "{p}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(running["progress"].as_f64(), Some(0.5));
    assert_eq!(running["state"]["sampling_steps"], 4);
    assert_eq!(running["state"]["job_count"], 1);
    assert!(running["eta_relative"].as_f64().unwrap() >= 0.0);
    assert_eq!(running["textinfo"], "denoising");
    // Interrupt: the job stops at its next step; its client gets 200 without images, as A1111 answers.
    let r = post(addr, "/sdapi/v1/interrupt", &[], &json!({}));
    assert_eq!((r.status, r.json()), (200, json!({})));
    go_tx.send(()).unwrap();
    let answer = client.join().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let v = answer.json();
    assert_eq!(v["images"], json!([]));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    // Nothing runs now.
    assert_eq!(get(addr, "/sdapi/v1/progress", &[]).json()["state"]["job_count"], 0);
    // A finished job's answer with send_images false: no images, the info still there.
    let body = json!({"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": 5, "send_images": false});
    let client = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &[], &body));
    started.recv_timeout(Duration::from_secs(30)).unwrap();
    go_tx.send(()).unwrap();
    let v = client.join().unwrap().json();
    assert_eq!(v["images"], json!([]));
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["seed"].as_u64(), info["interrupted"].as_bool()), (Some(5), Some(false)));
}

/// `current_image`: the real engine's preview of the running job, requested by polling `/progress`.
#[test]
fn progress_shows_a_preview_of_the_running_job() {
    let server = tiny_server(config(Ranges::Open));
    let addr = server.addr();
    let body = json!({"prompt": "x", "steps": 60, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"});
    let client = std::thread::spawn(move || post(addr, "/sdapi/v1/txt2img", &[], &body));
    let deadline = Instant::now() + Duration::from_secs(120);
    let preview = loop {
        let p = get(addr, "/sdapi/v1/progress", &[]).json();
        if let Some(image) = p["current_image"].as_str() {
            break image.to_string();
        }
        assert!(Instant::now() < deadline, "no preview: {p}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let png = unb64(&preview);
    let image = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    assert!(image.width() > 0 && image.height() > 0);
    post(addr, "/sdapi/v1/interrupt", &[], &json!({}));
    assert_eq!(client.join().unwrap().status, 200);
}
