//! A local HTTP server that is a drop-in for the hosted text-to-image API: `POST /v1/sdxl1.0-dreamshaper` with the
//! hosted request body, `x-api-key` header, ranges, answers and error statuses.
//!
//! The model is loaded once, at start-up, on a dedicated worker thread that runs one generation at a time
//! ([`queue`]); the HTTP side ([`handlers`]) runs on a small tokio runtime behind the server's own accept loop
//! ([`connections`]: connection cap, header timeout and size cap). Shutdown (Ctrl-C, SIGTERM, or
//! [`Server::shutdown`]) answers queued requests 503, finishes the running generation (meanwhile `/health` and
//! `/ready` say so) and then returns.

pub mod auth;
pub mod connections;
pub mod decode;
pub mod dialects;
pub mod errors;
pub mod fetch;
pub mod handlers;
pub mod hosts;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod queue;
pub mod respond;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::routing::{any, get, post};
use axum::Router;
use tokio::sync::oneshot;

pub use auth::ApiKeys;
pub use connections::Limits;
pub use decode::Ranges;
pub use errors::ApiError;
pub use handlers::{IMG2IMG_PATH, INPAINT_PATH, MODEL_PATH};
pub use hosts::AllowedHosts;
pub use logging::LogFormat;
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
    /// Shown by `/health` (unauthenticated): a hub id or a file name, never a file-system path.
    pub model_name: String,
    /// Connection cap, header timeout and header size cap.
    pub limits: Limits,
    /// `Host` names answered besides loopback ones (`*`: any); `None`: loopback only without a key, any with one
    /// (see [`hosts`]).
    pub allowed_hosts: Option<Vec<String>>,
    /// Also serve `GET /metrics`, without a key, on this address (for a scraper on a private network).
    pub metrics_addr: Option<SocketAddr>,
    /// After shutdown starts and the last generation has finished, how long connections may take to finish their
    /// answers before they are closed anyway (a stalled client must not keep the server up).
    pub shutdown_grace: Duration,
    /// Shut down on Ctrl-C / SIGTERM (the binary), rather than only on [`Server::shutdown`] (tests, embedding).
    pub handle_signals: bool,
    /// Fetch `image` / `mask` given as URLs (public addresses only, see [`fetch`]); off: such requests get 400.
    pub allow_image_urls: bool,
    /// The LoRA directory the engine resolves names in (`--lora-dir`), listed by A1111's `GET /sdapi/v1/loras`.
    pub lora_dir: Option<std::path::PathBuf>,
    /// The server's URL as clients reach it (`https://gpu.example`), for the absolute URLs of the v2 job API;
    /// `None`: `http://` and the request's `Host`.
    pub public_url: Option<String>,
    /// How long a finished v2 job's result is kept (then 404).
    pub job_ttl: Duration,
    /// The most v2 jobs kept, finished or not (the oldest finished ones make room).
    pub max_jobs: usize,
    /// Where v2 jobs live: `None` in this process's memory; `redis://HOST:PORT/DB`: in Redis, shared by a fleet
    /// (see [`jobs`]).
    pub job_store: Option<String>,
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
            limits: Limits::default(),
            allowed_hosts: None,
            metrics_addr: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            handle_signals: false,
            allow_image_urls: false,
            lora_dir: None,
            public_url: None,
            job_ttl: jobs::DEFAULT_JOB_TTL,
            max_jobs: jobs::DEFAULT_MAX_JOBS,
            job_store: None,
        }
    }
}

