//! Jobs of the submit-and-poll API ([`super::dialects::hosted_v2`]): a job is submitted, then polled for status
//! and result by id, possibly long after, and by clients that are not waiting on a connection.
//!
//! Two stores behind one API ([`Jobs`]):
//!
//! - In memory (the default): each job's queue [`Ticket`](super::queue::Ticket) is held by a task of its own that
//!   awaits the outcome (a ticket dropped early would cancel the job); status polls read the job's progress handle
//!   without waiting on the generation. Retention is bounded twice: a finished job is kept for the TTL after it ends,
//!   and at most `max_jobs` jobs are kept (the oldest finished ones make room; when every kept job is unfinished, a
//!   submission is refused 429). Ids that left the store are remembered for a while, so that a late poll hears that
//!   the result has expired rather than that the id was never known.
//! - In Redis (`--job-store redis://…`, `jobs/redis_store.rs`): a fleet's replicas share the jobs: any replica takes
//!   submissions and answers polls, and each pulls queued jobs while its own worker is idle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::errors::ApiError;
use super::metrics::Metrics;
use super::queue::{Canceller, JobProgress, JobState, Outcome, ProgressSnapshot, Queue};
use crate::{Error, GenerateRequest};

mod redis_store;

/// The default [`Jobs`] TTL: how long a finished job's result is kept.
pub const DEFAULT_JOB_TTL: Duration = Duration::from_secs(3600);
/// The default number of jobs kept (finished or not).
pub const DEFAULT_MAX_JOBS: usize = 1000;

/// The message of a cancelled job.
pub const CANCELLED: &str = "cancelled";

/// A finished job's images and figures.
#[derive(Debug)]
pub struct Output {
    /// One JPEG per sample, encoded once when the job ends.
    pub jpegs: Vec<Vec<u8>>,
    pub seed: u64,
    /// Seconds spent generating, and waiting in the queue before that.
    pub inference_time: f64,
    pub queue_time: f64,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum End {
    Completed(Arc<Output>),
    Failed(String),
}

/// A job's state as the v2 API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Processing,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "QUEUED",
            Status::Processing => "PROCESSING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        [Status::Queued, Status::Processing, Status::Completed, Status::Failed].into_iter().find(|s| s.as_str() == text)
    }
}

/// What a poll sees of a job, whichever store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub status: Status,
    /// The place in the queue while queued (0: next).
    pub queue_position: Option<usize>,
    pub progress: Progress,
    /// On `Failed`.
    pub error: Option<String>,
    /// The model evaluation the latest preview shows, once there is one.
    pub preview_evaluation: Option<usize>,
    /// On `Completed`.
    pub result: Option<ResultInfo>,
}

/// A job's progress: the step under way of `total` (0 of 0 before denoising), seconds left, the stage, the fraction
/// of model evaluations done.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub eta_seconds: Option<f64>,
    pub stage: String,
    pub fraction: f64,
}

impl Progress {
    pub fn of(snapshot: &ProgressSnapshot) -> Self {
        Progress {
            step: snapshot.step,
            total: snapshot.steps,
            eta_seconds: snapshot.eta_seconds.map(round_ms),
            stage: snapshot.stage.to_string(),
            fraction: round_ms(snapshot.fraction()),
        }
    }

    /// A finished job's: every step done.
    fn done(mut self) -> Self {
        (self.step, self.eta_seconds, self.stage, self.fraction) = (self.total, Some(0.0), "done".into(), 1.0);
        self
    }
}

/// A completed job's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultInfo {
    pub seed: u64,
    pub images: usize,
    pub inference_time: f64,
    pub queue_time: f64,
}

pub fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// The v2 jobs, in this process's memory or in Redis (shared by a fleet).
#[derive(Clone)]
pub struct Jobs {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(Memory),
    Redis(redis_store::RedisJobs),
}

impl Jobs {
    /// Jobs in this process's memory, run by `queue`.
    pub fn memory(queue: Queue, metrics: Arc<Metrics>, ttl: Duration, max_jobs: usize) -> Self {
        let memory = Memory { store: Arc::default(), ttl, max_jobs: max_jobs.max(1), queue, metrics };
        Jobs { backend: Backend::Memory(memory) }
    }

