//! The service: `absorb serve` keeps one bundle loaded and answers HTTP requests from other
//! processes on the device (design section 7). The only async file in the crate.
//!
//! One worker thread owns the [`Pipeline`] (its sessions need `&mut`) and takes jobs from a
//! bounded queue; the async handlers parse and validate requests, queue a job, and wait for its
//! reply. A full queue answers 429 at once instead of piling up; a job whose client has gone is
//! skipped, and a long request stops between batches. Under systemd (`Type=notify`) it signals
//! READY=1 only after the bundle is loaded and a warm-up generation ran, pings the watchdog, and
//! on SIGTERM stops accepting, finishes every accepted request and exits 0.
//!
//! ```text
//! curl -s localhost:8080/v1/generate -d '{"seed": 7}' -o 7.png                # one PNG
//! curl -s localhost:8080/v1/generate -d '{"seed": 7, "count": 4, "steps": 8}'  # JSON, base64 PNGs
//! curl -s localhost:8080/v1/inpaint -d "{\"image\": \"$(base64 -w0 7.png)\", \"rect\": [16, 0, 16, 32]}" -o e.png
//! curl -s localhost:8080/v1/model      # manifest, provider in use, ONNX Runtime library and version
//! curl -s localhost:8080/healthz       # 200 {"status":"ok"} while the worker is alive
//! curl -s localhost:8080/metrics       # Prometheus text
//! ```
//!
//! Errors are JSON, `{"error": "...", "field": "..."}`: 4xx for the caller's input (the message
//! names the field), 429/503 with `Retry-After` when busy, a generic 500 otherwise (the full chain
//! goes to the log). It does not sample, decode images or write PNGs itself: that is the library's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::bundle::ImageSpec;
use crate::error::{Error, Result};
use crate::graphs::{ProviderConfig, RuntimeOptions};
use crate::image::{self, AnimationFormat, Mask, Tensor};
use crate::sampler::{SamplerKind, Settings, Tiling, TokenSpace};
use crate::{DecodeMode, Pipeline, Plan, Timings};

/// Limits on what one request may ask for and on how much work may wait.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Jobs waiting for the worker at most; one more arriving gets 429.
    pub max_queue: usize,
    /// Images per transformer call (also the granularity at which a cancelled request stops).
    pub max_batch: usize,
    /// Images per generate request.
    pub max_count: usize,
    /// Reverse steps per request (never more than the bundle's token count).
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
            max_steps: None,
            max_body_bytes: 1 << 20,
            timeout_ms: 60_000,
            max_grid: 32,
        }
    }
}

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
    if limits.max_queue == 0 || limits.max_batch == 0 || limits.max_count == 0 || limits.max_body_bytes == 0 {
        return Err(Error::param(
            "max-queue",
            "--max-queue, --max-batch, --max-count and --max-body must be 1 or more",
        ));
    }
    let notify = Arc::new(systemd::Notifier::from_env());
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

    notify.send("STATUS=loading the bundle and warming up");
    let starting = systemd::extend_start_timeout(notify.clone());
    let service = Service::start(&options);
    starting.store(false, Ordering::Relaxed);
    let service = service?;
    let shared = service.shared.clone();

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
    notify.send(&format!("READY=1\nSTATUS=serving on {addr}"));

    let result = rt.block_on(async {
        if let Some(period) = systemd::watchdog_period() {
            tokio::spawn(watchdog(notify.clone(), shared.clone(), period));
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
    notify.send("STATUS=stopped");
    log::info!("stopped");
    result.map_err(|e| Error::io(addr.to_string(), e))
}

/// The routes over `shared`; tests may drive it without a socket.
pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/inpaint", post(inpaint))
        .route("/v1/outpaint", post(outpaint))
        .route("/v1/model", get(model))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

// ---------------------------------------------------------------------------------------------
// Requests

/// `POST /v1/generate`. An empty body means all defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    seed: Option<u64>,
    count: Option<usize>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    sampler: Option<SamplerKind>,
    /// Token grid `[rows, cols]` larger than the bundle's (the CLI's `--grid`).
    grid: Option<[usize; 2]>,
    stride: Option<[usize; 2]>,
    window_margin: Option<[usize; 2]>,
    decode: Option<DecodeMode>,
    /// Also return the reverse process as an animation (`gif` or `apng`).
    frames: Option<AnimationFormat>,
}

/// `POST /v1/outpaint`: a base64 PNG and the pixels to add per side.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutpaintRequest {
    image: String,
    extend: Extend,
    seed: Option<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    sampler: Option<SamplerKind>,
    stride: Option<[usize; 2]>,
    window_margin: Option<[usize; 2]>,
    decode: Option<DecodeMode>,
    frames: Option<AnimationFormat>,
    #[serde(default)]
    decode_all: bool,
}

/// Pixels to add on each side (the CLI's `--extend left=..,right=..,up=..,down=..`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extend {
    #[serde(default)]
    left: usize,
    #[serde(default)]
    right: usize,
    #[serde(default)]
    up: usize,
    #[serde(default)]
    down: usize,
}

/// `POST /v1/inpaint`: base64 PNGs and either a mask or a rectangle.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InpaintRequest {
    image: String,
    mask: Option<String>,
    rect: Option<[usize; 4]>,
    seed: Option<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    sampler: Option<SamplerKind>,
    #[serde(default)]
    decode_all: bool,
}

/// Where a job's PNGs (or its error) go.
type Reply = oneshot::Sender<Result<Vec<Vec<u8>>>>;

/// What the worker does next.
enum Job {
    Generate(GenerateJob),
    /// A larger grid, an outpainting or a preview: runs alone.
    Canvas(CanvasJob),
    Inpaint {
        image: Tensor,
        mask: Mask,
        token_mask: Vec<bool>,
        seed: u64,
        settings: Settings,
        decode_all: bool,
        reply: Reply,
    },
    Stop,
}

