//! One generation at a time: a dedicated worker thread owns the model and takes jobs from a bounded FIFO queue.
//!
//! A request holds a [`Ticket`] while it waits. Dropping the ticket (the client went away and the server dropped
//! the request's future) cancels the job: a waiting job leaves the queue at once, freeing its place; a running one
//! is stopped at the next progress callback (the next denoising step). Closing the queue (shutdown) answers every
//! waiting job [`Outcome::ShuttingDown`] and lets the running one finish.
//!
//! Every job has a [`JobProgress`] that the worker updates at each model evaluation and status routes read without
//! waiting on the generation: its step, its evaluations, an ETA, and, on request, a preview of the image forming
//! (made by the worker at the next evaluation, with the queue's [`Previewer`]).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::oneshot;

use crate::preview::Previewer;
use crate::sampling::ProgressFn;
use crate::{Control, Error, GenerateRequest, Generation, Pipeline, Result};

/// What the worker runs: the pipeline, or a stand-in in tests.
pub trait Engine {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation>;

    /// What makes job previews (see [`JobProgress::request_preview`]); none by default.
    fn previewer(&self) -> Option<Previewer> {
        None
    }
}

impl Engine for Pipeline {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
        Pipeline::generate_with_loras(self, request, progress)
    }

    /// The linear latent→RGB map: a preview costs a fraction of a model evaluation.
    fn previewer(&self) -> Option<Previewer> {
        Some(Previewer::LatentRgb(crate::preview::LatentRgb::sdxl(self.vae_scale_factor())))
    }
}

/// The images of a finished job.
#[derive(Debug)]
pub struct Finished {
    pub images: Vec<RgbImage>,
    pub seed: u64,
    /// Time spent generating (not waiting).
    pub elapsed: Duration,
    /// Time spent in the queue before the worker took it.
    pub waited: Duration,
    /// Model evaluations made (progress reports of finished evaluations).
    pub evaluations: usize,
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Finished),
    Failed(Error),
    /// The engine panicked; the worker carries on with the next job.
    Panicked(String),
    /// The queue was closed before the job started.
    ShuttingDown,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Every place is taken; a retry in about `retry_after` seconds may find one.
    Full {
        capacity: usize,
        retry_after: u64,
    },
    Closed,
}

/// A snapshot for `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatus {
    /// Jobs waiting (not counting the running one).
    pub waiting: usize,
    pub running: bool,
    pub capacity: usize,
    pub closed: bool,
    /// Jobs finished since start (any outcome but cancellation while waiting).
    pub completed: u64,
    /// Jobs stopped because their client went away (waiting or running).
    pub cancelled: u64,
}

struct Job {
    id: u64,
    progress: Arc<JobProgress>,
    request: GenerateRequest,
    submitted: Instant,
    /// [`work`] of the request.
    work: f64,
    cancel: Arc<AtomicBool>,
    reply: oneshot::Sender<Outcome>,
}

/// The job the worker runs: its id, [`work`] and start, its cancellation flag and its progress.
struct Running {
    id: u64,
    work: f64,
    started: Instant,
    cancel: Arc<AtomicBool>,
    progress: Arc<JobProgress>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    running: Option<Running>,
    closed: bool,
    next_id: u64,
    completed: u64,
    cancelled: u64,
    /// Moving average of seconds per unit of [`work`], learned from finished jobs, for `Retry-After`.
    seconds_per_work: Option<f64>,
}

/// How much denoising a request asks for, in megapixel-evaluations: samples × steps × megapixels, plus the hires
/// pass's. Generation time is close to proportional to it on a given machine and model, so one learned rate turns
/// the queue's contents into a wait.
pub fn work(request: &GenerateRequest) -> f64 {
    let megapixels = |w: f64, h: f64| w * h / 1e6;
    let (w, h) = (f64::from(request.img_width), f64::from(request.img_height));
    let strength = request.strength.unwrap_or(1.0).clamp(0.0, 1.0);
    let mut per_sample = f64::from(request.num_inference_steps) * strength.max(0.05) * megapixels(w, h);
    if let Some(hires) = &request.hires {
        let steps = if hires.steps == 0 { request.num_inference_steps } else { hires.steps };
        per_sample += f64::from(steps) * hires.strength.clamp(0.0, 1.0) * megapixels(w * hires.scale, h * hires.scale);
    }
    f64::from(request.samples.max(1)) * per_sample.max(1e-3)
}

