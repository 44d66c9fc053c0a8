//! A job: the one description of what to make, built by the CLI, the service and the batch
//! writer alike, and run by [`Pipeline::run`](crate::Pipeline::run).
//!
//! A job says where sampling starts ([`Start`]: an all-masked grid per image, an image with a
//! mask to regenerate, an image to extend, or known tokens), which images (seed and index per
//! image), the sampler settings, the token grid (the bundle's or a larger one, with its windows),
//! how a larger grid is decoded, and whether to record preview frames. generate, inpaint,
//! outpaint, decode, larger grids and previews are ways of building a job. It also writes the
//! PNG metadata of what it makes, and reads a job back from a PNG's metadata (`--from`).
//!
//! Jobs are built from request specs ([`crate::spec`]), which validate every parameter against
//! the bundle (no model needs to be loaded); a job is never changed after that. Running it is the
//! pipeline's business.

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::image::{Mask, Metadata, Pixels, Tensor};
use crate::limits;
use crate::param::Param;
use crate::sampler::{SamplerKind, Settings, Tiling};
use crate::spec;
use crate::{DecodeMode, Timings};

pub use crate::graphs::DEFAULT_MAX_BATCH;

/// One image of a job: its seed and its index, which together pick its random stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageId {
    /// The request's seed.
    pub seed: u64,
    /// The image's index under that seed.
    pub index: u64,
}

/// A variation's strength when neither the request nor the bundle gives one.
pub const DEFAULT_STRENGTH: f32 = 0.5;

/// Tokens a variation of `strength` masks in a grid of `len`: `strength * len` rounded to the
/// nearest whole token, at least one and at most all.
pub fn vary_count(strength: f32, len: usize) -> usize {
    ((f64::from(strength) * len as f64).round() as usize).clamp(1, len.max(1))
}

/// The positions (sorted, raster order) image `index` of `seed` masks in a variation: `count`
/// of `0..len`, drawn from a stream of their own (ChaCha20 keyed by the seed and "vary", stream
/// `index`) by a partial Fisher-Yates shuffle: for `i` in `0..count`, swap position `i` with
/// `i + floor(u * (len - i))`, `u` the next 64-bit word as a fraction. The sampler's own stream
/// (`image_rng(seed, index)`) is untouched, so the draw order of the reverse process is that of
/// an inpainting of the same tokens.
pub fn vary_positions(seed: u64, index: u64, len: usize, count: usize) -> Vec<usize> {
    use rand_core::{RngCore, SeedableRng};
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..12].copy_from_slice(b"vary");
    let mut rng = rand_chacha::ChaCha20Rng::from_seed(key);
    rng.set_stream(index);
    let mut order: Vec<usize> = (0..len).collect();
    let count = count.min(len);
    for i in 0..count {
        let j = i + ((u128::from(rng.next_u64()) * (len - i) as u128) >> 64) as usize;
        order.swap(i, j);
    }
    order.truncate(count);
    order.sort_unstable();
    order
}

/// Where sampling starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Every position masked, each image from its own stream.
    Masked,
    /// `image` (the bundle's size) encoded, the tokens under `token_mask` masked and sampled.
    /// With `keep_input`, the input's pixels outside `mask` replace the decoder's.
    Inpaint {
        /// The image to edit.
        image: Tensor,
        /// Pixels to regenerate.
        mask: Mask,
        /// `mask` pooled to the token grid.
        token_mask: Vec<bool>,
        /// Keep the input's own pixels outside the mask.
        keep_input: bool,
    },
    /// `image` (any size of whole tokens) encoded tile by tile and surrounded by `extend` pixels
    /// `[left, right, up, down]` of masked tokens. With `keep_input`, its own pixels replace the
    /// decoder's where it was.
    Outpaint {
        /// The image to extend.
        image: Tensor,
        /// Pixels added per side.
        extend: [usize; 4],
        /// Where the image's tokens go in the grid, `[row, col]`.
        at: [usize; 2],
        /// The input's tokens this deep along each extended side are regenerated too (the
        /// bundle's `sampling.outpaint_edge`).
        edge: usize,
        /// Keep the input's own pixels.
        keep_input: bool,
    },
    /// Variations: `image` (the bundle's size) encoded once; each image of the job masks its own
    /// seeded draw of `masked` of those tokens ([`vary_positions`]) and samples them again.
    Vary {
        /// The source image.
        image: Tensor,
        /// sha256 of the source image's file, recorded in metadata.
        source_sha256: String,
        /// The share of tokens redone, in (0, 1].
        strength: f32,
        /// Tokens masked per image: [`vary_count`] of `strength`.
        masked: usize,
    },
    /// One known grid per image; positions holding the mask id are sampled, the rest kept
    /// (none masked: the job only decodes).
    Tokens(Vec<Vec<i64>>),
}

