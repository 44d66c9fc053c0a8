//! The OpenAI images API next to absorb's own routes, for the clients people already have (the
//! OpenAI SDKs and what is built on them): `POST /v1/images/generations` (JSON),
//! `/v1/images/edits` and `/v1/images/variations` (multipart forms), `GET /v1/models` and
//! `/v1/models/{id}`. Each request becomes the spec the native route builds (`GenerateSpec`,
//! `InpaintSpec`, `VarySpec`) and runs through the same queue and worker, so its PNG bytes equal
//! the native route's and the CLI's for the same seed and settings. absorb's own settings (`seed`,
//! `steps`, `temperature`, `temperature_end`, `top_p`, `sampler`, `threshold`, `cache`, `guidance`, and
//! `strength` for variations) are extra fields (the SDKs' `extra_body`). Errors take OpenAI's
//! shape, `{"error": {"message", "type", "param", "code"}}`, with the native route's status.
//!
//! A class-conditional bundle reads the prompt as a class name (case-insensitive; empty: the
//! classes are spread over the images as without `class`); any other prompt is a 400 listing the
//! classes. A bundle without classes takes any prompt and says, in `revised_prompt` (empty) and
//! `absorb_note`, that it steered nothing. Fields that would ask for something absorb does not do
//! are refused, naming the field (README "The OpenAI images API" lists each).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use tokio::sync::oneshot;

use super::metrics::RequestId;
use super::routes::{self, AppError};
use super::shared::{Model, Shared, Work};
use crate::bundle::Bundle;
use crate::error::Error;
use crate::image;
use crate::job::{class_index, CacheMode, Job, Sampling};
use crate::param::Param;
use crate::sampler::SamplerKind;
use crate::spec::{GenerateSpec, InpaintSpec, VarySpec};

/// The OpenAI routes, merged into the service's router.
pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/images/variations", post(variations))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
}

/// An error in OpenAI's shape, with the status (and `Retry-After`) the native routes give it.
pub(super) struct OpenAiError(AppError);

impl From<AppError> for OpenAiError {
    fn from(e: AppError) -> Self {
        OpenAiError(e)
    }
}

impl From<Error> for OpenAiError {
    fn from(e: Error) -> Self {
        OpenAiError(AppError::from(e))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let parts = self.0.parts();
        // absorb's name for what OpenAI calls otherwise.
        let param = parts.field.as_deref().map(|f| if f == "count" { "n" } else { f });
        let (kind, code) = match parts.status.as_u16() {
            404 if param == Some("model") => ("invalid_request_error", Some("model_not_found")),
            429 => ("rate_limit_error", Some("rate_limit_exceeded")),
            400..=499 => ("invalid_request_error", None),
            _ => ("server_error", None),
        };
        parts.respond(&serde_json::json!({
            "error": {"message": parts.message, "type": kind, "param": param, "code": code}
        }))
    }
}

fn input(field: &str, message: impl Into<String>) -> AppError {
    AppError::Input {
        field: field.into(),
        message: format!("invalid {field}: {}", message.into()),
    }
}

/// absorb's own settings, as extra fields of any of the three requests.
#[derive(Debug, Default)]
struct Extras {
    seed: Option<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
}

impl Extras {
    fn sampling(&self, class: Option<usize>) -> Sampling {
        Sampling {
            steps: self.steps,
            temperature: self.temperature,
            temperature_end: self.temperature_end,
            top_p: self.top_p,
            sampler: self.sampler,
            threshold: self.threshold,
            cache: self.cache,
            guidance: self.guidance,
            class,
        }
    }
}

/// OpenAI's fields that shape the answer rather than the image: each is taken when absorb does
/// what it asks, else refused naming it.
#[derive(Debug, Default)]
struct Output {
    model: Option<String>,
    size: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    output_compression: Option<serde_json::Value>,
    quality: Option<String>,
    background: Option<String>,
    style: Option<String>,
    stream: Option<bool>,
    partial_images: Option<u32>,
    input_fidelity: Option<String>,
    moderation: Option<String>,
    user: Option<String>,
    safety_identifier: Option<String>,
}