/// Work that does not batch with others.
struct CanvasJob {
    seed: u64,
    settings: Settings,
    tiling: Option<Tiling>,
    decode: DecodeMode,
    frames: Option<AnimationFormat>,
    what: Canvas,
    reply: Reply,
}

enum Canvas {
    /// Images `0..count`.
    Generate { count: usize },
    /// Outpaint `image` by `extend` pixels `[left, right, up, down]`.
    Outpaint {
        image: Tensor,
        extend: [usize; 4],
        decode_all: bool,
    },
}

/// Images `0..count` of `seed`.
struct GenerateJob {
    seed: u64,
    count: usize,
    settings: Settings,
    reply: Reply,
}

struct Queued {
    job: Job,
    accepted: Instant,
}

/// State shared by the handlers and the worker.
pub struct Shared {
    queue: SyncSender<Queued>,
    limits: Limits,
    space: TokenSpace,
    grid: [usize; 2],
    image: ImageSpec,
    defaults: crate::bundle::SamplingDefaults,
    model_info: serde_json::Value,
    worker_alive: AtomicBool,
    shutting_down: AtomicBool,
    metrics: Metrics,
}

impl Shared {
    /// Settings as the CLI validates them ([`Pipeline::settings`], then the sampler and the
    /// temperature schedule), plus the service's step cap. The JSON fields are the CLI's
    /// `--steps`, `--temperature START[:END]` as `temperature` and `temperature_end`, `--sampler`.
    fn settings(
        &self,
        steps: Option<usize>,
        temperature: Option<f32>,
        temperature_end: Option<f32>,
        sampler: Option<SamplerKind>,
    ) -> Result<Settings> {
        self.settings_for(self.grid, steps, temperature, temperature_end, sampler)
    }

    /// [`Shared::settings`] for a `grid` (steps up to its token count).
    fn settings_for(
        &self,
        grid: [usize; 2],
        steps: Option<usize>,
        temperature: Option<f32>,
        temperature_end: Option<f32>,
        sampler: Option<SamplerKind>,
    ) -> Result<Settings> {
        let steps = steps.unwrap_or(self.defaults.steps);
        if let Some(max) = self.limits.max_steps.filter(|&m| steps > m) {
            return Err(Error::param(
                "steps",
                format!("{steps} is above this service's limit of {max}"),
            ));
        }
        let space = TokenSpace {
            len: grid[0] * grid[1],
            ..self.space
        };
        Settings::new(steps, temperature.unwrap_or(self.defaults.temperature), &space)?
            .with_sampler(sampler.unwrap_or_default())
            .with_temperature_end(temperature_end)
    }

    /// Windows over a requested `grid`, within this service's `max_grid`.
    fn tiling(&self, grid: [usize; 2], stride: Option<[usize; 2]>, margin: Option<[usize; 2]>) -> Result<Tiling> {
        let max = self.limits.max_grid;
        if grid[0] > max || grid[1] > max {
            return Err(Error::param(
                "grid",
                format!(
                    "{}x{} tokens is above this service's limit of {max} per side",
                    grid[0], grid[1]
                ),
            ));
        }
        crate::tiling_for(self.grid, &self.defaults, grid, stride, margin)
    }

    /// Queues a job, or says 429 when the queue is full.
    fn submit(&self, job: Job) -> Result<(), AppError> {
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.queue.try_send(Queued {
            job,
            accepted: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => AppError::Busy {
                        retry_after_s: self.metrics.retry_after_s(self.limits.max_queue),
                    },
                    TrySendError::Disconnected(_) => AppError::WorkerGone,
                })
            }
        }
    }

    /// Waits for a job's reply, at most the request timeout.
    async fn wait(&self, reply: oneshot::Receiver<Result<Vec<Vec<u8>>>>) -> Result<Vec<Vec<u8>>, AppError> {
        let timeout = Duration::from_millis(self.limits.timeout_ms);
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(Ok(pngs))) => Ok(pngs),
            Ok(Ok(Err(e))) => Err(AppError::from(e)),
            Ok(Err(_)) => Err(AppError::WorkerGone),
            Err(_) => Err(AppError::Timeout {
                timeout_ms: self.limits.timeout_ms,
            }),
        }
    }
}

