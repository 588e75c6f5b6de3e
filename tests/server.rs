//! The HTTP server as a client of the hosted API sees it: in-process servers (and the `serve` binary) on ephemeral
//! loopback ports, the tiny model for real generations, a stand-in engine where only the HTTP side is under test.
//!
//! Only 127.0.0.1 is ever contacted; every request has a read timeout and every loop a bound in count and time.

mod common;
#[path = "common/serve_binary.rs"]
mod serve_binary;
#[path = "common/tiny_server.rs"]
mod tiny_server;

use common::http::*;
use serve_binary::{serve, wait_exit};
use tiny_server::tiny_server;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device, Tensor};
use dreamshaper::request::MAX_SEED;
use dreamshaper::sampling::ProgressFn;
use dreamshaper::server::{ApiKeys, Engine, Ranges, Server, ServerConfig};
use dreamshaper::{Error, GenerateRequest, Generation};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------------------------
// Servers.

fn config(ranges: Ranges, max_queue: usize) -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ranges,
        max_queue,
        model_name: "tiny-sdxl".into(),
        ..ServerConfig::default()
    }
}

/// A small, fast request for the open ranges.
fn small(prompt: &str, size: u32, steps: u32) -> Value {
    json!({"prompt": prompt, "scheduler": "Euler", "num_inference_steps": steps, "img_width": size,
           "img_height": size, "seed": 1234})
}

/// Answers instantly (8×8 images whatever the size asked), fails or panics on request; for HTTP-side tests.
struct StandIn;

impl Engine for StandIn {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> dreamshaper::Result<Generation> {
        match request.prompt.as_str() {
            "fail" => return Err(Error::Service("the stand-in engine failed on purpose".into())),
            "panic" => panic!("the stand-in engine panicked on purpose"),
            _ => {}
        }
        progress(&dreamshaper::Progress::Stage("denoising"));
        let images = vec![image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30])); request.samples as usize];
        let latents = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        Ok(Generation { images, seed: request.resolve_seed(), latents, warnings: Vec::new(), loras: Vec::new() })
    }
}

fn stand_in_server(config: ServerConfig) -> Server {
    Server::start(config, || Ok(StandIn)).unwrap()
}

/// The stand-in, holding each generation until the returned sender says go.
fn held_server(config: ServerConfig) -> (Server, mpsc::Sender<()>) {
    struct Held(std::sync::Mutex<mpsc::Receiver<()>>);
    impl Engine for Held {
        fn generate(&mut self, r: &GenerateRequest, p: &mut ProgressFn) -> dreamshaper::Result<Generation> {
            self.0.lock().unwrap().recv_timeout(Duration::from_secs(30)).unwrap();
            StandIn.generate(r, p)
        }
    }
    let (go, held) = mpsc::channel();
    (Server::start(config, move || Ok(Held(std::sync::Mutex::new(held)))).unwrap(), go)
}

// ---------------------------------------------------------------------------------------------------------------
// Real generations with the tiny model.

#[test]
fn hosted_ranges_valid_request_returns_a_jpeg_of_the_requested_size() {
    let server = tiny_server(config(Ranges::Hosted, 2));
    let body = json!({"prompt": "a photo of a Grumpy cat", "negative_prompt": "blurry", "samples": 1,
        "scheduler": "Euler", "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 42, "img_width": 520,
        "img_height": 512, "base64": false, "some_future_field": {"x": 1}});
    let r = post_json(server.addr(), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.jpeg_size(), (520, 512));
    assert_eq!(r.header("x-seed-value"), Some("42"));
    let time: f64 = r.header("x-generation-time").unwrap().parse().unwrap();
    assert!(time > 0.0);
    assert!(!r.header("x-request-id").unwrap().is_empty());
    let h = health(server.addr());
    assert_eq!(
        (h["status"].as_str(), h["model_loaded"].as_bool(), h["queue_length"].as_u64()),
        (Some("ok"), Some(true), Some(0))
    );
    server.shutdown().unwrap();
}