impl Output {
    /// The bundle `model` names, once every field is one absorb does.
    fn check(&self, s: &Shared) -> Result<Arc<Model>, AppError> {
        let model = routes::model_of(s, self.model.as_deref())?;
        let spec = &model.usable()?.manifest().image;
        let own = format!("{}x{}", spec.width, spec.height);
        if let Some(size) = self.size.as_deref().filter(|&z| z != "auto" && z != own) {
            return Err(input(
                "size",
                format!(
                    "\"{size}\": this model makes {own} images; give size {own} or auto (larger canvases: \
                     the native POST /v1/generate with \"grid\")"
                ),
            ));
        }
        if let Some(f) = self.response_format.as_deref().filter(|&f| f != "b64_json") {
            return Err(input(
                "response_format",
                format!("\"{f}\": absorb keeps no images to link to; use b64_json"),
            ));
        }
        if let Some(f) = self.output_format.as_deref().filter(|&f| f != "png") {
            return Err(input(
                "output_format",
                format!("\"{f}\": absorb writes PNG (with its metadata) only"),
            ));
        }
        if self.output_compression.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(input(
                "output_compression",
                "PNG is lossless: there is no compression level",
            ));
        }
        if let Some(q) = self.quality.as_deref().filter(|&q| q != "auto" && q != "standard") {
            return Err(input(
                "quality",
                format!("\"{q}\": absorb has no quality levels; \"steps\" sets the work per image"),
            ));
        }
        if let Some(b) = self.background.as_deref().filter(|&b| b != "auto" && b != "opaque") {
            return Err(input("background", format!("\"{b}\": images are opaque")));
        }
        if let Some(st) = &self.style {
            return Err(input("style", format!("\"{st}\": absorb has no styles")));
        }
        if self.stream == Some(true) || self.partial_images.is_some_and(|n| n > 0) {
            let field = if self.stream == Some(true) {
                "stream"
            } else {
                "partial_images"
            };
            return Err(input(
                field,
                "no streaming here: POST /v1/jobs and its /events stream progress and previews",
            ));
        }
        if let Some(f) = &self.input_fidelity {
            return Err(input(
                "input_fidelity",
                format!("\"{f}\": known tokens are always kept exactly"),
            ));
        }
        // absorb has no content moderation to set: OpenAI's two levels are taken and change nothing.
        if let Some(m) = self.moderation.as_deref().filter(|&m| m != "auto" && m != "low") {
            return Err(input("moderation", format!("\"{m}\": auto or low")));
        }
        if let Some(user) = self.user.as_deref().or(self.safety_identifier.as_deref()) {
            log::debug!("request for end user {user:?}");
        }
        Ok(model)
    }
}

/// What the prompt did.
enum Steer {
    /// Asked for this class.
    Class(String),
    /// A class-conditional bundle and an empty prompt: the classes spread over the images.
    Spread,
    /// A bundle without classes: nothing to steer.
    Unsteered,
}

impl Steer {
    fn revised_prompt(&self) -> &str {
        match self {
            Steer::Class(name) => name,
            Steer::Spread | Steer::Unsteered => "",
        }
    }

    fn note(&self) -> Option<&'static str> {
        match self {
            Steer::Class(_) => None,
            Steer::Spread => Some("an empty prompt asks for no class: the classes are spread over the images"),
            Steer::Unsteered => Some("this model has no classes: the prompt did not steer the images"),
        }
    }
}