async fn generate(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Result<Response, AppError> {
    let bytes = read_body(&s, &headers, body).await?;
    let req: GenerateRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        GenerateRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let count = req.count.unwrap_or(1);
    if count == 0 || count > s.limits.max_count {
        return Err(Error::param(
            "count",
            format!("{count} images requested: must be 1..={}", s.limits.max_count),
        )
        .into());
    }
    let canvas = req.grid.is_some_and(|g| g != s.grid) || req.frames.is_some();
    if !canvas && (req.stride.is_some() || req.window_margin.is_some() || req.decode.is_some()) {
        return Err(Error::param(
            "grid",
            "stride, window_margin and decode apply to a grid larger than the bundle's: give \"grid\"",
        )
        .into());
    }
    if canvas {
        let grid = req.grid.unwrap_or(s.grid);
        let tiling = if grid == s.grid {
            None
        } else {
            Some(s.tiling(grid, req.stride, req.window_margin)?)
        };
        let settings = s.settings_for(grid, req.steps, req.temperature, req.temperature_end, req.sampler)?;
        let seed = req.seed.unwrap_or_else(crate::fresh_seed);
        return run_canvas_request(
            &s,
            CanvasJob {
                seed,
                settings,
                tiling,
                decode: req.decode.unwrap_or_default(),
                frames: req.frames,
                what: Canvas::Generate { count },
                reply: oneshot::channel().0,
            },
        )
        .await;
    }
    let settings = s.settings(req.steps, req.temperature, req.temperature_end, req.sampler)?;
    let seed = req.seed.unwrap_or_else(crate::fresh_seed);
    let (reply, rx) = oneshot::channel();
    s.submit(Job::Generate(GenerateJob {
        seed,
        count,
        settings,
        reply,
    }))?;
    let mut pngs = s.wait(rx).await?;
    if count == 1 {
        return Ok(png_response(pngs.remove(0), seed, &settings));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let json = serde_json::json!({
        "seed": seed,
        "steps": settings.steps,
        "temperature": settings.temperature,
        "temperature_end": settings.temperature_end,
        "sampler": settings.sampler,
        "images": pngs.iter().map(|p| b64.encode(p)).collect::<Vec<_>>(),
    });
    Ok(json_response(StatusCode::OK, &json))
}

async fn inpaint(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Result<Response, AppError> {
    let bytes = read_body(&s, &headers, body).await?;
    let req: InpaintRequest = parse_json(&bytes)?;
    let settings = s.settings(req.steps, req.temperature, req.temperature_end, req.sampler)?;
    // PNGs this small decode in microseconds; the body limit keeps it that way.
    let image = image::image_from_png(&base64_field(&req.image, "image")?, &s.image, "image")?;
    let (w, h) = (s.image.width, s.image.height);
    let mask = match (&req.mask, req.rect) {
        (Some(m), None) => image::mask_from_png(&base64_field(m, "mask")?, w, h, "mask")?,
        (None, Some(rect)) => image::rect_mask(rect, w, h)?,
        _ => {
            return Err(Error::param(
                "mask",
                "give exactly one of \"mask\" (base64 PNG) or \"rect\" [x, y, w, h]",
            )
            .into())
        }
    };
    let token_mask = image::pool_mask(&mask, s.grid);
    if !token_mask.iter().any(|&m| m) {
        return Err(Error::param("mask", "the mask is empty: mark the region to regenerate in white").into());
    }
    let seed = req.seed.unwrap_or_else(crate::fresh_seed);
    let (reply, rx) = oneshot::channel();
    s.submit(Job::Inpaint {
        image,
        mask,
        token_mask,
        seed,
        settings,
        decode_all: req.decode_all,
        reply,
    })?;
    let mut pngs = s.wait(rx).await?;
    Ok(png_response(pngs.remove(0), seed, &settings))
}

async fn outpaint(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Result<Response, AppError> {
    let bytes = read_body(&s, &headers, body).await?;
    let req: OutpaintRequest = parse_json(&bytes)?;
    let image = image::image_any_from_png(&base64_field(&req.image, "image")?, &s.image, "image")?;
    let e = &req.extend;
    let extend = [e.left, e.right, e.up, e.down];
    let token_px = [s.image.height / s.grid[0], s.image.width / s.grid[1]];
    crate::check_tileable(&image, &s.image, s.grid)?;
    let (grid, _) = crate::outpaint_grid([image.height, image.width], token_px, extend, s.limits.max_grid)?;
    let tiling = s.tiling(grid, req.stride, req.window_margin)?;
    let settings = s.settings_for(grid, req.steps, req.temperature, req.temperature_end, req.sampler)?;
    let seed = req.seed.unwrap_or_else(crate::fresh_seed);
    run_canvas_request(
        &s,
        CanvasJob {
            seed,
            settings,
            tiling: Some(tiling),
            decode: req.decode.unwrap_or_default(),
            frames: req.frames,
            what: Canvas::Outpaint {
                image,
                extend,
                decode_all: req.decode_all,
            },
            reply: oneshot::channel().0,
        },
    )
    .await
}

/// Queues a canvas job and answers with its PNG, or JSON when there are several images or a
/// preview.
async fn run_canvas_request(s: &Shared, mut job: CanvasJob) -> Result<Response, AppError> {
    let (reply, rx) = oneshot::channel();
    job.reply = reply;
    let (seed, settings, frames) = (job.seed, job.settings, job.frames);
    let grid = job.tiling.as_ref().map_or(s.grid, |t| t.grid());
    s.submit(Job::Canvas(job))?;
    let mut out = s.wait(rx).await?;
    let animation = frames.map(|_| out.pop().unwrap_or_default());
    if out.len() == 1 && animation.is_none() {
        return Ok(png_response(out.remove(0), seed, &settings));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut json = serde_json::json!({
        "seed": seed,
        "steps": settings.steps,
        "temperature": settings.temperature,
        "temperature_end": settings.temperature_end,
        "sampler": settings.sampler,
        "grid": grid,
        "images": out.iter().map(|p| b64.encode(p)).collect::<Vec<_>>(),
    });
    if let (Some(format), Some(bytes)) = (frames, animation) {
        json["frames"] = serde_json::Value::String(b64.encode(bytes));
        json["frames_format"] = serde_json::Value::String(format.name().into());
    }
    Ok(json_response(StatusCode::OK, &json))
}

async fn model(State(s): State<Arc<Shared>>) -> Response {
    let mut info = s.model_info.clone();
    info["limits"] = serde_json::to_value(&s.limits).unwrap_or_default();
    json_response(StatusCode::OK, &info)
}

async fn healthz(State(s): State<Arc<Shared>>) -> Result<Response, AppError> {
    if !s.worker_alive.load(Ordering::Relaxed) {
        return Err(AppError::WorkerGone);
    }
    let json = serde_json::json!({
        "status": "ok",
        "queue_depth": s.metrics.queue_depth.load(Ordering::Relaxed),
    });
    Ok(json_response(StatusCode::OK, &json))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let text = s.metrics.render(s.limits.max_queue);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        text,
    )
        .into_response()
}

/// Reads the whole body, refusing more than the limit (by `Content-Length` before reading).
async fn read_body(s: &Shared, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, AppError> {
    let limit = s.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::TooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if format!("{e:?}").contains("LengthLimitError") {
            AppError::TooLarge { limit }
        } else {
            AppError::Input {
                field: "body".into(),
                message: format!("could not read the request body: {e}"),
            }
        }
    })
}

/// Parses JSON, naming the field in errors (`steps: invalid type: string "x", expected usize`).
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (field, message) = if inner.is_syntax() || inner.is_eof() {
            ("body".to_string(), format!("malformed JSON: {inner}"))
        } else if path == "." {
            // Errors at the top level: unknown or missing fields, whose names serde puts in the message.
            ("body".to_string(), format!("invalid request: {inner}"))
        } else {
            (path.clone(), format!("invalid {path}: {inner}"))
        };
        AppError::Input { field, message }
    })
}

