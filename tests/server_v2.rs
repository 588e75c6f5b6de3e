//! The hosted v2 submit-and-poll job API (`/v2/...`) as a client sees it: in-process servers on ephemeral loopback
//! ports, the tiny model where images are compared with v1's, a stand-in engine where only the job handling is
//! under test. Every route and every error shape.
//!
//! Only 127.0.0.1 is ever contacted; every request has a read timeout and every loop a bound in count and time.

mod common;
#[path = "common/tiny_server.rs"]
mod tiny_server;

use common::http::*;
use tiny_server::tiny_server;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use dreamshaper::sampling::ProgressFn;
use dreamshaper::server::{ApiKeys, Engine, Ranges, Server, ServerConfig};
use dreamshaper::{Control, Error, GenerateRequest, Generation};
use serde_json::{json, Value};

const SUBMIT: &str = "/v2/sdxl1.0-dreamshaper";

fn config() -> ServerConfig {
    ServerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ranges: Ranges::Open,
        max_queue: 4,
        model_name: "tiny-sdxl".into(),
        ..ServerConfig::default()
    }
}

/// Instant 8×8 images; `"fail"` fails; `"slow"` runs 400 evaluations of 5 ms each (`"slower"`: 2000), stopping
/// when cancelled.
struct StandIn;

impl Engine for StandIn {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> dreamshaper::Result<Generation> {
        if request.prompt == "fail" {
            return Err(Error::Service("the stand-in engine failed on purpose".into()));
        }
        progress(&dreamshaper::Progress::Stage("denoising"));
        if request.prompt.starts_with("slow") {
            // "slow": 2 s; "slower": 10 s.
            let steps = if request.prompt == "slower" { 2000 } else { 400 };
            for step in 0..steps {
                std::thread::sleep(Duration::from_millis(5));
                let p = dreamshaper::Progress::Step {
                    step,
                    steps,
                    evaluation: step + 1,
                    evaluations: steps,
                    latents: None,
                };
                if progress(&p) == Control::Stop {
                    return Err(Error::Cancelled);
                }
            }
        }
        let images = vec![image::RgbImage::from_pixel(8, 8, image::Rgb([200, 30, 30])); request.samples as usize];
        let latents = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
        Ok(Generation { images, seed: request.resolve_seed(), latents, warnings: Vec::new(), loras: Vec::new() })
    }
}

fn stand_in(config: ServerConfig) -> Server {
    Server::start(config, || Ok(StandIn)).unwrap()
}

fn small(prompt: &str) -> Value {
    json!({"prompt": prompt, "scheduler": "Euler", "num_inference_steps": 2, "img_width": 64, "img_height": 64,
           "seed": 1234})
}

fn submit(addr: std::net::SocketAddr, body: &Value) -> Reply {
    call(addr, "POST", SUBMIT, &[("content-type", "application/json")], body.to_string().as_bytes())
}

/// The path of one of our absolute URLs (which must start with `base`).
fn path_of(url: &str, base: &str) -> String {
    url.strip_prefix(base).unwrap_or_else(|| panic!("{url} is not under {base}")).to_string()
}

fn get(addr: std::net::SocketAddr, path: &str) -> Reply {
    call(addr, "GET", path, &[], b"")
}