/// The class a prompt names, case-insensitive, on a class-conditional bundle.
fn prompt_class(bundle: &Bundle, prompt: Option<&str>) -> Result<(Option<usize>, Steer), AppError> {
    let Some(names) = bundle.manifest().classes.as_deref() else {
        return Ok((None, Steer::Unsteered));
    };
    let p = prompt.unwrap_or("").trim();
    if p.is_empty() {
        return Ok((None, Steer::Spread));
    }
    match names.iter().position(|n| n.eq_ignore_ascii_case(p)) {
        Some(i) => Ok((Some(i), Steer::Class(names[i].clone()))),
        None => {
            let mut shown: String = p.chars().take(60).collect();
            if shown.len() < p.len() {
                shown.push_str("...");
            }
            Err(input(
                "prompt",
                format!(
                    "\"{shown}\" names no class of this model; the prompt is one of: {} (or empty for any)",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// `POST /v1/images/generations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Generation {
    prompt: Option<String>,
    n: Option<usize>,
    model: Option<String>,
    size: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    output_compression: Option<serde_json::Value>,
    quality: Option<String>,
    background: Option<String>,
    style: Option<String>,
    stream: Option<bool>,
    partial_images: Option<u32>,
    moderation: Option<String>,
    user: Option<String>,
    safety_identifier: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
}

impl Generation {
    fn split(self) -> (Option<String>, Option<usize>, Output, Extras) {
        let output = Output {
            model: self.model,
            size: self.size,
            response_format: self.response_format,
            output_format: self.output_format,
            output_compression: self.output_compression,
            quality: self.quality,
            background: self.background,
            style: self.style,
            stream: self.stream,
            partial_images: self.partial_images,
            input_fidelity: None,
            moderation: self.moderation,
            user: self.user,
            safety_identifier: self.safety_identifier,
        };
        let extras = Extras {
            seed: self.seed,
            steps: self.steps,
            temperature: self.temperature,
            temperature_end: self.temperature_end,
            top_p: self.top_p,
            sampler: self.sampler,
            threshold: self.threshold,
            cache: self.cache,
            guidance: self.guidance,
        };
        (self.prompt, self.n, output, extras)
    }
}

async fn generations(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let bytes = routes::read_body(&s, &headers, body).await?;
    let req: Generation = super::requests::parse_json(&bytes)?;
    let (prompt, n, output, extras) = req.split();
    let model = output.check(&s)?;
    let bundle = model.usable()?;
    let (class, steer) = prompt_class(bundle, prompt.as_deref())?;
    let job = GenerateSpec {
        seed: extras.seed.unwrap_or_else(crate::fresh_seed),
        count: n.unwrap_or(1),
        sampling: extras.sampling(class),
        max_batch: s.limits.max_batch,
        caps: s.limits.caps(),
        ..GenerateSpec::default()
    }
    .job(bundle)?;
    images(&s, id, job, &steer, model.clone()).await
}

/// A multipart form: its files and its text fields, each name once (`image[]` is `image`).
#[derive(Default)]
struct Form {
    files: HashMap<String, Bytes>,
    texts: HashMap<String, String>,
}

fn bad_form(e: multer::Error) -> AppError {
    AppError::Input {
        field: "body".into(),
        message: format!("malformed multipart form: {e}"),
    }
}

async fn read_form(s: &Shared, headers: &HeaderMap, body: Body, known: &[&str]) -> Result<Form, AppError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| AppError::Input {
        field: "body".into(),
        message: format!(
            "expected a multipart/form-data body (an image file and fields), got content type \"{content_type}\""
        ),
    })?;
    let bytes = routes::read_body(s, headers, body).await?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(bytes) });
    let mut parts = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    while let Some(field) = parts.next_field().await.map_err(bad_form)? {
        let raw = field.name().unwrap_or("").to_string();
        let name = raw.strip_suffix("[]").unwrap_or(&raw).to_string();
        // Files by name, whatever the part says: a client may send an image without a filename,
        // or a number as a file part; either way it is read as what the field is.
        let is_file = FILE_FIELDS.contains(&name.as_str());
        let data = field.bytes().await.map_err(bad_form)?;
        if !known.contains(&name.as_str()) {
            return Err(AppError::Input {
                field: "body".into(),
                message: format!(
                    "invalid request: unknown field `{name}`, expected one of {}",
                    known.join(", ")
                ),
            });
        }
        if form.files.contains_key(&name) || form.texts.contains_key(&name) {
            return Err(input(
                &name,
                "given more than once (absorb takes one image per request)",
            ));
        }
        if is_file {
            form.files.insert(name, data);
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| input(&name, "not UTF-8 text"))?;
            form.texts.insert(name, text);
        }
    }
    Ok(form)
}

impl Form {
    fn text(&self, name: &str) -> Option<&str> {
        self.texts.get(name).map(String::as_str)
    }

    /// A text field parsed as JSON would (numbers, `true`): the SDKs send every field as text.
    fn value<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, AppError> {
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        let as_json = serde_json::from_str::<T>(text);
        let as_string = serde_json::from_value::<T>(serde_json::Value::String(text.to_string()));
        as_json
            .or(as_string)
            .map(Some)
            .map_err(|e| input(name, format!("\"{text}\": {e}")))
    }

