//! `/metrics`: a `prometheus-client` registry of typed metrics, encoded as the Prometheus text
//! format 0.0.4, and the middleware that counts and times every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Shared;

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Routes are a fixed set of labels, so a scanner cannot blow up the series count.
pub const ROUTES: [&str; 14] = [
    "/",
    "/v1/generate",
    "/v1/inpaint",
    "/v1/outpaint",
    "/v1/vary",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/models",
    "/v1/jobs",
    "/v1/model",
    "/healthz",
    "/metrics",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

type Latency = Family<RouteLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS_S)
}

/// The service's metrics. Counters and gauges are updated where things happen; the rates are
/// computed when `/metrics` is read.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Latency,
    /// Jobs waiting for the worker.
    pub queue_depth: Gauge,
    queue_capacity: Gauge,
    /// Generate, inpaint and outpaint requests being handled.
    pub in_flight: Gauge,
    cancelled: Counter,
    /// Jobs not run, or stopped between batches, because their client went away.
    pub skipped: Counter,
    /// Images made.
    pub images: Counter,
    /// Reverse steps run, summed over images.
    pub steps: Counter,
    /// Transformer graph runs.
    pub transformer_calls: Counter,
    /// Requests whose handling panicked (answered 500; the service goes on).
    pub panics: Counter,
    /// Connections open.
    pub connections: Gauge,
    /// Connections over `--max-connections`, answered 503 and closed.
    pub connections_refused: Counter,
    /// Connections closed because no whole request head came within `--header-timeout-ms`.
    pub header_timeouts: Counter,
    /// Requests answered 408 because their body did not arrive within `--body-timeout-ms`.
    pub body_timeouts: Counter,
    /// Requests answered 503 because they were still waiting at the drain deadline.
    pub drain_expired: Counter,
    /// Asynchronous jobs accepted.
    pub jobs_submitted: Counter,
    /// Asynchronous jobs cancelled by DELETE.
    pub jobs_cancelled: Counter,
    /// Asynchronous jobs that failed (the model, the machine, the timeout).
    pub jobs_failed: Counter,
    /// Finished asynchronous jobs dropped from the store (kept time or count reached).
    pub jobs_expired: Counter,
    /// Asynchronous jobs waiting for the worker (set when /metrics is read).
    pub jobs_queued: Gauge,
    /// Asynchronous jobs being sampled (set when /metrics is read).
    pub jobs_running: Gauge,
    /// Live previews decoded for asynchronous jobs' event streams.
    pub previews: Counter,
    /// Time spent decoding and encoding live previews (added when a job is done).
    pub preview_s: Counter<f64, AtomicU64>,
    busy_s: Counter<f64, AtomicU64>,
    images_per_s: Gauge<f64, AtomicU64>,
    steps_per_s: Gauge<f64, AtomicU64>,
    /// Bundles loaded by the worker now.
    pub models_loaded: Gauge,
    /// Bundle loads started (the first use of a bundle, or again after it was unloaded).
    pub model_loads: Counter,
    /// Bundle loads that failed (answered to the requests for that bundle only).
    pub model_load_failures: Counter,
    /// Bundles unloaded to make room (`--max-loaded`, `--memory-budget`).
    pub model_unloads: Counter,
    /// Jobs waiting for their bundle to load (the one being loaded for; the others wait in the
    /// queue).
    pub waiting_for_model: Gauge,
    /// Jobs answered (for Retry-After; not exported).
    jobs: AtomicU64,
}

