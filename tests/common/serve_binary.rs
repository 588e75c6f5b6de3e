//! The `dreamshaper serve` binary as a child process on an ephemeral loopback port, its log lines collected.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Serve {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: mpsc::Receiver<String>,
    /// The log lines up to and including the "listening on" one.
    pub startup: Vec<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(args: &[&str]) -> Serve {
    serve_with(args, &[], None)
}

/// [`serve`] with extra environment variables, and under `ulimit -n open_files` (soft and hard) when given.
pub fn serve_with(args: &[&str], env: &[(&str, &str)], open_files: Option<u64>) -> Serve {
    let binary = env!("CARGO_BIN_EXE_dreamshaper");
    let mut command = match open_files {
        Some(n) => {
            let mut c = Command::new("bash");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), binary]);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("serve")
        .arg("--model")
        .arg(crate::common::tiny_model())
        .args(if args.contains(&"--addr") { &[][..] } else { &["--addr", "127.0.0.1:0"][..] })
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("DREAMSHAPER_API_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut startup = Vec::new();
    let addr = loop {
        let line = log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a listening line");
        startup.push(line.clone());
        if let Some(rest) = line.split("listening on http://").nth(1) {
            // Text lines end the address with a space or the line, JSON lines with a quote.
            let end = rest.find(|c: char| c.is_whitespace() || c == '"').unwrap_or(rest.len());
            break rest[..end].parse().unwrap();
        }
    };
    Serve { child, addr, log, startup }
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "the server did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