    fn file(&self, name: &str) -> Result<&Bytes, AppError> {
        self.files.get(name).ok_or_else(|| AppError::Input {
            field: name.into(),
            message: format!("missing field `{name}` (a PNG file)"),
        })
    }

    fn output(&self) -> Result<Output, AppError> {
        Ok(Output {
            model: self.value("model")?,
            size: self.value("size")?,
            response_format: self.value("response_format")?,
            output_format: self.value("output_format")?,
            output_compression: self.value("output_compression")?,
            quality: self.value("quality")?,
            background: self.value("background")?,
            style: self.value("style")?,
            stream: self.value("stream")?,
            partial_images: self.value("partial_images")?,
            input_fidelity: self.value("input_fidelity")?,
            moderation: self.value("moderation")?,
            user: self.value("user")?,
            safety_identifier: self.value("safety_identifier")?,
        })
    }

    fn extras(&self) -> Result<Extras, AppError> {
        Ok(Extras {
            seed: self.value("seed")?,
            steps: self.value("steps")?,
            temperature: self.value("temperature")?,
            temperature_end: self.value("temperature_end")?,
            top_p: self.value("top_p")?,
            sampler: self.value("sampler")?,
            threshold: self.value("threshold")?,
            cache: self.value("cache")?,
            guidance: self.value("guidance")?,
        })
    }
}

/// The form fields that are files; every other field is text.
const FILE_FIELDS: [&str; 2] = ["image", "mask"];

/// The form fields every multipart route takes.
const FORM_COMMON: [&str; 22] = [
    "image",
    "n",
    "model",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "quality",
    "background",
    "style",
    "stream",
    "partial_images",
    "input_fidelity",
    "moderation",
    "user",
    "safety_identifier",
    "seed",
    "steps",
    "temperature",
    "temperature_end",
    "top_p",
    "sampler",
];