/// The routes, for a running queue: the `Host` check in front of them, the request log (and `x-request-id`) in
/// front of everything.
pub fn router(state: handlers::AppState, log: logging::RequestLog, hosts: AllowedHosts) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route(MODEL_PATH, post(handlers::generate))
        .route(IMG2IMG_PATH, post(handlers::img2img))
        .route(INPAINT_PATH, post(handlers::inpaint))
        .merge(dialects::routes())
        .route("/v1/{*model}", any(handlers::other_model))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(Arc::new(hosts), hosts::check_host))
        .layer(axum::middleware::from_fn_with_state(log, logging::log_requests))
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
        let metrics_listener = match config.metrics_addr {
            Some(metrics_addr) => Some(
                runtime
                    .block_on(tokio::net::TcpListener::bind(metrics_addr))
                    .map_err(|e| Error::Service(format!("could not listen on {metrics_addr} (--metrics-addr): {e}")))?,
            ),
            None => None,
        };
        if config.limits.max_connections == 0 {
            return Err(Error::Service("the connection cap (--max-connections) must be at least 1".into()));
        }
        if !addr.ip().is_loopback() && !config.api_keys.is_enabled() {
            tracing::warn!(
                "listening on {addr}, which is not a loopback address, without an API key: anyone who can reach \
                 it can use it (set --api-key, --api-keys-file or DREAMSHAPER_API_KEY)"
            );
        }
        tracing::info!(model = %config.model_name, "loading the model");
        let (queue, worker) = Queue::start(config.max_queue, load)?;
        let metrics = Arc::new(metrics::Metrics::default());
        let connections = Arc::new(connections::Connections::default());
        let jobs = match &config.job_store {
            None => jobs::Jobs::memory(queue.clone(), metrics.clone(), config.job_ttl, config.max_jobs),
            Some(url) => {
                let connected = runtime.block_on(jobs::Jobs::redis(
                    url,
                    queue.clone(),
                    metrics.clone(),
                    config.job_ttl,
                    config.max_jobs,
                ));
                match connected {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        queue.close();
                        let _ = worker.join();
                        return Err(e);
                    }
                }
            }
        };
        let state = handlers::AppState {
            queue: queue.clone(),
            keys: config.api_keys.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.limits.body_timeout,
            ranges: config.ranges,
            allow_image_urls: config.allow_image_urls,
            model_name: config.model_name.clone().into(),
            metrics: metrics.clone(),
            connections: connections.clone(),
            lora_dir: config.lora_dir.clone().map(Arc::from),
            jobs,
            public_url: config.public_url.as_deref().map(|u| u.trim_end_matches('/').into()),
        };
        let log = logging::RequestLog { ids: Arc::new(logging::RequestIds::default()), metrics: metrics.clone() };
        let hosts = AllowedHosts::for_server(config.allowed_hosts.as_deref(), config.api_keys.is_enabled());
        let app = router(state.clone(), log.clone(), hosts);
        let limits = config.limits;
        let (trigger, triggered) = oneshot::channel::<()>();
        let handle_signals = config.handle_signals;
        let grace = config.shutdown_grace;
        let mut signals = {
            let _context = runtime.enter();
            Termination::new(handle_signals)
        };
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                // Until the last generation has finished, connections are still accepted so that `/health` and
                // `/ready` answer 503 "shutting_down" (and new requests 503) rather than nothing.
                let stop_accepting = {
                    let queue = queue.clone();
                    async move {
                        tokio::select! {
                            _ = triggered => {}
                            _ = signals.recv() => {}
                        }
                        tracing::info!(
                            "shutting down: finishing the running generation, answering queued requests 503"
                        );
                        queue.close();
                        if handle_signals {
                            // A second Ctrl-C / SIGTERM does not wait for the running generation.
                            tokio::spawn(async move {
                                signals.recv().await;
                                tracing::warn!("second signal: exiting now");
                                std::process::exit(130);
                            });
                        }
                        while queue.status().running {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                let jobs = state.jobs.clone();
                runtime.block_on(async move {
                    if let Some(listener) = metrics_listener {
                        tokio::spawn(serve_metrics(listener, state, stopped));
                    }
                    let accepting = connections::Accepting {
                        listener,
                        router: app,
                        limits,
                        ids: log.ids,
                        metrics: log.metrics,
                        connections,
                    };
                    connections::serve(accepting, stop_accepting, grace).await;
                    // A shared job store: the last job's end is recorded before the runtime stops.
                    jobs.drain(grace).await;
                    let _ = stopped_tx.send(true);
                });
                let joined = worker.join();
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

/// `GET /metrics` without a key on its own listener (`--metrics-addr`), until the main server has stopped.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: handlers::AppState,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let app = Router::new().route(
        "/metrics",
        get(|axum::extract::State(state): axum::extract::State<handlers::AppState>| async move {
            handlers::metrics_text(&state)
        }),
    );
    let app = app.fallback(handlers::not_found).with_state(state);
    let shutdown = async move {
        let _ = stopped.wait_for(|stopped| *stopped).await;
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::warn!("the metrics listener stopped: {e}");
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

/// Text log lines to stderr; `RUST_LOG` filters (default `info`). See [`logging::init`] for JSON lines.
pub fn init_logging() {
    logging::init(LogFormat::Text);
}