/// Seconds until the queue has room again: what is left of the running job plus the waiting jobs, at the learned
/// rate. Before any job has finished there is no rate: a guess of 5 s per job.
fn estimate_wait(seconds_per_work: Option<f64>, running: Option<(f64, Duration)>, waiting: &[f64]) -> u64 {
    let seconds = match seconds_per_work {
        Some(rate) => {
            let running = running.map_or(0.0, |(work, elapsed)| (work * rate - elapsed.as_secs_f64()).max(0.0));
            running + waiting.iter().sum::<f64>() * rate
        }
        None => 5.0 * (waiting.len() + usize::from(running.is_some())) as f64,
    };
    seconds.ceil().clamp(1.0, 3600.0) as u64
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    /// Makes previews for [`JobProgress::request_preview`] (the engine's, set once it is loaded).
    previewer: std::sync::OnceLock<Previewer>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    /// Answered (any outcome).
    Finished,
}

/// A job's progress: written by the worker, read by status routes (short locks only, never across a generation).
#[derive(Debug)]
pub struct JobProgress {
    state: Mutex<ProgressState>,
    wants_preview: AtomicBool,
}

#[derive(Debug, Clone)]
struct ProgressState {
    job: JobState,
    stage: &'static str,
    step: usize,
    steps: usize,
    evaluation: usize,
    evaluations: usize,
    started: Option<Instant>,
    preview: Option<Arc<RgbImage>>,
    preview_evaluation: usize,
}

/// A copy of a job's progress.
#[derive(Debug, Clone)]
pub struct ProgressSnapshot {
    pub state: JobState,
    /// The pipeline stage under way (`"encoding prompt"`, `"denoising"`, `"decoding"` …); empty before it starts.
    pub stage: &'static str,
    /// The inference step under way and the number of steps (0 of 0 before denoising starts).
    pub step: usize,
    pub steps: usize,
    /// Model evaluations finished and planned (Heun-like schedulers evaluate twice per step).
    pub evaluation: usize,
    pub evaluations: usize,
    /// Time since the worker took the job.
    pub elapsed: Option<Duration>,
    /// Seconds left, from the pace of the evaluations so far; `None` until one has finished.
    pub eta_seconds: Option<f64>,
    /// The latest preview and the evaluation it shows.
    pub preview: Option<(Arc<RgbImage>, usize)>,
}

impl ProgressSnapshot {
    /// Evaluations done, as a fraction (0 before denoising, 1 when finished).
    pub fn fraction(&self) -> f64 {
        match self.state {
            JobState::Finished => 1.0,
            _ if self.evaluations == 0 => 0.0,
            _ => self.evaluation as f64 / self.evaluations as f64,
        }
    }
}

impl Default for JobProgress {
    fn default() -> Self {
        Self {
            state: Mutex::new(ProgressState {
                job: JobState::Queued,
                stage: "",
                step: 0,
                steps: 0,
                evaluation: 0,
                evaluations: 0,
                started: None,
                preview: None,
                preview_evaluation: 0,
            }),
            wants_preview: AtomicBool::new(false),
        }
    }
}

