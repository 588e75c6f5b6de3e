//! The v2 jobs of a fleet in Redis (`--job-store redis://HOST:PORT/DB`): every replica takes submissions and
//! answers polls for any job, and pulls queued jobs while its own worker is idle, so that replicas behind a load
//! balancer behave as one service (submit on one, poll on another).
//!
//! Keys (all under `dreamshaper:v2:`):
//!
//! - `queue`: a list of queued job ids (pushed on the left, pulled from the right: first in, first out);
//! - `job:{id}`: a hash: `status`, `request` (the checked request, JSON), progress fields written by the running
//!   replica every [`HEARTBEAT`] (`step`, `total`, `eta`, `stage`, `fraction`, `heartbeat`), then `error` or the
//!   result's figures (`seed`, `images`, `inference_time`, `queue_time`); `cancel` and `wants_preview` flags set by
//!   other replicas for the running one;
//! - `job:{id}:out:{n}`: the n-th JPEG; `job:{id}:preview`: the latest preview JPEG;
//! - `gone:{id}`: a marker that outlives an ended job, so that a late poll hears the result expired.
//!
//! State changes are compare-and-set (a Lua script: only from the expected status), so a cancel and a pull, or a
//! cancel and the end of a generation, never overwrite each other. A finished job's keys expire after the TTL.
//!
//! A Redis restart or outage: commands time out after [`COMMAND_TIMEOUT`] (nothing hangs; routes answer 503 while
//! Redis is unreachable) and the connection manager reconnects. A running job whose record was lost with the restart
//! is stopped and recorded FAILED with a message that says so; a job whose replica stopped reporting (crash, lost
//! store) for [`STALE`] is reported FAILED by any replica.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{
    already_ended, end_of, missing, no_output, no_preview, no_such_image, round_ms, End, Progress, ResultInfo, Status,
    View, CANCELLED,
};
use crate::server::errors::ApiError;
use crate::server::metrics::Metrics;
use crate::server::queue::Queue;
use crate::{Error, GenerateRequest};

const PREFIX: &str = "dreamshaper:v2";
/// How often a running job's replica writes its progress and reads the flags others set for it.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// A processing job whose progress has not been written for this long is reported failed.
pub const STALE: Duration = Duration::from_secs(15);
/// Every Redis command answers within this, or fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a queued or running job's record lives without ending (a guard against records no replica ends).
const PENDING_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an ended job's id is remembered after its result expired.
const GONE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a replica keeps trying to record a job's end while Redis is unreachable.
const END_RETRIES: Duration = Duration::from_secs(60);

/// Sets fields of a job only if it has the expected status. KEYS[1]: the job; ARGV[1]: the status; ARGV[2]: seconds
/// until the record expires (0: unchanged); ARGV[3..]: field, value pairs. Returns 1 if written, 0 if not.
const TRANSITION: &str = r#"
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
"#;

const LOST: &str = "the job store (Redis) lost this job while it ran (was it restarted?); submit it again";