#[test]
fn base64_form_and_several_samples() {
    let server = tiny_server(config(Ranges::Open, 2));
    let addr = server.addr();
    let mut body = small("a lighthouse", 64, 2);
    body["base64"] = json!(true);
    let r = post_json(addr, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "Success");
    assert!(v["infer_time"].as_f64().unwrap() > 0.0);
    assert!(v.get("images").is_none(), "one sample: the hosted form exactly");
    let one = base64::engine::general_purpose::STANDARD.decode(v["image"].as_str().unwrap()).unwrap();
    assert_eq!(jpeg_size(&one), (64, 64));
    assert_eq!(r.header("x-seed-value"), Some("1234"));

    // Three samples: JSON even without base64, every image in "images", the first also in "image".
    let mut body = small("a lighthouse", 64, 2);
    body["samples"] = json!(3);
    body["img_height"] = json!(72);
    let r = post_json(addr, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    assert_eq!(v["image"], images[0]);
    for image in images {
        let jpeg = base64::engine::general_purpose::STANDARD.decode(image.as_str().unwrap()).unwrap();
        assert_eq!(jpeg_size(&jpeg), (64, 72));
    }
    assert_ne!(images[0], images[1], "different samples");
    server.shutdown().unwrap();
}

#[test]
fn random_seed_is_reported_and_reproducible() {
    let server = tiny_server(config(Ranges::Open, 2));
    let mut body = small("a castle", 64, 3);
    body["seed"] = json!(-1);
    let first = post_json(server.addr(), &body);
    assert_eq!(first.status, 200, "{}", first.text());
    let seed: i64 = first.header("x-seed-value").unwrap().parse().unwrap();
    assert!((0..=MAX_SEED).contains(&seed));
    body["seed"] = json!(seed);
    let again = post_json(server.addr(), &body);
    assert_eq!(again.header("x-seed-value").unwrap(), seed.to_string());
    assert_eq!(again.body, first.body, "the reported seed reproduces the image");
    body["seed"] = json!(seed + 1);
    assert_ne!(post_json(server.addr(), &body).body, first.body);
    server.shutdown().unwrap();
}

#[test]
fn api_keys_are_required_when_configured() {
    let mut cfg = config(Ranges::Open, 2);
    cfg.api_keys = ApiKeys::new(["key-one", "key-two"]).unwrap();
    let server = tiny_server(cfg);
    let addr = server.addr();
    let body = small("a key", 64, 2);
    for headers in [vec![], vec![("x-api-key", "wrong")], vec![("x-api-key", "key-one-")], vec![("x-api-key", "")]] {
        let r = post_with(addr, &headers, &body);
        assert_eq!(r.status, 401, "{headers:?}");
        assert!(r.error().contains("x-api-key"));
    }
    // The key is checked before anything else: a wrong key with a bad body is still 401.
    let r = call(addr, "POST", PATH, &[("x-api-key", "wrong"), ("content-type", "text/plain")], b"hello");
    assert_eq!(r.status, 401);
    // Either key works.
    let r = post_with(addr, &[("x-api-key", "key-two")], &json!({"prompt": "x", "samples": 9}));
    assert_eq!(r.status, 400, "past the key check");
    let r = post_with(addr, &[("x-api-key", "key-one")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.jpeg_size(), (64, 64));
    // Other models: 401 without a key, 404 with one.
    assert_eq!(call(addr, "POST", "/v1/sdxl1.0-other", &[], b"{}").status, 401);
    let r = call(addr, "POST", "/v1/sdxl1.0-other", &[("x-api-key", "key-two")], b"{}");
    assert_eq!((r.status, r.error()), (404, "Model not found".to_string()));
    // Health needs no key.
    assert_eq!(health(addr)["model_loaded"], true);
    server.shutdown().unwrap();
}

#[test]
fn bad_inputs_get_their_status_and_a_json_error_naming_the_field() {
    let server = tiny_server(config(Ranges::Hosted, 2));
    let addr = server.addr();
    let valid =
        json!({"prompt": "x", "scheduler": "Euler", "num_inference_steps": 20, "img_width": 512, "img_height": 512});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let cases: Vec<(Value, &str, &[&str])> = vec![
        (with("samples", json!(0)), "samples", &["1 and 4"]),
        (with("samples", json!(5)), "samples", &["1 and 4"]),
        (with("samples", json!("2")), "samples", &["1 and 4"]),
        (with("samples", json!(-1)), "samples", &["1 and 4"]),
        (with("num_inference_steps", json!(19)), "num_inference_steps", &["20 and 100"]),
        (with("num_inference_steps", json!(101)), "num_inference_steps", &["20 and 100"]),
        (with("num_inference_steps", json!(20.5)), "num_inference_steps", &["20 and 100"]),
        (with("guidance_scale", json!(0.99)), "guidance_scale", &["1 and 25"]),
        (with("guidance_scale", json!(25.01)), "guidance_scale", &["1 and 25"]),
        // JSON null reads as absent for optional fields (tests/server_v2.rs), but not for the prompt.
        (with("guidance_scale", json!("high")), "guidance_scale", &["1 and 25"]),
        (with("prompt", json!(null)), "prompt", &["string"]),
        (with("seed", json!(-2)), "seed", &["-1 and 999999999999999"]),
        (with("seed", json!(1_000_000_000_000_000i64)), "seed", &["-1 and 999999999999999"]),
        (with("seed", json!(1e30)), "seed", &["-1 and 999999999999999"]),
        (with("img_width", json!(504)), "img_width", &["multiple of 8", "512 and 2048"]),
        (with("img_width", json!(516)), "img_width", &["multiple of 8", "512 and 2048"]),
        (with("img_width", json!(2056)), "img_width", &["multiple of 8", "512 and 2048"]),
        (with("img_height", json!(511)), "img_height", &["multiple of 8", "512 and 2048"]),
        (with("img_height", json!(4096)), "img_height", &["multiple of 8", "512 and 2048"]),
        (with("scheduler", json!("NoSuchSampler")), "scheduler", &["Euler", "DDIM"]),
        (with("scheduler", json!(7)), "scheduler", &["Euler"]),
        (with("prompt", json!(["a", "b"])), "prompt", &["string"]),
        (with("base64", json!("yes")), "base64", &["true or false"]),
        (json!({"samples": 1}), "prompt", &["missing"]),
    ];
    for (body, field, needles) in &cases {
        let r = post_json(addr, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.error();
        assert!(e.contains(&format!("`{field}`")), "{body}: {e}");
        for needle in *needles {
            assert!(e.contains(needle), "{body}: {e} lacks {needle}");
        }
        assert!(r.header("x-request-id").is_some());
    }
    // Malformed JSON and non-objects: 400.
    for raw in [
        &b"{\"prompt\": \"x\""[..],
        b"",
        b"not json",
        b"[1, 2, 3]",
        b"\"prompt\"",
        b"{\"prompt\": \"x\"} {}",
        b"\xff\xfe",
    ] {
        let r = call(addr, "POST", PATH, &[("content-type", "application/json")], raw);
        assert_eq!(r.status, 400, "{raw:?}");
        let e = r.error();
        assert!(e.contains("JSON"), "{raw:?}: {e}");
    }
    // Not JSON: 406.
    for content_type in
        [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data"), None]
    {
        let headers: Vec<(&str, &str)> = content_type.map(|t| ("content-type", t)).into_iter().collect();
        let r = call(addr, "POST", PATH, &headers, valid.to_string().as_bytes());
        assert_eq!(r.status, 406, "{content_type:?}");
        assert!(r.error().contains("application/json"));
    }
    // Over the body limit: 413, whether the length is declared or found out while reading.
    let r = read_reply({
        let mut s = connect(addr);
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            2 << 20
        );
        s.write_all(head.as_bytes()).unwrap();
        s
    });
    assert_eq!(r.status, 413);
    assert!(r.error().contains("limit"));
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat((1 << 20) + 10));
    let r = read_reply({
        let mut s = connect(addr);
        let head = format!("POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        for chunk in huge.as_bytes().chunks(64 << 10) {
            if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err()
                || s.write_all(chunk).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                break;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
        s
    });
    assert_eq!(r.status, 413);
    // Routes: other models, unknown paths, wrong methods.
    for (method, path, status, message) in [
        ("POST", "/v1/sdxl1.0-other", 404, "Model not found"),
        ("POST", "/v1/stable-diffusion-xl", 404, "Model not found"),
        ("GET", "/v1/sdxl1.0-dreamshaper/x", 404, "Model not found"),
        ("GET", "/", 404, "Not found"),
        // The v2 job API serves the v1 slugs only (tests/server_v2.rs).
        ("POST", "/v2/sdxl1.0-other", 404, "Model not found"),
        ("POST", "/v3/sdxl1.0-dreamshaper", 404, "Not found"),
        ("GET", PATH, 405, "Method not allowed"),
    ] {
        let r = call(addr, method, path, &[("content-type", "application/json")], b"{}");
        assert_eq!((r.status, r.error()), (status, message.to_string()), "{method} {path}");
    }
    // Nothing above reached the worker.
    let h = health(addr);
    assert_eq!((h["completed"].as_u64(), h["queue_length"].as_u64()), (Some(0), Some(0)));
    server.shutdown().unwrap();
}

#[test]
fn queue_overflow_every_client_is_answered() {
    const CLIENTS: usize = 8;
    let server = tiny_server(config(Ranges::Open, 1));
    let addr = server.addr();
    let start = Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                post_json(addr, &small(&format!("client {i}"), 128, 12))
            })
        })
        .collect();
    let replies: Vec<Reply> = clients.into_iter().map(|c| c.join().expect("client answered")).collect();
    let elapsed = start.elapsed();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + refused.len(), CLIENTS, "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    assert!(ok >= 1 && !refused.is_empty(), "{ok} ok, {} refused", refused.len());
    for r in &refused {
        let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!(retry >= 1);
        assert!(r.error().contains("queue"));
    }
    for r in replies.iter().filter(|r| r.status == 200) {
        assert_eq!(r.jpeg_size(), (128, 128));
    }
    assert!(elapsed < Duration::from_secs(90), "{elapsed:?}");
    let h = wait_for_health(addr, Duration::from_secs(10), "an idle queue", |h| h["running"] == false);
    assert_eq!((h["queue_length"].as_u64(), h["completed"].as_u64()), (Some(0), Some(ok as u64)));
    server.shutdown().unwrap();
}

