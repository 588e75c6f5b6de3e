//! `GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4).
//!
//! Requests by route and status; the queue (waiting, running, capacity); generation and queue-wait seconds as
//! histograms; model evaluations (a counter, and the last generation's evaluations per second); failed, panicked
//! and cancelled generations; connections (open, evicted at the cap, refused, header timeouts). Routes are the
//! router's patterns (`/v1/{*model}` for unknown models, `(unmatched)` for unknown paths, `(unparsed)` for requests
//! hyper could not parse), so a client cannot grow the label set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use super::connections::ConnectionStats;
use super::queue::{Outcome, QueueStatus};

/// Bucket bounds of the seconds histograms: from a tiny-model request to a 2048² CPU job.
const SECONDS_BUCKETS: [f64; 14] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Observations at most each bound (not cumulative; summed when rendered).
    counts: [u64; SECONDS_BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = SECONDS_BUCKETS.iter().position(|&bound| seconds <= bound) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in SECONDS_BUCKETS.iter().zip(self.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Recorded {
    requests: BTreeMap<(String, u16), u64>,
    generation_seconds: Histogram,
    queue_wait_seconds: Histogram,
    evaluations: u64,
    last_evaluations_per_second: f64,
    failures: BTreeMap<&'static str, u64>,
}

/// The counters; shared by the routes, the logging layer and the accept loop.
#[derive(Debug, Default)]
pub struct Metrics {
    recorded: Mutex<Recorded>,
}

/// Why a generation did not produce images, for `dreamshaper_generation_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The library returned an error (bad request content found late, or a server-side fault).
    Error,
    Panic,
    /// Answered 503 because the server was shutting down.
    ShuttingDown,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Error => "error",
            Failure::Panic => "panic",
            Failure::ShuttingDown => "shutting_down",
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One answered request.
    pub fn record_request(&self, route: &str, status: u16) {
        *self.lock().requests.entry((route.to_string(), status)).or_default() += 1;
    }

    /// A finished generation: how long it waited, how long it ran, how many model evaluations it made.
    pub fn record_generation(&self, waited: Duration, ran: Duration, evaluations: usize) {
        let mut r = self.lock();
        r.queue_wait_seconds.observe(waited.as_secs_f64());
        r.generation_seconds.observe(ran.as_secs_f64());
        r.evaluations += evaluations as u64;
        if ran > Duration::ZERO && evaluations > 0 {
            r.last_evaluations_per_second = evaluations as f64 / ran.as_secs_f64();
        }
    }

    /// A job's outcome: its times and evaluations when it finished, else the reason it produced no image.
    pub fn record_outcome(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Done(f) => self.record_generation(f.waited, f.elapsed, f.evaluations),
            Outcome::Failed(_) => self.record_failure(Failure::Error),
            Outcome::Panicked(_) => self.record_failure(Failure::Panic),
            Outcome::ShuttingDown => self.record_failure(Failure::ShuttingDown),
        }
    }

    pub fn record_failure(&self, failure: Failure) {
        *self.lock().failures.entry(failure.label()).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, queue: QueueStatus, connections: ConnectionStats) -> String {
        let r = self.lock();
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family("dreamshaper_http_requests_total", "counter", "HTTP requests answered, by route pattern and status.");
        for ((route, status), count) in &r.requests {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "dreamshaper_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}");
        }
        let gauges = [
            ("dreamshaper_queue_length", "Requests waiting for the generation worker.", queue.waiting as f64),
            ("dreamshaper_queue_capacity", "Requests that may wait (--max-queue).", queue.capacity as f64),
            ("dreamshaper_running", "Whether a generation is running (0 or 1).", f64::from(u8::from(queue.running))),
            ("dreamshaper_shutting_down", "1 once shutdown has started.", f64::from(u8::from(queue.closed))),
            ("dreamshaper_connections_open", "Open HTTP connections.", connections.open as f64),
            (
                "dreamshaper_model_evaluations_per_second",
                "UNet evaluations per second of the last finished generation.",
                r.last_evaluations_per_second,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        let counters = [
            ("dreamshaper_generations_completed_total", "Generations finished (any outcome).", queue.completed),
            ("dreamshaper_model_evaluations_total", "UNet evaluations of finished generations.", r.evaluations),
            (
                "dreamshaper_connections_evicted_total",
                "Idle connections closed to make room at --max-connections.",
                connections.evicted,
            ),
            (
                "dreamshaper_connections_refused_total",
                "Connections refused (503) because every open one had a request in progress.",
                connections.refused,
            ),
            (
                "dreamshaper_header_timeouts_total",
                "Connections closed because a request head did not arrive within --header-timeout.",
                connections.header_timeouts,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let name = "dreamshaper_generation_failures_total";
        let _ = writeln!(out, "# HELP {name} Generations that produced no image, by reason.\n# TYPE {name} counter");
        for reason in [Failure::Error, Failure::Panic, Failure::ShuttingDown] {
            let count = r.failures.get(reason.label()).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}{{reason=\"{}\"}} {count}", reason.label());
        }
        // Stopped because the client went away (waiting or running): counted by the queue.
        let _ = writeln!(out, "{name}{{reason=\"cancelled\"}} {}", queue.cancelled);
        r.generation_seconds.render(&mut out, "dreamshaper_generation_seconds", "Time generating, per request.");
        r.queue_wait_seconds.render(
            &mut out,
            "dreamshaper_queue_wait_seconds",
            "Time from queuing to the start of generation, per request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        m.record_request("/health", 200);
        m.record_request("/health", 200);
        m.record_request("/v1/sdxl1.0-dreamshaper", 429);
        m.record_generation(Duration::from_millis(300), Duration::from_secs(2), 40);
        m.record_failure(Failure::Panic);
        let status = QueueStatus { waiting: 2, running: true, capacity: 8, closed: false, completed: 1, cancelled: 1 };
        let text = m.render(status, ConnectionStats { open: 3, ..Default::default() });
        for line in [
            "dreamshaper_http_requests_total{route=\"/health\",status=\"200\"} 2",
            "dreamshaper_http_requests_total{route=\"/v1/sdxl1.0-dreamshaper\",status=\"429\"} 1",
            "dreamshaper_queue_length 2",
            "dreamshaper_running 1",
            "dreamshaper_connections_open 3",
            "dreamshaper_model_evaluations_per_second 20",
            "dreamshaper_model_evaluations_total 40",
            "dreamshaper_generation_failures_total{reason=\"cancelled\"} 1",
            "dreamshaper_generation_failures_total{reason=\"panic\"} 1",
            "dreamshaper_generation_failures_total{reason=\"error\"} 0",
            "dreamshaper_generation_seconds_bucket{le=\"1\"} 0",
            "dreamshaper_generation_seconds_bucket{le=\"2.5\"} 1",
            "dreamshaper_generation_seconds_bucket{le=\"+Inf\"} 1",
            "dreamshaper_generation_seconds_sum 2",
            "dreamshaper_queue_wait_seconds_bucket{le=\"0.25\"} 0",
            "dreamshaper_queue_wait_seconds_bucket{le=\"0.5\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a family declared by a TYPE line.
        let declared: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap()).collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            assert!(declared.contains(&name) || declared.contains(&family), "{sample}");
        }
    }
}
