//! The service: `absorb serve` keeps one bundle loaded and answers HTTP requests from other
//! processes on the device. The only async code in the crate: `connections.rs` (the accept loop:
//! header and idle timeouts, the connection cap, the drain), `requests.rs` (request bodies parsed
//! and validated into [`crate::Job`]s, no I/O: the fuzz targets drive it), `routes.rs` (the
//! handlers, answers and errors), `tasks.rs` (asynchronous jobs, `/v1/jobs`: their status and event streams),
//! `metrics.rs` (the Prometheus registry and the request middleware); and two parts that are not
//! async: `shared.rs` (the state the routes and the worker share: the queue, the bundle, the limits), `worker.rs` (the one thread that owns the [`crate::Pipeline`], taking work from the queue and batching it)
//! and `systemd.rs` (readiness, watchdog and status notifications). This file starts them and
//! stops them.
//!
//! A full queue answers 429 at once instead of piling up; a job whose client has gone is
//! skipped, and a running one stops between transformer calls. Under systemd (`Type=notify`) it
//! signals READY=1 only after the bundle is loaded and a warm-up generation ran, pings the
//! watchdog, and on SIGTERM stops accepting, closes idle and half-sent connections, finishes
//! every accepted request (503 for those still waiting at the drain deadline) and exits 0.
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

mod connections;
mod metrics;
mod openai;
pub mod registry;
pub mod requests;
mod routes;
mod shared;
mod systemd;
pub mod tasks;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::graphs::{ProviderConfig, RuntimeOptions};
use crate::param::Param;

pub use routes::app;
pub use shared::Shared;
pub use worker::Service;

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
    /// A connection must send a whole request head within this, counted from when the server
    /// waits for one (so also the idle time of a keep-alive connection); else it is closed.
    pub header_timeout_ms: u64,
    /// A request body must arrive within this once its handler reads it; else 408.
    pub body_timeout_ms: u64,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// After SIGTERM, how long accepted requests have to finish; then those still waiting are
    /// answered 503 and what is still open is dropped.
    pub drain_timeout_ms: u64,
    /// Asynchronous jobs held at once, queued, running and finished; a new one evicts the oldest
    /// finished job, and is refused (429) when every held job is unfinished.
    pub max_jobs: usize,
    /// How long a finished asynchronous job's results are kept (seconds).
    pub job_keep_s: u64,
}

impl Limits {
    /// Checks that every limit allows something: none may be 0.
    pub fn check(&self) -> Result<()> {
        let steps = self.max_steps.map_or(1, |s| s as u64);
        for (param, value) in [
            (Param::MaxQueue, self.max_queue as u64),
            (Param::MaxBatch, self.max_batch as u64),
            (Param::MaxCount, self.max_count as u64),
            (Param::MaxBody, self.max_body_bytes as u64),
            (Param::MaxSteps, steps),
            (Param::MaxConnections, self.max_connections as u64),
            (Param::HeaderTimeoutMs, self.header_timeout_ms),
            (Param::BodyTimeoutMs, self.body_timeout_ms),
            (Param::MaxJobs, self.max_jobs as u64),
        ] {
            if value == 0 {
                return Err(Error::param(param, "0 is not allowed: use 1 or more"));
            }
        }
        Ok(())
    }

    /// The caps these put on one request's job.
    pub fn caps(&self) -> crate::spec::Caps {
        crate::spec::Caps {
            max_count: self.max_count,
            max_steps: self.max_steps,
            max_grid: Some(self.max_grid),
        }
    }
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
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_connections: 512,
            drain_timeout_ms: 10_000,
            max_jobs: 64,
            job_keep_s: 600,
        }
    }
}

/// Default cap on the reverse steps of one request: one step is one transformer call per batch
/// of windows, so a request at the largest default grid (32x32 tokens) and this many steps is the
/// heaviest one a client can ask for without changing the service's flags.
pub const DEFAULT_MAX_STEPS: usize = 256;

/// What `absorb serve` needs: the bundles, how to run them, where to listen, the limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The bundles: `--model` directories and `--models` directories of bundles.
    pub sources: registry::Sources,
    /// Bundles loaded at once at most (`--max-loaded`); the least recently used is unloaded
    /// to load another.
    pub max_loaded: usize,
    /// Estimated bytes the loaded bundles may hold (`--memory-budget`, in MiB on the command
    /// line); `None`: only `max_loaded` bounds them.
    pub memory_budget: Option<u64>,
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

/// Runs the service until SIGTERM or SIGINT, then drains: every accepted request is answered
/// (503 if it is still waiting at the drain deadline), and the function returns `Ok` once the
/// worker has stopped.
pub fn serve(options: ServeOptions) -> Result<()> {
    let limits = options.limits.clone();
    limits.check()?;
    let notify = systemd::Notifier::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::os("starting the async runtime"))?;
    // Bind first: a taken port fails in milliseconds, not after a long warm-up.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(options.listen))
        .map_err(Error::os(format!("binding {}", options.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(Error::os(format!("reading the address bound for {}", options.listen)))?;

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
    let (term, int) = match signals {
        (Ok(term), Ok(int)) => (term, int),
        (Err(error), _) | (_, Err(error)) => {
            return Err(Error::Os {
                what: "installing the SIGTERM and SIGINT handlers".into(),
                error,
            })
        }
    };
    eprintln!("listening on {addr}");
    log::info!("serving on {addr} (limits: {limits:?})");
    notify.ready(&format!("serving on {addr}"));

    let hangup = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        signal(SignalKind::hangup())
    };
    rt.block_on(async {
        // SIGHUP reads the bundle list again; running jobs finish on the bundle they hold.
        match hangup {
            Ok(mut hup) => {
                let s = shared.clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let s = s.clone();
                        match tokio::task::spawn_blocking(move || s.reload()).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => log::error!("SIGHUP: the bundle list was kept: {e}"),
                            Err(e) => log::error!("SIGHUP: reading the bundle list failed: {e}"),
                        }
                    }
                });
            }
            Err(e) => log::warn!("no SIGHUP handler ({e}): reload with POST /v1/models/reload"),
        }
        if let Some(period) = systemd::watchdog_period() {
            tokio::spawn(systemd::watchdog(notify.clone(), shared.clone(), period));
        }
        connections::serve(
            listener,
            app(shared.clone()),
            shared.clone(),
            shutdown_signal(term, int, notify.clone(), shared.clone()),
        )
        .await
    });
    service.stop();
    notify.status("stopped");
    log::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT: the accept loop then stops accepting and drains.
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
    shared.phase.send_replace(connections::Phase::Draining);
    let pending = shared.metrics.in_flight.get();
    log::info!(
        "shutting down: no new connections; finishing {pending} accepted requests (deadline {} ms)",
        shared.limits.drain_timeout_ms
    );
    notify.stopping(&format!("draining {pending} requests"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_of_zero_is_refused_naming_its_flag() {
        assert!(Limits::default().check().is_ok());
        let zero_steps = Limits {
            max_steps: Some(0),
            ..Limits::default()
        };
        let e = zero_steps.check().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Param {
                    param: Param::MaxSteps,
                    ..
                }
            ),
            "{e}"
        );
        let no_cap = Limits {
            max_steps: None,
            ..Limits::default()
        };
        assert!(no_cap.check().is_ok(), "no step cap is allowed");
        let e = Limits {
            body_timeout_ms: 0,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid body_timeout_ms: 0 is not allowed: use 1 or more"
        );
    }
}