fn base64_field(text: &str, field: &'static str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| Error::param(field, format!("not valid base64 (standard alphabet, padded): {e}")))
}

fn png_response(png: Vec<u8>, seed: u64, settings: &Settings) -> Response {
    let mut r = (StatusCode::OK, png).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    h.insert("x-absorb-seed", HeaderValue::from(seed));
    h.insert("x-absorb-steps", HeaderValue::from(settings.steps));
    if let Ok(v) = HeaderValue::from_str(&settings.temperature.to_string()) {
        h.insert("x-absorb-temperature", v);
    }
    if let Some(v) = settings
        .temperature_end
        .and_then(|t| HeaderValue::from_str(&t.to_string()).ok())
    {
        h.insert("x-absorb-temperature-end", v);
    }
    h.insert("x-absorb-sampler", HeaderValue::from_static(settings.sampler.name()));
    r
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut r = (status, value.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// ---------------------------------------------------------------------------------------------
// Errors: the one place that maps them to status codes

/// Every way a request can fail, and its status.
#[derive(Debug)]
enum AppError {
    /// The caller's input: 400 (413 for size), naming the field.
    Input {
        field: String,
        message: String,
    },
    TooLarge {
        limit: usize,
    },
    NotFound,
    MethodNotAllowed,
    /// The queue is full: 429.
    Busy {
        retry_after_s: u64,
    },
    /// Not answered in time: 503.
    Timeout {
        timeout_ms: u64,
    },
    /// The worker thread has died: 503 (systemd's watchdog restarts the service).
    WorkerGone,
    /// The model or the machine failed: a generic 500, the chain goes to the log.
    Internal(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        if !e.is_input_error() {
            return AppError::Internal(e);
        }
        let field = match &e {
            Error::Param { name, .. } => name.to_string(),
            Error::Image { path, .. } => path.display().to_string(),
            Error::Tokens(_) => "mask".to_string(),
            _ => "body".to_string(),
        };
        AppError::Input {
            field,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, field, message, retry_after) = match self {
            AppError::Input { field, message } => (StatusCode::BAD_REQUEST, Some(field), message, None),
            AppError::TooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("body".into()),
                format!("request body is larger than this service's limit of {limit} bytes"),
                None,
            ),
            AppError::NotFound => (
                StatusCode::NOT_FOUND,
                None,
                "no such route: see GET /v1/model, POST /v1/generate, POST /v1/inpaint, GET /healthz, GET /metrics"
                    .into(),
                None,
            ),
            AppError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                "method not allowed on this route (generate and inpaint are POST, the rest GET)".into(),
                None,
            ),
            AppError::Busy { retry_after_s } => (
                StatusCode::TOO_MANY_REQUESTS,
                None,
                "the queue is full; retry after the number of seconds in Retry-After".into(),
                Some(retry_after_s),
            ),
            AppError::Timeout { timeout_ms } => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!("not answered within {timeout_ms} ms; the device is overloaded, retry later"),
                Some(1),
            ),
            AppError::WorkerGone => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the sampling worker has stopped; the service is restarting".into(),
                Some(5),
            ),
            AppError::Internal(e) => {
                log::error!("request failed: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    None,
                    "internal error (details in the service log)".into(),
                    None,
                )
            }
        };
        let mut json = serde_json::json!({ "error": message });
        if let Some(f) = field {
            json["field"] = f.into();
        }
        let mut r = json_response(status, &json);
        if let Some(s) = retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// The worker: the only thread that touches the Pipeline

/// A loaded, warmed-up pipeline on its worker thread, and the state the routes share.
pub struct Service {
    shared: Arc<Shared>,
    worker: std::thread::JoinHandle<()>,
}

impl Service {
    /// Loads the bundle and warms it up on a new thread, which then serves the queue. Returns
    /// once it is ready, or with the load error.
    pub fn start(options: &ServeOptions) -> Result<Service> {
        let (queue, jobs) = mpsc::sync_channel::<Queued>(options.limits.max_queue);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Shared>>>();
        let options = options.clone();
        let handle = std::thread::Builder::new()
            .name("absorb-worker".into())
            .spawn(move || {
                let mut config = options.provider.clone();
                if config.cache_dir.is_none() {
                    // Several directories come colon-separated; the first is ours.
                    config.cache_dir = std::env::var("CACHE_DIRECTORY")
                        .ok()
                        .and_then(|d| d.split(':').next().filter(|d| !d.is_empty()).map(PathBuf::from))
                        .map(|d| d.join("tensorrt"));
                }
                let loaded = Pipeline::load_with(&options.model, &options.runtime, &config)
                    .and_then(|mut p| warm_up(&mut p).map(|()| p));
                let mut p = match loaded {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared::new(&p, queue, options.limits.clone()));
                let _alive = AliveGuard(shared.clone());
                let _ = ready_tx.send(Ok(shared.clone()));
                work(&mut p, &jobs, &shared);
            })
            .map_err(|e| Error::io("<worker thread>", e))?;
        match ready_rx.recv() {
            Ok(Ok(shared)) => Ok(Service { shared, worker: handle }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::io(
                "<worker thread>",
                std::io::Error::other("the worker thread died while loading (see the log)"),
            )),
        }
    }

