//! One generation at a time: a dedicated worker thread owns the model and takes jobs from a bounded FIFO queue.
//!
//! A request holds a [`Ticket`] while it waits. Dropping the ticket (the client went away and the server dropped
//! the request's future) cancels the job: a waiting job leaves the queue at once, freeing its place; a running one
//! is stopped at the next progress callback (the next denoising step). Closing the queue (shutdown) answers every
//! waiting job [`Outcome::ShuttingDown`] and lets the running one finish.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::oneshot;

use crate::sampling::ProgressFn;
use crate::{Control, Error, GenerateRequest, Generation, Pipeline, Result};

/// What the worker runs: the pipeline, or a stand-in in tests.
pub trait Engine {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation>;
}

impl Engine for Pipeline {
    fn generate(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
        Pipeline::generate_with_loras(self, request, progress)
    }
}

/// The images of a finished job.
#[derive(Debug)]
pub struct Finished {
    pub images: Vec<RgbImage>,
    pub seed: u64,
    /// Time spent generating (not waiting).
    pub elapsed: Duration,
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
    request: GenerateRequest,
    cancel: Arc<AtomicBool>,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Job>,
    running: Option<u64>,
    closed: bool,
    next_id: u64,
    completed: u64,
    cancelled: u64,
    /// Moving average of generation time, for `Retry-After`.
    average_secs: Option<f64>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
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
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new(), capacity });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("generation-worker".into())
            .spawn(move || match catch_unwind(AssertUnwindSafe(load)) {
                Ok(Ok(engine)) => {
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
            let per_job = state.average_secs.unwrap_or(5.0);
            let retry_after = (per_job * in_system as f64).ceil().clamp(1.0, 3600.0) as u64;
            return Err(Rejected::Full { capacity: self.shared.capacity, retry_after });
        }
        let id = state.next_id;
        state.next_id += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let (reply, receiver) = oneshot::channel();
        state.waiting.push_back(Job { id, request, cancel: cancel.clone(), reply });
        drop(state);
        self.shared.wake.notify_one();
        Ok(Ticket { id, cancel, receiver: Some(receiver), queue: self.clone() })
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
    receiver: Option<oneshot::Receiver<Outcome>>,
    queue: Queue,
}

impl Ticket {
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

fn run_worker<E: Engine>(mut engine: E, shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if let Some(job) = state.waiting.pop_front() {
                    state.running = Some(job.id);
                    break job;
                }
                if state.closed {
                    return;
                }
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let cancel = job.cancel.clone();
        let mut progress = |_: &crate::Progress| {
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
                Ok(Ok(g)) => Outcome::Done(Finished { images: g.images, seed: g.seed, elapsed: started.elapsed() }),
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
                    let secs = elapsed.as_secs_f64();
                    state.average_secs = Some(state.average_secs.map_or(secs, |avg| 0.7 * avg + 0.3 * secs));
                }
            }
        }
        let _ = job.reply.send(outcome);
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
    fn load_errors_are_returned() {
        let r = Queue::start::<Gated, _>(1, || Err(Error::NotFound("no model here".into())));
        assert!(r.err().unwrap().to_string().contains("no model here"));
    }
}
