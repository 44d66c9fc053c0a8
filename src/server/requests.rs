//! The service's request bodies: JSON parsed and checked against the bundle's manifest and the
//! service's [`Limits`] into a [`Parsed`] request, which becomes a [`Job`] once its images are
//! decoded. Nothing here needs the graphs or an async runtime, so the fuzz targets
//! (`fuzz/fuzz_targets/`) drive exactly what a request body reaches.

use base64::Engine as _;
use serde::Deserialize;

use super::Limits;
use crate::error::{Error, Result};
use crate::image::{self, AnimationFormat};
use crate::job::{self, CacheMode, Canvas, Job, Sampling};
use crate::limits;
use crate::param::Param;
use crate::sampler::SamplerKind;
use crate::spec::{self, Caps, GenerateSpec, InpaintSpec, OutpaintSpec, VarySpec};
use crate::{Bundle, DecodeMode};

/// `POST /v1/generate`. An empty body means all defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    /// The bundle, read before the body is parsed ([`model_of`]).
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    seed: Option<u64>,
    count: Option<usize>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
    /// A class-conditional bundle's class, by name or index (the CLI's `--class`).
    class: Option<serde_json::Value>,
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
    /// The bundle, read before the body is parsed ([`model_of`]).
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    image: String,
    extend: Extend,
    seed: Option<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
    class: Option<serde_json::Value>,
    stride: Option<[usize; 2]>,
    window_margin: Option<[usize; 2]>,
    decode: Option<DecodeMode>,
    frames: Option<AnimationFormat>,
    #[serde(default)]
    decode_all: bool,
    outpaint_edge: Option<usize>,
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
    /// The bundle, read before the body is parsed ([`model_of`]).
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    image: String,
    mask: Option<String>,
    rect: Option<[usize; 4]>,
    seed: Option<u64>,
    count: Option<usize>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
    class: Option<serde_json::Value>,
    #[serde(default)]
    decode_all: bool,
}

/// `POST /v1/vary`: a base64 PNG, the share of its tokens to redo, and how many variations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VaryRequest {
    /// The bundle, read before the body is parsed ([`model_of`]).
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    image: String,
    strength: Option<f32>,
    seed: Option<u64>,
    count: Option<usize>,
    steps: Option<usize>,
    temperature: Option<f32>,
    temperature_end: Option<f32>,
    top_p: Option<f32>,
    sampler: Option<SamplerKind>,
    threshold: Option<f32>,
    cache: Option<CacheMode>,
    guidance: Option<f32>,
    class: Option<serde_json::Value>,
}

/// The routes that take a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/generate`
    Generate,
    /// `POST /v1/inpaint`
    Inpaint,
    /// `POST /v1/outpaint`
    Outpaint,
    /// `POST /v1/vary`
    Vary,
}

/// A request body that parsed and passed every check that needs no pixels.
#[derive(Debug)]
pub struct Parsed {
    pending: Pending,
    /// The animation of the reverse process asked for, if any.
    pub animation: Option<AnimationFormat>,
    /// True when the answer names the grid (a larger grid, an outpainting or a preview).
    pub canvas: bool,
}

/// What an inpaint request regenerates: a mask PNG (white = regenerate) or a rectangle.
#[derive(Debug)]
enum Region {
    Mask(Vec<u8>),
    Rect([usize; 4]),
}

#[derive(Debug)]
enum Pending {
    Ready(Job),
    /// An edit's fields but its image, which is decoded off the async threads.
    Inpaint {
        image: Vec<u8>,
        region: Region,
        seed: u64,
        count: usize,
        sampling: Sampling,
        keep_input: bool,
        max_batch: usize,
        caps: Caps,
    },
    Outpaint {
        image: Vec<u8>,
        extend: [usize; 4],
        seed: u64,
        sampling: Sampling,
        canvas: Canvas,
        keep_input: bool,
        edge: Option<usize>,
        frames: bool,
        max_batch: usize,
        caps: Caps,
    },
    Vary {
        image: Vec<u8>,
        spec: VaryFields,
    },
}

/// A variation request's fields but its image.
#[derive(Debug)]
struct VaryFields {
    strength: Option<f32>,
    seed: u64,
    count: usize,
    sampling: Sampling,
    max_batch: usize,
    caps: Caps,
}

impl Parsed {
    /// True when [`Parsed::into_job`] decodes images (CPU work the service runs off its async
    /// threads).
    pub fn decodes_images(&self) -> bool {
        !matches!(self.pending, Pending::Ready(_))
    }

    /// The seed the job will run with (drawn fresh when the body gave none).
    pub fn seed(&self) -> u64 {
        match &self.pending {
            Pending::Ready(job) => job.seed(),
            Pending::Inpaint { seed, .. } | Pending::Outpaint { seed, .. } => *seed,
            Pending::Vary { spec, .. } => spec.seed,
        }
    }