impl JobProgress {
    fn lock(&self) -> MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let s = self.lock().clone();
        let elapsed = s.started.map(|t| t.elapsed());
        let eta_seconds = match (s.job, elapsed) {
            (JobState::Finished, _) => Some(0.0),
            (JobState::Running, Some(elapsed)) if s.evaluation > 0 && s.evaluations >= s.evaluation => {
                let per_evaluation = elapsed.as_secs_f64() / s.evaluation as f64;
                Some(per_evaluation * (s.evaluations - s.evaluation) as f64)
            }
            _ => None,
        };
        ProgressSnapshot {
            state: s.job,
            stage: s.stage,
            step: s.step,
            steps: s.steps,
            evaluation: s.evaluation,
            evaluations: s.evaluations,
            elapsed,
            eta_seconds,
            preview: s.preview.map(|p| (p, s.preview_evaluation)),
        }
    }

    /// Asks the worker for a preview at the job's next model evaluation (previews cost a decode, so they are made
    /// only when someone looks). No effect without a previewer.
    pub fn request_preview(&self) {
        self.wants_preview.store(true, Ordering::Relaxed);
    }

    fn set(&self, update: impl FnOnce(&mut ProgressState)) {
        update(&mut self.lock());
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across anything that can panic, but stay usable if it ever is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The handle the HTTP side uses. `capacity` is the number of requests that may wait while one runs.
#[derive(Clone)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Starts the worker thread, which first builds the engine with `load` (so the model is loaded, and lives, on
    /// that thread). Returns once loading has finished, with its error if it failed.
    pub fn start<E, F>(capacity: usize, load: F) -> Result<(Queue, JoinHandle<()>)>
    where
        E: Engine + 'static,
        F: FnOnce() -> Result<E> + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            capacity,
            previewer: std::sync::OnceLock::new(),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("generation-worker".into())
            .spawn(move || match catch_unwind(AssertUnwindSafe(load)) {
                Ok(Ok(engine)) => {
                    if let Some(previewer) = engine.previewer() {
                        let _ = worker_shared.previewer.set(previewer);
                    }
                    let _ = ready_tx.send(Ok(()));
                    run_worker(engine, &worker_shared);
                }
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                }
                Err(panic) => {
                    let _ = ready_tx
                        .send(Err(Error::Service(format!("loading the model panicked: {}", panic_message(&*panic)))));
                }
            })
            .map_err(|e| Error::Service(format!("could not start the generation worker: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok((Queue { shared }, handle)),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(Error::Service("the generation worker stopped while loading the model".into())),
        }
    }

    /// Queues a request, or refuses it when the queue is full or closed.
    pub fn submit(&self, request: GenerateRequest) -> std::result::Result<Ticket, Rejected> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(Rejected::Closed);
        }
        // A job counts as waiting until the worker has taken it, so an idle server still accepts one job when the
        // capacity is 0.
        let in_system = state.waiting.len() + usize::from(state.running.is_some());
        if in_system > self.shared.capacity {
            let running = state.running.as_ref().map(|r| (r.work, r.started.elapsed()));
            let waiting: Vec<f64> = state.waiting.iter().map(|job| job.work).collect();
            let retry_after = estimate_wait(state.seconds_per_work, running, &waiting);
            return Err(Rejected::Full { capacity: self.shared.capacity, retry_after });
        }
        let id = state.next_id;
        state.next_id += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, receiver) = oneshot::channel();
        let work = work(&request);
        let progress = Arc::new(JobProgress::default());
        let submitted = Instant::now();
        let job = Job { id, progress: progress.clone(), request, submitted, work, cancel: cancel.clone(), reply };
        state.waiting.push_back(job);
        drop(state);
        self.shared.wake.notify_one();
        Ok(Ticket { id, cancel, progress, receiver: Some(receiver), queue: self.clone() })
    }

    /// A waiting job's place: 0 is next. `None` once it runs or has left the queue.
    pub fn position(&self, id: u64) -> Option<usize> {
        self.shared.lock().waiting.iter().position(|job| job.id == id)
    }

    /// Stops the running job at its next checkpoint (A1111's "interrupt"); its client gets the cancellation as its
    /// outcome. False when nothing runs.
    pub fn interrupt_running(&self) -> bool {
        match &self.shared.lock().running {
            Some(running) => {
                running.cancel.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// The running job's id.
    pub fn running_id(&self) -> Option<u64> {
        self.shared.lock().running.as_ref().map(|r| r.id)
    }

    /// The running job's progress (A1111's `/progress` reports on whatever runs, whoever submitted it).
    pub fn running_progress(&self) -> Option<Arc<JobProgress>> {
        self.shared.lock().running.as_ref().map(|r| r.progress.clone())
    }

    /// Refuses new jobs, answers the waiting ones [`Outcome::ShuttingDown`]; the running job finishes and the worker
    /// then stops.
    pub fn close(&self) {
        let drained: Vec<Job> = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.waiting.drain(..).collect()
        };
        self.shared.wake.notify_all();
        for job in drained {
            let _ = job.reply.send(Outcome::ShuttingDown);
        }
    }

    pub fn status(&self) -> QueueStatus {
        let state = self.shared.lock();
        QueueStatus {
            waiting: state.waiting.len(),
            running: state.running.is_some(),
            capacity: self.shared.capacity,
            closed: state.closed,
            completed: state.completed,
            cancelled: state.cancelled,
        }
    }

    /// Takes a waiting job out of the queue and answers it cancelled (a job API's cancel). False if the worker
    /// already has it.
    fn cancel_waiting(&self, id: u64) -> bool {
        let job = {
            let mut state = self.shared.lock();
            let Some(index) = state.waiting.iter().position(|job| job.id == id) else {
                return false;
            };
            state.cancelled += 1;
            state.waiting.remove(index)
        };
        if let Some(job) = job {
            job.progress.set(|p| p.job = JobState::Finished);
            let _ = job.reply.send(Outcome::Failed(Error::Cancelled));
        }
        true
    }

    /// Takes a waiting job out of the queue (its client went away). False if the worker already has it.
    fn withdraw(&self, id: u64) -> bool {
        let mut state = self.shared.lock();
        match state.waiting.iter().position(|job| job.id == id) {
            Some(index) => {
                state.waiting.remove(index);
                state.cancelled += 1;
                true
            }
            None => false,
        }
    }
}

/// A queued request. Await [`Ticket::outcome`]; dropping the ticket first cancels the job.
pub struct Ticket {
    id: u64,
    cancel: Arc<AtomicBool>,
    progress: Arc<JobProgress>,
    receiver: Option<oneshot::Receiver<Outcome>>,
    queue: Queue,
}

/// Cancels a job from elsewhere than its ticket's holder (a job API's cancel route).
#[derive(Clone)]
pub struct Canceller {
    id: u64,
    cancel: Arc<AtomicBool>,
    queue: Queue,
}

impl Canceller {
    /// A waiting job leaves the queue at once; a running one stops at its next checkpoint. Its ticket's outcome
    /// is then [`Outcome::Failed`] with [`Error::Cancelled`] (or `ShuttingDown` / its real outcome if it had already
    /// ended).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.queue.cancel_waiting(self.id);
    }
}