fn form_fields(more: &[&'static str]) -> Vec<&'static str> {
    let mut v = FORM_COMMON.to_vec();
    v.extend_from_slice(&["threshold", "cache", "guidance"]);
    v.extend_from_slice(more);
    v
}

/// `POST /v1/images/edits`: inpainting where the mask (or, without one, the image itself) is
/// fully transparent.
async fn edits(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let form = read_form(&s, &headers, body, &form_fields(&["mask", "prompt"])).await?;
    let model = form.output()?.check(&s)?;
    let (class, steer) = prompt_class(model.usable()?, form.text("prompt"))?;
    let extras = form.extras()?;
    let image_png = form.file("image")?.clone();
    let mask_png = form.files.get("mask").cloned();
    let seed = extras.seed.unwrap_or_else(crate::fresh_seed);
    let count = form.value("n")?.unwrap_or(1);
    let (sampling, caps, max_batch) = (extras.sampling(class), s.limits.caps(), s.limits.max_batch);
    let m = model.clone();
    let job = routes::decode_off_thread(&s, move || {
        let bundle = m.usable()?;
        let spec = &bundle.manifest().image;
        let image = image::image_from_png(&image_png, spec, "image")?;
        let mask = match &mask_png {
            Some(m) => image::mask_from_alpha(m, spec.width, spec.height, "mask")?,
            None => image::mask_from_alpha(&image_png, spec.width, spec.height, "image").map_err(|e| match e {
                Error::Image { message, .. } => Error::param(
                    Param::Mask,
                    format!("no mask was given and the image {message}; or send a mask"),
                ),
                e => e,
            })?,
        };
        if !mask.data.iter().any(|&m| m) {
            return Err(Error::param(
                Param::Mask,
                "no pixel is fully transparent (alpha 0): nothing to regenerate",
            ));
        }
        InpaintSpec {
            seed,
            sampling,
            count,
            max_batch,
            caps,
            ..InpaintSpec::new(image, mask)
        }
        .job(bundle)
    })
    .await?;
    images(&s, id, job, &steer, model).await
}

/// `POST /v1/images/variations`: absorb's variations at the request's `strength` (an extra
/// field), else the bundle's.
async fn variations(
    State(s): State<Arc<Shared>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, OpenAiError> {
    let form = read_form(&s, &headers, body, &form_fields(&["strength", "class"])).await?;
    let model = form.output()?.check(&s)?;
    let bundle = model.usable()?;
    let extras = form.extras()?;
    // No prompt here: a class, if any, is absorb's own field.
    let class = match form.text("class") {
        Some(c) => Some(class_index(bundle, c)?),
        None => None,
    };
    let strength: Option<f32> = form.value("strength")?;
    crate::spec::strength(bundle, strength)?;
    let image_png = form.file("image")?.clone();
    let seed = extras.seed.unwrap_or_else(crate::fresh_seed);
    let count = form.value("n")?.unwrap_or(1);
    let (sampling, caps, max_batch) = (extras.sampling(class), s.limits.caps(), s.limits.max_batch);
    let m = model.clone();
    let job = routes::decode_off_thread(&s, move || {
        let bundle = m.usable()?;
        let image = image::image_from_png(&image_png, &bundle.manifest().image, "image")?;
        VarySpec {
            strength,
            seed,
            count,
            sampling,
            max_batch,
            caps,
            ..VarySpec::new(image, &image_png)
        }
        .job(bundle)
    })
    .await?;
    let steer = match class {
        Some(c) => Steer::Class(model.usable()?.manifest().classes.as_deref().unwrap_or_default()[c].clone()),
        None => Steer::Class(String::new()),
    };
    images(&s, id, job, &steer, model).await
}

/// Runs `job` through the queue and answers OpenAI's images response.
async fn images(
    s: &Shared,
    id: RequestId,
    job: Job,
    steer: &Steer,
    model: Arc<Model>,
) -> Result<Response, OpenAiError> {
    let seed = job.seed();
    let spec = model.usable()?.manifest().image.clone();
    let (reply, rx) = oneshot::channel();
    s.submit(Work {
        id: id.0,
        job,
        animation: None,
        reply,
        progress: None,
        model,
    })
    .map_err(routes::refused)?;
    let answer = routes::wait(s, rx).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<serde_json::Value> = answer
        .pngs
        .iter()
        .map(|png| serde_json::json!({"b64_json": b64.encode(png), "revised_prompt": steer.revised_prompt()}))
        .collect();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut json = serde_json::json!({
        "created": created,
        "data": data,
        "output_format": "png",
        "size": format!("{}x{}", spec.width, spec.height),
        "seed": seed,
    });
    if let Some(note) = steer.note() {
        json["absorb_note"] = note.into();
    }
    Ok(routes::json_response(axum::http::StatusCode::OK, &json))
}

/// One bundle as OpenAI's model object, with what absorb adds under `absorb` (a broken bundle:
/// its error).
fn model_object(s: &Shared, model: &Model) -> serde_json::Value {
    let created = std::fs::metadata(model.dir.join("model.json"))
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let loaded = s.is_loaded(model);
    let absorb = match &model.bundle {
        Ok(b) => {
            let m = b.manifest();
            serde_json::json!({
                "size": format!("{}x{}", m.image.width, m.image.height),
                "tokens": [m.tokens.height, m.tokens.width],
                "classes": m.classes,
                "sampling": m.sampling,
                "sha256": b.sha256(),
                "loaded": loaded,
            })
        }
        Err(e) => serde_json::json!({"error": e, "loaded": false}),
    };
    serde_json::json!({
        "id": model.name,
        "object": "model",
        "created": created,
        "owned_by": "absorb",
        "absorb": absorb,
    })
}

/// `GET /v1/models`: every bundle, in order (the first is the default).
async fn models(State(s): State<Arc<Shared>>) -> Response {
    let catalog = s.catalog();
    let data: Vec<serde_json::Value> = catalog.entries.iter().map(|m| model_object(&s, m)).collect();
    routes::json_response(
        axum::http::StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
}

/// `GET /v1/models/{id}`.
async fn model(State(s): State<Arc<Shared>>, Path(name): Path<String>) -> Result<Response, OpenAiError> {
    let model = s
        .model(Some(&name))
        .map_err(|(name, known)| AppError::NoModel { name, known })?;
    Ok(routes::json_response(
        axum::http::StatusCode::OK,
        &model_object(&s, &model),
    ))
}