    /// Decodes the request's images (bounded by their declared size) and builds the job.
    pub fn into_job(self, bundle: &Bundle) -> Result<Job> {
        let spec = &bundle.manifest().image;
        match self.pending {
            Pending::Ready(job) => Ok(job),
            Pending::Inpaint {
                image,
                region,
                seed,
                count,
                sampling,
                keep_input,
                max_batch,
                caps,
            } => {
                let (w, h) = (spec.width, spec.height);
                let mask = match region {
                    Region::Mask(m) => image::mask_from_png(&m, w, h, "mask")?,
                    Region::Rect(rect) => image::rect_mask(rect, w, h)?,
                };
                InpaintSpec {
                    image: image::image_from_png(&image, spec, "image")?,
                    mask,
                    seed,
                    sampling,
                    keep_input,
                    count,
                    max_batch,
                    caps,
                }
                .job(bundle)
            }
            Pending::Outpaint {
                image,
                extend,
                seed,
                sampling,
                canvas,
                keep_input,
                edge,
                frames,
                max_batch,
                caps,
            } => {
                let f = bundle.manifest().token_pixels();
                let side = caps.max_grid.unwrap_or(limits::MAX_GRID_SIDE);
                OutpaintSpec {
                    image: image::image_any_from_png(&image, spec, "image", [side * f[1], side * f[0]])?,
                    extend,
                    seed,
                    sampling,
                    canvas,
                    keep_input,
                    edge,
                    frames,
                    max_batch,
                    caps,
                }
                .job(bundle)
            }
            Pending::Vary { image, spec: f } => VarySpec {
                strength: f.strength,
                seed: f.seed,
                count: f.count,
                sampling: f.sampling,
                max_batch: f.max_batch,
                caps: f.caps,
                ..VarySpec::new(image::image_from_png(&image, spec, "image")?, &image)
            }
            .job(bundle),
        }
    }
}

/// The bundle a body names in `model` (a string; absent or null: none). A body that is not a
/// JSON object says nothing here: its parse reports it.
pub fn model_of(body: &[u8]) -> Result<Option<String>> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        model: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Peek>(body) {
        Ok(Peek {
            model: Some(serde_json::Value::String(name)),
        }) => Ok(Some(name)),
        Ok(Peek {
            model: None | Some(serde_json::Value::Null),
        })
        | Err(_) => Ok(None),
        Ok(Peek { model: Some(other) }) => Err(Error::Request {
            field: "model".into(),
            message: format!("invalid model: {other} is not a bundle's name (a string)"),
        }),
    }
}

/// Parses and checks a body for `route`.
pub fn parse(route: Route, bundle: &Bundle, limits: &Limits, body: &[u8]) -> Result<Parsed> {
    match route {
        Route::Generate => generate(bundle, limits, body),
        Route::Inpaint => inpaint(bundle, limits, body),
        Route::Outpaint => outpaint(bundle, limits, body),
        Route::Vary => vary(bundle, limits, body),
    }
}

fn vary(bundle: &Bundle, limits: &Limits, body: &[u8]) -> Result<Parsed> {
    let req: VaryRequest = parse_json(body)?;
    let sampling = sampling_of!(req, bundle);
    let caps = limits.caps();
    // Everything but the image is checked before the image is decoded.
    spec::check_sampling(bundle, &sampling, &caps, bundle.manifest().grid())?;
    spec::strength(bundle, req.strength)?;
    let count = req.count.unwrap_or(1);
    limits::check_range(Param::Count, count, caps.max_count.min(limits::MAX_IMAGES))?;
    let image = base64_field(&req.image, Param::Image)?;
    Ok(Parsed {
        pending: Pending::Vary {
            image,
            spec: VaryFields {
                strength: req.strength,
                seed: req.seed.unwrap_or_else(crate::fresh_seed),
                count,
                sampling,
                max_batch: limits.max_batch,
                caps,
            },
        },
        animation: None,
        canvas: false,
    })
}

fn generate(bundle: &Bundle, limits: &Limits, body: &[u8]) -> Result<Parsed> {
    let req: GenerateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        GenerateRequest::default()
    } else {
        parse_json(body)?
    };
    let trained = bundle.manifest().grid();
    let canvas = req.grid.is_some_and(|g| g != trained) || req.frames.is_some();
    if !canvas && (req.stride.is_some() || req.window_margin.is_some() || req.decode.is_some()) {
        return Err(Error::param(
            Param::Grid,
            "stride, window_margin and decode apply to a grid larger than the bundle's: give \"grid\"",
        ));
    }
    let spec = GenerateSpec {
        seed: req.seed.unwrap_or_else(crate::fresh_seed),
        count: req.count.unwrap_or(1),
        sampling: sampling_of!(req, bundle),
        canvas: Canvas {
            grid: req.grid,
            stride: req.stride,
            window_margin: req.window_margin,
            decode: req.decode.unwrap_or_default(),
        },
        frames: req.frames.is_some(),
        max_batch: limits.max_batch,
        caps: limits.caps(),
        ..GenerateSpec::default()
    };
    Ok(Parsed {
        pending: Pending::Ready(spec.job(bundle)?),
        animation: req.frames,
        canvas,
    })
}