#[test]
fn disconnects_free_queue_places_and_stop_the_running_generation() {
    let server = tiny_server(config(Ranges::Open, 1));
    let addr = server.addr();
    let json = [("content-type", "application/json")];
    // A: a long generation (hosted-valid; about a minute on two cores if it ran to the end).
    let long = json!({"prompt": "long", "scheduler": "Euler", "num_inference_steps": 100, "img_width": 512, "img_height": 512});
    let a = send(addr, "POST", PATH, &json, long.to_string().as_bytes());
    wait_for_health(addr, Duration::from_secs(30), "A running", |h| h["running"] == true);
    // B waits in the only place; C is refused.
    let b = send(addr, "POST", PATH, &json, small("b", 64, 2).to_string().as_bytes());
    wait_for_health(addr, Duration::from_secs(30), "B queued", |h| h["queue_length"] == 1);
    assert_eq!(post_json(addr, &small("c", 64, 2)).status, 429);
    // B hangs up: its place is free at once, and D gets it.
    drop(b);
    let h = wait_for_health(addr, Duration::from_secs(10), "B's place freed", |h| h["queue_length"] == 0);
    assert_eq!(h["cancelled"], 1);
    let d = std::thread::spawn(move || post_json(addr, &small("d", 64, 2)));
    wait_for_health(addr, Duration::from_secs(30), "D queued", |h| h["queue_length"] == 1);
    // A hangs up mid-generation: stopped at the next step, far sooner than its 100 steps would take.
    let hang_up = Instant::now();
    drop(a);
    wait_for_health(addr, Duration::from_secs(20), "A stopped", |h| h["cancelled"] == 2);
    let stopped_after = hang_up.elapsed();
    let d = d.join().unwrap();
    assert_eq!(d.status, 200, "{}", d.text());
    assert_eq!(d.jpeg_size(), (64, 64));
    let h = health(addr);
    assert_eq!((h["completed"].as_u64(), h["running"].as_bool()), (Some(1), Some(false)));
    eprintln!("the running generation stopped {stopped_after:?} after its client hung up");
    server.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// The HTTP side alone, with the stand-in engine.

#[test]
fn failed_generations_are_500_and_the_server_keeps_serving() {
    let server = stand_in_server(config(Ranges::Hosted, 2));
    let addr = server.addr();
    let body = |prompt: &str| json!({"prompt": prompt, "scheduler": "Euler", "seed": 5});
    for prompt in ["fail", "panic", "fail"] {
        let r = post_json(addr, &body(prompt));
        assert_eq!(r.status, 500, "{prompt}");
        assert!(r.error().contains("on purpose"), "{}", r.text());
    }
    let r = post_json(addr, &body("fine"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-seed-value"), Some("5"));
    assert_eq!(health(addr)["completed"], 4);
    server.shutdown().unwrap();
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn value(&mut self, depth: usize) -> Value {
        match self.below(if depth > 2 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.next() as i64 >> self.below(64)),
            3 => json!((self.next() as f64 / u64::MAX as f64 - 0.5) * 10f64.powi(self.below(30) as i32)),
            4 => json!(
                [512, 1024, 2048, 8, 0, -1, 20, 100, 999_999_999_999_999i64, 1_000_000_000_000_000i64][self.below(10)]
            ),
            5 => json!(["", "Euler", "DDIM", "UniPC", "a cat", "\u{0}", "é✓"][self.below(7)]),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth + 1)).collect()),
            _ => Value::Object((0..self.below(4)).map(|i| (format!("k{i}"), self.value(depth + 1))).collect()),
        }
    }

    /// A body: random bytes, a mutated valid body, or an object of the real fields with random values.
    fn body(&mut self) -> Vec<u8> {
        const FIELDS: [&str; 10] = [
            "prompt",
            "negative_prompt",
            "samples",
            "scheduler",
            "num_inference_steps",
            "guidance_scale",
            "seed",
            "img_width",
            "img_height",
            "base64",
        ];
        match self.below(3) {
            0 => {
                let n = self.below(300);
                self.bytes(n)
            }
            1 => {
                let mut b = br#"{"prompt": "a cat", "samples": 2, "scheduler": "Euler", "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 12, "img_width": 512, "img_height": 512, "base64": true}"#.to_vec();
                for _ in 0..1 + self.below(4) {
                    let i = self.below(b.len());
                    match self.below(3) {
                        0 => b[i] = self.next() as u8,
                        1 => b.truncate(i),
                        _ => b.insert(i, b"{}[],:\"0-9e.\\"[self.below(13)]),
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                b
            }
            _ => {
                let mut obj = serde_json::Map::new();
                for field in FIELDS {
                    if self.below(4) != 0 {
                        obj.insert(field.into(), self.value(0));
                    }
                }
                if self.below(2) == 0 {
                    obj.insert("prompt".into(), json!("fuzz"));
                }
                Value::Object(obj).to_string().into_bytes()
            }
        }
    }
}

#[test]
fn the_request_decoder_survives_arbitrary_input() {
    // Directly: never panics, and whatever it accepts is within the hosted ranges.
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut accepted = 0;
    for _ in 0..5000 {
        let body = rng.body();
        match dreamshaper::server::decode::decode(&body, Ranges::Hosted) {
            Ok(request) => {
                request.validate_hosted().unwrap();
                accepted += 1;
            }
            Err(e) => assert_eq!(e.status, 400, "{e}"),
        }
    }
    eprintln!("decoder: {accepted} of 5000 random bodies were valid requests");

    // Over HTTP: a few hundred random bodies, then raw garbage instead of HTTP; the server answers every one
    // and is still healthy.
    let server = stand_in_server(config(Ranges::Hosted, 64));
    let addr = server.addr();
    let start = Instant::now();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for _ in 0..300 {
        let body = rng.body();
        let r = call(addr, "POST", PATH, &[("content-type", "application/json")], &body);
        assert!(matches!(r.status, 200 | 400), "{}: {:?} -> {}", r.status, String::from_utf8_lossy(&body), r.text());
        if r.status == 400 {
            r.error();
        } else {
            assert_eq!(
                r.header("content-type").unwrap(),
                if body_is_base64_or_many(&body) { "application/json" } else { "image/jpeg" }
            );
        }
        *statuses.entry(r.status).or_default() += 1;
        assert!(start.elapsed() < Duration::from_secs(60));
    }
    eprintln!("HTTP fuzz statuses: {statuses:?}");
    for _ in 0..30 {
        let n = 1 + rng.below(500);
        let garbage = rng.bytes(n);
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&garbage);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        if !answer.is_empty() {
            let status = parse_reply(&answer).status;
            assert!((400..500).contains(&status), "{status}");
        }
    }
    let h = health(addr);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["queue_length"], 0);
    server.shutdown().unwrap();
}