    /// The routes, for `axum::serve` or a test's `oneshot`.
    pub fn app(&self) -> Router {
        app(self.shared.clone())
    }

    /// Lets the worker finish the jobs already queued, then joins it. Call after the server has
    /// stopped accepting (graceful shutdown has answered every accepted request by then).
    pub fn stop(self) {
        let _ = self.shared.queue.send(Queued {
            job: Job::Stop,
            accepted: Instant::now(),
        });
        let _ = self.worker.join();
    }
}

/// Marks the worker dead when its thread ends, even by a panic: `/healthz` then fails and the
/// watchdog stops, so systemd restarts the service.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.worker_alive.store(false, Ordering::Relaxed);
    }
}

impl Shared {
    fn new(p: &Pipeline, queue: SyncSender<Queued>, limits: Limits) -> Shared {
        let rt = p.runtime();
        let m = p.bundle().manifest();
        let model_info = serde_json::json!({
            "bundle": {
                "dir": p.bundle().dir(),
                "sha256": p.bundle().sha256(),
                "manifest": m,
            },
            "provider": p.provider(),
            "onnxruntime": {
                "library": rt.library(),
                "version": rt.library().version,
                "threads": rt.threads(),
            },
            "cpu": crate::cpu::detect(),
            "absorb": crate::VERSION,
        });
        Shared {
            queue,
            space: p.token_space(),
            grid: p.grid(),
            image: m.image.clone(),
            defaults: m.sampling.clone(),
            model_info,
            limits,
            worker_alive: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
        }
    }
}

/// One generation with the bundle's defaults before READY=1, so the first request does not pay
/// for lazy initialisation (and a TensorRT engine build happens while systemd still waits).
fn warm_up(p: &mut Pipeline) -> Result<()> {
    let start = Instant::now();
    let settings = p.settings(None, None)?;
    let mut timings = Timings::default();
    p.generate_pixels(0, 0..1, &settings, 1, &mut |_| {}, &mut timings)?;
    log::info!("warm-up generation took {:.0?}", start.elapsed());
    Ok(())
}