    /// Jobs in Redis at `url` (`redis://HOST:PORT/DB`): submitted to a list every replica pulls from while its own
    /// queue is idle. Starts this replica's puller on the current tokio runtime.
    pub async fn redis(
        url: &str,
        queue: Queue,
        metrics: Arc<Metrics>,
        ttl: Duration,
        max_jobs: usize,
    ) -> crate::Result<Self> {
        let redis = redis_store::RedisJobs::connect(url, queue, metrics, ttl, max_jobs).await?;
        redis.start_puller();
        Ok(Jobs { backend: Backend::Redis(redis) })
    }

    /// Waits (at most `limit`) until the jobs this replica ran have their ends recorded (Redis: in memory they are
    /// lost with the process anyway).
    pub async fn drain(&self, limit: Duration) {
        if let Backend::Redis(r) = &self.backend {
            r.drain(limit).await;
        }
    }

    /// Keeps and queues `request`; its id and first view.
    pub async fn submit(&self, request: GenerateRequest) -> Result<(String, View), ApiError> {
        let id = new_id();
        let view = match &self.backend {
            Backend::Memory(m) => m.submit(id.clone(), request)?,
            Backend::Redis(r) => r.submit(&id, request).await?,
        };
        Ok((id, view))
    }

    /// The job's view; a poll of an unfinished job also asks for a preview (made at its next evaluation).
    pub async fn status(&self, id: &str) -> Result<View, ApiError> {
        match &self.backend {
            Backend::Memory(m) => m.status(id),
            Backend::Redis(r) => r.status(id).await,
        }
    }

    /// Cancels a queued or running job: it is FAILED with [`CANCELLED`] at once (a running generation stops at its
    /// next model evaluation). Cancelling a cancelled job again is a no-op; a job that has ended otherwise is 409.
    pub async fn cancel(&self, id: &str) -> Result<View, ApiError> {
        match &self.backend {
            Backend::Memory(m) => m.cancel(id),
            Backend::Redis(r) => r.cancel(id).await,
        }
    }

    /// Image `n` of a completed job, and its seed.
    pub async fn output(&self, id: &str, n: usize) -> Result<(Vec<u8>, u64), ApiError> {
        match &self.backend {
            Backend::Memory(m) => m.output(id, n),
            Backend::Redis(r) => r.output(id, n).await,
        }
    }

    /// The latest preview of a job, as a JPEG.
    pub async fn preview(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        match &self.backend {
            Backend::Memory(m) => m.preview(id),
            Backend::Redis(r) => r.preview(id).await,
        }
    }
}

/// 409 for the output of a job that has none.
pub fn no_output(id: &str, status: Status) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, format!("request `{id}` has no output: it is {}", status.as_str()))
}

/// 404 for an image number past a job's images.
pub fn no_such_image(id: &str, count: usize) -> ApiError {
    let message = format!("request `{id}` has {count} image(s): `output/0.jpg` … `output/{}.jpg`", count.max(1) - 1);
    ApiError::new(StatusCode::NOT_FOUND, message)
}

/// 409 for cancelling a job that has ended.
pub fn already_ended(id: &str, status: Status, error: Option<&str>) -> ApiError {
    let error = error.map(|e| format!(": {e}")).unwrap_or_default();
    let message = format!("request `{id}` has already ended ({}{error}); nothing to cancel", status.as_str());
    ApiError::new(StatusCode::CONFLICT, message)
}

/// 404 for an id that left the store (`gone`) or never was in it; `max_jobs`: the memory store's bound.
pub fn missing(id: &str, gone: bool, ttl: Duration, max_jobs: Option<usize>) -> ApiError {
    if gone {
        let bound = max_jobs.map(|n| format!(", and at most {n} jobs are kept (--max-jobs)")).unwrap_or_default();
        let message = format!(
            "request `{id}` has expired: results are kept for {} s after the job ends (--job-ttl){bound}",
            ttl.as_secs()
        );
        ApiError::new(StatusCode::NOT_FOUND, message)
    } else {
        ApiError::new(StatusCode::NOT_FOUND, format!("request `{id}` not found"))
    }
}

/// 429 when the store keeps as many unfinished jobs as it may.
fn too_many_jobs(count: usize) -> ApiError {
    let message =
        format!("Too many requests: {count} jobs are queued or running, the most this server keeps (--max-jobs)");
    ApiError { retry_after: Some(5), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message) }
}

struct Entry {
    queue_id: u64,
    progress: Arc<JobProgress>,
    canceller: Canceller,
    end: Option<End>,
}

