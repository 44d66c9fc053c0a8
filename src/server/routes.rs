//! The HTTP routes: request bodies parsed and validated into [`Job`]s (the same builders as the
//! CLI's flags), queued for the worker, and answered as a PNG or JSON; every error mapped to its
//! status in one place ([`AppError`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use tokio::sync::oneshot;
use tower_http::catch_panic::CatchPanicLayer;

use super::connections::Phase;
use super::metrics::{self, track, RequestId};
use super::requests::{self, Route};
use super::shared::{self, Answer, Model, Refused, Shared, Work};
use super::tasks;
use crate::error::{Error, Result};
use crate::image::AnimationFormat;
use crate::job::Job;
use crate::param::Param;
use crate::sampler::Settings;

/// The routes over `shared`; tests may drive it without a socket.
pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/v1/generate", post(generate))
        .route("/v1/inpaint", post(inpaint))
        .route("/v1/outpaint", post(outpaint))
        .route("/v1/vary", post(vary))
        .route("/v1/jobs", post(create_job))
        .route("/v1/jobs/{id}", get(job_status).delete(delete_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/images/{k}", get(job_image))
        .route("/v1/model", get(model))
        .route("/v1/models/reload", post(reload))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(super::openai::routes())
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(CatchPanicLayer::custom(HandlerPanicked(shared.metrics.panics.clone())))
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

/// A handler that panicked (a bug) answers 500 like any internal error and is counted in
/// `absorb_panics_total`; the connection and the service go on. [`track`] logs it with the
/// request's id.
#[derive(Clone)]
struct HandlerPanicked(prometheus_client::metrics::counter::Counter);

impl tower_http::catch_panic::ResponseForPanic for HandlerPanicked {
    type ResponseBody = axum::body::Body;

    fn response_for_panic(&mut self, panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
        self.0.inc();
        AppError::Internal(Error::Panicked {
            during: "a request handler ran".into(),
            message: crate::error::panic_message(panic.as_ref()),
        })
        .into_response()
    }
}

/// `POST /v1/generate`, `/v1/inpaint` and `/v1/outpaint`: the job prepared, queued, answered.
async fn submit(
    s: Arc<Shared>,
    id: RequestId,
    headers: HeaderMap,
    body: Body,
    route: Route,
) -> Result<Response, AppError> {
    let (job, animation, canvas, model) = prepare(&s, &headers, body, route).await?;
    answer(&s, id, job, animation, canvas, model).await
}

/// The bundle a request names (`model`; none: the first), checked usable.
pub(super) fn model_of(s: &Shared, name: Option<&str>) -> Result<Arc<Model>, AppError> {
    let model = s
        .model(name)
        .map_err(|(name, known)| AppError::NoModel { name, known })?;
    model.usable()?;
    Ok(model)
}

/// The body read, parsed and checked ([`requests::parse`]), its images decoded off the async
/// threads: the job, its animation format and whether the answer names the grid.
async fn prepare(
    s: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
    route: Route,
) -> Result<(Job, Option<AnimationFormat>, bool, Arc<Model>), AppError> {
    let bytes = read_body(s, headers, body).await?;
    let model = model_of(s, requests::model_of(&bytes)?.as_deref())?;
    let bundle = model.usable()?;
    let parsed = requests::parse(route, bundle, &s.limits, &bytes)?;
    if route == Route::Generate && s.test_panic.handler == Some(parsed.seed()) {
        panic!("injected by ABSORB_TEST_PANIC (handler:{})", parsed.seed());
    }
    let (animation, canvas) = (parsed.animation, parsed.canvas);
    let job = if parsed.decodes_images() {
        let m = model.clone();
        decode_off_thread(s, move || parsed.into_job(m.usable()?)).await?
    } else {
        parsed.into_job(bundle)?
    };
    Ok((job, animation, canvas, model))
}

async fn generate(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    submit(s, id, headers, body, Route::Generate).await
}

async fn inpaint(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    submit(s, id, headers, body, Route::Inpaint).await
}

async fn outpaint(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    submit(s, id, headers, body, Route::Outpaint).await
}

async fn vary(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    submit(s, id, headers, body, Route::Vary).await
}

/// `POST /v1/jobs?type=generate|inpaint|outpaint|vary` (default generate): the synchronous route's
/// body, queued; answers 202 with the job's id, its place in the queue and where to look.
async fn create_job(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let kind = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("type="))
        .unwrap_or("generate");
    let route = match kind {
        "generate" => Route::Generate,
        "inpaint" => Route::Inpaint,
        "outpaint" => Route::Outpaint,
        "vary" => Route::Vary,
        other => {
            return Err(Error::param(
                Param::JobType,
                format!("\"{other}\" is not a job type: use generate, inpaint, outpaint or vary"),
            )
            .into())
        }
    };
    let (job, animation, _, model) = prepare(&s, &headers, body, route).await?;
    let Some((job_id, entry)) = s.tasks.create(&s, route, job.seed(), job.settings().steps) else {
        return Err(AppError::Busy {
            retry_after_s: s.metrics.retry_after_s(),
        });
    };
    let position = s.metrics.queue_depth.get();
    let (reply, rx) = oneshot::channel();
    let queued = s.submit(Work {
        id: id.0,
        job,
        animation,
        reply,
        progress: Some(entry.clone()),
        model,
    });
    if let Err(r) = queued {
        s.tasks.discard(job_id);
        return Err(refused(r));
    }
    tasks::wait(s.clone(), job_id, entry.clone(), rx);
    let mut json = serde_json::to_value(entry.status()).unwrap_or_default();
    json["position"] = position.into();
    json["events"] = format!("/v1/jobs/{job_id}/events").into();
    let mut r = json_response(StatusCode::ACCEPTED, &json);
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{job_id}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

impl From<tasks::Missing> for AppError {
    fn from(m: tasks::Missing) -> Self {
        AppError::NoJob {
            gone: matches!(m, tasks::Missing::Gone),
        }
    }
}

/// A job id from the path; one that is not a number is no job either.
fn job_id(id: &str) -> Result<u64, AppError> {
    id.parse::<u64>().map_err(|_| AppError::NoJob { gone: false })
}

fn job_entry(s: &Shared, id: &str) -> Result<Arc<tasks::Entry>, AppError> {
    Ok(s.tasks.get(s, job_id(id)?)?)
}

/// A job's status as JSON: state, progress, and once done its images' URLs.
fn status_json(st: &tasks::Status) -> serde_json::Value {
    let mut json = serde_json::to_value(st).unwrap_or_default();
    if let Some(a) = &st.answer {
        json["images"] = (0..a.pngs.len())
            .map(|k| format!("/v1/jobs/{}/images/{k}", st.id))
            .collect();
    }
    json
}

/// `GET /v1/jobs/{id}`.
async fn job_status(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, AppError> {
    let entry = job_entry(&s, &id)?;
    Ok(json_response(StatusCode::OK, &status_json(&entry.status())))
}

/// `DELETE /v1/jobs/{id}`: cancels a queued or running job (it stops before its next
/// transformer call); a finished one is dropped. Answers the status it had.
async fn delete_job(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, AppError> {
    let status = s.tasks.delete(&s, job_id(&id)?)?;
    Ok(json_response(StatusCode::OK, &status_json(&status)))
}

/// `GET /v1/jobs/{id}/images/{k}`: a finished job's PNG (with its metadata).
async fn job_image(State(s): State<Arc<Shared>>, Path((id, k)): Path<(String, String)>) -> Result<Response, AppError> {
    let entry = job_entry(&s, &id)?;
    let st = entry.status();
    let png = st
        .answer
        .as_ref()
        .and_then(|a| a.pngs.get(k.parse::<usize>().ok()?))
        .ok_or(AppError::NoJob { gone: false })?;
    let mut r = Response::new(Body::from(png.clone()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    Ok(r)
}

/// `GET /v1/jobs/{id}/events`: Server-Sent Events, `status` after every change (queued,
/// running, each transformer call; with a new live preview, its images as base64 PNGs in
/// `preview`), then one `done` (its images as base64 PNGs), `failed` or `cancelled`, and the
/// stream ends. A slow reader skips to the latest status, never piles up. Previews are made
/// only while a stream follows the job.
async fn job_events(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, AppError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let entry = job_entry(&s, &id)?;
    let mut rx = entry.subscribe();
    rx.mark_changed();
    let b64 = |pngs: &[Vec<u8>]| -> serde_json::Value {
        let b64 = base64::engine::general_purpose::STANDARD;
        pngs.iter().map(|p| b64.encode(p)).collect()
    };
    // The state: the receiver (none once the job has finished) and the preview last sent.
    let start: (Option<_>, Option<Arc<tasks::Preview>>) = (Some(rx), None);
    let stream = futures_util::stream::unfold(start, move |(rx, sent)| async move {
        let mut rx = rx?;
        rx.changed().await.ok()?;
        let st = rx.borrow_and_update().clone();
        let mut json = status_json(&st);
        let name = match st.state {
            tasks::State::Done => "done",
            tasks::State::Failed => "failed",
            tasks::State::Cancelled => "cancelled",
            _ => "status",
        };
        if let Some(a) = &st.answer {
            json["pngs"] = b64(&a.pngs);
        }
        let new = st.preview.filter(|p| !sent.as_ref().is_some_and(|s| Arc::ptr_eq(s, p)));
        if let Some(p) = &new {
            json["preview"] = serde_json::json!({ "step": p.step, "first": p.first, "pngs": b64(&p.pngs) });
        }
        let event = Event::default().event(name).data(json.to_string());
        let next = (!st.state.finished()).then_some(rx);
        Some((Ok::<_, std::convert::Infallible>(event), (next, new.or(sent))))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// `GET /`: the page (one self-contained file, compiled in).
async fn page() -> Response {
    let mut r = Response::new(Body::from(PAGE));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// The browser UI: `src/server/page.html`.
const PAGE: &str = include_str!("page.html");

pub(super) fn refused(r: Refused) -> AppError {
    match r {
        Refused::Busy { retry_after_s } => AppError::Busy { retry_after_s },
        Refused::WorkerGone => AppError::WorkerGone,
    }
}

/// Runs `decode` (request images: bounded by their declared size) on a blocking thread, at
/// most [`Shared::decode_slots`] at once, so that the async threads stay free for `/healthz`
/// and the other routes.
pub(super) async fn decode_off_thread<T: Send + 'static>(
    s: &Shared,
    decode: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, AppError> {
    let _slot = s.decode_slots.acquire().await.map_err(|_| AppError::WorkerGone)?;
    match tokio::task::spawn_blocking(decode).await {
        Ok(r) => r.map_err(AppError::from),
        Err(e) => Err(AppError::Internal(Error::Panicked {
            during: "a request image was decoded".into(),
            message: e.to_string(),
        })),
    }
}

/// Queues `job` and answers with its PNG, or JSON when there are several images or a preview
/// (with the grid when `canvas`: a larger grid, an outpainting or a preview).
async fn answer(
    s: &Shared,
    id: RequestId,
    job: Job,
    animation: Option<AnimationFormat>,
    canvas: bool,
    model: Arc<Model>,
) -> Result<Response, AppError> {
    let (reply, rx) = oneshot::channel();
    let (seed, settings, grid) = (job.seed(), *job.settings(), job.grid(model.usable()?));
    let strength = match job.start() {
        crate::job::Start::Vary { strength, .. } => Some(*strength),
        _ => None,
    };
    s.submit(Work {
        id: id.0,
        job,
        animation,
        reply,
        progress: None,
        model,
    })
    .map_err(refused)?;
    let format = animation;
    let Answer { mut pngs, animation } = wait(s, rx).await?;
    if pngs.len() == 1 && animation.is_none() {
        return Ok(png_response(pngs.remove(0), seed, &settings, strength));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut json = serde_json::json!({
        "seed": seed,
        "steps": settings.steps,
        "temperature": settings.temperature,
        "temperature_end": settings.temperature_end,
        "sampler": settings.sampler,
    });
    if let Some(p) = settings.top_p {
        json["top_p"] = serde_json::json!(p);
    }
    if settings.sampler.uses_threshold() {
        json["threshold"] = serde_json::json!(settings.threshold_or_default());
    }
    json["cache"] = settings
        .cache
        .map_or(serde_json::json!("off"), |n| serde_json::json!(n));
    if let Some(w) = settings.guidance {
        json["guidance"] = serde_json::json!(w);
    }
    if let Some(v) = strength {
        json["strength"] = serde_json::json!(v);
    }
    if canvas {
        json["grid"] = serde_json::json!(grid);
    }
    json["images"] = pngs.iter().map(|p| b64.encode(p)).collect();
    if let (Some(format), Some(bytes)) = (format, animation) {
        json["frames"] = serde_json::Value::String(b64.encode(bytes));
        json["frames_format"] = serde_json::Value::String(format.name().into());
    }
    Ok(json_response(StatusCode::OK, &json))
}

/// Waits for a job's answer, at most the request timeout, and no longer than the drain deadline
/// once the service is stopping (dropping `rx` then tells the worker nobody waits).
pub(super) async fn wait(s: &Shared, rx: oneshot::Receiver<Result<Answer>>) -> Result<Answer, AppError> {
    let mut phase = s.phase.subscribe();
    let answer = tokio::select! {
        answer = tokio::time::timeout(shared::timeout(&s.limits), rx) => answer,
        _ = phase.wait_for(|p| *p == Phase::Expired) => {
            s.metrics.drain_expired.inc();
            return Err(AppError::ShuttingDown { drain_ms: s.limits.drain_timeout_ms });
        }
    };
    match answer {
        Ok(Ok(Ok(answer))) => Ok(answer),
        Ok(Ok(Err(e))) => Err(AppError::from(e)),
        Ok(Err(_)) => Err(AppError::WorkerGone),
        Err(_) => Err(AppError::Timeout {
            timeout_ms: s.limits.timeout_ms,
        }),
    }
}

/// `GET /v1/model[?name=NAME]`: one bundle (default: the first), the provider, ONNX Runtime,
/// the CPU, the samplers, the limits, and the names of every bundle.
async fn model(State(s): State<Arc<Shared>>, uri: axum::http::Uri) -> Result<Response, AppError> {
    let name = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("name="))
        .map(percent_decode);
    let model = s
        .model(name.as_deref())
        .map_err(|(name, known)| AppError::NoModel { name, known })?;
    let mut info = s.model_info(&model);
    info["limits"] = serde_json::to_value(&s.limits).unwrap_or_default();
    info["models"] = s.catalog().names().into();
    Ok(json_response(StatusCode::OK, &info))
}

/// `%XX` escapes and `+` of a query value (bundle names are plain, but a client may escape them).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(c) => {
                        out.push(c);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `POST /v1/models/reload`: reads the bundle list again (as SIGHUP does) and answers the names.
async fn reload(State(s): State<Arc<Shared>>) -> Result<Response, AppError> {
    // Reading the bundles hashes their graph files: off the async threads.
    let shared = s.clone();
    let read = tokio::task::spawn_blocking(move || shared.reload())
        .await
        .map_err(|e| {
            AppError::Internal(Error::Panicked {
                during: "the bundle list was read again".into(),
                message: e.to_string(),
            })
        })?;
    // Another reload running: try again shortly. An unreadable list is the service's own
    // configuration: 500 with the reason (the list in use is kept).
    let catalog = read.map_err(|message| match message.as_str() {
        shared::RELOAD_BUSY => AppError::Busy { retry_after_s: 1 },
        _ => AppError::ModelUnavailable(format!("the bundle list was kept: {message}")),
    })?;
    let models: Vec<serde_json::Value> = catalog
        .entries
        .iter()
        .map(|e| serde_json::json!({"name": e.name, "dir": e.dir, "error": e.bundle.as_ref().err()}))
        .collect();
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "models": models })))
}

async fn healthz(State(s): State<Arc<Shared>>) -> Result<Response, AppError> {
    if !s.worker_alive.load(Ordering::Relaxed) {
        return Err(AppError::WorkerGone);
    }
    let json = serde_json::json!({
        "status": "ok",
        "queue_depth": s.metrics.queue_depth.get(),
    });
    Ok(json_response(StatusCode::OK, &json))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let (queued, running) = s.tasks.unfinished();
    s.metrics.jobs_queued.set(queued as i64);
    s.metrics.jobs_running.set(running as i64);
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE))],
        s.metrics.render(),
    )
        .into_response()
}

/// Reads the whole body, refusing more than the limit (by `Content-Length` before reading) and a
/// body that takes longer than the body timeout (408).
pub(super) async fn read_body(s: &Shared, headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, AppError> {
    let limit = s.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::TooLarge { limit });
    }
    let within_ms = s.limits.body_timeout_ms;
    let read = tokio::time::timeout(Duration::from_millis(within_ms), axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        s.metrics.body_timeouts.inc();
        return Err(AppError::BodyTimeout { within_ms });
    };
    read.map_err(|e| {
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

fn png_response(png: Vec<u8>, seed: u64, settings: &Settings, strength: Option<f32>) -> Response {
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
    if let Some(v) = settings.top_p.and_then(|p| HeaderValue::from_str(&p.to_string()).ok()) {
        h.insert("x-absorb-top-p", v);
    }
    h.insert("x-absorb-sampler", HeaderValue::from_static(settings.sampler.name()));
    if settings.sampler.uses_threshold() {
        if let Ok(v) = HeaderValue::from_str(&settings.threshold_or_default().to_string()) {
            h.insert("x-absorb-threshold", v);
        }
    }
    let cache = settings.cache.map_or_else(|| "off".to_string(), |n| n.to_string());
    if let Ok(v) = HeaderValue::from_str(&cache) {
        h.insert("x-absorb-cache", v);
    }
    if let Some(v) = settings
        .guidance
        .and_then(|w| HeaderValue::from_str(&w.to_string()).ok())
    {
        h.insert("x-absorb-guidance", v);
    }
    if let Some(v) = strength.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        h.insert("x-absorb-strength", v);
    }
    r
}

pub(super) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut r = (status, value.to_string()).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// ---------------------------------------------------------------------------------------------
// Errors: the one place that maps them to status codes

/// Every way a request can fail, and its status.
#[derive(Debug)]
pub(super) enum AppError {
    /// The caller's input: 400 (413 for size), naming the field.
    Input {
        field: String,
        message: String,
    },
    TooLarge {
        limit: usize,
    },
    NotFound,
    /// No such asynchronous job: 404, or 410 when it was dropped from the store.
    NoJob {
        gone: bool,
    },
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
    /// The body did not arrive in time: 408, and the connection is closed.
    BodyTimeout {
        within_ms: u64,
    },
    /// Still waiting at the drain deadline after SIGTERM: 503.
    ShuttingDown {
        drain_ms: u64,
    },
    /// The bundle asked for cannot be read or loaded: 500 with the reason (it is the
    /// service's configuration, not a secret), the other bundles unaffected.
    ModelUnavailable(String),
    /// No bundle of that name: 404 naming the field `model` and the names there are.
    NoModel {
        name: String,
        known: String,
    },
    /// The model or the machine failed: a generic 500, the chain goes to the log.
    Internal(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        if let Error::ModelUnavailable { .. } = e {
            return AppError::ModelUnavailable(e.to_string());
        }
        if !e.is_input_error() {
            return AppError::Internal(e);
        }
        let field = match &e {
            Error::Param { param, .. } => param.key().to_string(),
            Error::Request { field, .. } => field.clone(),
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

/// An error as every route family renders it: its status, the field it names, the message, the
/// seconds of `Retry-After`, and whether the connection closes after it.
pub(super) struct ErrorParts {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
    pub retry_after: Option<u64>,
    pub close: bool,
}

impl AppError {
    /// What the answer says; [`IntoResponse`] renders it as absorb's JSON, `openai.rs` as OpenAI's.
    pub(super) fn parts(self) -> ErrorParts {
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
                "no such route: see GET /, GET /v1/model, POST /v1/generate, POST /v1/inpaint, POST /v1/outpaint, \
                 POST /v1/jobs, GET /v1/jobs/ID, GET /healthz, GET /metrics"
                    .into(),
                None,
            ),
            AppError::NoJob { gone: false } => (
                StatusCode::NOT_FOUND,
                None,
                "no such job (ids come from POST /v1/jobs)".into(),
                None,
            ),
            AppError::NoJob { gone: true } => (
                StatusCode::GONE,
                None,
                "this job finished and its results are no longer kept (--job-keep-s, --max-jobs)".into(),
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
            AppError::BodyTimeout { within_ms } => {
                return ErrorParts {
                    status: StatusCode::REQUEST_TIMEOUT,
                    field: Some("body".into()),
                    message: format!("the request body did not arrive within {within_ms} ms (--body-timeout-ms)"),
                    retry_after: None,
                    close: true,
                };
            }
            AppError::ModelUnavailable(message) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("model".into()),
                message,
                None,
            ),
            AppError::NoModel { name, known } => (
                StatusCode::NOT_FOUND,
                Some("model".into()),
                format!("\"{name}\" is not a model of this service: {known}"),
                None,
            ),
            AppError::ShuttingDown { drain_ms } => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!(
                    "the service is stopping and this request was not done within its {drain_ms} ms drain deadline; retry on the restarted service"
                ),
                Some(5),
            ),
            AppError::Internal(e) => {
                log::error!("request failed: {e:#}");
                let message = match &e {
                    // A bug, not the machine: say so (the panic's own text is in the log).
                    Error::Panicked { .. } => {
                        "internal error: handling this request panicked; the service goes on (details in the service log)"
                    }
                    _ => "internal error (details in the service log)",
                };
                (StatusCode::INTERNAL_SERVER_ERROR, None, message.into(), None)
            }
        };
        ErrorParts {
            status,
            field,
            message,
            retry_after,
            close: false,
        }
    }
}

impl ErrorParts {
    /// `body` as the answer, with the status and headers these parts call for.
    pub(super) fn respond(&self, body: &serde_json::Value) -> Response {
        let mut r = json_response(self.status, body);
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let parts = self.parts();
        let mut json = serde_json::json!({ "error": parts.message });
        if let Some(f) = &parts.field {
            json["field"] = f.as_str().into();
        }
        parts.respond(&json)
    }
}