impl Metrics {
    /// A registry holding every metric, with the queue's capacity.
    pub fn new(max_queue: usize) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        let m = Metrics {
            requests: requests.clone(),
            latency: latency.clone(),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            in_flight: Gauge::default(),
            cancelled: Counter::default(),
            skipped: Counter::default(),
            images: Counter::default(),
            steps: Counter::default(),
            transformer_calls: Counter::default(),
            panics: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            header_timeouts: Counter::default(),
            body_timeouts: Counter::default(),
            drain_expired: Counter::default(),
            jobs_submitted: Counter::default(),
            jobs_cancelled: Counter::default(),
            jobs_failed: Counter::default(),
            jobs_expired: Counter::default(),
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            previews: Counter::default(),
            preview_s: Counter::default(),
            busy_s: Counter::default(),
            images_per_s: Gauge::default(),
            steps_per_s: Gauge::default(),
            models_loaded: Gauge::default(),
            model_loads: Counter::default(),
            model_load_failures: Counter::default(),
            model_unloads: Counter::default(),
            waiting_for_model: Gauge::default(),
            jobs: AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register("absorb_models_loaded", "Bundles loaded now", m.models_loaded.clone());
        registry.register(
            "absorb_model_loads",
            "Bundle loads started (first use, or again after an unload)",
            m.model_loads.clone(),
        );
        registry.register(
            "absorb_model_load_failures",
            "Bundle loads that failed: answered to that bundle's requests only",
            m.model_load_failures.clone(),
        );
        registry.register(
            "absorb_model_unloads",
            "Bundles unloaded to make room (--max-loaded, --memory-budget)",
            m.model_unloads.clone(),
        );
        registry.register(
            "absorb_jobs_waiting_for_model",
            "Jobs waiting while their bundle loads",
            m.waiting_for_model.clone(),
        );
        m.queue_capacity.set(max_queue as i64);
        // Help texts without a final period: the encoder adds one.
        registry.register(
            "absorb_requests",
            "Requests answered, by route and HTTP status",
            requests,
        );
        registry.register(
            "absorb_request_duration_seconds",
            "Time from request to response",
            latency,
        );
        registry.register(
            "absorb_queue_depth",
            "Jobs waiting for the worker",
            m.queue_depth.clone(),
        );
        registry.register(
            "absorb_queue_capacity",
            "Jobs that may wait (--max-queue)",
            m.queue_capacity.clone(),
        );
        registry.register(
            "absorb_requests_in_flight",
            "Generate, inpaint and outpaint requests being handled",
            m.in_flight.clone(),
        );
        registry.register(
            "absorb_panics",
            "Requests whose handling panicked: answered 500, the service goes on",
            m.panics.clone(),
        );
        registry.register(
            "absorb_requests_cancelled",
            "Requests whose client went away before the answer",
            m.cancelled.clone(),
        );
        registry.register(
            "absorb_jobs_skipped",
            "Jobs not run, or stopped between batches, because their client went away",
            m.skipped.clone(),
        );
        registry.register(
            "absorb_images",
            "Images generated, inpainted or outpainted",
            m.images.clone(),
        );
        registry.register("absorb_steps", "Reverse steps run, summed over images", m.steps.clone());
        registry.register("absorb_busy_seconds", "Time the worker spent on jobs", m.busy_s.clone());
        registry.register(
            "absorb_images_per_second",
            "Images per busy second of the worker, since start",
            m.images_per_s.clone(),
        );
        registry.register(
            "absorb_steps_per_second",
            "Reverse steps per busy second of the worker, since start",
            m.steps_per_s.clone(),
        );
        registry.register(
            "absorb_transformer_calls",
            "Transformer graph runs",
            m.transformer_calls.clone(),
        );
        registry.register(
            "absorb_connections_open",
            "Client connections open",
            m.connections.clone(),
        );
        registry.register(
            "absorb_connections_refused",
            "Connections over --max-connections, answered 503 and closed",
            m.connections_refused.clone(),
        );
        registry.register(
            "absorb_header_timeouts",
            "Connections closed because no whole request head came within --header-timeout-ms",
            m.header_timeouts.clone(),
        );
        registry.register(
            "absorb_body_timeouts",
            "Requests answered 408 because their body did not arrive within --body-timeout-ms",
            m.body_timeouts.clone(),
        );
        registry.register(
            "absorb_drain_expired",
            "Requests answered 503 because they were still waiting at the drain deadline",
            m.drain_expired.clone(),
        );
        registry.register(
            "absorb_jobs_submitted",
            "Asynchronous jobs accepted",
            m.jobs_submitted.clone(),
        );
        registry.register(
            "absorb_jobs_cancelled",
            "Asynchronous jobs cancelled by DELETE",
            m.jobs_cancelled.clone(),
        );
        registry.register(
            "absorb_jobs_failed",
            "Asynchronous jobs that failed or timed out",
            m.jobs_failed.clone(),
        );
        registry.register(
            "absorb_jobs_expired",
            "Finished asynchronous jobs dropped from the store (--job-keep-s, --max-jobs)",
            m.jobs_expired.clone(),
        );
        registry.register(
            "absorb_jobs_queued",
            "Asynchronous jobs waiting for the worker",
            m.jobs_queued.clone(),
        );
        registry.register(
            "absorb_jobs_running",
            "Asynchronous jobs being sampled",
            m.jobs_running.clone(),
        );
        registry.register(
            "absorb_previews",
            "Live previews decoded for asynchronous jobs' event streams",
            m.previews.clone(),
        );
        registry.register(
            "absorb_preview_seconds",
            "Time spent decoding and encoding live previews",
            m.preview_s.clone(),
        );
        Metrics { registry, ..m }
    }

    fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.requests.get_or_create(&RouteStatus { route, status }).inc();
        self.latency
            .get_or_create(&RouteLabel { route })
            .observe(elapsed.as_secs_f64());
    }

    /// The worker finished `jobs` jobs in `busy`.
    pub fn worked(&self, jobs: usize, busy: Duration) {
        self.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        self.busy_s.inc_by(busy.as_secs_f64());
    }

    /// Seconds a client should wait before retrying: the time the full queue takes to drain at
    /// the measured job time, at least 1.
    pub fn retry_after_s(&self) -> u64 {
        let jobs = self.jobs.load(Ordering::Relaxed).max(1);
        let per_job_s = self.busy_s.get() / jobs as f64;
        (per_job_s * self.queue_capacity.get() as f64).ceil().clamp(1.0, 60.0) as u64
    }

    /// The Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let busy = self.busy_s.get();
        let per_busy_s = |n: u64| if busy > 0.0 { n as f64 / busy } else { 0.0 };
        self.images_per_s.set(per_busy_s(self.images.get()));
        self.steps_per_s.set(per_busy_s(self.steps.get()));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            log::error!("encoding /metrics failed: {e}");
        }
        out
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Counts a generate/inpaint request as in flight from arrival until its handler is done or
/// dropped (a client that hangs up drops it), and records cancellations.
struct InFlight<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.done {
            self.metrics.cancelled.inc();
        }
    }
}

/// Middleware: counts every request by route and status, times it, tracks in-flight work.
/// Gives every request an id (in its extensions, the `x-request-id` answer header and the log
/// lines about it).
pub async fn track(State(s): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let id = RequestId(s.next_request_id());
    req.extensions_mut().insert(id);
    let route = ROUTES
        .iter()
        .copied()
        .find(|r| {
            let path = req.uri().path();
            *r == path
                || (*r == "/v1/jobs" && path.starts_with("/v1/jobs/"))
                || (*r == "/v1/models" && path.starts_with("/v1/models/"))
        })
        .unwrap_or("other");
    let start = Instant::now();
    let work = matches!(
        route,
        "/v1/generate"
            | "/v1/inpaint"
            | "/v1/outpaint"
            | "/v1/vary"
            | "/v1/images/generations"
            | "/v1/images/edits"
            | "/v1/images/variations"
    );
    let mut guard = work.then(|| {
        s.metrics.in_flight.inc();
        InFlight {
            metrics: &s.metrics,
            done: false,
        }
    });
    let response = next.run(req).await;
    if let Some(g) = guard.as_mut() {
        g.done = true;
    }
    drop(guard);
    let status = response.status().as_u16();
    s.metrics.record(route, status, start.elapsed());
    if status == 500 {
        log::error!("request {} ({route}) answered 500", id.0);
    }
    let mut response = response;
    response.headers_mut().insert("x-request-id", id.0.into());
    response
}

/// The id [`track`] gave a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestId(pub u64);