fn queue_key() -> String {
    format!("{PREFIX}:queue")
}
fn job_key(id: &str) -> String {
    format!("{PREFIX}:job:{id}")
}
fn out_key(id: &str, n: usize) -> String {
    format!("{PREFIX}:job:{id}:out:{n}")
}
fn preview_key(id: &str) -> String {
    format!("{PREFIX}:job:{id}:preview")
}
fn gone_key(id: &str) -> String {
    format!("{PREFIX}:gone:{id}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// 503 while Redis cannot be reached.
fn unavailable(e: redis::RedisError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("the job store (Redis) is unavailable: {e}"))
}

/// The fields a poll reads (not the request, which may hold images).
const VIEW_FIELDS: [&str; 13] = [
    "status",
    "error",
    "step",
    "total",
    "eta",
    "stage",
    "fraction",
    "preview_evaluation",
    "seed",
    "images",
    "inference_time",
    "queue_time",
    "heartbeat",
];

#[derive(Clone)]
pub struct RedisJobs {
    conn: ConnectionManager,
    transition: Arc<Script>,
    queue: Queue,
    metrics: Arc<Metrics>,
    ttl: Duration,
    max_jobs: usize,
    /// Jobs pulled by this replica whose end is not recorded yet.
    running: Arc<std::sync::atomic::AtomicUsize>,
}

impl RedisJobs {
    pub async fn connect(
        url: &str,
        queue: Queue,
        metrics: Arc<Metrics>,
        ttl: Duration,
        max_jobs: usize,
    ) -> crate::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| Error::Service(format!("--job-store: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| Error::Service(format!("--job-store: cannot reach Redis: {e}")))?;
        let transition = Arc::new(Script::new(TRANSITION));
        Ok(Self { conn, transition, queue, metrics, ttl, max_jobs: max_jobs.max(1), running: Arc::default() })
    }

    /// Compare-and-set: writes `fields` to the job if its status is `from`; `expire`: the record's new lifetime.
    async fn transition(
        &self,
        id: &str,
        from: Status,
        expire: Option<Duration>,
        fields: &[(&str, String)],
    ) -> redis::RedisResult<bool> {
        let mut invocation = self.transition.key(job_key(id));
        invocation.arg(from.as_str()).arg(expire.map_or(0, |d| d.as_secs().max(1)));
        for (field, value) in fields {
            invocation.arg(*field).arg(value);
        }
        let written: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(written == 1)
    }

    pub async fn submit(&self, id: &str, request: GenerateRequest) -> Result<View, ApiError> {
        if self.queue.status().closed {
            return Err(ApiError::shutting_down());
        }
        let mut conn = self.conn.clone();
        let waiting: usize = redis::cmd("LLEN").arg(queue_key()).query_async(&mut conn).await.map_err(unavailable)?;
        if waiting >= self.max_jobs {
            return Err(super::too_many_jobs(waiting));
        }
        let json = serde_json::to_string(&request)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("storing the request: {e}")))?;
        let (length,): (usize,) = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(job_key(id))
            .arg("status")
            .arg(Status::Queued.as_str())
            .arg("request")
            .arg(json)
            .arg("created")
            .arg(now_ms())
            .ignore()
            .cmd("EXPIRE")
            .arg(job_key(id))
            .arg(PENDING_TTL.as_secs())
            .ignore()
            .cmd("LPUSH")
            .arg(queue_key())
            .arg(id)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(View {
            status: Status::Queued,
            queue_position: Some(length.saturating_sub(1)),
            progress: Progress::default(),
            error: None,
            preview_evaluation: None,
            result: None,
        })
    }

    pub async fn status(&self, id: &str) -> Result<View, ApiError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(job_key(id)).arg(&VIEW_FIELDS[..]);
        let values: Vec<Option<String>> = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        let field = |name: &str| values[VIEW_FIELDS.iter().position(|f| *f == name).expect("a view field")].clone();
        let number = |name: &str| field(name).and_then(|v| v.parse::<f64>().ok());
        let Some(status) = field("status").as_deref().and_then(Status::parse) else {
            return Err(self.missing(id).await);
        };
        let mut view = View {
            status,
            queue_position: None,
            progress: Progress {
                step: number("step").unwrap_or(0.0) as usize,
                total: number("total").unwrap_or(0.0) as usize,
                eta_seconds: number("eta"),
                stage: field("stage").unwrap_or_default(),
                fraction: number("fraction").unwrap_or(0.0),
            },
            error: field("error"),
            preview_evaluation: number("preview_evaluation").map(|v| v as usize),
            result: None,
        };
        match status {
            Status::Queued => {
                let index: Option<usize> =
                    redis::cmd("LPOS").arg(queue_key()).arg(id).query_async(&mut conn).await.map_err(unavailable)?;
                let length: usize =
                    redis::cmd("LLEN").arg(queue_key()).query_async(&mut conn).await.map_err(unavailable)?;
                // Pulled from the right: the place is the count to the right of it.
                view.queue_position = index.map(|i| length.saturating_sub(i + 1));
                self.want_preview(id).await;
            }
            Status::Processing => {
                let heartbeat = number("heartbeat").unwrap_or(0.0) as u64;
                let silent = Duration::from_millis(now_ms().saturating_sub(heartbeat));
                if silent > STALE {
                    view.status = Status::Failed;
                    view.error = Some(format!(
                        "the replica running this job stopped reporting {} s ago (it stopped, or lost the job store)",
                        silent.as_secs()
                    ));
                } else {
                    self.want_preview(id).await;
                }
            }
            Status::Completed => {
                view.progress = Progress {
                    step: view.progress.total,
                    eta_seconds: Some(0.0),
                    stage: "done".into(),
                    fraction: 1.0,
                    ..view.progress
                };
                view.result = Some(ResultInfo {
                    seed: number("seed").unwrap_or(0.0) as u64,
                    images: number("images").unwrap_or(0.0) as usize,
                    inference_time: round_ms(number("inference_time").unwrap_or(0.0)),
                    queue_time: round_ms(number("queue_time").unwrap_or(0.0)),
                });
            }
            Status::Failed => {}
        }
        Ok(view)
    }

    /// Asks the running replica for a preview at the job's next evaluation (best effort).
    async fn want_preview(&self, id: &str) {
        let _: redis::RedisResult<()> =
            redis::cmd("HSET").arg(job_key(id)).arg("wants_preview").arg(1).query_async(&mut self.conn.clone()).await;
    }

    async fn missing(&self, id: &str) -> ApiError {
        let gone: redis::RedisResult<bool> =
            redis::cmd("EXISTS").arg(gone_key(id)).query_async(&mut self.conn.clone()).await;
        match gone {
            Ok(gone) => missing(id, gone, self.ttl, None),
            Err(e) => unavailable(e),
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<View, ApiError> {
        let failed = |cancel: bool| {
            let mut fields = vec![("status", Status::Failed.as_str().to_string()), ("error", CANCELLED.to_string())];
            if cancel {
                fields.push(("cancel", "1".into()));
            }
            fields
        };
        let cancelled =
            if self.transition(id, Status::Queued, Some(self.ttl), &failed(false)).await.map_err(unavailable)? {
                let _: redis::RedisResult<()> =
                    redis::cmd("LREM").arg(queue_key()).arg(0).arg(id).query_async(&mut self.conn.clone()).await;
                true
            } else {
                // The running replica sees `cancel` at its next heartbeat and stops the generation.
                self.transition(id, Status::Processing, Some(self.ttl), &failed(true)).await.map_err(unavailable)?
            };
        if cancelled {
            self.mark_gone(id).await;
        }
        let view = self.status(id).await?;
        match (view.status, view.error.as_deref()) {
            (Status::Failed, Some(CANCELLED)) => Ok(view),
            (status, error) => Err(already_ended(id, status, error)),
        }
    }

    async fn mark_gone(&self, id: &str) {
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(gone_key(id))
            .arg(1)
            .arg("EX")
            .arg((self.ttl + GONE_TTL).as_secs())
            .query_async(&mut self.conn.clone())
            .await;
    }

    pub async fn output(&self, id: &str, n: usize) -> Result<(Vec<u8>, u64), ApiError> {
        let view = self.status(id).await?;
        let Some(result) = view.result.filter(|_| view.status == Status::Completed) else {
            return Err(no_output(id, view.status));
        };
        if n >= result.images {
            return Err(no_such_image(id, result.images));
        }
        let jpeg: Option<Vec<u8>> =
            redis::cmd("GET").arg(out_key(id, n)).query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        match jpeg {
            Some(jpeg) => Ok((jpeg, result.seed)),
            None => Err(missing(id, true, self.ttl, None)),
        }
    }

    pub async fn preview(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let jpeg: Option<Vec<u8>> =
            redis::cmd("GET").arg(preview_key(id)).query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        match jpeg {
            Some(jpeg) => Ok(jpeg),
            None => {
                // 404 for the job itself if it is not known.
                self.status(id).await?;
                Err(no_preview(id))
            }
        }
    }

    /// Waits (at most `limit`) until the jobs this replica pulled have their ends recorded.
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.running.load(std::sync::atomic::Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pulls queued jobs while this replica's worker is idle, until the queue closes (shutdown).
    pub fn start_puller(&self) {
        let jobs = self.clone();
        tokio::spawn(async move { jobs.pull().await });
    }

    async fn pull(self) {
        let mut failing = false;
        loop {
            let status = self.queue.status();
            if status.closed {
                return;
            }
            if status.running || status.waiting > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let pulled: redis::RedisResult<Option<String>> =
                redis::cmd("RPOP").arg(queue_key()).query_async(&mut self.conn.clone()).await;
            match pulled {
                Ok(pulled) => {
                    if failing {
                        tracing::info!("the job store (Redis) is reachable again");
                    }
                    failing = false;
                    match pulled {
                        Some(id) => {
                            self.running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            self.run(id).await;
                            self.running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("the job store (Redis) is unreachable: {e}; retrying");
                    }
                    failing = true;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Runs a pulled job on this replica's worker, writing its progress, then its end.
    async fn run(&self, id: String) {
        let request: redis::RedisResult<Option<String>> =
            redis::cmd("HGET").arg(job_key(&id)).arg("request").query_async(&mut self.conn.clone()).await;
        let request = match request {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%id, "could not read a pulled job: {e}");
                return;
            }
        };
        let now = now_ms().to_string();
        let claim = [("status", Status::Processing.as_str().to_string()), ("started", now.clone()), ("heartbeat", now)];
        match self.transition(&id, Status::Queued, None, &claim).await {
            Ok(true) => {}
            // Cancelled while queued.
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(%id, "could not claim a pulled job: {e}");
                return;
            }
        }
        let request: GenerateRequest = match serde_json::from_str(&request) {
            Ok(request) => request,
            Err(e) => return self.store_end(&id, End::Failed(format!("unreadable stored request: {e}"))).await,
        };
        let ticket = match self.queue.submit(request) {
            Ok(ticket) => ticket,
            Err(r) => return self.store_end(&id, End::Failed(ApiError::from(r).message)).await,
        };
        let progress = ticket.progress();
        let canceller = ticket.canceller();
        let outcome = ticket.outcome();
        tokio::pin!(outcome);
        let mut last_preview = None;
        let mut unreachable = false;
        let outcome = loop {
            tokio::select! {
                outcome = &mut outcome => break outcome,
                _ = tokio::time::sleep(HEARTBEAT) => {
                    match self.heartbeat(&id, &progress, &mut last_preview).await {
                        Ok(true) => unreachable = false,
                        // Cancelled, or lost with a restart of the store: stop at the next evaluation.
                        Ok(false) => canceller.cancel(),
                        Err(e) => {
                            if !unreachable {
                                tracing::warn!(%id, "cannot report progress to the job store: {e}");
                            }
                            unreachable = true;
                        }
                    }
                }
            }
        };
        let end = end_of(outcome, &self.metrics).await;
        self.store_end(&id, end).await;
    }

    /// Writes the running job's progress, follows the flags other replicas set. False: the job is no longer
    /// processing here (cancelled, or its record is gone).
    async fn heartbeat(
        &self,
        id: &str,
        progress: &crate::server::queue::JobProgress,
        last_preview: &mut Option<usize>,
    ) -> redis::RedisResult<bool> {
        let snapshot = progress.snapshot();
        let p = Progress::of(&snapshot);
        let fields = [
            ("step", p.step.to_string()),
            ("total", p.total.to_string()),
            ("eta", p.eta_seconds.map(|v| v.to_string()).unwrap_or_default()),
            ("stage", p.stage.clone()),
            ("fraction", p.fraction.to_string()),
            ("heartbeat", now_ms().to_string()),
        ];
        if !self.transition(id, Status::Processing, None, &fields).await? {
            return Ok(false);
        }
        let mut conn = self.conn.clone();
        let wants: Option<String> =
            redis::cmd("HGET").arg(job_key(id)).arg("wants_preview").query_async(&mut conn).await?;
        if wants.is_some() {
            progress.request_preview();
            let _: () = redis::cmd("HDEL").arg(job_key(id)).arg("wants_preview").query_async(&mut conn).await?;
        }
        if let Some((image, evaluation)) = snapshot.preview {
            if *last_preview != Some(evaluation) {
                if let Ok(jpeg) = crate::server::respond::jpeg(&image) {
                    let _: () = redis::cmd("SET")
                        .arg(preview_key(id))
                        .arg(jpeg)
                        .arg("EX")
                        .arg((PENDING_TTL + self.ttl).as_secs())
                        .query_async(&mut conn)
                        .await?;
                    let evaluation_field = [("preview_evaluation", evaluation.to_string())];
                    self.transition(id, Status::Processing, None, &evaluation_field).await?;
                    *last_preview = Some(evaluation);
                }
            }
        }
        Ok(true)
    }

    /// Records a job's end (retrying while Redis is unreachable): its images and figures, or its error; a job whose
    /// record was lost is recorded FAILED with [`LOST`]; a cancelled one keeps its status.
    async fn store_end(&self, id: &str, end: End) {
        let deadline = tokio::time::Instant::now() + END_RETRIES;
        loop {
            match self.try_store_end(id, &end).await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%id, "recording the job's end failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(%id, "could not record the job's end in the job store: {e}");
                    return;
                }
            }
        }
    }

    async fn try_store_end(&self, id: &str, end: &End) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let ttl = self.ttl.as_secs().max(1);
        let fields = match end {
            End::Completed(output) => {
                let mut pipe = redis::pipe();
                for (n, jpeg) in output.jpegs.iter().enumerate() {
                    pipe.cmd("SET").arg(out_key(id, n)).arg(jpeg.as_slice()).arg("EX").arg(ttl).ignore();
                }
                pipe.cmd("EXPIRE").arg(preview_key(id)).arg(ttl).ignore();
                let _: () = pipe.query_async(&mut conn).await?;
                vec![
                    ("status", Status::Completed.as_str().to_string()),
                    ("seed", output.seed.to_string()),
                    ("images", output.jpegs.len().to_string()),
                    ("inference_time", output.inference_time.to_string()),
                    ("queue_time", output.queue_time.to_string()),
                ]
            }
            End::Failed(message) => vec![("status", Status::Failed.as_str().to_string()), ("error", message.clone())],
        };
        if !self.transition(id, Status::Processing, Some(self.ttl), &fields).await? {
            let status: Option<String> =
                redis::cmd("HGET").arg(job_key(id)).arg("status").query_async(&mut conn).await?;
            if status.is_none() {
                tracing::warn!(%id, "the job's record was lost from the job store while it ran");
                let _: () = redis::pipe()
                    .atomic()
                    .cmd("HSET")
                    .arg(job_key(id))
                    .arg("status")
                    .arg(Status::Failed.as_str())
                    .arg("error")
                    .arg(LOST)
                    .ignore()
                    .cmd("EXPIRE")
                    .arg(job_key(id))
                    .arg(ttl)
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
            }
        }
        self.mark_gone(id).await;
        Ok(())
    }
}