#[derive(Default)]
struct Store {
    jobs: HashMap<String, Entry>,
    /// Finished jobs in the order they ended (so in the order they expire).
    finished: VecDeque<(Instant, String)>,
    /// Ids that left the store (expired or evicted), oldest first, bounded.
    gone: HashSet<String>,
    gone_order: VecDeque<String>,
}

/// The in-memory store: each job's queue [`Ticket`](super::queue::Ticket) is held by a task that awaits its outcome.
#[derive(Clone)]
struct Memory {
    store: Arc<Mutex<Store>>,
    ttl: Duration,
    max_jobs: usize,
    queue: Queue,
    metrics: Arc<Metrics>,
}

impl Memory {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, id: String, request: GenerateRequest) -> Result<View, ApiError> {
        let ticket = {
            let mut store = self.lock();
            self.purge(&mut store);
            while store.jobs.len() >= self.max_jobs {
                let Some((_, oldest)) = store.finished.pop_front() else {
                    return Err(too_many_jobs(store.jobs.len()));
                };
                self.forget(&mut store, oldest);
            }
            // Under the store's lock, so that the count above still holds when the job is added.
            let ticket = self.queue.submit(request).map_err(ApiError::from)?;
            let entry =
                Entry { queue_id: ticket.id(), progress: ticket.progress(), canceller: ticket.canceller(), end: None };
            store.jobs.insert(id.clone(), entry);
            ticket
        };
        let view = self.view(ticket.id(), &ticket.progress(), None);
        let memory = self.clone();
        tokio::spawn(async move {
            let outcome = ticket.outcome().await;
            let end = end_of(outcome, &memory.metrics).await;
            memory.finish(&id, end);
        });
        Ok(view)
    }

    fn view(&self, queue_id: u64, progress: &JobProgress, end: Option<&End>) -> View {
        let snapshot = progress.snapshot();
        let progress = Progress::of(&snapshot);
        let preview_evaluation = snapshot.preview.as_ref().map(|(_, evaluation)| *evaluation);
        match end {
            Some(End::Completed(output)) => View {
                status: Status::Completed,
                queue_position: None,
                progress: progress.done(),
                error: None,
                preview_evaluation,
                result: Some(ResultInfo {
                    seed: output.seed,
                    images: output.jpegs.len(),
                    inference_time: round_ms(output.inference_time),
                    queue_time: round_ms(output.queue_time),
                }),
            },
            Some(End::Failed(message)) => View {
                status: Status::Failed,
                queue_position: None,
                progress,
                error: Some(message.clone()),
                preview_evaluation,
                result: None,
            },
            None => {
                // Finished but not yet stored (its JPEGs are being encoded): still processing.
                let queued = snapshot.state == JobState::Queued;
                View {
                    status: if queued { Status::Queued } else { Status::Processing },
                    queue_position: if queued { self.queue.position(queue_id) } else { None },
                    progress,
                    error: None,
                    preview_evaluation,
                    result: None,
                }
            }
        }
    }

    fn entry<'a>(&self, store: &'a mut Store, id: &str) -> Result<&'a mut Entry, ApiError> {
        self.purge(store);
        if !store.jobs.contains_key(id) {
            return Err(missing(id, store.gone.contains(id), self.ttl, Some(self.max_jobs)));
        }
        Ok(store.jobs.get_mut(id).expect("checked"))
    }

    fn status(&self, id: &str) -> Result<View, ApiError> {
        let mut store = self.lock();
        let entry = self.entry(&mut store, id)?;
        if entry.end.is_none() {
            // Made by the worker at its next evaluation, for the next poll.
            entry.progress.request_preview();
        }
        Ok(self.view(entry.queue_id, &entry.progress, entry.end.as_ref()))
    }

    fn cancel(&self, id: &str) -> Result<View, ApiError> {
        let mut store = self.lock();
        let entry = self.entry(&mut store, id)?;
        match &entry.end {
            None => {
                entry.canceller.cancel();
                entry.end = Some(End::Failed(CANCELLED.into()));
            }
            Some(End::Failed(message)) if message == CANCELLED => {}
            Some(End::Completed(_)) => return Err(already_ended(id, Status::Completed, None)),
            Some(End::Failed(message)) => return Err(already_ended(id, Status::Failed, Some(message))),
        }
        let view = self.view(entry.queue_id, &entry.progress, entry.end.as_ref());
        store.finished.push_back((Instant::now(), id.to_string()));
        Ok(view)
    }

    fn output(&self, id: &str, n: usize) -> Result<(Vec<u8>, u64), ApiError> {
        let mut store = self.lock();
        let entry = self.entry(&mut store, id)?;
        match &entry.end {
            Some(End::Completed(output)) => match output.jpegs.get(n) {
                Some(jpeg) => Ok((jpeg.clone(), output.seed)),
                None => Err(no_such_image(id, output.jpegs.len())),
            },
            Some(End::Failed(_)) => Err(no_output(id, Status::Failed)),
            None => Err(no_output(id, self.view(entry.queue_id, &entry.progress, None).status)),
        }
    }

    fn preview(&self, id: &str) -> Result<Vec<u8>, ApiError> {
        let progress = {
            let mut store = self.lock();
            self.entry(&mut store, id)?.progress.clone()
        };
        match progress.snapshot().preview {
            Some((image, _)) => super::respond::jpeg(&image),
            None => {
                progress.request_preview();
                Err(no_preview(id))
            }
        }
    }

    /// Records how a job ended, unless it was cancelled first.
    fn finish(&self, id: &str, end: End) {
        let mut store = self.lock();
        if let Some(entry) = store.jobs.get_mut(id) {
            if entry.end.is_none() {
                entry.end = Some(end);
                store.finished.push_back((Instant::now(), id.to_string()));
            }
        }
    }

    /// Drops the finished jobs older than the TTL.
    fn purge(&self, store: &mut Store) {
        while let Some((ended, _)) = store.finished.front() {
            if ended.elapsed() < self.ttl {
                break;
            }
            let (_, id) = store.finished.pop_front().expect("a front entry");
            self.forget(store, id);
        }
    }

    fn forget(&self, store: &mut Store, id: String) {
        if store.jobs.remove(&id).is_some() && store.gone.insert(id.clone()) {
            store.gone_order.push_back(id);
            let limit = (4 * self.max_jobs).max(1024);
            while store.gone_order.len() > limit {
                let old = store.gone_order.pop_front().expect("over the limit");
                store.gone.remove(&old);
            }
        }
    }
}