/// Sampler settings as a request gives them: absent values are the bundle's defaults. The CLI's
/// `--steps`, `--temperature START[:END]`, `--sampler` and the service's JSON fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampling {
    /// Reverse steps S.
    pub steps: Option<usize>,
    /// Temperature (of the first step, with `temperature_end`).
    pub temperature: Option<f32>,
    /// Temperature of the last step: a linear schedule.
    pub temperature_end: Option<f32>,
    /// Nucleus (top-p) truncation, in (0, 1]; 1 turns a bundle's default off.
    pub top_p: Option<f32>,
    /// Reveal rule.
    pub sampler: Option<SamplerKind>,
    /// The `threshold` sampler's least probability for a reveal, in (0, 1] (an error with
    /// another sampler).
    pub threshold: Option<f32>,
    /// Cached attention between steps (`--cache N|off`); absent = the bundle's default, else off
    /// (off too when guidance is on: cached attention does not guide).
    pub cache: Option<CacheMode>,
    /// Classifier-free guidance scale (`--guidance W`, >= 0; 0 = none); absent = the bundle's
    /// default, else none. Only a class-conditional bundle guides.
    pub guidance: Option<f32>,
    /// The class to make, an index into a class-conditional bundle's `classes` ([`class_index`]
    /// reads a name). Absent: generation gives the classes in turn ([`sampler::spread_class`]),
    /// edits use none.
    pub class: Option<usize>,
}

/// Exact mode or cached attention, as a request gives it: `"off"` or a period N (a full
/// transformer pass every N calls of an image, cheap passes between). JSON: `"off"` or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Every call a full pass of the bundle's transformer (exact mode).
    Off,
    /// A full pass every N calls of an image.
    Every(usize),
}

