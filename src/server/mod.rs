//! The service: `absorb serve` keeps one bundle loaded and answers HTTP requests from other
//! processes on the device. The only async code in the crate, in four parts:
//! `routes.rs` (requests parsed and validated into [`crate::Job`]s, answers and errors),
//! `worker.rs` (the one thread that owns the [`crate::Pipeline`], its queue and batching),
//! `metrics.rs` (the Prometheus registry and the request middleware), `systemd.rs`
//! (readiness, watchdog and status notifications). This file starts them and stops them.
//!
//! A full queue answers 429 at once instead of piling up; a job whose client has gone is
//! skipped, and a long job stops between batches. Under systemd (`Type=notify`) it signals
//! READY=1 only after the bundle is loaded and a warm-up generation ran, pings the watchdog, and
//! on SIGTERM stops accepting, finishes every accepted request and exits 0.
//!
//! ```text
//! curl -s localhost:8080/v1/generate -d '{"seed": 7}' -o 7.png                # one PNG
//! curl -s localhost:8080/v1/generate -d '{"seed": 7, "count": 4, "steps": 8}'  # JSON, base64 PNGs
//! curl -s localhost:8080/v1/inpaint -d "{\"image\": \"$(base64 -w0 7.png)\", \"rect\": [16, 0, 16, 32]}" -o e.png
//! curl -s localhost:8080/v1/outpaint -d "{\"image\": \"$(base64 -w0 7.png)\", \"extend\": {\"right\": 32}}" -o o.png
//! curl -s localhost:8080/v1/model      # manifest, provider in use, ONNX Runtime library, CPU
//! curl -s localhost:8080/healthz       # 200 {"status":"ok"} while the worker is alive
//! curl -s localhost:8080/metrics       # Prometheus text
//! ```
//!
//! Errors are JSON, `{"error": "...", "field": "..."}`: 4xx for the caller's input (the message
//! names the field), 429/503 with `Retry-After` when busy, a generic 500 otherwise (the full chain
//! goes to the log). It does not sample, decode images or write PNGs itself: that is the library's.

mod metrics;
mod routes;
mod systemd;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::serve::ListenerExt as _;

use crate::error::{Error, Result};
use crate::graphs::{ProviderConfig, RuntimeOptions};

pub use routes::app;
pub use worker::{Service, Shared};

/// Limits on what one request may ask for and on how much work may wait.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Jobs waiting for the worker at most; one more arriving gets 429.
    pub max_queue: usize,
    /// Images per transformer call (also the granularity at which a cancelled request stops).
    pub max_batch: usize,
    /// Images per generate request.
    pub max_count: usize,
    /// Reverse steps per request (never more than the grid's token count); `None` = no cap
    /// but that. Default [`DEFAULT_MAX_STEPS`].
    pub max_steps: Option<usize>,
    /// Request body size in bytes (base64 images included).
    pub max_body_bytes: usize,
    /// A request not answered within this (queue wait + work) gets 503.
    pub timeout_ms: u64,
    /// Largest token grid side a request may ask for (`grid`, outpainting).
    pub max_grid: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: 8,
            max_batch: crate::DEFAULT_MAX_BATCH,
            max_count: 16,
            max_steps: Some(DEFAULT_MAX_STEPS),
            max_body_bytes: 1 << 20,
            timeout_ms: 60_000,
            max_grid: 32,
        }
    }
}

/// Default cap on the reverse steps of one request: one step is one transformer call per batch
/// of windows, so a request at the largest default grid (32x32 tokens) and this many steps is the
/// heaviest one a client can ask for without changing the service's flags.
pub const DEFAULT_MAX_STEPS: usize = 256;

/// What `absorb serve` needs: the bundle, how to run it, where to listen, the limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Bundle directory.
    pub model: PathBuf,
    /// ONNX Runtime library and threads.
    pub runtime: RuntimeOptions,
    /// Execution provider and its settings (TensorRT engine cache, precision, variant). Without a
    /// cache directory, systemd's `CACHE_DIRECTORY` (the unit's `CacheDirectory=`) is used.
    pub provider: ProviderConfig,
    /// Address to bind, e.g. `127.0.0.1:8080` (port 0 picks a free port; the bound address is
    /// printed as `listening on ADDR` on stderr).
    pub listen: SocketAddr,
    /// Request and queue limits.
    pub limits: Limits,
}

/// Runs the service until SIGTERM or SIGINT, then drains: every accepted request is answered,
/// and the function returns `Ok` once the worker has stopped.
pub fn serve(options: ServeOptions) -> Result<()> {
    let limits = options.limits.clone();
    if limits.max_queue == 0
        || limits.max_batch == 0
        || limits.max_count == 0
        || limits.max_body_bytes == 0
        || limits.max_steps == Some(0)
    {
        return Err(Error::param(
            "max-queue",
            "--max-queue, --max-batch, --max-count, --max-steps and --max-body must be 1 or more",
        ));
    }
    let notify = systemd::Notifier::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("<tokio runtime>", e))?;
    // Bind first: a taken port fails in milliseconds, not after a long warm-up.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(options.listen))
        .map_err(|e| Error::io(options.listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(options.listen.to_string(), e))?;

    notify.status("loading the bundle and warming up");
    let starting = systemd::extend_start_timeout(notify.clone());
    let service = Service::start(&options);
    starting.store(false, Ordering::Relaxed);
    let service = service?;
    let shared = service.shared();

    // Handlers before READY=1, so a stop right after readiness is a drain too, never a kill.
    // (While loading, SIGTERM still ends the process at once: nothing has been accepted yet.)
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    };
    let (Ok(term), Ok(int)) = signals else {
        return Err(Error::io(
            "<signals>",
            std::io::Error::other("cannot install SIGTERM/SIGINT handlers"),
        ));
    };
    eprintln!("listening on {addr}");
    log::info!("serving on {addr} (limits: {limits:?})");
    notify.ready(&format!("serving on {addr}"));

    let result = rt.block_on(async {
        if let Some(period) = systemd::watchdog_period() {
            tokio::spawn(systemd::watchdog(notify.clone(), shared.clone(), period));
        }
        // Responses are small and latency matters more than packet count: no Nagle delay.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                log::debug!("TCP_NODELAY not set: {e}");
            }
        });
        axum::serve(listener, app(shared.clone()))
            .with_graceful_shutdown(shutdown_signal(term, int, notify.clone(), shared.clone()))
            .await
    });
    service.stop();
    notify.status("stopped");
    log::info!("stopped");
    result.map_err(|e| Error::io(addr.to_string(), e))
}

/// Resolves on SIGTERM or SIGINT: axum then stops accepting and waits for in-flight requests.
async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    notify: systemd::Notifier,
    shared: Arc<Shared>,
) {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    shared.shutting_down.store(true, Ordering::Relaxed);
    let pending = shared.metrics.in_flight.get();
    log::info!("shutting down: no new connections; finishing {pending} accepted requests");
    notify.stopping(&format!("draining {pending} requests"));
}