/// Polls the status until it is COMPLETED or FAILED (bounded); returns the last status answer.
fn wait_done(addr: std::net::SocketAddr, status_path: &str) -> (u16, Value) {
    let start = Instant::now();
    loop {
        let r = get(addr, status_path);
        let v = r.json();
        if matches!(v["status"].as_str(), Some("COMPLETED" | "FAILED")) {
            return (r.status, v);
        }
        assert_eq!(r.status, 200, "{v}");
        assert!(start.elapsed() < Duration::from_secs(120), "the job did not end: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Submits `body`; returns the id, the status path and the result path.
fn submitted(addr: std::net::SocketAddr, body: &Value) -> (String, String, String) {
    let r = submit(addr, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let base = "http://localhost";
    let id = v["request_id"].as_str().unwrap().to_string();
    (id, path_of(v["status_url"].as_str().unwrap(), base), path_of(v["response_url"].as_str().unwrap(), base))
}

// ---------------------------------------------------------------------------------------------------------------

#[test]
fn submit_poll_and_result_give_v1s_image() {
    let server = tiny_server(config());
    let addr = server.addr();
    let v1 = post_json(addr, &small("a lighthouse"));
    assert_eq!(v1.status, 200, "{}", v1.text());

    let r = submit(addr, &small("a lighthouse"));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "QUEUED");
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(id.len(), 36, "{id}");
    // Absolute URLs from the request's Host (the SDK's client has base URL …/v1).
    let base = "http://localhost";
    assert_eq!(v["status_url"], format!("{base}/v2/requests/{id}/status"));
    assert_eq!(v["poll_url"], v["status_url"]);
    assert_eq!(v["response_url"], format!("{base}/v2/requests/{id}"));
    assert_eq!(v["cancel_url"], format!("{base}/v2/requests/{id}/cancel"));

    let (code, status) = wait_done(addr, &format!("/v2/requests/{id}/status"));
    assert_eq!((code, status["status"].as_str()), (200, Some("COMPLETED")), "{status}");
    assert_eq!(status["progress"]["step"], 2, "{status}");
    assert_eq!(status["progress"]["total"], 2, "{status}");
    assert_eq!(status["progress"]["eta_seconds"], 0.0, "{status}");
    assert!(status.get("error").is_none(), "{status}");

    let r = get(addr, &format!("/v2/requests/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let result = r.json();
    assert_eq!(result["status"], "COMPLETED");
    assert_eq!(result["error"], Value::Null);
    assert_eq!(result["seed"], 1234);
    assert!(result["metrics"]["inference_time"].as_f64().unwrap() > 0.0, "{result}");
    let output = result["output"].as_str().unwrap();
    assert_eq!(output, format!("{base}/v2/requests/{id}/output/0.jpg"));
    let image = get(addr, &path_of(output, base));
    assert_eq!(image.status, 200);
    assert_eq!(image.jpeg_size(), (64, 64));
    assert_eq!(image.header("x-seed-value"), Some("1234"));
    assert!(image.body == v1.body, "the v2 image is the v1 image of the same request");

    // Several samples: a list of URLs, each image v1's.
    let mut body = small("a lighthouse");
    body["samples"] = json!(2);
    body["base64"] = json!(true);
    let v1 = post_json(addr, &body).json();
    let (id, status_path, response_path) = submitted(addr, &body);
    assert_eq!(wait_done(addr, &status_path).1["status"], "COMPLETED");
    let result = get(addr, &response_path).json();
    let outputs = result["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "{result}");
    use base64::Engine as _;
    for (n, url) in outputs.iter().enumerate() {
        assert_eq!(url.as_str().unwrap(), format!("{base}/v2/requests/{id}/output/{n}.jpg"));
        let bytes = get(addr, &path_of(url.as_str().unwrap(), base)).body;
        let expected = base64::engine::general_purpose::STANDARD.decode(v1["images"][n].as_str().unwrap()).unwrap();
        assert!(bytes == expected, "sample {n}");
    }
    let r = get(addr, &format!("/v2/requests/{id}/output/2.jpg"));
    assert_eq!(r.status, 404);
    assert!(r.error().contains("has 2 image(s)"), "{}", r.text());
    let r = get(addr, &format!("/v2/requests/{id}/output/x.png"));
    assert_eq!(r.status, 404);
    server.shutdown().unwrap();
}

#[test]
fn previews_of_a_running_job() {
    let server = tiny_server(config());
    let addr = server.addr();
    let mut long = small("a lighthouse");
    long["num_inference_steps"] = json!(100);
    let (_, first_status, _) = submitted(addr, &long);
    let (id, status_path, _) = submitted(addr, &long);
    // Polled while queued: the worker makes a preview at its first evaluation.
    let status = get(addr, &status_path).json();
    assert!(matches!(status["status"].as_str(), Some("QUEUED" | "PROCESSING")), "{status}");
    assert_eq!(wait_done(addr, &first_status).1["status"], "COMPLETED");
    assert_eq!(wait_done(addr, &status_path).1["status"], "COMPLETED");
    let preview = get(addr, &format!("/v2/requests/{id}/preview.jpg"));
    assert_eq!(preview.status, 200, "{}", preview.text());
    let (w, h) = preview.jpeg_size();
    assert!(w > 0 && h > 0);
    server.shutdown().unwrap();
}

#[test]
fn progress_queue_position_and_cancellation() {
    let server = stand_in(config());
    let addr = server.addr();
    let (running, running_status, running_response) = submitted(addr, &small("slow"));
    let (queued, queued_status, _) = submitted(addr, &small("slow"));

    // The first one runs (progress, an ETA), the second waits at position 0.
    let start = Instant::now();
    let status = loop {
        let s = get(addr, &running_status).json();
        if s["status"] == "PROCESSING" && s["progress"]["step"].as_u64() > Some(2) {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status["progress"]["total"], 400, "{status}");
    assert!(status["progress"]["eta_seconds"].as_f64().unwrap() > 0.0, "{status}");
    assert_eq!(status["queue_position"], Value::Null);
    let s = get(addr, &queued_status).json();
    assert_eq!((s["status"].as_str(), s["queue_position"].as_u64()), (Some("QUEUED"), Some(0)), "{s}");
    let r = get(addr, &running_response);
    assert_eq!(r.status, 202, "not done yet: the status, no output");
    assert_eq!(r.json()["output"], Value::Null);
    let r = get(addr, &format!("/v2/requests/{running}/output/0.jpg"));
    assert_eq!(r.status, 409);
    assert!(r.error().contains("has no output"), "{}", r.text());

    // Cancel the queued one (DELETE), then the running one (POST …/cancel).
    let r = call(addr, "DELETE", &format!("/v2/requests/{queued}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!((v["status"].as_str(), v["error"].as_str()), (Some("FAILED"), Some("cancelled")), "{v}");
    let r = call(addr, "POST", &format!("/v2/requests/{running}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["error"], "cancelled");
    // The worker stops at its next evaluation.
    wait_for_health(addr, Duration::from_secs(30), "the cancelled job to stop", |h| h["running"] == false);
    assert_eq!(health(addr)["cancelled"], 2);
    // Status and result of a failed job: 422 with the error, as the hosted service answers.
    let r = get(addr, &running_status);
    assert_eq!(r.status, 422);
    let v = r.json();
    assert_eq!((v["status"].as_str(), v["error"].as_str()), (Some("FAILED"), Some("cancelled")), "{v}");
    let r = get(addr, &running_response);
    assert_eq!(r.status, 422);
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["error"].as_str(), &v["output"]),
        (Some("FAILED"), Some("cancelled"), &Value::Null)
    );
    // Cancelling again is a no-op; cancelling a finished job is 409.
    assert_eq!(call(addr, "POST", &format!("/v2/requests/{running}/cancel"), &[], b"").status, 200);
    let (done, done_status, _) = submitted(addr, &small("quick"));
    assert_eq!(wait_done(addr, &done_status).1["status"], "COMPLETED");
    let r = call(addr, "DELETE", &format!("/v2/requests/{done}"), &[], b"");
    assert_eq!(r.status, 409);
    assert!(r.error().contains("already ended (COMPLETED)"), "{}", r.text());
    server.shutdown().unwrap();
}

#[test]
fn failed_generations_are_failed_with_the_error() {
    let server = stand_in(config());
    let addr = server.addr();
    let (_, status_path, response_path) = submitted(addr, &small("fail"));
    let (code, v) = wait_done(addr, &status_path);
    assert_eq!((code, v["status"].as_str()), (422, Some("FAILED")), "{v}");
    assert!(v["error"].as_str().unwrap().contains("failed on purpose"), "{v}");
    assert_eq!(get(addr, &response_path).status, 422);
    server.shutdown().unwrap();
}

#[test]
fn errors_before_queueing_are_v1s() {
    let keyed = ServerConfig { api_keys: ApiKeys::new(["k"]).unwrap(), ..config() };
    let server = stand_in(keyed);
    let addr = server.addr();
    let json_key = [("content-type", "application/json"), ("x-api-key", "k")];
    let body = small("x").to_string();
    // 401 on every route without the key.
    let r = call(addr, "POST", SUBMIT, &[("content-type", "application/json")], body.as_bytes());
    assert_eq!(r.status, 401);
    assert!(r.error().contains("x-api-key"));
    for (method, path) in [
        ("GET", "/v2/requests/abc/status"),
        ("GET", "/v2/requests/abc"),
        ("DELETE", "/v2/requests/abc"),
        ("POST", "/v2/requests/abc/cancel"),
        ("GET", "/v2/requests/abc/output/0.jpg"),
        ("GET", "/v2/requests/abc/preview.jpg"),
        ("POST", "/v2/sdxl1.0-txt2img"),
    ] {
        let r = call(addr, method, path, &[], b"");
        assert_eq!(r.status, 401, "{method} {path}");
        r.error();
    }
    // Unknown slug, unknown id: 404 with a message.
    let r = call(addr, "POST", "/v2/sdxl1.0-txt2img", &json_key, body.as_bytes());
    assert_eq!((r.status, r.error().as_str()), (404, "Model not found"));
    for (method, path) in [
        ("GET", "/v2/requests/abc/status"),
        ("GET", "/v2/requests/abc"),
        ("DELETE", "/v2/requests/abc"),
        ("POST", "/v2/requests/abc/cancel"),
        ("GET", "/v2/requests/abc/output/0.jpg"),
        ("GET", "/v2/requests/abc/preview.jpg"),
    ] {
        let r = call(addr, method, path, &[("x-api-key", "k")], b"");
        assert_eq!(r.status, 404, "{method} {path}");
        assert!(r.error().contains("`abc` not found"), "{}", r.text());
    }
    // 400 naming the field, 406 for another content type, 405 for another method.
    let r = call(addr, "POST", SUBMIT, &json_key, br#"{"prompt": "x", "samples": 9}"#);
    assert_eq!(r.status, 400);
    assert!(r.error().contains("samples"));
    let r = call(addr, "POST", SUBMIT, &[("content-type", "text/plain"), ("x-api-key", "k")], body.as_bytes());
    assert_eq!(r.status, 406);
    r.error();
    let r = call(addr, "POST", "/v2/sdxl-img2img", &json_key, body.as_bytes());
    assert_eq!(r.status, 400);
    assert!(r.error().contains("`image` is required"));
    let r = call(addr, "GET", SUBMIT, &[("x-api-key", "k")], b"");
    assert_eq!(r.status, 405);
    r.error();
    // JSON null for an optional field reads as absent (Python clients send None).
    let nulls = json!({"prompt": "x", "negative_prompt": null, "seed": null, "scheduler": "Euler",
                       "num_inference_steps": 2, "img_width": 64, "img_height": 64, "samples": null});
    let r = call(addr, "POST", SUBMIT, &json_key, nulls.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(addr, "POST", "/v1/sdxl1.0-dreamshaper", &json_key, nulls.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    server.shutdown().unwrap();
}

#[test]
fn urls_follow_public_url_or_host() {
    let server = stand_in(ServerConfig { public_url: Some("https://gpu.example/".into()), ..config() });
    let v = submit(server.addr(), &small("x")).json();
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(v["status_url"], format!("https://gpu.example/v2/requests/{id}/status"));
    server.shutdown().unwrap();

    let server = stand_in(config());
    let addr = server.addr();
    let host = addr.to_string();
    let r = call(
        addr,
        "POST",
        SUBMIT,
        &[("content-type", "application/json"), ("host", &host)],
        small("x").to_string().as_bytes(),
    );
    let v = r.json();
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(v["response_url"], format!("http://{host}/v2/requests/{id}"));
    server.shutdown().unwrap();
}

#[test]
fn finished_jobs_expire_after_the_ttl_and_beyond_max_jobs() {
    let server = stand_in(ServerConfig { job_ttl: Duration::from_millis(500), ..config() });
    let addr = server.addr();
    let (id, status_path, _) = submitted(addr, &small("x"));
    assert_eq!(wait_done(addr, &status_path).1["status"], "COMPLETED");
    std::thread::sleep(Duration::from_millis(700));
    for path in [status_path.clone(), format!("/v2/requests/{id}"), format!("/v2/requests/{id}/output/0.jpg")] {
        let r = get(addr, &path);
        assert_eq!(r.status, 404, "{path}");
        let e = r.error();
        assert!(e.contains("expired") && e.contains("--job-ttl"), "{e}");
    }
    server.shutdown().unwrap();

    // At most two jobs kept: the oldest finished one makes room; with two unfinished ones, a third is refused.
    let server = stand_in(ServerConfig { max_jobs: 2, ..config() });
    let addr = server.addr();
    let (first, first_status, _) = submitted(addr, &small("x"));
    assert_eq!(wait_done(addr, &first_status).1["status"], "COMPLETED");
    let (_, slow_status, _) = submitted(addr, &small("slow"));
    let (_, slow2_status, _) = submitted(addr, &small("slow"));
    let r = get(addr, &format!("/v2/requests/{first}"));
    assert_eq!(r.status, 404);
    assert!(r.error().contains("expired"));
    let r = submit(addr, &small("x"));
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.error().contains("--max-jobs"));
    assert!(r.header("retry-after").is_some());
    for path in [&slow_status, &slow2_status] {
        let cancel = path.replace("/status", "/cancel");
        assert_eq!(call(addr, "POST", &cancel, &[], b"").status, 200);
    }
    server.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// A fleet sharing Redis (`--job-store`): needs `redis-server` (Debian: apt-get install redis-server).

/// A `redis-server` of our own on a free loopback port, without persistence, in a temporary folder.
struct Redis {
    child: std::process::Child,
    port: u16,
    _dir: common::TempDir,
}

impl Redis {
    fn start(port: Option<u16>, dir: common::TempDir) -> Redis {
        let port =
            port.unwrap_or_else(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (our own child) and starts a fresh, empty one on the same port.
    fn restart(mut self) -> Redis {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let dir = std::mem::replace(&mut self._dir, common::TempDir::new("redis-unused"));
        drop(self);
        Redis::start(Some(port), dir)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_available() -> bool {
    let found = std::process::Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: redis-server is not installed (Debian: apt-get install redis-server)");
    }
    found
}

fn poll_until(addr: std::net::SocketAddr, path: &str, limit: Duration, done: impl Fn(u16, &Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let r = get(addr, path);
        let v = r.json();
        if done(r.status, &v) {
            return v;
        }
        assert!(start.elapsed() < limit, "gave up waiting on {path}: {} {v}", r.status);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fleet_sharing_redis_behaves_as_one_service() {
    if !redis_available() {
        return;
    }
    let redis = Redis::start(None, common::TempDir::new("redis"));
    // A restart keeps the port, so the URL.
    let url = redis.url();
    let fleet = |ttl: Duration| ServerConfig { job_store: Some(url.clone()), job_ttl: ttl, ..config() };
    let a = stand_in(fleet(Duration::from_secs(2)));
    let b = stand_in(fleet(Duration::from_secs(2)));
    let (a_addr, b_addr) = (a.addr(), b.addr());

    // Submit on one replica, poll and fetch on the other.
    let mut body = small("x");
    body["samples"] = json!(2);
    let (id, status_path, response_path) = submitted(a_addr, &body);
    let status = poll_until(b_addr, &status_path, Duration::from_secs(30), |_, v| v["status"] == "COMPLETED");
    assert_eq!(status["progress"]["eta_seconds"], 0.0, "{status}");
    let result = get(b_addr, &response_path).json();
    assert_eq!(result["seed"], 1234, "{result}");
    assert_eq!(result["output"].as_array().map(Vec::len), Some(2), "{result}");
    for replica in [a_addr, b_addr] {
        let image = get(replica, &format!("/v2/requests/{id}/output/1.jpg"));
        assert_eq!(image.jpeg_size(), (8, 8));
        assert_eq!(image.header("x-seed-value"), Some("1234"));
    }
    assert_eq!(get(b_addr, &format!("/v2/requests/{id}/output/2.jpg")).status, 404);
    assert_eq!(get(a_addr, "/v2/requests/nope/status").status, 404);
    assert_eq!(call(a_addr, "DELETE", &format!("/v2/requests/{id}"), &[], b"").status, 409);

    // Failures and cancellation across replicas.
    let (_, fail_status, _) = submitted(b_addr, &small("fail"));
    let v = poll_until(a_addr, &fail_status, Duration::from_secs(30), |_, v| v["status"] == "FAILED");
    assert!(v["error"].as_str().unwrap().contains("on purpose"), "{v}");
    let (slow, slow_status, _) = submitted(a_addr, &small("slower"));
    poll_until(b_addr, &slow_status, Duration::from_secs(30), |_, v| v["status"] == "PROCESSING");
    let r = call(b_addr, "POST", &format!("/v2/requests/{slow}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["error"], "cancelled");
    // The replica running it stops at its next heartbeat and evaluation.
    for replica in [a_addr, b_addr] {
        wait_for_health(replica, Duration::from_secs(30), "the cancelled job to stop", |h| h["running"] == false);
    }
    assert_eq!(call(a_addr, "DELETE", &format!("/v2/requests/{slow}"), &[], b"").status, 200, "idempotent");

    // Results expire after the TTL.
    std::thread::sleep(Duration::from_millis(2500));
    let r = get(a_addr, &status_path);
    assert_eq!(r.status, 404);
    assert!(r.error().contains("expired"), "{}", r.text());

    // Redis restarts (empty) under a running job: polls answer 503 while it is down, nothing hangs; the running job
    // ends FAILED saying its record was lost; the replicas reconnect and take new jobs.
    let (_, running_status, _) = submitted(a_addr, &small("slower"));
    poll_until(b_addr, &running_status, Duration::from_secs(30), |_, v| v["status"] == "PROCESSING");
    let mut redis = redis;
    {
        let _ = redis.child.kill();
        let _ = redis.child.wait();
    }
    let start = Instant::now();
    let r = get(b_addr, &running_status);
    assert!(start.elapsed() < Duration::from_secs(10), "a poll hung while Redis was down");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.error().contains("job store"), "{}", r.text());
    let r = submit(a_addr, &small("x"));
    assert_eq!(r.status, 503, "{}", r.text());
    redis = redis.restart();
    let v =
        poll_until(b_addr, &running_status, Duration::from_secs(60), |code, v| code != 503 && v["status"] == "FAILED");
    assert!(v["error"].as_str().unwrap().contains("lost this job"), "{v}");
    for replica in [a_addr, b_addr] {
        wait_for_health(replica, Duration::from_secs(30), "the lost job to stop", |h| h["running"] == false);
    }
    let (_, after_status, _) = submitted(b_addr, &small("x"));
    poll_until(a_addr, &after_status, Duration::from_secs(30), |_, v| v["status"] == "COMPLETED");

    // A replica shut down while it runs a job records the job's end before it stops: another one serves it.
    b.shutdown().unwrap();
    let (_, last_status, last_response) = submitted(a_addr, &small("slow"));
    poll_until(a_addr, &last_status, Duration::from_secs(30), |_, v| v["status"] == "PROCESSING");
    a.shutdown().unwrap();
    let c = stand_in(fleet(Duration::from_secs(60)));
    let v = poll_until(c.addr(), &last_status, Duration::from_secs(5), |code, _| code != 503);
    assert_eq!(v["status"], "COMPLETED", "{v}");
    assert_eq!(get(c.addr(), &last_response).json()["seed"], 1234);
    c.shutdown().unwrap();
    drop(redis);
}
