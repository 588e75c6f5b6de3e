//! A minimal HTTP/1.1 client on std's TcpStream for the server tests: full control over headers, bodies and
//! disconnects. Only loopback addresses are ever contacted; every read has a timeout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The hosted text-to-image route.
pub const PATH: &str = "/v1/sdxl1.0-dreamshaper";
/// No single answer in these tests may take longer (the 2048² request takes ~80 s on two busy cores).
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn json(&self) -> Value {
        assert_eq!(self.header("content-type"), Some("application/json"), "status {}", self.status);
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }

    /// The message of a JSON error answer (exactly one field, `error`).
    pub fn error(&self) -> String {
        let v = self.json();
        let obj = v.as_object().expect("JSON object");
        assert_eq!(obj.len(), 1, "{v}");
        obj["error"].as_str().expect("error string").to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn jpeg_size(&self) -> (u32, u32) {
        assert_eq!(self.header("content-type"), Some("image/jpeg"), "{}: {}", self.status, self.text());
        jpeg_size(&self.body)
    }
}

pub fn jpeg_size(bytes: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg).expect("a decodable JPEG");
    (image.width(), image.height())
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    assert!(addr.ip().is_loopback(), "tests only talk to loopback");
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        head.push_str("host: localhost\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Sends a request and leaves the connection open (the caller reads the answer, or hangs up).
pub fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut stream = connect(addr);
    // The server may answer (413, 401) and close before the whole body is written: that is fine.
    let _ = stream.write_all(&request_bytes(method, path, headers, body));
    stream
}

pub fn read_reply(mut stream: TcpStream) -> Reply {
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        assert!(!raw.is_empty(), "no answer: {e}");
    }
    parse_reply(&raw)
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {raw:?}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body);
    } else if let Some(n) = headers.get("content-length").and_then(|n| n.parse::<usize>().ok()) {
        assert_eq!(body.len(), n, "body length");
    }
    Reply { status, headers, body }
}

pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

pub fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    read_reply(send(addr, method, path, headers, body))
}

pub fn post_json(addr: SocketAddr, body: &Value) -> Reply {
    post_with(addr, &[], body)
}

pub fn post_with(addr: SocketAddr, extra: &[(&str, &str)], body: &Value) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    call(addr, "POST", PATH, &headers, body.to_string().as_bytes())
}

pub fn health(addr: SocketAddr) -> Value {
    let r = call(addr, "GET", "/health", &[], b"");
    assert!(r.status == 200 || r.status == 503, "{}", r.status);
    r.json()
}

/// Polls `/health` until `condition` holds; panics after `limit`.
pub fn wait_for_health(addr: SocketAddr, limit: Duration, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = health(addr);
        if condition(&h) {
            return h;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}: {h}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