impl serde::Serialize for CacheMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            CacheMode::Off => s.serialize_str("off"),
            CacheMode::Every(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> serde::Deserialize<'de> for CacheMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<CacheMode, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = CacheMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"off\" or a whole number of calls (not a cache mode)")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<CacheMode, E> {
                Ok(CacheMode::Every(usize::try_from(n).unwrap_or(usize::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<CacheMode, E> {
                CacheMode::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visit)
    }
}

impl CacheMode {
    /// Parses `off` or a whole number (the command line's `--cache`).
    pub fn parse(s: &str) -> std::result::Result<CacheMode, String> {
        match s.trim() {
            "off" => Ok(CacheMode::Off),
            n => n
                .parse::<usize>()
                .map(CacheMode::Every)
                .map_err(|_| format!("\"{s}\" is not a cache mode: give off or a number of calls")),
        }
    }

    /// The period, or `None` for exact mode.
    pub fn period(self) -> Option<usize> {
        match self {
            CacheMode::Off => None,
            CacheMode::Every(n) => Some(n),
        }
    }
}

/// The class a request names (`--class`, the service's `class`), by name or index, as an
/// index into `bundle`'s classes.
pub fn class_index(bundle: &Bundle, given: &str) -> Result<usize> {
    bundle
        .manifest()
        .class_index(given)
        .map_err(|m| Error::param(Param::Class, m))
}

impl Sampling {
    /// The request's class, checked against `bundle`.
    pub fn class(&self, bundle: &Bundle) -> Result<Option<usize>> {
        let n = bundle.manifest().class_count();
        match self.class {
            Some(_) if n == 0 => Err(Error::param(
                Param::Class,
                format!(
                    "this model ({}) is not class-conditional: it takes no class",
                    bundle.manifest().name
                ),
            )),
            Some(c) if c >= n => Err(Error::param(
                Param::Class,
                format!("class index {c} is out of range: this model has {n} classes (0..{n})"),
            )),
            c => Ok(c),
        }
    }

    /// Validated settings for sampling a token grid `[h, w]` of `bundle`.
    pub fn settings(&self, bundle: &Bundle, grid: [usize; 2]) -> Result<Settings> {
        let d = &bundle.manifest().sampling;
        let space = crate::sampler::TokenSpace {
            len: grid[0] * grid[1],
            width: grid[1],
            ..bundle.manifest().token_space()
        };
        // A request's own temperature replaces the bundle's whole schedule.
        let temperature_end = match self.temperature {
            Some(_) => self.temperature_end,
            None => self.temperature_end.or(d.temperature_end),
        };
        let settings = Settings::new(
            self.steps.unwrap_or(d.steps),
            self.temperature.unwrap_or(d.temperature),
            &space,
        )?
        .with_sampler(self.sampler.or(d.sampler).unwrap_or_default())
        .with_temperature_end(temperature_end)?
        .with_top_p(self.top_p.or(d.top_p))?;
        // The bundle's threshold goes with its threshold sampler only; a request's must match.
        let threshold = self
            .threshold
            .or(d.threshold.filter(|_| settings.sampler.uses_threshold()));
        let guidance = self.guidance.or(d.guidance).filter(|&w| w != 0.0);
        if guidance.is_some() && bundle.manifest().classes.is_none() {
            return Err(Error::param(
                Param::Guidance,
                "this model has no classes: guidance needs a class-conditional model; leave it out".to_string(),
            ));
        }
        // Cached attention does not guide: with guidance the bundle's default cache is off, and a
        // request's own cache period is refused (by with_guidance).
        let cache = match (self.cache, guidance) {
            (None, Some(_)) => None,
            (c, _) => c.map_or(d.cache, CacheMode::period),
        };
        settings
            .with_threshold(threshold)?
            .with_cache(cache)?
            .with_guidance(guidance)
    }
}

/// The canvas a request asks for: a token grid (absent = the bundle's), its windows and how it
/// is decoded. The CLI's `--grid`/`--size`, `--stride`, `--window-margin`, `--decode`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Canvas {
    /// Token grid `[rows, cols]`.
    pub grid: Option<[usize; 2]>,
    /// Window stride (default: the bundle's, else half a window).
    pub stride: Option<[usize; 2]>,
    /// Window margin (default: the bundle's, else an eighth of a window).
    pub window_margin: Option<[usize; 2]>,
    /// How a larger grid is decoded.
    pub decode: DecodeMode,
}

/// What to make; see the module docs. Built by the specs in [`crate::spec`], read-only after.
#[derive(Debug, Clone)]
pub struct Job {
    pub(crate) start: Start,
    /// One per image; a job of several seeds is how the service batches requests with equal
    /// settings.
    pub(crate) images: Vec<ImageId>,
    pub(crate) settings: Settings,
    pub(crate) class: Option<usize>,
    pub(crate) tiling: Option<Tiling>,
    pub(crate) decode: DecodeMode,
    pub(crate) record_frames: bool,
    pub(crate) columns: usize,
    pub(crate) max_batch: usize,
}

/// What a job made.
#[derive(Debug, Clone)]
pub struct Made {
    /// The token grids, one per image (row-major, `grid`).
    pub tokens: Vec<Vec<i64>>,
    /// Each image's class (a class-conditional bundle's; `None`: none).
    pub classes: Vec<Option<usize>>,
    /// The images, input pixels kept where the job says so.
    pub pixels: Vec<Pixels>,
    /// The token grid size.
    pub grid: [usize; 2],
    /// Preview frames when asked for.
    pub frames: Option<Vec<Pixels>>,
    /// Where the time went.
    pub timings: Timings,
}

/// Checks a token file's grid `[height, width]` before anything is allocated for it: at least
/// the bundle's grid, and decodable in one piece.
pub fn check_decode_grid(bundle: &Bundle, grid: [usize; 2]) -> Result<()> {
    let t = bundle.manifest().grid();
    if grid[0] < t[0] || grid[1] < t[1] {
        return Err(Error::Tokens(format!(
            "the grid is {}x{} (height x width), smaller than the bundle's {}x{}",
            grid[0], grid[1], t[0], t[1]
        )));
    }
    spec::check_whole_decode(bundle.manifest(), grid, Param::Grid)
        .map_err(|e| Error::Tokens(format!("the grid (height x width): {e}")))
}

/// Checks that each of `grids` has `grid`'s size and holds codes `0..k`, or the mask id `mask`
/// where one is given (positions to sample).
pub fn check_grids(grids: &[Vec<i64>], grid: [usize; 2], k: usize, mask: Option<i64>) -> Result<()> {
    let k = k as i64;
    for (i, g) in grids.iter().enumerate() {
        if g.len() != grid[0] * grid[1] {
            return Err(Error::Tokens(format!(
                "grid {i} has {} tokens, a {}x{} grid has {}",
                g.len(),
                grid[0],
                grid[1],
                grid[0] * grid[1]
            )));
        }
        if let Some(p) = g.iter().position(|&t| Some(t) != mask && !(0..k).contains(&t)) {
            let allowed = match mask {
                Some(m) => format!("neither a code (0..{k}) nor the mask id {m}"),
                None => format!("outside 0..{k}; only codes can be decoded"),
            };
            return Err(Error::Tokens(format!(
                "grid {i}: token {} at row {}, column {} is {allowed}",
                g[p],
                p / grid[1],
                p % grid[1]
            )));
        }
    }
    Ok(())
}

/// Whether outpainting regenerates token `(r, c)` of an input of `kgrid` tokens: it lies within
/// `edge` tokens of a side that `extend` (`[left, right, up, down]` pixels) extends.
pub fn outpaint_edge_token(r: usize, c: usize, kgrid: [usize; 2], extend: [usize; 4], edge: usize) -> bool {
    let [left, right, up, down] = extend;
    (left > 0 && c < edge)
        || (right > 0 && c >= kgrid[1].saturating_sub(edge))
        || (up > 0 && r < edge)
        || (down > 0 && r >= kgrid[0].saturating_sub(edge))
}

impl Job {
    /// An edit: one image, stream (`seed`, 0).
    pub(crate) fn one(
        start: Start,
        seed: u64,
        settings: Settings,
        class: Option<usize>,
        tiling: Option<Tiling>,
    ) -> Job {
        Job {
            start,
            images: vec![ImageId { seed, index: 0 }],
            settings,
            class,
            tiling,
            decode: DecodeMode::default(),
            record_frames: false,
            columns: 1,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// The same job for other images: indices a batch still lacks, or the images of several
    /// requests of equal settings (the service's merged batches). Each image is the same
    /// whatever else is made with it.
    pub fn with_images(&self, images: Vec<ImageId>) -> Result<Job> {
        if images.is_empty() {
            return Err(Error::Internal("a job of no images".into()));
        }
        Ok(Job { images, ..self.clone() })
    }

    /// The same job at most `max_batch` images (or windows) per transformer call.
    pub fn with_max_batch(&self, max_batch: usize) -> Result<Job> {
        Ok(Job {
            max_batch: limits::check_range(Param::MaxBatch, max_batch, limits::MAX_BATCH)?,
            ..self.clone()
        })
    }

    /// Where sampling starts.
    pub fn start(&self) -> &Start {
        &self.start
    }

    /// Every image's seed and index.
    pub fn images(&self) -> &[ImageId] {
        &self.images
    }

    /// The validated sampler settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The class of every image (a class-conditional bundle's); `None`: generation gives the
    /// classes in turn ([`crate::sampler::spread_class`]), edits use none.
    pub fn class(&self) -> Option<usize> {
        self.class
    }

    /// Windows over a grid larger than the bundle's; `None` = the bundle's grid.
    pub fn tiling(&self) -> Option<&Tiling> {
        self.tiling.as_ref()
    }

    /// How a larger grid is decoded.
    pub fn decode_mode(&self) -> DecodeMode {
        self.decode
    }

    /// Whether the job records one preview frame per step that revealed something.
    pub fn records_frames(&self) -> bool {
        self.record_frames
    }

    /// Columns of a sheet of several images (a multi-image PNG, a preview frame).
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Images (or windows) per transformer call.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Decodes known token grids of size `grid` (`absorb decode`): the bundle's grid, or a
    /// larger one in one piece. Every token must be a code.
    pub fn decode(bundle: &Bundle, grid: [usize; 2], grids: Vec<Vec<i64>>) -> Result<Job> {
        check_decode_grid(bundle, grid)?;
        check_grids(&grids, grid, bundle.manifest().tokens.codebook_size, None)?;
        let settings = Sampling::default().settings(bundle, bundle.manifest().grid())?;
        let canvas = Canvas {
            grid: Some(grid),
            decode: DecodeMode::Whole,
            ..Canvas::default()
        };
        let tiling = spec::tiling(bundle, &canvas, grid, None)?;
        let images = (0..grids.len() as u64)
            .map(|index| ImageId { seed: 0, index })
            .collect();
        Ok(Job {
            decode: DecodeMode::Whole,
            images,
            ..Job::one(Start::Tokens(grids), 0, settings, None, tiling)
        })
    }

    /// Checks that this job's images fit in one PNG: at most [`limits::MAX_SHEET_IMAGES`],
    /// and a sheet at most [`limits::MAX_SHEET_SIDE`] pixels a side.
    pub fn check_sheet(&self, bundle: &Bundle) -> Result<()> {
        let n = self.images.len();
        if n > limits::MAX_SHEET_IMAGES {
            return Err(Error::param(
                Param::Count,
                format!(
                    "{n} images into one PNG is above the limit of {}: write them into a directory instead",
                    limits::MAX_SHEET_IMAGES
                ),
            ));
        }
        let g = self.grid(bundle);
        let f = bundle.manifest().token_pixels();
        let (columns, rows) = (
            self.columns.clamp(1, n.max(1)),
            n.div_ceil(self.columns.clamp(1, n.max(1))),
        );
        let side = |k: usize, px: usize| k * (px + 2);
        let (w, h) = (side(columns, g[1] * f[1]), side(rows, g[0] * f[0]));
        if w > limits::MAX_SHEET_SIDE || h > limits::MAX_SHEET_SIDE {
            return Err(Error::param(
                Param::Count,
                format!(
                    "a sheet of {n} images in {columns} columns would be {w}x{h} pixels, above the limit of {} per side",
                    limits::MAX_SHEET_SIDE
                ),
            ));
        }
        Ok(())
    }

    /// The token grid the job samples.
    pub fn grid(&self, bundle: &Bundle) -> [usize; 2] {
        self.tiling.as_ref().map_or(bundle.manifest().grid(), Tiling::grid)
    }

    /// The seed of the first image.
    pub fn seed(&self) -> u64 {
        self.images.first().map_or(0, |i| i.seed)
    }

    /// Positions to sample in all: what progress counts up to.
    pub fn masked_tokens(&self, bundle: &Bundle) -> usize {
        let [h, w] = self.grid(bundle);
        match &self.start {
            Start::Masked => self.images.len() * h * w,
            Start::Inpaint { token_mask, .. } => self.images.len() * token_mask.iter().filter(|&&m| m).count(),
            Start::Outpaint {
                image, extend, edge, ..
            } => {
                let f = bundle.manifest().token_pixels();
                let kgrid = [image.height / f[0], image.width / f[1]];
                let kept = (0..kgrid[0] * kgrid[1])
                    .filter(|&i| !outpaint_edge_token(i / kgrid[1], i % kgrid[1], kgrid, *extend, *edge))
                    .count();
                h * w - kept
            }
            Start::Vary { masked, .. } => self.images.len() * masked,
            Start::Tokens(grids) => {
                let mask_id = bundle.manifest().tokens.mask_id;
                grids.iter().flatten().filter(|&&t| t == mask_id).count()
            }
        }
    }

    /// The mode recorded in metadata.
    fn mode(&self) -> &'static str {
        match self.start {
            Start::Masked => "generate",
            Start::Inpaint { .. } => "inpaint",
            Start::Outpaint { .. } => "outpaint",
            Start::Vary { .. } => "vary",
            Start::Tokens(_) => "decode",
        }
    }

    /// Metadata of a PNG holding the job's images `k..k + count` (a sheet of `self.columns`
    /// when `count > 1`), made on `provider` with `bundle`. A single image's metadata is the same
    /// wherever it is written, so the CLI, the service and the batch writer make equal bytes.
    pub fn metadata(&self, bundle: &Bundle, provider: &str, k: usize, count: usize) -> Metadata {
        let mut meta = Metadata {
            absorb: crate::VERSION.to_string(),
            mode: self.mode().to_string(),
            bundle: bundle.manifest().name.clone(),
            bundle_sha256: bundle.sha256().to_string(),
            sampler: None,
            seed: None,
            index: None,
            count: None,
            columns: None,
            steps: None,
            temperature: None,
            temperature_end: None,
            top_p: None,
            threshold: None,
            cache: None,
            guidance: None,
            strength: None,
            source_sha256: None,
            provider: Some(provider.to_string()),
            variant: bundle.variant().map(str::to_string),
            grid: None,
            stride: None,
            window_margin: None,
            decode: None,
            class: None,
        };
        if matches!(self.start, Start::Tokens(_)) {
            return meta;
        }
        meta.sampler = Some(self.settings.sampler.name().to_string());
        meta.steps = Some(self.settings.steps);
        meta.temperature = Some(self.settings.temperature);
        meta.temperature_end = self.settings.temperature_end;
        meta.top_p = self.settings.top_p;
        meta.threshold = (self.settings.sampler.uses_threshold()).then(|| self.settings.threshold_or_default());
        meta.cache = self.settings.cache;
        meta.guidance = self.settings.guidance;
        if let Start::Vary {
            strength,
            source_sha256,
            ..
        } = &self.start
        {
            meta.strength = Some(*strength);
            meta.source_sha256 = Some(source_sha256.clone());
        }
        let names = bundle.manifest().classes.as_deref().unwrap_or_default();
        meta.class = self.class.and_then(|c| names.get(c).cloned());
        let ImageId { seed, index } = self.images.get(k).copied().unwrap_or_default();
        meta.seed = Some(seed);
        meta.index = Some(index);
        meta.count = Some(count);
        meta.columns = (count > 1).then_some(self.columns);
        if let Some(t) = &self.tiling {
            meta.grid = Some(t.grid());
            meta.stride = Some(t.stride());
            meta.window_margin = Some(t.margin());
            meta.decode = Some(self.decode.name().to_string());
        }
        meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variation_masks_its_share_of_distinct_positions_drawn_by_seed_and_index() {
        assert_eq!(vary_count(0.5, 64), 32);
        assert_eq!(vary_count(0.001, 64), 1, "at least one token");
        assert_eq!(vary_count(1.0, 256), 256);
        assert_eq!(vary_count(0.3, 256), 77, "rounded to the nearest token");
        for (seed, index, len, count) in [(0, 0, 64, 16), (7, 3, 256, 77), (1, 1, 5, 5), (2, 0, 64, 1)] {
            let p = vary_positions(seed, index, len, count);
            assert_eq!(p.len(), count);
            assert!(p.windows(2).all(|w| w[0] < w[1]), "sorted and distinct: {p:?}");
            assert!(p.iter().all(|&x| x < len));
            assert_eq!(p, vary_positions(seed, index, len, count), "the same draw every time");
        }
        let a = vary_positions(9, 0, 64, 16);
        assert_ne!(a, vary_positions(9, 1, 64, 16), "each index has its own draw");
        assert_ne!(a, vary_positions(10, 0, 64, 16), "each seed has its own draw");
        // A smaller share is not a prefix of a larger one's sorted set but is drawn first:
        // the first draws of a partial shuffle are those of any longer one.
        let small = vary_positions(9, 0, 64, 8);
        assert!(small.iter().all(|x| a.contains(x)), "{small:?} within {a:?}");
        // Spread over the grid: 1000 draws of one position hit every position.
        let mut hit = [false; 64];
        for i in 0..1000 {
            hit[vary_positions(4, i, 64, 1)[0]] = true;
        }
        assert!(hit.iter().all(|&h| h), "every position can be drawn");
    }

    #[test]
    fn outpainting_regenerates_only_the_edge_facing_each_extended_side() {
        let g = [4, 6];
        let marked = |extend: [usize; 4], edge: usize| -> Vec<(usize, usize)> {
            (0..g[0])
                .flat_map(|r| (0..g[1]).map(move |c| (r, c)))
                .filter(|&(r, c)| outpaint_edge_token(r, c, g, extend, edge))
                .collect()
        };
        assert!(marked([8, 8, 8, 8], 0).is_empty(), "edge 0 keeps every token");
        assert_eq!(marked([0, 8, 0, 0], 1), (0..4).map(|r| (r, 5)).collect::<Vec<_>>());
        assert_eq!(marked([8, 0, 0, 0], 2).len(), 8, "two columns on the left");
        assert_eq!(marked([0, 0, 8, 0], 1), (0..6).map(|c| (0, c)).collect::<Vec<_>>());
        let right2 = marked([0, 8, 0, 0], 2);
        assert!(
            right2.len() == 8 && right2.iter().all(|&(_, c)| c == 4 || c == 5),
            "{right2:?}"
        );
        let down2 = marked([0, 0, 0, 8], 2);
        assert!(
            down2.len() == 12 && down2.iter().all(|&(r, _)| r == 2 || r == 3),
            "{down2:?}"
        );
        assert_eq!(
            marked([0, 8, 0, 0], usize::MAX).len(),
            24,
            "a huge edge does not overflow"
        );
        // All four sides, depth 1: the ring of 4 x 6 = 24 - (2 x 4) = 16 tokens.
        let ring = marked([4, 4, 4, 4], 1);
        assert_eq!(ring.len(), 16);
        assert!(ring.iter().all(|&(r, c)| r == 0 || r == 3 || c == 0 || c == 5));
    }
}
