//! A local HTTP server that is a drop-in for the hosted text-to-image API: `POST /v1/sdxl1.0-dreamshaper` with the
//! hosted request body, `x-api-key` header, ranges, answers and error statuses.
//!
//! The model is loaded once, at start-up, on a dedicated worker thread that runs one generation at a time
//! ([`queue`]); the HTTP side ([`handlers`]) runs on a small tokio runtime. Shutdown (Ctrl-C, SIGTERM, or
//! [`Server::shutdown`]) finishes the running generation, answers queued requests 503 and then returns.

pub mod auth;
pub mod decode;
pub mod errors;
pub mod fetch;
pub mod handlers;
pub mod logging;
pub mod queue;
pub mod respond;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::routing::{any, get, post};
use axum::Router;
use tokio::sync::{oneshot, Notify};

pub use auth::ApiKeys;
pub use decode::Ranges;
pub use errors::ApiError;
pub use handlers::{IMG2IMG_PATH, INPAINT_PATH, MODEL_PATH};
pub use queue::{Engine, Queue};

use crate::{Error, Result};

/// The default listening address: loopback only.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7860";
/// The default number of requests that may wait while one runs.
pub const DEFAULT_MAX_QUEUE: usize = 8;
/// The default request body limit (a hosted request is a few hundred bytes).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;

/// The default [`ServerConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Keys accepted in `x-api-key`; none means no key is needed.
    pub api_keys: ApiKeys,
    /// Requests that may wait while one runs; more get 429.
    pub max_queue: usize,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// Exactly the hosted ranges unless relaxed for tests.
    pub ranges: Ranges,
    /// Shown by `/health`.
    pub model_name: String,
    /// After shutdown starts and the last generation has finished, how long connections may take to finish their
    /// answers before they are closed anyway (a stalled client must not keep the server up).
    pub shutdown_grace: Duration,
    /// Shut down on Ctrl-C / SIGTERM (the binary), rather than only on [`Server::shutdown`] (tests, embedding).
    pub handle_signals: bool,
    /// Fetch `image` / `mask` given as URLs (public addresses only, see [`fetch`]); off: such requests get 400.
    pub allow_image_urls: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().expect("valid address"),
            api_keys: ApiKeys::none(),
            max_queue: DEFAULT_MAX_QUEUE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            ranges: Ranges::Hosted,
            model_name: String::new(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            handle_signals: false,
            allow_image_urls: false,
        }
    }
}

/// The routes, for a running queue.
pub fn router(state: handlers::AppState) -> Router {
    let ids = Arc::new(logging::RequestIds::default());
    Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route(MODEL_PATH, post(handlers::generate))
        .route(IMG2IMG_PATH, post(handlers::img2img))
        .route(INPAINT_PATH, post(handlers::inpaint))
        .route("/v1/{*model}", any(handlers::other_model))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(ids, logging::log_requests))
}

/// A running server: HTTP on its own thread and runtime, generations on the worker thread.
pub struct Server {
    addr: SocketAddr,
    trigger: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Binds `config.addr` (port 0 picks a free port), loads the engine with `load` on the worker thread, then
    /// serves in the background. Returns once the server accepts requests.
    pub fn start<E, F>(config: ServerConfig, load: F) -> Result<Server>
    where
        E: Engine + 'static,
        F: FnOnce() -> Result<E> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("http")
            .enable_all()
            .build()
            .map_err(|e| Error::Service(format!("could not start the HTTP runtime: {e}")))?;
        // Bind first: a busy port fails before a long model load.
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(config.addr))
            .map_err(|e| Error::Service(format!("could not listen on {}: {e}", config.addr)))?;
        let addr = listener.local_addr().map_err(|e| Error::Service(format!("listening socket: {e}")))?;
        tracing::info!(model = %config.model_name, "loading the model");
        let (queue, worker) = Queue::start(config.max_queue, load)?;
        let state = handlers::AppState {
            queue: queue.clone(),
            keys: config.api_keys.clone(),
            max_body_bytes: config.max_body_bytes,
            ranges: config.ranges,
            allow_image_urls: config.allow_image_urls,
            model_name: config.model_name.clone().into(),
        };
        let app = router(state);
        let (trigger, triggered) = oneshot::channel::<()>();
        let handle_signals = config.handle_signals;
        let grace = config.shutdown_grace;
        let mut signals = {
            let _context = runtime.enter();
            Termination::new(handle_signals)
        };
        let stopping = Arc::new(Notify::new());
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                let shutdown = {
                    let (queue, stopping) = (queue.clone(), stopping.clone());
                    async move {
                        tokio::select! {
                            _ = triggered => {}
                            _ = signals.recv() => {}
                        }
                        tracing::info!(
                            "shutting down: finishing the running generation, answering queued requests 503"
                        );
                        queue.close();
                        stopping.notify_one();
                        if handle_signals {
                            // A second Ctrl-C / SIGTERM does not wait for the running generation.
                            tokio::spawn(async move {
                                signals.recv().await;
                                tracing::warn!("second signal: exiting now");
                                std::process::exit(130);
                            });
                        }
                    }
                };
                let served = runtime.block_on(async move {
                    let graceful = axum::serve(listener, app).with_graceful_shutdown(shutdown);
                    let deadline = async {
                        stopping.notified().await;
                        while queue.status().running {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        tokio::time::sleep(grace).await;
                    };
                    tokio::select! {
                        served = graceful => served,
                        _ = deadline => {
                            tracing::warn!("closing connections still open {grace:?} after the last generation");
                            Ok(())
                        }
                    }
                });
                let joined = worker.join();
                served.map_err(|e| Error::Service(format!("server error: {e}")))?;
                joined.map_err(|_| Error::Service("the generation worker panicked".into()))?;
                tracing::info!("stopped");
                Ok(())
            })
            .map_err(|e| Error::Service(format!("could not start the HTTP thread: {e}")))?;
        tracing::info!("listening on http://{addr}");
        Ok(Server { addr, trigger: Some(trigger), thread: Some(thread) })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server has stopped (after a signal, with `handle_signals`).
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Graceful stop: no new connections, queued requests answered 503, the running generation finishes and is
    /// answered; returns when all of that is done.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(trigger) = self.trigger.take() {
            let _ = trigger.send(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| Error::Service("the HTTP thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(trigger) = self.trigger.take() {
            let _ = trigger.send(());
        }
        let _ = self.join();
    }
}

/// Ctrl-C and SIGTERM, listened for from creation on (so a signal sent right after start-up is not missed).
struct Termination {
    #[cfg_attr(unix, allow(dead_code))]
    enabled: bool,
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Termination {
    /// Must be called inside the runtime. Disabled: never resolves.
    fn new(enabled: bool) -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = if enabled {
                match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
                    (Ok(int), Ok(term)) => Some((int, term)),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!("cannot listen for Ctrl-C / SIGTERM: {e}");
                        None
                    }
                }
            } else {
                None
            };
            Self { enabled, streams }
        }
        #[cfg(not(unix))]
        {
            Self { enabled }
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            match &mut self.streams {
                Some((int, term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                None => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            if !self.enabled {
                return std::future::pending().await;
            }
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Log lines to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