impl Ticket {
    /// The queue's id of this job.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn progress(&self) -> Arc<JobProgress> {
        self.progress.clone()
    }

    pub fn canceller(&self) -> Canceller {
        Canceller { id: self.id, cancel: self.cancel.clone(), queue: self.queue.clone() }
    }

    /// Waits for the job to finish.
    pub async fn outcome(mut self) -> Outcome {
        let receiver = self.receiver.as_mut().expect("a ticket is awaited once");
        let outcome = receiver.await;
        // Answered: nothing left to cancel when the ticket drops.
        self.receiver = None;
        outcome.unwrap_or_else(|_| Outcome::Failed(Error::Service("the generation worker stopped".into())))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.receiver.is_some() {
            self.cancel.store(true, Ordering::SeqCst);
            self.queue.withdraw(self.id);
        }
    }
}

/// The longest side of a job preview (a thumbnail for progress displays).
const PREVIEW_SIDE: usize = 256;

fn run_worker<E: Engine>(mut engine: E, shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if let Some(job) = state.waiting.pop_front() {
                    state.running = Some(Running {
                        id: job.id,
                        work: job.work,
                        started: Instant::now(),
                        cancel: job.cancel.clone(),
                        progress: job.progress.clone(),
                    });
                    break job;
                }
                if state.closed {
                    return;
                }
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let waited = started.duration_since(job.submitted);
        job.progress.set(|p| (p.job, p.started) = (JobState::Running, Some(started)));
        let cancel = job.cancel.clone();
        let job_progress = job.progress.clone();
        let mut evaluations = 0;
        let mut progress = |p: &crate::Progress| {
            match p {
                crate::Progress::Stage(stage) | crate::Progress::Part { stage, .. } => {
                    job_progress.set(|s| s.stage = stage)
                }
                crate::Progress::Step { step, steps, evaluation, evaluations: planned, latents } => {
                    evaluations += 1;
                    job_progress.set(|s| {
                        (s.stage, s.step, s.steps, s.evaluation, s.evaluations) =
                            ("denoising", *step, *steps, *evaluation, *planned);
                    });
                    if let (Some(previewer), Some(latents)) = (shared.previewer.get(), latents) {
                        if job_progress.wants_preview.swap(false, Ordering::Relaxed) {
                            let image = latents.denoised().and_then(|x0| previewer.preview_at_most(&x0, PREVIEW_SIDE));
                            match image {
                                Ok(image) => job_progress.set(|s| {
                                    (s.preview, s.preview_evaluation) = (Some(Arc::new(image)), *evaluation);
                                }),
                                Err(e) => tracing::debug!("preview failed: {e}"),
                            }
                        }
                    }
                }
            }
            if cancel.load(Ordering::SeqCst) {
                Control::Stop
            } else {
                Control::Continue
            }
        };
        let outcome = if cancel.load(Ordering::SeqCst) {
            Outcome::Failed(Error::Cancelled)
        } else {
            match catch_unwind(AssertUnwindSafe(|| engine.generate(&job.request, &mut progress))) {
                Ok(Ok(g)) => Outcome::Done(Finished {
                    images: g.images,
                    seed: g.seed,
                    elapsed: started.elapsed(),
                    waited,
                    evaluations,
                }),
                Ok(Err(e)) => Outcome::Failed(e),
                Err(panic) => Outcome::Panicked(panic_message(&*panic)),
            }
        };
        let elapsed = started.elapsed();
        let was_cancelled = matches!(outcome, Outcome::Failed(Error::Cancelled)) && job.cancel.load(Ordering::SeqCst);
        {
            let mut state = shared.lock();
            state.running = None;
            if was_cancelled {
                state.cancelled += 1;
            } else {
                state.completed += 1;
                if matches!(outcome, Outcome::Done(_)) {
                    let rate = elapsed.as_secs_f64() / job.work;
                    state.seconds_per_work = Some(state.seconds_per_work.map_or(rate, |avg| 0.7 * avg + 0.3 * rate));
                }
            }
        }
        job.progress.set(|p| p.job = JobState::Finished);
        let _ = job.reply.send(outcome);
        // The generation's buffers are free now; give the pages back so the server's memory returns to its
        // baseline between requests instead of staying at the largest request's peak.
        release_free_memory();
    }
}