fn body_is_base64_or_many(body: &[u8]) -> bool {
    let r: GenerateRequest = serde_json::from_slice(body).unwrap();
    r.base64 || r.samples > 1
}

#[test]
fn in_process_shutdown_answers_queued_requests_503() {
    let (server, go) = held_server(config(Ranges::Hosted, 4));
    let addr = server.addr();
    let body = json!({"prompt": "x", "scheduler": "Euler"}).to_string();
    let json = [("content-type", "application/json")];
    let running = send(addr, "POST", PATH, &json, body.as_bytes());
    wait_for_health(addr, Duration::from_secs(10), "running", |h| h["running"] == true);
    let queued: Vec<TcpStream> = (0..3).map(|_| send(addr, "POST", PATH, &json, body.as_bytes())).collect();
    wait_for_health(addr, Duration::from_secs(10), "three queued", |h| h["queue_length"] == 3);
    let stopping = std::thread::spawn(move || server.shutdown());
    for q in queued {
        let r = read_reply(q);
        assert_eq!(r.status, 503);
        assert!(r.error().contains("shutting down"));
    }
    go.send(()).unwrap();
    let r = read_reply(running);
    assert_eq!(r.status, 200, "the running generation finishes and is answered");
    stopping.join().unwrap().unwrap();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(), "no longer listening");
}