fn work(p: &mut Pipeline, jobs: &Receiver<Queued>, shared: &Shared) {
    let m = &shared.metrics;
    let max_batch = shared.limits.max_batch;
    // A job taken from the queue while gathering a batch that it could not join: it runs next,
    // before anything newer, so the order stays first come, first served.
    let mut held: Option<Queued> = None;
    loop {
        let Some(q) = held.take().or_else(|| jobs.recv().ok()) else {
            break;
        };
        m.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let start = Instant::now();
        let waited = start.duration_since(q.accepted);
        let mut timings = Timings::default();
        let (answers, images, steps) = match q.job {
            Job::Stop => break,
            Job::Generate(job) if job.reply.is_closed() => {
                m.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Job::Generate(job) if job.count > max_batch => {
                let result = run_generate(p, &job, max_batch, &mut timings);
                let images = match &result {
                    Ok(_) => job.count,
                    Err(Error::Param { name: CANCELLED, .. }) => {
                        m.skipped.fetch_add(1, Ordering::Relaxed);
                        0
                    }
                    Err(_) => 0,
                };
                (vec![(job.reply, result)], images, images * job.settings.steps)
            }
            Job::Generate(job) => {
                let steps = job.settings.steps;
                let mut batch = vec![job];
                held = gather(&mut batch, jobs, max_batch, m);
                let (answers, images) = run_batch(p, batch, max_batch, &mut timings);
                (answers, images, images * steps)
            }
            Job::Canvas(job) => {
                if job.reply.is_closed() {
                    m.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let result = run_canvas(p, &job, max_batch, &mut timings);
                let images = match (&result, &job.what) {
                    (Err(_), _) => 0,
                    (Ok(_), Canvas::Generate { count }) => *count,
                    (Ok(_), Canvas::Outpaint { .. }) => 1,
                };
                (vec![(job.reply, result)], images, images * job.settings.steps)
            }
            Job::Inpaint {
                image,
                mask,
                token_mask,
                seed,
                settings,
                decode_all,
                reply,
            } => {
                if reply.is_closed() {
                    m.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let result = run_inpaint(p, &image, &mask, &token_mask, seed, &settings, decode_all, &mut timings);
                let images = usize::from(result.is_ok());
                (vec![(reply, result)], images, images * settings.steps)
            }
        };
        let busy = start.elapsed();
        m.busy_ns.fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        m.jobs.fetch_add(answers.len() as u64, Ordering::Relaxed);
        m.images.fetch_add(images as u64, Ordering::Relaxed);
        m.steps.fetch_add(steps as u64, Ordering::Relaxed);
        m.transformer_calls
            .fetch_add(timings.transformer_calls as u64, Ordering::Relaxed);
        log::debug!(
            "{} jobs: first waited {waited:.1?}, ran {busy:.1?}, {images} images",
            answers.len()
        );
        // Metrics first, so a client that reads /metrics after its answer sees its images. A
        // client that has gone meanwhile just does not get it.
        for (reply, result) in answers {
            let _ = reply.send(result);
        }
    }
}

/// Moves queued generate jobs with the same settings into `batch` while all their images fit in
/// one transformer batch. Returns the first job that cannot join, which must run next.
fn gather(batch: &mut Vec<GenerateJob>, jobs: &Receiver<Queued>, max_batch: usize, m: &Metrics) -> Option<Queued> {
    let settings = batch[0].settings;
    let mut images: usize = batch.iter().map(|j| j.count).sum();
    while images < max_batch {
        let q = jobs.try_recv().ok()?;
        match q.job {
            Job::Generate(job) if job.settings == settings && images + job.count <= max_batch => {
                m.queue_depth.fetch_sub(1, Ordering::Relaxed);
                if job.reply.is_closed() {
                    m.skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                images += job.count;
                batch.push(job);
            }
            job => {
                return Some(Queued {
                    job,
                    accepted: q.accepted,
                })
            }
        }
    }
    None
}

/// An answer to send: where, and what.
type Answer = (Reply, Result<Vec<Vec<u8>>>);

/// Runs generate jobs with equal settings in shared transformer calls. Returns each job's answer
/// and the number of images made.
fn run_batch(
    p: &mut Pipeline,
    batch: Vec<GenerateJob>,
    max_batch: usize,
    timings: &mut Timings,
) -> (Vec<Answer>, usize) {
    let settings = batch[0].settings;
    let streams: Vec<(u64, u64)> = batch
        .iter()
        .flat_map(|j| (0..j.count as u64).map(move |i| (j.seed, i)))
        .collect();
    match batch_pngs(p, &streams, &settings, max_batch, timings) {
        Ok(pngs) => {
            let mut pngs = pngs.into_iter();
            let answers = batch
                .into_iter()
                .map(|job| (job.reply, Ok(pngs.by_ref().take(job.count).collect())))
                .collect();
            (answers, streams.len())
        }
        Err(e) => {
            // Error is not Clone: the first job gets the original, the others its text. Inputs
            // were validated before queueing, so this is the model or the machine: a 500.
            let text = format!("{e:#}");
            let mut first = Some(e);
            let answers = batch
                .into_iter()
                .map(|job| {
                    let e = first
                        .take()
                        .unwrap_or_else(|| Error::io("<batch>", std::io::Error::other(text.clone())));
                    (job.reply, Err(e))
                })
                .collect();
            (answers, 0)
        }
    }
}

/// PNGs of the `(seed, index)` streams, each the CLI's single-image PNG for that seed and index.
fn batch_pngs(
    p: &mut Pipeline,
    streams: &[(u64, u64)],
    settings: &Settings,
    max_batch: usize,
    timings: &mut Timings,
) -> Result<Vec<Vec<u8>>> {
    let tokens = p.generate_streams(streams, settings, max_batch, &mut |_| {}, timings)?;
    let range = p.bundle().manifest().image.range;
    let tensors = p.decode(&tokens, p.grid(), max_batch, timings)?;
    streams
        .iter()
        .zip(&tensors)
        .map(|(&(seed, index), t)| {
            let meta = p.generate_metadata(seed, settings, index, 1, None);
            image::png_bytes(&image::to_pixels(t, range), Some(&meta))
        })
        .collect()
}

/// The pseudo-parameter of the error that ends a job whose client has gone.
const CANCELLED: &str = "cancelled";

/// Generates a job larger than one batch, `max_batch` images at a time, stopping between batches
/// if the client has gone. Image `i` is the CLI's image `i` for this seed.
fn run_generate(p: &mut Pipeline, job: &GenerateJob, max_batch: usize, timings: &mut Timings) -> Result<Vec<Vec<u8>>> {
    let (seed, count, settings) = (job.seed, job.count, &job.settings);
    let mut pngs = Vec::with_capacity(count);
    let mut first = 0u64;
    while (first as usize) < count {
        if job.reply.is_closed() {
            // Nobody reads this error: it only ends the job early.
            return Err(Error::param(CANCELLED, "the client went away"));
        }
        let n = (count - first as usize).min(max_batch) as u64;
        let pixels = p.generate_pixels(seed, first..first + n, settings, max_batch, &mut |_| {}, timings)?;
        for (i, px) in pixels.iter().enumerate() {
            // Image i of a response is the CLI's directory output for index i (a count-1
            // response is also the CLI's `--count 1 -o x.png`): one image with its own index.
            let meta = p.generate_metadata(seed, settings, first + i as u64, 1, None);
            pngs.push(image::png_bytes(px, Some(&meta))?);
        }
        first += n;
    }
    Ok(pngs)
}

/// Inpaints like `absorb inpaint`: same tokens, same compositing, same metadata, same bytes.
#[allow(clippy::too_many_arguments)]
fn run_inpaint(
    p: &mut Pipeline,
    input: &Tensor,
    mask: &Mask,
    token_mask: &[bool],
    seed: u64,
    settings: &Settings,
    decode_all: bool,
    timings: &mut Timings,
) -> Result<Vec<Vec<u8>>> {
    let range = p.bundle().manifest().image.range;
    let tokens = p.inpaint(input, token_mask, seed, settings, &mut |_| {}, timings)?;
    let out = p.decode(&[tokens], p.grid(), 1, timings)?;
    let mut pixels = image::to_pixels(&out[0], range);
    if !decode_all {
        image::composite(&mut pixels, &image::to_pixels(input, range), mask);
    }
    let mut meta = p.metadata("inpaint");
    crate::record_settings(&mut meta, settings);
    meta.seed = Some(seed);
    meta.index = Some(0);
    meta.count = Some(1);
    Ok(vec![image::png_bytes(&pixels, Some(&meta))?])
}

/// A larger grid, an outpainting or a preview: the CLI's `generate`/`outpaint` code path
/// ([`Pipeline::make`], [`Pipeline::outpaint`]), so both give the same bytes. Returns the PNGs,
/// then the animation when asked for.
fn run_canvas(p: &mut Pipeline, job: &CanvasJob, max_batch: usize, timings: &mut Timings) -> Result<Vec<Vec<u8>>> {
    let count = match job.what {
        Canvas::Generate { count } => count,
        Canvas::Outpaint { .. } => 1,
    };
    let plan = Plan {
        tiling: job.tiling.as_ref(),
        decode: job.decode,
        frames: job.frames.is_some(),
        // The CLI's default layout of a preview of several images.
        columns: image::grid_columns(count),
        max_batch,
    };
    let trained = p.grid();
    let (made, metas) = match &job.what {
        Canvas::Generate { count } => {
            let made = p.make(job.seed, 0..*count as u64, &job.settings, &plan, &mut |_| {}, timings)?;
            let metas: Vec<image::Metadata> = (0..*count as u64)
                .map(|i| {
                    let mut meta = p.generate_metadata(job.seed, &job.settings, i, 1, None);
                    if let Some(t) = &job.tiling {
                        crate::record_tiling(&mut meta, t, trained, job.decode);
                    }
                    meta
                })
                .collect();
            (made, metas)
        }
        Canvas::Outpaint {
            image: input,
            extend,
            decode_all,
        } => {
            let made = p.outpaint(
                input,
                *extend,
                !decode_all,
                job.seed,
                &job.settings,
                &plan,
                &mut |_| {},
                timings,
            )?;
            let mut meta = p.metadata("outpaint");
            crate::record_settings(&mut meta, &job.settings);
            if let Some(t) = &job.tiling {
                crate::record_tiling(&mut meta, t, trained, job.decode);
            }
            meta.seed = Some(job.seed);
            meta.index = Some(0);
            meta.count = Some(1);
            (made, vec![meta])
        }
    };
    let mut out = made
        .pixels
        .iter()
        .zip(&metas)
        .map(|(px, meta)| image::png_bytes(px, Some(meta)))
        .collect::<Result<Vec<_>>>()?;
    if let (Some(format), Some(frames)) = (job.frames, &made.frames) {
        out.push(image::animation_bytes(frames, format, 100, 1500)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Shutdown and watchdog

/// Resolves on SIGTERM or SIGINT: axum then stops accepting and waits for in-flight requests.
async fn shutdown_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    notify: Arc<systemd::Notifier>,
    shared: Arc<Shared>,
) {
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    shared.shutting_down.store(true, Ordering::Relaxed);
    let pending = shared.metrics.in_flight.load(Ordering::Relaxed);
    log::info!("shutting down: no new connections; finishing {pending} accepted requests");
    notify.send(&format!("STOPPING=1\nSTATUS=draining {pending} requests"));
}

/// Pings systemd's watchdog at half its period while the worker thread is alive; a dead worker
/// stops the pings and systemd restarts the service.
async fn watchdog(notify: Arc<systemd::Notifier>, shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        if shared.worker_alive.load(Ordering::Relaxed) {
            notify.send("WATCHDOG=1");
        } else {
            if !shared.shutting_down.load(Ordering::Relaxed) {
                log::error!("the sampling worker has stopped; no more watchdog pings");
            }
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Upper bounds of the latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Routes are a fixed set of labels, so a scanner cannot blow up the series count.
const ROUTES: [&str; 7] = [
    "/v1/generate",
    "/v1/inpaint",
    "/v1/outpaint",
    "/v1/model",
    "/healthz",
    "/metrics",
    "other",
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS_S.len()],
    sum_s: f64,
    count: u64,
}

#[derive(Default)]
struct Metrics {
    /// (route, status) -> count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    queue_depth: AtomicUsize,
    in_flight: AtomicUsize,
    cancelled: AtomicU64,
    skipped: AtomicU64,
    jobs: AtomicU64,
    images: AtomicU64,
    steps: AtomicU64,
    transformer_calls: AtomicU64,
    busy_ns: AtomicU64,
}

impl Metrics {
    fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route, status)).or_default() += 1;
        }
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry(route).or_default();
            for (b, &le) in h.buckets.iter_mut().zip(&LATENCY_BUCKETS_S) {
                if s <= le {
                    *b += 1;
                }
            }
            h.sum_s += s;
            h.count += 1;
        }
    }

    /// Seconds a client should wait before retrying: the time the full queue takes to drain at
    /// the measured job time, at least 1.
    fn retry_after_s(&self, max_queue: usize) -> u64 {
        let jobs = self.jobs.load(Ordering::Relaxed).max(1);
        let per_job_s = self.busy_ns.load(Ordering::Relaxed) as f64 / jobs as f64 / 1e9;
        (per_job_s * max_queue as f64).ceil().clamp(1.0, 60.0) as u64
    }

    /// Prometheus text format 0.0.4.
    fn render(&self, max_queue: usize) -> String {
        let mut o = String::new();
        let busy_s = self.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let images = self.images.load(Ordering::Relaxed);
        let steps = self.steps.load(Ordering::Relaxed);
        let per_busy_s = |n: u64| if busy_s > 0.0 { n as f64 / busy_s } else { 0.0 };
        let _ = writeln!(
            o,
            "# HELP absorb_requests_total Requests answered, by route and HTTP status."
        );
        let _ = writeln!(o, "# TYPE absorb_requests_total counter");
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(o, "absorb_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        let _ = writeln!(
            o,
            "# HELP absorb_request_duration_seconds Time from request to response."
        );
        let _ = writeln!(o, "# TYPE absorb_request_duration_seconds histogram");
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                for (le, n) in LATENCY_BUCKETS_S.iter().zip(&h.buckets) {
                    let _ = writeln!(
                        o,
                        "absorb_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    o,
                    "absorb_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    o,
                    "absorb_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                    h.sum_s
                );
                let _ = writeln!(
                    o,
                    "absorb_request_duration_seconds_count{{route=\"{route}\"}} {}",
                    h.count
                );
            }
        }
        let gauges: [(&str, &str, &str, f64); 10] = [
            (
                "absorb_queue_depth",
                "gauge",
                "Jobs waiting for the worker.",
                self.queue_depth.load(Ordering::Relaxed) as f64,
            ),
            (
                "absorb_queue_capacity",
                "gauge",
                "Jobs that may wait (--max-queue).",
                max_queue as f64,
            ),
            (
                "absorb_requests_in_flight",
                "gauge",
                "Generate and inpaint requests being handled.",
                self.in_flight.load(Ordering::Relaxed) as f64,
            ),
            (
                "absorb_requests_cancelled_total",
                "counter",
                "Requests whose client went away before the answer.",
                self.cancelled.load(Ordering::Relaxed) as f64,
            ),
            (
                "absorb_jobs_skipped_total",
                "counter",
                "Jobs not run, or stopped between batches, because their client went away.",
                self.skipped.load(Ordering::Relaxed) as f64,
            ),
            (
                "absorb_images_total",
                "counter",
                "Images generated or inpainted.",
                images as f64,
            ),
            (
                "absorb_steps_total",
                "counter",
                "Reverse steps run, summed over images.",
                steps as f64,
            ),
            (
                "absorb_busy_seconds_total",
                "counter",
                "Time the worker spent on jobs.",
                busy_s,
            ),
            (
                "absorb_images_per_second",
                "gauge",
                "Images per busy second of the worker, since start.",
                per_busy_s(images),
            ),
            (
                "absorb_steps_per_second",
                "gauge",
                "Reverse steps per busy second of the worker, since start.",
                per_busy_s(steps),
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
        let calls = self.transformer_calls.load(Ordering::Relaxed);
        let _ = writeln!(o, "# HELP absorb_transformer_calls_total Transformer graph runs.");
        let _ = writeln!(
            o,
            "# TYPE absorb_transformer_calls_total counter\nabsorb_transformer_calls_total {calls}"
        );
        o
    }
}

/// Counts a generate/inpaint request as in flight from arrival until its handler is done or
/// dropped (a client that hangs up drops it), and records cancellations.
struct InFlight<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Middleware: counts every request by route and status, times it, tracks in-flight work.
async fn track(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = ROUTES
        .iter()
        .copied()
        .find(|r| *r == req.uri().path())
        .unwrap_or("other");
    let start = Instant::now();
    let work = matches!(route, "/v1/generate" | "/v1/inpaint" | "/v1/outpaint");
    let mut guard = work.then(|| {
        s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
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
    s.metrics.record(route, response.status().as_u16(), start.elapsed());
    response
}

// ---------------------------------------------------------------------------------------------
// systemd's notify protocol, by hand: one datagram per message to $NOTIFY_SOCKET

mod systemd {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Each extension of the start timeout while loading (EXTEND_TIMEOUT_USEC), sent every third
    /// of it so one lost datagram does not matter.
    const START_EXTENSION: Duration = Duration::from_secs(60);

    /// Loading is never extended past this: a TensorRT engine build on a Jetson Orin takes
    /// minutes; an hour means something hangs, and systemd's timeout should fire.
    const MAX_START_EXTENSION: Duration = Duration::from_secs(3600);

    /// Where systemd listens, if it does (`NOTIFY_SOCKET`: a path, or `@name` in the abstract
    /// namespace). Sending never fails the service: errors are logged.
    pub struct Notifier {
        target: Option<(UnixDatagram, SocketAddr)>,
    }

    impl Notifier {
        pub fn from_env() -> Notifier {
            let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
                return Notifier { target: None };
            };
            let path = path.to_string_lossy().into_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => abstract_addr(name),
                None => SocketAddr::from_pathname(&path),
            };
            // Non-blocking: a manager that stops reading must never stall a request or the drain
            // (a full socket drops the message; the next ping or status line follows soon).
            let socket = UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s));
            match (socket, addr) {
                (Ok(socket), Ok(addr)) => Notifier {
                    target: Some((socket, addr)),
                },
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("NOTIFY_SOCKET={path} is not usable: {e}; not notifying systemd");
                    Notifier { target: None }
                }
            }
        }

        pub fn send(&self, message: &str) {
            if let Some((socket, addr)) = &self.target {
                if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                    log::warn!("notifying systemd ({message:?}) failed: {e}");
                }
            }
        }

        pub fn enabled(&self) -> bool {
            self.target.is_some()
        }
    }

    #[cfg(target_os = "linux")]
    fn abstract_addr(name: &str) -> std::io::Result<SocketAddr> {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    }

    #[cfg(not(target_os = "linux"))]
    fn abstract_addr(_name: &str) -> std::io::Result<SocketAddr> {
        Err(std::io::Error::other("abstract sockets exist only on Linux"))
    }

    /// The watchdog period if systemd asked for pings for this process (`WATCHDOG_USEC`, and
    /// `WATCHDOG_PID` when set must be ours).
    pub fn watchdog_period() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec))
    }

    /// While the returned flag stays true, keeps extending systemd's start timeout (a TensorRT
    /// engine build can take minutes), up to [`MAX_START_EXTENSION`] in total.
    pub fn extend_start_timeout(notify: Arc<Notifier>) -> Arc<AtomicBool> {
        let starting = Arc::new(AtomicBool::new(true));
        if !notify.enabled() {
            return starting;
        }
        let flag = starting.clone();
        let spawned = std::thread::Builder::new()
            .name("absorb-start-timeout".into())
            .spawn(move || {
                let begin = Instant::now();
                let mut next = Instant::now();
                while flag.load(Ordering::Relaxed) && begin.elapsed() < MAX_START_EXTENSION {
                    if Instant::now() >= next {
                        let elapsed = begin.elapsed().as_secs();
                        notify.send(&format!(
                            "EXTEND_TIMEOUT_USEC={}\nSTATUS=loading the bundle and warming up ({elapsed} s)",
                            START_EXTENSION.as_micros()
                        ));
                        next += START_EXTENSION / 3;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the start-timeout thread: {e}");
        }
        starting
    }
}
