//! Jobs of the submit-and-poll API ([`super::dialects::hosted_v2`]): a job is submitted, then polled for status
//! and result by id, possibly long after, and by clients that are not waiting on a connection.
//!
//! The store keeps each job's queue [`Ticket`] in a task of its own that awaits the outcome (a ticket dropped early
//! would cancel the job), its progress handle (read by status polls without waiting on the generation) and, once it
//! has ended, its JPEGs or its error. Retention is bounded twice: a finished job is kept for the TTL after it ends,
//! and at most `max_jobs` jobs are kept (the oldest finished ones make room; when every kept job is unfinished, a
//! submission is refused 429). Ids that left the store are remembered for a while, so that a late poll hears that
//! the result has expired rather than that the id was never known.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::errors::ApiError;
use super::metrics::{Failure, Metrics};
use super::queue::{Canceller, JobProgress, Outcome, Queue, Rejected};
use crate::{Error, GenerateRequest};

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

/// What a status poll sees of a job.
#[derive(Clone)]
pub struct Snapshot {
    /// The queue's id, for its position while waiting.
    pub queue_id: u64,
    pub progress: Arc<JobProgress>,
    /// `None` while queued or running.
    pub end: Option<End>,
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

/// The in-memory job store, shared by the routes.
#[derive(Clone)]
pub struct Jobs {
    store: Arc<Mutex<Store>>,
    ttl: Duration,
    max_jobs: usize,
}

impl Jobs {
    pub fn new(ttl: Duration, max_jobs: usize) -> Self {
        Self { store: Arc::default(), ttl, max_jobs: max_jobs.max(1) }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `request` as job `id` and keeps it; a task awaits its outcome and stores the result. Refused (429)
    /// when the queue is full or every kept job is unfinished, 503 while shutting down.
    pub fn submit(
        &self,
        id: String,
        request: GenerateRequest,
        queue: &Queue,
        metrics: Arc<Metrics>,
    ) -> Result<Snapshot, ApiError> {
        let ticket = {
            let mut store = self.lock();
            self.purge(&mut store);
            while store.jobs.len() >= self.max_jobs {
                let Some((_, oldest)) = store.finished.pop_front() else {
                    let message = format!(
                        "Too many requests: {} jobs are queued or running, the most this server keeps (--max-jobs)",
                        store.jobs.len()
                    );
                    return Err(ApiError {
                        retry_after: Some(5),
                        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, message)
                    });
                };
                self.forget(&mut store, oldest);
            }
            // Under the store's lock, so that the count above still holds when the job is added.
            let ticket = queue.submit(request).map_err(|rejected| match rejected {
                Rejected::Full { capacity, retry_after } => ApiError::queue_full(capacity, retry_after),
                Rejected::Closed => ApiError::shutting_down(),
            })?;
            let entry =
                Entry { queue_id: ticket.id(), progress: ticket.progress(), canceller: ticket.canceller(), end: None };
            store.jobs.insert(id.clone(), entry);
            ticket
        };
        let snapshot = Snapshot { queue_id: ticket.id(), progress: ticket.progress(), end: None };
        let jobs = self.clone();
        tokio::spawn(async move {
            let outcome = ticket.outcome().await;
            let end = end_of(outcome, &metrics).await;
            jobs.finish(&id, end);
        });
        Ok(snapshot)
    }

    /// The job `id`, or 404: unknown, or no longer kept.
    pub fn get(&self, id: &str) -> Result<Snapshot, ApiError> {
        let mut store = self.lock();
        self.purge(&mut store);
        match store.jobs.get(id) {
            Some(entry) => {
                Ok(Snapshot { queue_id: entry.queue_id, progress: entry.progress.clone(), end: entry.end.clone() })
            }
            None => Err(self.missing(&store, id)),
        }
    }

    /// Cancels a queued or running job: it is FAILED with [`CANCELLED`] at once (a running generation stops at its
    /// next model evaluation). Cancelling a cancelled job again is a no-op; a job that has ended otherwise is 409.
    pub fn cancel(&self, id: &str) -> Result<Snapshot, ApiError> {
        let mut store = self.lock();
        self.purge(&mut store);
        let Some(entry) = store.jobs.get_mut(id) else {
            return Err(self.missing(&store, id));
        };
        match &entry.end {
            None => {
                entry.canceller.cancel();
                entry.end = Some(End::Failed(CANCELLED.into()));
            }
            Some(End::Failed(message)) if message == CANCELLED => {}
            Some(end) => {
                let (status, error) = match end {
                    End::Completed(_) => ("COMPLETED", String::new()),
                    End::Failed(message) => ("FAILED", format!(": {message}")),
                };
                let message = format!("request `{id}` has already ended ({status}{error}); nothing to cancel");
                return Err(ApiError::new(StatusCode::CONFLICT, message));
            }
        }
        let snapshot = Snapshot { queue_id: entry.queue_id, progress: entry.progress.clone(), end: entry.end.clone() };
        store.finished.push_back((Instant::now(), id.to_string()));
        Ok(snapshot)
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

    fn missing(&self, store: &Store, id: &str) -> ApiError {
        if store.gone.contains(id) {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "request `{id}` has expired: results are kept for {} s after the job ends (--job-ttl), and at \
                     most {} jobs are kept (--max-jobs)",
                    self.ttl.as_secs(),
                    self.max_jobs
                ),
            )
        } else {
            ApiError::new(StatusCode::NOT_FOUND, format!("request `{id}` not found"))
        }
    }
}

/// The job's end from its queue outcome: the JPEGs encoded once (off the runtime's threads), or the error message
/// as the v1 endpoint would answer it. Recorded in the metrics as v1 records its requests.
async fn end_of(outcome: Outcome, metrics: &Metrics) -> End {
    match &outcome {
        Outcome::Done(f) => metrics.record_generation(f.waited, f.elapsed, f.evaluations),
        Outcome::Failed(Error::Cancelled) => {}
        Outcome::Failed(_) => metrics.record_failure(Failure::Error),
        Outcome::Panicked(_) => metrics.record_failure(Failure::Panic),
        Outcome::ShuttingDown => metrics.record_failure(Failure::ShuttingDown),
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