/// Returns freed heap memory to the operating system (glibc keeps freed blocks below its mmap threshold, which
/// grows with each large free, in its arenas otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::sync::mpsc;

    /// Runs `steps` progress calls per job; each waits for a go-ahead from the test.
    struct Gated {
        steps: Arc<Mutex<mpsc::Receiver<()>>>,
        started: mpsc::Sender<String>,
    }

    impl Engine for Gated {
        fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
            self.started.send(request.prompt.clone()).unwrap();
            if request.prompt == "panic" {
                panic!("boom");
            }
            for step in 0..3 {
                self.steps.lock().unwrap().recv_timeout(Duration::from_secs(10)).unwrap();
                let p = crate::Progress::Step { step, steps: 3, evaluation: step, evaluations: 3, latents: None };
                if progress(&p) == Control::Stop {
                    return Err(Error::Cancelled);
                }
            }
            let latents = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
            Ok(Generation {
                images: vec![RgbImage::new(8, 8)],
                seed: 1,
                latents,
                warnings: Vec::new(),
                loras: Vec::new(),
            })
        }
    }

    fn gated(capacity: usize) -> (Queue, mpsc::Sender<()>, mpsc::Receiver<String>, JoinHandle<()>) {
        let (go, steps) = mpsc::channel();
        let (started, started_rx) = mpsc::channel();
        let steps = Arc::new(Mutex::new(steps));
        let (queue, handle) = Queue::start(capacity, move || Ok(Gated { steps, started })).unwrap();
        (queue, go, started_rx, handle)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn bounded_fifo_with_cancellation() {
        let (queue, go, started, handle) = gated(1);
        let first = queue.submit(GenerateRequest::new("first")).unwrap();
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), "first");
        let second = queue.submit(GenerateRequest::new("second")).unwrap();
        assert!(matches!(queue.submit(GenerateRequest::new("third")), Err(Rejected::Full { capacity: 1, .. })));
        // The waiting client goes away: its place is free at once.
        drop(second);
        assert_eq!(queue.status().waiting, 0);
        let third = queue.submit(GenerateRequest::new("third")).unwrap();
        // The running client goes away: stopped at the next step.
        drop(first);
        go.send(()).unwrap();
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), "third");
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        assert!(matches!(block_on(third.outcome()), Outcome::Done(Finished { seed: 1, .. })));
        let status = queue.status();
        assert_eq!((status.cancelled, status.completed, status.running), (2, 1, false));
        queue.close();
        handle.join().unwrap();
    }

    #[test]
    fn panics_are_reported_and_close_answers_waiting_jobs() {
        let (queue, go, started, handle) = gated(2);
        let panicking = queue.submit(GenerateRequest::new("panic")).unwrap();
        assert!(matches!(block_on(panicking.outcome()), Outcome::Panicked(m) if m.contains("boom")));
        assert_eq!(started.recv().unwrap(), "panic");
        let running = queue.submit(GenerateRequest::new("running")).unwrap();
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), "running");
        let waiting = queue.submit(GenerateRequest::new("waiting")).unwrap();
        queue.close();
        assert!(matches!(queue.submit(GenerateRequest::new("late")), Err(Rejected::Closed)));
        assert!(matches!(block_on(waiting.outcome()), Outcome::ShuttingDown));
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        assert!(matches!(block_on(running.outcome()), Outcome::Done(_)));
        handle.join().unwrap();
    }

    #[test]
    fn progress_positions_and_cancellation_from_a_job_api() {
        let (queue, go, started, handle) = gated(3);
        let first = queue.submit(GenerateRequest::new("first")).unwrap();
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), "first");
        let second = queue.submit(GenerateRequest::new("second")).unwrap();
        let third = queue.submit(GenerateRequest::new("third")).unwrap();
        assert_eq!(
            (queue.position(first.id()), queue.position(second.id()), queue.position(third.id())),
            (None, Some(0), Some(1))
        );
        assert_eq!(second.progress().snapshot().state, JobState::Queued);
        let progress = first.progress();
        assert_eq!(progress.snapshot().state, JobState::Running);
        go.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.snapshot().evaluation != 0 || progress.snapshot().steps != 3 {
            assert!(Instant::now() < deadline, "{:?}", progress.snapshot());
            std::thread::sleep(Duration::from_millis(5));
        }
        let snapshot = progress.snapshot();
        assert_eq!((snapshot.step, snapshot.stage), (0, "denoising"));
        // A job API cancels the waiting second job: answered at once, its place freed.
        second.canceller().cancel();
        assert!(matches!(block_on(second.outcome()), Outcome::Failed(Error::Cancelled)));
        assert_eq!(queue.position(third.id()), Some(0));
        // A1111's interrupt stops the running job at its next step.
        assert_eq!(queue.running_id(), Some(first.id()));
        assert!(Arc::ptr_eq(&queue.running_progress().unwrap(), &progress));
        assert!(queue.interrupt_running());
        go.send(()).unwrap();
        assert!(matches!(block_on(first.outcome()), Outcome::Failed(Error::Cancelled)));
        assert_eq!(progress.snapshot().state, JobState::Finished);
        assert_eq!(started.recv_timeout(Duration::from_secs(10)).unwrap(), "third");
        for _ in 0..3 {
            go.send(()).unwrap();
        }
        let done = third.progress();
        assert!(matches!(block_on(third.outcome()), Outcome::Done(_)));
        assert_eq!((done.snapshot().state, done.snapshot().fraction()), (JobState::Finished, 1.0));
        queue.close();
        handle.join().unwrap();
    }

    #[test]
    fn retry_after_follows_the_queued_work() {
        let request = |size: u32, steps: u32, samples: u32| {
            let mut r = GenerateRequest::new("x");
            (r.img_width, r.img_height, r.num_inference_steps, r.samples) = (size, size, steps, samples);
            r
        };
        let small = work(&request(512, 20, 1));
        let large = work(&request(1024, 50, 4));
        assert!((large / small - 40.0).abs() < 1e-9, "4× the pixels, 2.5× the steps, 4× the samples");
        // A rate learned from 1-second small jobs; queued: four large jobs (~40 s each).
        let rate = Some(1.0 / small);
        assert_eq!(estimate_wait(rate, None, &[small]), 1);
        assert_eq!(estimate_wait(rate, Some((large, Duration::from_secs(10))), &[large; 4]), 190);
        // Before any job has finished: 5 s per job.
        assert_eq!(estimate_wait(None, Some((large, Duration::ZERO)), &[large; 2]), 15);
        let mut img2img = request(512, 20, 1);
        img2img.strength = Some(0.5);
        assert!((work(&img2img) / small - 0.5).abs() < 1e-9, "image to image runs strength × steps");
    }

    #[test]
    fn load_errors_are_returned() {
        let r = Queue::start::<Gated, _>(1, || Err(Error::NotFound("no model here".into())));
        assert!(r.err().unwrap().to_string().contains("no model here"));
    }
}