// ---------------------------------------------------------------------------------------------------------------
// The binary.

#[test]
fn serve_binary_with_a_key_file_and_sigterm() {
    // Declared before the server: the child is killed (Serve's drop) before the folder goes.
    let dir = common::TempDir::new("serve");
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "# local keys\nfirst-key\n\nsecond-key\n").unwrap();
    let mut server = serve(&["--api-keys-file", keys.to_str().unwrap(), "--max-queue", "2", "--relaxed-ranges"]);
    let addr = server.addr;
    assert_eq!(post_json(addr, &small("x", 64, 2)).status, 401);
    assert_eq!(post_with(addr, &[("x-api-key", "local keys")], &small("x", 64, 2)).status, 401);
    let r = post_with(addr, &[("x-api-key", "second-key")], &small("x", 64, 2));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.jpeg_size(), (64, 64));

    // SIGTERM with one generation running and one queued: the running one is answered, the queued one gets 503,
    // and the process exits cleanly.
    let key = [("content-type", "application/json"), ("x-api-key", "first-key")];
    let running = send(addr, "POST", PATH, &key, small("running", 256, 30).to_string().as_bytes());
    wait_for_health(addr, Duration::from_secs(30), "running", |h| h["running"] == true);
    let queued = send(addr, "POST", PATH, &key, small("queued", 64, 2).to_string().as_bytes());
    wait_for_health(addr, Duration::from_secs(30), "queued", |h| h["queue_length"] == 1);
    let kill = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let q = read_reply(queued);
    assert_eq!(q.status, 503, "{}", q.text());
    let r = read_reply(running);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.jpeg_size(), (256, 256));
    let status = wait_exit(&mut server.child, Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = server.log.try_iter().collect();
    let requests = log.iter().filter(|l| l.contains("request_id=") && l.contains(PATH)).count();
    assert!(requests >= 5, "one log line per request:\n{}", log.join("\n"));
    assert!(log.iter().any(|l| l.contains("status=401")) && log.iter().any(|l| l.contains("status=503")));
}