/// 404 for a preview not made yet.
pub fn no_preview(id: &str) -> ApiError {
    let message = format!("request `{id}` has no preview yet (one is made at the next model evaluation)");
    ApiError::new(StatusCode::NOT_FOUND, message)
}

/// The job's end from its queue outcome: the JPEGs encoded once (off the runtime's threads), or the error message
/// as the v1 endpoint would answer it. Recorded in the metrics as v1 records its requests.
pub(crate) async fn end_of(outcome: Outcome, metrics: &Metrics) -> End {
    // A cancelled job is counted by the queue (`cancelled`), not as a failure.
    if !matches!(outcome, Outcome::Failed(Error::Cancelled)) {
        metrics.record_outcome(&outcome);
    }
    match outcome {
        Outcome::Done(finished) => {
            let encoded = tokio::task::spawn_blocking(move || {
                let jpegs = finished.images.iter().map(super::respond::jpeg).collect::<Result<Vec<_>, _>>()?;
                if jpegs.is_empty() {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "generation produced no image"));
                }
                Ok(Output {
                    jpegs,
                    seed: finished.seed,
                    inference_time: finished.elapsed.as_secs_f64(),
                    queue_time: finished.waited.as_secs_f64(),
                })
            })
            .await;
            match encoded {
                Ok(Ok(output)) => End::Completed(Arc::new(output)),
                Ok(Err(e)) => End::Failed(e.message),
                Err(e) => End::Failed(format!("encoding the answer failed: {e}")),
            }
        }
        Outcome::Failed(Error::Cancelled) => End::Failed(CANCELLED.into()),
        Outcome::Failed(error) => {
            tracing::warn!(%error, "generation failed");
            End::Failed(ApiError::from_generation(&error).message)
        }
        Outcome::Panicked(message) => {
            tracing::error!(%message, "generation panicked");
            End::Failed(format!("generation failed: internal error ({message})"))
        }
        Outcome::ShuttingDown => End::Failed(ApiError::shutting_down().message),
    }
}

/// A new job id: 128 random bits in the UUID layout (ids must not collide across replicas sharing a store, nor be
/// guessable from one another).
pub fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // Each RandomState has fresh random keys: two independent 64-bit hashes of (count, time, pid).
    let half = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.finish()
    };
    let (a, b) = (half(), half());
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_shaped_like_uuids() {
        let ids: HashSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        let id = ids.iter().next().unwrap();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
        assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{id}");
    }
}