fn inpaint(bundle: &Bundle, limits: &Limits, body: &[u8]) -> Result<Parsed> {
    let req: InpaintRequest = parse_json(body)?;
    let sampling = sampling_of!(req, bundle);
    // The sampler fields are checked before any image is decoded.
    spec::check_sampling(bundle, &sampling, &limits.caps(), bundle.manifest().grid())?;
    let image = base64_field(&req.image, Param::Image)?;
    let region = match (&req.mask, req.rect) {
        (Some(m), None) => Region::Mask(base64_field(m, Param::Mask)?),
        (None, Some(rect)) => Region::Rect(rect),
        _ => {
            return Err(Error::param(
                Param::Mask,
                "give exactly one of \"mask\" (base64 PNG) or \"rect\" [x, y, w, h]",
            ))
        }
    };
    Ok(Parsed {
        pending: Pending::Inpaint {
            image,
            region,
            seed: req.seed.unwrap_or_else(crate::fresh_seed),
            count: limits::check_range(
                Param::Count,
                req.count.unwrap_or(1),
                limits.caps().max_count.min(limits::MAX_IMAGES),
            )?,
            sampling,
            keep_input: !req.decode_all,
            max_batch: limits.max_batch,
            caps: limits.caps(),
        },
        animation: None,
        canvas: false,
    })
}

fn outpaint(bundle: &Bundle, limits: &Limits, body: &[u8]) -> Result<Parsed> {
    let req: OutpaintRequest = parse_json(body)?;
    let image = base64_field(&req.image, Param::Image)?;
    let sampling = sampling_of!(req, bundle);
    spec::check_sampling(bundle, &sampling, &limits.caps(), bundle.manifest().grid())?;
    let e = &req.extend;
    Ok(Parsed {
        pending: Pending::Outpaint {
            image,
            extend: [e.left, e.right, e.up, e.down],
            seed: req.seed.unwrap_or_else(crate::fresh_seed),
            sampling,
            canvas: Canvas {
                grid: None,
                stride: req.stride,
                window_margin: req.window_margin,
                decode: req.decode.unwrap_or_default(),
            },
            keep_input: !req.decode_all,
            edge: req.outpaint_edge,
            frames: req.frames.is_some(),
            max_batch: limits.max_batch,
            caps: limits.caps(),
        },
        animation: req.frames,
        canvas: true,
    })
}

/// The sampler fields every request has, as a [`Sampling`] (the class looked up in `$bundle`).
macro_rules! sampling_of {
    ($req:expr, $bundle:expr) => {
        Sampling {
            steps: $req.steps,
            temperature: $req.temperature,
            temperature_end: $req.temperature_end,
            top_p: $req.top_p,
            sampler: $req.sampler,
            threshold: $req.threshold,
            cache: $req.cache,
            guidance: $req.guidance,
            class: class_of($bundle, $req.class.as_ref())?,
        }
    };
}
use sampling_of;

/// A request's `class`: a name (string) or an index (number) of the bundle's classes.
fn class_of(bundle: &Bundle, given: Option<&serde_json::Value>) -> Result<Option<usize>> {
    let text = match given {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(other) => {
            let mut shown = other.to_string();
            if shown.len() > 40 {
                let cut = (0..=40).rev().find(|&i| shown.is_char_boundary(i)).unwrap_or(0);
                shown.truncate(cut);
                shown.push_str("...");
            }
            return Err(Error::param(
                Param::Class,
                format!(
                    "{shown} is neither a class name (a string) nor an index (a whole number); \
                     leave \"class\" out (or null) for none"
                ),
            ));
        }
    };
    job::class_index(bundle, &text).map(Some)
}

/// Parses JSON, naming the field in errors (`steps: invalid type: string "x", expected usize`).
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // A number that does not fit (1e400, 2^64) is a syntax error to serde_json, raised while
        // reading that field's value: it belongs to the field, not to the body.
        let number = inner.is_syntax() && path != "." && {
            let m = inner.to_string();
            m.starts_with("number out of range") || m.starts_with("invalid number")
        };
        let (field, message) = if number {
            (path.clone(), format!("invalid {path}: {inner}"))
        } else if inner.is_syntax() || inner.is_eof() {
            ("body".to_string(), format!("malformed JSON: {inner}"))
        } else if path == "." {
            // Errors at the top level: unknown or missing fields, whose names serde puts in the message.
            ("body".to_string(), format!("invalid request: {inner}"))
        } else {
            (path.clone(), format!("invalid {path}: {inner}"))
        };
        Error::Request { field, message }
    })?;
    // One JSON value and nothing after it (else `{"model": "a"} x` would be half read).
    de.end().map_err(|e| Error::Request {
        field: "body".into(),
        message: format!("malformed JSON: {e}"),
    })?;
    Ok(value)
}

fn base64_field(text: &str, field: Param) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| Error::param(field, format!("not valid base64 (standard alphabet, padded): {e}")))
}