#[test]
fn serve_binary_refuses_bad_options() {
    for (args, needle) in [
        (vec!["--api-key", "a", "--api-keys-file", "/x"], "--api-keys-file"),
        (vec!["--api-keys-file", "/no/such/keys.txt"], "/no/such/keys.txt"),
        (vec!["--api-key", "  "], "empty"),
        (vec!["--addr", "not-an-address"], "--addr"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_dreamshaper"))
            .arg("serve")
            .arg("--model")
            .arg(common::tiny_model())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn shutdown_is_not_held_up_by_a_stalled_client() {
    let server = stand_in_server(ServerConfig { shutdown_grace: Duration::from_secs(1), ..config(Ranges::Hosted, 2) });
    let addr = server.addr();
    // Half a request head, then silence.
    let mut stalled = connect(addr);
    stalled.write_all(b"POST /v1/sdxl1.0-dreamshaper HTTP/1.1\r\nhost: x\r\n").unwrap();
    let idle = connect(addr);
    std::thread::sleep(Duration::from_millis(100));
    let (done, finished) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || done.send(server.shutdown()).unwrap());
    let result = finished.recv_timeout(Duration::from_secs(30)).expect("shutdown finished");
    result.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    eprintln!("shutdown with a stalled client took {took:?}");
    drop((stalled, idle));
}

/// `loras` in the request body (and `<lora:…>` tags) are found in `--lora-dir`: the image changes with the LoRA and
/// is the same as the CLI's for the same request; a name that tries to leave the directory, or names no LoRA, is a
/// 400 naming the field.
#[test]
fn request_loras_come_from_the_lora_directory_only() {
    let loras = common::root().join("models/tiny-sdxl-loras");
    let server = serve(&["--relaxed-ranges", "--lora-dir", loras.to_str().unwrap()]);
    let addr = server.addr;
    let base = post_json(addr, &small("a photo of a cat", 64, 2));
    assert_eq!(base.status, 200, "{}", base.text());
    let mut with_lora = small("a photo of a cat", 64, 2);
    with_lora["loras"] = json!([{"name": "kohya_sgm", "weight": 0.8}]);
    let first = post_json(addr, &with_lora);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_ne!(first.body, base.body, "the LoRA changes the image");
    let mut tagged = small("a photo of a cat <lora:kohya_sgm:0.8>", 64, 2);
    tagged["loras"] = json!([]);
    let second = post_json(addr, &tagged);
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.body, first.body, "a prompt tag is the same LoRA as the field");
    assert_eq!(post_json(addr, &small("a photo of a cat", 64, 2)).body, base.body, "back to the base weights");
    for name in ["../tiny-sdxl/unet/diffusion_pytorch_model", "/etc/passwd", "missing"] {
        let mut bad = small("x", 64, 2);
        bad["loras"] = json!([{"name": name}]);
        let r = post_json(addr, &bad);
        assert_eq!(r.status, 400, "{name}: {}", r.text());
        assert!(r.error().contains("loras"), "{name}: {}", r.error());
    }
}

/// `POST /v1/sdxl-img2img`: the input image's size, the same images as the library gives for the request, and the
/// endpoint's own 400s (no image, an unreadable one, a strength out of range, a strength that leaves no step).
#[test]
fn img2img_endpoint_answers_the_inputs_size_and_its_errors() {
    let server = tiny_server(config(Ranges::Open, 2));
    let input = std::fs::read(common::root().join("tests/fixtures/img2img_input.png")).unwrap();
    let image = base64::engine::general_purpose::STANDARD.encode(&input);
    let post = |body: &Value| {
        call(
            server.addr(),
            "POST",
            "/v1/sdxl-img2img",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let body = json!({"prompt": "a photo of a Grumpy cat", "image": image, "strength": 0.6, "scheduler": "Euler a",
        "num_inference_steps": 10, "guidance_scale": 6.0, "seed": 42, "samples": 2, "base64": true});
    let r = post(&body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-seed-value"), Some("42"));
    let images = r.json()["images"].as_array().cloned().expect("an images list for two samples");
    assert_eq!(images.len(), 2, "two samples");
    for encoded in &images {
        let jpeg = base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap()).unwrap();
        assert_eq!(jpeg_size(&jpeg), (96, 64), "the input's size");
    }
    // (The pixels are checked against diffusers in tests/img2img.rs.)
    for (bad, field) in [
        (json!({"prompt": "x", "scheduler": "Euler"}), "image"),
        (json!({"prompt": "x", "scheduler": "Euler", "image": "%%%"}), "image"),
        (json!({"prompt": "x", "scheduler": "Euler", "image": image, "strength": 0}), "strength"),
        (json!({"prompt": "x", "scheduler": "Euler", "image": image, "strength": 1.5}), "strength"),
        (json!({"prompt": "x", "scheduler": "Euler", "image": image, "strength": "high"}), "strength"),
        (
            json!({"prompt": "x", "scheduler": "Euler", "image": image, "strength": 0.01, "num_inference_steps": 20}),
            "strength",
        ),
    ] {
        let r = post(&bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.error().contains(field), "{bad}: {}", r.error());
    }
    // Inpainting: the mask is required and must have the image's size.
    let mask = std::fs::read(common::root().join("tests/fixtures/inpaint_mask_hard.png")).unwrap();
    let mask = base64::engine::general_purpose::STANDARD.encode(&mask);
    let inpaint = |body: &Value| {
        call(
            server.addr(),
            "POST",
            "/v1/sdxl-inpaint",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let body = json!({"prompt": "a cat", "image": image, "mask": mask, "scheduler": "Euler", "num_inference_steps": 4,
        "seed": 7});
    let r = inpaint(&body);
    assert_eq!((r.status, r.jpeg_size()), (200, (96, 64)), "{}", r.text());
    let r = inpaint(&json!({"prompt": "x", "scheduler": "Euler", "image": image}));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("mask"), "{}", r.error());
    let r = inpaint(&json!({"prompt": "x", "scheduler": "Euler", "image": image, "mask": small_png_base64()}));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("mask") && r.error().contains("96×64"), "{}", r.error());
    // The text-to-image endpoint ignores `image`, like any field it does not know.
    let mut t2i = small("a cat", 64, 2);
    t2i["image"] = json!(image);
    let r = post_json(server.addr(), &t2i);
    assert_eq!((r.status, r.jpeg_size()), (200, (64, 64)));
    server.shutdown().unwrap();
}

fn small_png_base64() -> String {
    let mut png = Vec::new();
    image::GrayImage::new(8, 8).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

/// Image URLs: refused naming `--allow-image-urls` without it; with it, still never fetched from loopback or private
/// addresses (the hosted API fetches them; a local server must not become a proxy into its own network).
#[test]
fn image_urls_need_the_flag_and_never_reach_private_addresses() {
    let body = |image: &str| json!({"prompt": "x", "scheduler": "Euler", "image": image}).to_string();
    let post = |server: &Server, image: &str| {
        call(server.addr(), "POST", "/v1/sdxl-img2img", &[("content-type", "application/json")], body(image).as_bytes())
    };
    let plain = stand_in_server(config(Ranges::Open, 2));
    let r = post(&plain, "https://example.com/cat.png");
    assert_eq!(r.status, 400);
    assert!(r.error().contains("`image`") && r.error().contains("--allow-image-urls"), "{}", r.error());
    plain.shutdown().unwrap();

    let fetching = stand_in_server(ServerConfig { allow_image_urls: true, ..config(Ranges::Open, 2) });
    // The server's own address, other loopback and private ones: refused before any connection.
    let own = format!("http://{}/health", fetching.addr());
    for url in [own.as_str(), "http://localhost:1/x.png", "http://10.0.0.1/x.png", "http://169.254.169.254/latest"] {
        let r = post(&fetching, url);
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        assert!(r.error().contains("image") && r.error().contains("not a public address"), "{url}: {}", r.error());
    }
    fetching.shutdown().unwrap();
}

/// A 2048² input (the hosted ranges' largest) is served: encoded and decoded in bands of rows (the tiny VAE's
/// `sample_size` is 128), one step of a 20-step schedule at strength 0.05.
#[test]
fn a_2048_image_to_image_request_is_served() {
    let server = tiny_server(config(Ranges::Hosted, 1));
    let big =
        image::RgbImage::from_fn(2048, 2048, |x, y| image::Rgb([(x / 8) as u8, (y / 8) as u8, ((x + y) / 16) as u8]));
    let mut png = Vec::new();
    big.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let body = json!({"prompt": "a cat", "image": base64::engine::general_purpose::STANDARD.encode(&png),
        "strength": 0.05, "scheduler": "Euler", "num_inference_steps": 20, "guidance_scale": 1.0, "seed": 3});
    let started = Instant::now();
    let r = call(
        server.addr(),
        "POST",
        "/v1/sdxl-img2img",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.jpeg_size(), (2048, 2048));
    eprintln!("2048² image to image on the tiny model: {:.1} s", started.elapsed().as_secs_f64());
    server.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// Hardening: what hyper rejects itself, the Host check, readiness, metrics, logs, the key from the environment.

/// Requests hyper cannot parse are answered by it before any route runs; they get JSON errors and a request id
/// like every other answer.
#[test]
fn requests_the_http_parser_rejects_get_json_errors_with_a_request_id() {
    let server = stand_in_server(config(Ranges::Hosted, 2));
    let addr = server.addr();
    let raw = |bytes: &[u8]| {
        let mut stream = connect(addr);
        let _ = stream.write_all(bytes);
        read_reply(stream)
    };
    let big_header = format!("GET /health HTTP/1.1\r\nhost: localhost\r\nx-pad: {}\r\n\r\n", "a".repeat(40_000));
    let cases: [(&[u8], u16, &str); 4] = [
        (big_header.as_bytes(), 431, "at most 16384 bytes"),
        (
            b"POST /v1/sdxl1.0-dreamshaper HTTP/1.1\r\nhost: localhost\r\ncontent-length: abc\r\n\r\n{}",
            400,
            "Content-Length",
        ),
        (b"GET /health HTTP/1.1\r\nhost: localhost\r\nx-nul: a\0b\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET /he alth HTTP/1.1\r\nhost: localhost\r\n\r\n", 400, "malformed HTTP request"),
    ];
    for (request, status, needle) in cases {
        let r = raw(request);
        let shown = String::from_utf8_lossy(&request[..request.len().min(60)]).into_owned();
        assert_eq!(r.status, status, "{shown}: {}", r.text());
        assert!(r.error().contains(needle), "{shown}: {}", r.error());
        assert!(r.header("x-request-id").is_some_and(|id| id.len() > 8), "{shown}: {:?}", r.headers);
    }
    // The server is unharmed.
    assert_eq!(health(addr)["status"], "ok");
}

/// DNS rebinding: without a key only loopback host names are answered, unless `--allowed-hosts` says otherwise.
#[test]
fn host_names_are_checked_without_a_key() {
    let host = |addr: SocketAddr, host: &str| call(addr, "GET", "/health", &[("host", host)], b"");
    let open = stand_in_server(config(Ranges::Hosted, 2));
    let r = host(open.addr(), "evil.example:7860");
    assert_eq!(r.status, 403);
    assert!(r.error().contains("evil.example") && r.error().contains("--allowed-hosts"), "{}", r.error());
    assert!(r.header("x-request-id").is_some());
    let r =
        call(open.addr(), "POST", PATH, &[("host", "rebound.example"), ("content-type", "application/json")], b"{}");
    assert_eq!(r.status, 403, "generation routes too");
    for ok in ["localhost", "127.0.0.1:7860", "[::1]:7860"] {
        assert_eq!(host(open.addr(), ok).status, 200, "{ok}");
    }
    let listed =
        stand_in_server(ServerConfig { allowed_hosts: Some(vec!["gpu-box.lan".into()]), ..config(Ranges::Hosted, 2) });
    assert_eq!(host(listed.addr(), "gpu-box.lan:7860").status, 200);
    assert_eq!(host(listed.addr(), "other.lan").status, 403);
    let keyed = stand_in_server(ServerConfig { api_keys: ApiKeys::new(["k"]).unwrap(), ..config(Ranges::Hosted, 2) });
    assert_eq!(host(keyed.addr(), "gpu-box.lan").status, 200, "with a key the key protects it");
}

/// `/health` and `/ready` while shutting down (the running generation still finishing) and with the queue full.
#[test]
fn health_and_ready_show_shutdown_and_a_full_queue() {
    let (server, go) = held_server(config(Ranges::Hosted, 1));
    let addr = server.addr();
    let ready = || call(addr, "GET", "/ready", &[], b"");
    assert_eq!(ready().status, 200);
    assert_eq!(ready().json()["ready"], true);
    let body = json!({"prompt": "x", "scheduler": "Euler"}).to_string();
    let json = [("content-type", "application/json")];
    let running = send(addr, "POST", PATH, &json, body.as_bytes());
    wait_for_health(addr, Duration::from_secs(10), "running", |h| h["running"] == true);
    assert_eq!(ready().status, 200, "one place left in the queue");
    let queued = send(addr, "POST", PATH, &json, body.as_bytes());
    wait_for_health(addr, Duration::from_secs(10), "queued", |h| h["queue_length"] == 1);
    let r = ready();
    assert_eq!((r.status, r.json()["reason"].as_str()), (503, Some("queue_full")));
    assert_eq!(call(addr, "GET", "/health", &[], b"").status, 200, "/health is liveness: still 200");

    let stopping = std::thread::spawn(move || server.shutdown());
    assert_eq!(read_reply(queued).status, 503);
    // The running generation is still finishing: the server says so instead of not answering.
    let h = wait_for_health(addr, Duration::from_secs(10), "shutting down", |h| h["status"] == "shutting_down");
    assert_eq!(h["running"], true);
    let r = ready();
    assert_eq!((r.status, r.json()["reason"].as_str()), (503, Some("shutting_down")));
    let late = post_json(addr, &json!({"prompt": "late", "scheduler": "Euler"}));
    assert_eq!(late.status, 503, "{}", late.text());
    go.send(()).unwrap();
    assert_eq!(read_reply(running).status, 200);
    stopping.join().unwrap().unwrap();
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// `/metrics` in Prometheus text: behind the key on the main address, key-less on `--metrics-addr`.
#[test]
fn metrics_count_requests_generations_and_the_queue() {
    // A free port (bound and released; nothing else on this machine picks ports from the ephemeral range by hand).
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = tiny_server(ServerConfig {
        api_keys: ApiKeys::new(["k"]).unwrap(),
        metrics_addr: Some(metrics_addr),
        ..config(Ranges::Open, 2)
    });
    let addr = server.addr();
    let key = [("x-api-key", "k")];
    assert_eq!(call(addr, "GET", "/metrics", &[], b"").status, 401);
    let r = post_with(addr, &key, &small("a cat", 64, 3));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(post_json(addr, &small("no key", 64, 3)).status, 401);
    assert_eq!(post_with(addr, &key, &json!({"prompt": "x", "samples": 9})).status, 400);
    let r = call(addr, "GET", "/metrics", &key, b"");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    let requests = |status: u16| {
        metric(&text, &format!("dreamshaper_http_requests_total{{route=\"{PATH}\",status=\"{status}\"}}"))
    };
    assert_eq!((requests(200), requests(401), requests(400)), (1.0, 1.0, 1.0));
    assert_eq!(metric(&text, "dreamshaper_http_requests_total{route=\"/metrics\",status=\"401\"}"), 1.0);
    assert_eq!(metric(&text, "dreamshaper_generation_seconds_count"), 1.0);
    assert_eq!(metric(&text, "dreamshaper_model_evaluations_total"), 3.0, "3 Euler steps");
    assert!(metric(&text, "dreamshaper_model_evaluations_per_second") > 0.0);
    assert_eq!(metric(&text, "dreamshaper_queue_length"), 0.0);
    assert_eq!(metric(&text, "dreamshaper_queue_capacity"), 2.0);
    assert!(metric(&text, "dreamshaper_connections_open") >= 1.0);
    // The separate address needs no key (it is for a scraper on a private network).
    let r = call(metrics_addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("dreamshaper_generation_seconds_bucket{le=\"+Inf\"} 1"));
}

/// The key from `DREAMSHAPER_API_KEY` (not on the command line, where `ps` shows it), JSON log lines, no file-system
/// path in `/health`, and a warning for a key-less server on a non-loopback address.
#[test]
fn serve_binary_key_from_the_environment_json_logs_and_no_paths_in_health() {
    let server = serve_binary::serve_with(
        &["--log-format", "json", "--relaxed-ranges"],
        &[("DREAMSHAPER_API_KEY", "env-secret")],
        None,
    );
    let addr = server.addr;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.child.id())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("env-secret"));
    assert_eq!(post_json(addr, &small("x", 64, 2)).status, 401);
    let r = post_with(addr, &[("x-api-key", "env-secret")], &small("x", 64, 2));
    assert_eq!(r.status, 200, "{}", r.text());
    let request_id = r.header("x-request-id").unwrap().to_string();
    let h = call(addr, "GET", "/health", &[], b"");
    assert_eq!(h.json()["model"], "tiny-sdxl");
    let root = common::root();
    assert!(!h.text().contains(root.to_str().unwrap()) && !h.text().contains('/'), "{}", h.text());
    // One JSON object per line; the request line carries the request id and the status.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let line = server.log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("log line");
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if value["request_id"] == request_id.as_str() {
            break value;
        }
    };
    assert_eq!((line["status"].as_u64(), line["path"].as_str()), (Some(200), Some(PATH)), "{line}");
    assert!(line["timestamp"].is_string() && line["level"] == "INFO", "{line}");

    // Key-less on a non-loopback address: a warning (the port is closed again at once).
    let mut open = serve_binary::serve(&["--addr", "0.0.0.0:0"]);
    let warned = open.startup.iter().any(|l| l.contains("not a loopback address") && l.contains("without an API key"));
    let _ = open.child.kill();
    assert!(warned, "no warning for a key-less non-loopback server");
}

/// A client that stops half-way through its request head is disconnected after the header timeout (also the idle
/// keep-alive timeout); one that stops half-way through its body gets 408 after the body timeout.
#[test]
fn slow_heads_and_bodies_time_out() {
    let limits = dreamshaper::server::Limits {
        header_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let server = stand_in_server(ServerConfig { limits, ..config(Ranges::Hosted, 2) });
    let addr = server.addr();
    let start = Instant::now();
    let mut slow_head = connect(addr);
    slow_head.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n").unwrap();
    let mut idle = connect(addr);
    let mut rest = Vec::new();
    assert_eq!(slow_head.read_to_end(&mut rest).unwrap_or(0), 0, "closed without an answer");
    assert_eq!(idle.read_to_end(&mut rest).unwrap_or(0), 0);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(5), "{took:?}");
    let mut slow_body = connect(addr);
    slow_body
        .write_all(
            format!("POST {PATH} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\"")
                .as_bytes(),
        )
        .unwrap();
    let r = read_reply(slow_body);
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.error().contains("did not arrive"), "{}", r.error());
    assert_eq!(health(addr)["status"], "ok");
}
