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
//! Building a job validates every parameter against the bundle (no model needs to be loaded);
//! running it is the pipeline's business.

use std::path::Path;

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::image::{self, Mask, Metadata, Pixels, Tensor};
use crate::limits;
use crate::param::Param;
use crate::sampler::{SamplerKind, Settings, Tiling, TokenSpace};
use crate::{DecodeMode, Timings};

pub use crate::graphs::DEFAULT_MAX_BATCH;

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
    /// The class to make, an index into a class-conditional bundle's `classes` ([`class_index`]
    /// reads a name). Absent: generation gives the classes in turn ([`sampler::spread_class`]),
    /// edits use none.
    pub class: Option<usize>,
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

    /// Validated settings for sampling a grid of `len` tokens of `bundle`.
    pub fn settings(&self, bundle: &Bundle, len: usize) -> Result<Settings> {
        let d = &bundle.manifest().sampling;
        let space = TokenSpace {
            len,
            ..token_space(bundle)
        };
        // A request's own temperature replaces the bundle's whole schedule.
        let temperature_end = match self.temperature {
            Some(_) => self.temperature_end,
            None => self.temperature_end.or(d.temperature_end),
        };
        Settings::new(
            self.steps.unwrap_or(d.steps),
            self.temperature.unwrap_or(d.temperature),
            &space,
        )?
        .with_sampler(self.sampler.or(d.sampler).unwrap_or_default())
        .with_temperature_end(temperature_end)?
        .with_top_p(self.top_p.or(d.top_p))
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

/// What to make; see the module docs.
#[derive(Debug, Clone)]
pub struct Job {
    /// Where sampling starts.
    pub start: Start,
    /// `(seed, index)` of each image: its random stream. One per image; a job of several seeds
    /// is how the service batches requests with equal settings.
    pub images: Vec<(u64, u64)>,
    /// Validated sampler settings.
    pub settings: Settings,
    /// The class of every image (a class-conditional bundle's); `None`: generation gives the
    /// classes in turn ([`sampler::spread_class`]), edits use none.
    pub class: Option<usize>,
    /// Windows over a grid larger than the bundle's; `None` = the bundle's grid.
    pub tiling: Option<Tiling>,
    /// How a larger grid is decoded.
    pub decode: DecodeMode,
    /// Also record one preview frame per step that revealed something.
    pub frames: bool,
    /// Columns of a sheet of several images (a multi-image PNG, a preview frame).
    pub columns: usize,
    /// Images (or windows) per transformer call.
    pub max_batch: usize,
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

/// The bundle's token space.
pub fn token_space(bundle: &Bundle) -> TokenSpace {
    let t = &bundle.manifest().tokens;
    TokenSpace {
        len: t.len(),
        codebook_size: t.codebook_size,
        mask_id: t.mask_id,
    }
}

/// The bundle's token grid `[h, w]`.
pub fn trained_grid(bundle: &Bundle) -> [usize; 2] {
    let t = &bundle.manifest().tokens;
    [t.height, t.width]
}

/// Pixels per token `[rows, cols]`.
pub fn token_pixels(bundle: &Bundle) -> [usize; 2] {
    let (s, g) = (&bundle.manifest().image, trained_grid(bundle));
    [s.height / g[0], s.width / g[1]]
}

/// Windows of the bundle's grid over `grid`; stride and margin default to the bundle's
/// (`sampling.window_stride`, `sampling.window_margin`), else half and an eighth of a window.
/// `None` for the bundle's own grid. `limit`: a service's cap on tokens per side.
pub fn tiling(bundle: &Bundle, canvas: &Canvas, grid: [usize; 2], limit: Option<usize>) -> Result<Option<Tiling>> {
    let window = trained_grid(bundle);
    if let Some(max_side) = limit.filter(|&m| grid[0] > m || grid[1] > m) {
        return Err(Error::param(
            Param::Grid,
            format!(
                "{}x{} tokens is above this service's limit of {max_side} per side",
                grid[0], grid[1]
            ),
        ));
    }
    check_grid(bundle, grid, Param::Grid)?;
    if grid == window {
        return Ok(None);
    }
    if canvas.decode == DecodeMode::Whole {
        check_whole_decode(bundle, grid, Param::Decode)?;
    }
    let d = &bundle.manifest().sampling;
    Tiling::new(
        grid,
        window,
        canvas
            .stride
            .or(d.window_stride)
            .unwrap_or_else(|| Tiling::default_stride(window)),
        canvas
            .window_margin
            .or(d.window_margin)
            .unwrap_or_else(|| Tiling::default_margin(window)),
    )
    .map(Some)
}

/// Largest grid side in tokens for `bundle`: [`limits::MAX_GRID_SIDE`] tokens and
/// [`limits::MAX_IMAGE_SIDE`] pixels, whichever is smaller.
pub fn max_grid_side(bundle: &Bundle) -> [usize; 2] {
    let f = token_pixels(bundle);
    [0, 1].map(|a| limits::MAX_GRID_SIDE.min(limits::MAX_IMAGE_SIDE / f[a]))
}

/// Checks `grid` (`[rows, cols]` of tokens) against the limits, before any arithmetic on it;
/// `name` is the flag or field it came from.
pub fn check_grid(bundle: &Bundle, grid: [usize; 2], name: Param) -> Result<()> {
    let max = max_grid_side(bundle);
    if grid[0] > max[0] || grid[1] > max[1] {
        let f = token_pixels(bundle);
        return Err(Error::param(
            name,
            format!(
                "{}x{} tokens (rows x columns) is above the limit of {}x{} tokens ({} pixels per side)",
                grid[0],
                grid[1],
                max[0],
                max[1],
                (max[0] * f[0]).max(max[1] * f[1])
            ),
        ));
    }
    Ok(())
}

/// Checks that `grid` can be decoded in one piece: at most [`limits::MAX_WHOLE_DECODE_SIDE`]
/// pixels a side (the decoder's memory grows with the square of it).
pub fn check_whole_decode(bundle: &Bundle, grid: [usize; 2], name: Param) -> Result<()> {
    check_grid(bundle, grid, name)?;
    let f = token_pixels(bundle);
    let px = [grid[0] * f[0], grid[1] * f[1]];
    let max = limits::MAX_WHOLE_DECODE_SIDE;
    if px[0] > max || px[1] > max {
        return Err(Error::param(
            name,
            format!(
                "a {}x{} token grid decodes to {}x{} pixels (width x height) in one piece, above the limit of \
                 {max} per side ({}x{} tokens): decode it in tiles",
                grid[0],
                grid[1],
                px[1],
                px[0],
                max / f[0],
                max / f[1]
            ),
        ));
    }
    Ok(())
}

/// Checks a token file's grid `[height, width]` before anything is allocated for it: at least
/// the bundle's grid, and decodable in one piece.
pub fn check_decode_grid(bundle: &Bundle, grid: [usize; 2]) -> Result<()> {
    let t = trained_grid(bundle);
    if grid[0] < t[0] || grid[1] < t[1] {
        return Err(Error::Tokens(format!(
            "the grid is {}x{} (height x width), smaller than the bundle's {}x{}",
            grid[0], grid[1], t[0], t[1]
        )));
    }
    check_whole_decode(bundle, grid, Param::Grid).map_err(|e| Error::Tokens(format!("the grid (height x width): {e}")))
}

/// Checks that `image` can be encoded tile by tile by `bundle`: its channels, at least the
/// bundle's size, a whole number of tokens.
pub fn check_tileable(image: &Tensor, bundle: &Bundle) -> Result<()> {
    let spec = &bundle.manifest().image;
    let f = token_pixels(bundle);
    if image.channels != spec.channels
        || image.height < spec.height
        || image.width < spec.width
        || image.height % f[0] != 0
        || image.width % f[1] != 0
    {
        return Err(Error::param(
            Param::Image,
            format!(
                "image is {}x{} with {} channel(s): must have {} channel(s), be at least {}x{} and a multiple of {}x{} pixels (one token)",
                image.width, image.height, image.channels, spec.channels, spec.width, spec.height, f[1], f[0]
            ),
        ));
    }
    Ok(())
}

/// Checks that every token of `grids` (of size `grid`) is one of the `k` codes: what the decoder
/// can decode.
pub fn check_codes(grids: &[Vec<i64>], grid: [usize; 2], k: usize) -> Result<()> {
    let k = k as i64;
    for (i, g) in grids.iter().enumerate() {
        if let Some(p) = g.iter().position(|&t| !(0..k).contains(&t)) {
            return Err(Error::Tokens(format!(
                "grid {i}: token {} at row {}, column {} is outside 0..{k}; only codes can be decoded",
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

/// Pixels added around an image by outpainting, `[left, right, up, down]`, checked to be whole
/// tokens; returns the new token grid and where the image's tokens go in it (`[row, col]`).
pub fn outpaint_grid(
    image: [usize; 2],
    token_px: [usize; 2],
    extend: [usize; 4],
    max_side: usize,
) -> Result<([usize; 2], [usize; 2])> {
    let [left, right, up, down] = extend;
    // Each side is bounded before the sums: up + down cannot wrap.
    let max_px = [max_side * token_px[0], max_side * token_px[1]];
    for (side, px, limit) in [
        ("left", left, max_px[1]),
        ("right", right, max_px[1]),
        ("up", up, max_px[0]),
        ("down", down, max_px[0]),
    ] {
        if px > limit {
            return Err(Error::param(
                Param::Extend,
                format!("{side}={px} is above the limit of {limit} pixels ({max_side} tokens)"),
            ));
        }
    }
    for (side, px, unit) in [
        ("left", left, token_px[1]),
        ("right", right, token_px[1]),
        ("up", up, token_px[0]),
        ("down", down, token_px[0]),
    ] {
        if px % unit != 0 {
            return Err(Error::param(
                Param::Extend,
                format!("{side}={px} is not a whole number of tokens: use a multiple of {unit} pixels"),
            ));
        }
    }
    if extend == [0; 4] {
        return Err(Error::param(Param::Extend, "nothing to extend: give e.g. right=32"));
    }
    let grid = [
        (image[0] + up + down) / token_px[0],
        (image[1] + left + right) / token_px[1],
    ];
    if grid[0] > max_side || grid[1] > max_side {
        return Err(Error::param(
            Param::Extend,
            format!(
                "the result would be {}x{} tokens: at most {max_side} per side",
                grid[0], grid[1]
            ),
        ));
    }
    Ok((grid, [up / token_px[0], left / token_px[1]]))
}

impl Job {
    /// Images `first..first + count` of `seed` from all-masked grids, on `canvas`'s grid (at
    /// most `limit` tokens a side, when a service sets one).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        bundle: &Bundle,
        seed: u64,
        first: u64,
        count: usize,
        sampling: &Sampling,
        canvas: &Canvas,
        limit: Option<usize>,
    ) -> Result<Job> {
        if count == 0 {
            return Err(Error::param(Param::Count, "0 images requested: use 1 or more"));
        }
        limits::check_range(Param::Count, count, limits::MAX_IMAGES)?;
        limits::check_indices(Param::FirstIndex, first, count)?;
        let grid = canvas.grid.unwrap_or(trained_grid(bundle));
        let tiling = tiling(bundle, canvas, grid, limit)?;
        Ok(Job {
            start: Start::Masked,
            images: (0..count as u64).map(|i| (seed, first + i)).collect(),
            settings: sampling.settings(bundle, grid[0] * grid[1])?,
            class: sampling.class(bundle)?,
            tiling,
            decode: canvas.decode,
            frames: false,
            columns: image::grid_columns(count),
            max_batch: DEFAULT_MAX_BATCH,
        })
    }

    /// Regenerates the pixels of `image` under `mask` (pooled to tokens) under stream
    /// (`seed`, 0); tokens outside the mask never change.
    pub fn inpaint(
        bundle: &Bundle,
        image: Tensor,
        mask: Mask,
        seed: u64,
        sampling: &Sampling,
        keep_input: bool,
    ) -> Result<Job> {
        let grid = trained_grid(bundle);
        let token_mask = image::pool_mask(&mask, grid);
        if !token_mask.iter().any(|&m| m) {
            return Err(Error::param(
                Param::Mask,
                "the mask is empty: mark the region to regenerate in white",
            ));
        }
        Ok(Job {
            start: Start::Inpaint {
                image,
                mask,
                token_mask,
                keep_input,
            },
            class: sampling.class(bundle)?,
            ..Job::one(seed, sampling.settings(bundle, grid[0] * grid[1])?, None)
        })
    }

    /// Extends `image` by `extend` pixels `[left, right, up, down]` under stream (`seed`, 0),
    /// with `canvas`'s windows (its grid is the outpainted one, at most `limit` tokens a side
    /// when a service sets one); the image's tokens never change but `edge` of them (default: the
    /// bundle's `sampling.outpaint_edge`, else 0) along each extended side.
    #[allow(clippy::too_many_arguments)]
    pub fn outpaint(
        bundle: &Bundle,
        image: Tensor,
        extend: [usize; 4],
        seed: u64,
        sampling: &Sampling,
        canvas: &Canvas,
        keep_input: bool,
        edge: Option<usize>,
        limit: Option<usize>,
    ) -> Result<Job> {
        check_tileable(&image, bundle)?;
        let trained = trained_grid(bundle);
        let edge = edge.or(bundle.manifest().sampling.outpaint_edge).unwrap_or(0);
        if !crate::bundle::outpaint_edge_fits(edge, trained) {
            return Err(Error::param(
                Param::OutpaintEdge,
                format!(
                    "{edge} must be less than half the trained grid {}x{} (some of the input's tokens must stay)",
                    trained[0], trained[1]
                ),
            ));
        }
        let max_side = limit.unwrap_or(limits::MAX_GRID_SIDE);
        let (grid, at) = outpaint_grid([image.height, image.width], token_pixels(bundle), extend, max_side)?;
        let canvas = Canvas {
            grid: Some(grid),
            ..*canvas
        };
        let tiling = tiling(bundle, &canvas, grid, limit)?;
        Ok(Job {
            start: Start::Outpaint {
                image,
                extend,
                at,
                edge,
                keep_input,
            },
            decode: canvas.decode,
            class: sampling.class(bundle)?,
            ..Job::one(seed, sampling.settings(bundle, grid[0] * grid[1])?, tiling)
        })
    }

    /// Decodes known token grids of size `grid` (`absorb decode`): the bundle's grid, or a
    /// larger one in one piece. Every token must be a code.
    pub fn decode(bundle: &Bundle, grid: [usize; 2], grids: Vec<Vec<i64>>) -> Result<Job> {
        check_decode_grid(bundle, grid)?;
        if let Some((i, g)) = grids.iter().enumerate().find(|(_, g)| g.len() != grid[0] * grid[1]) {
            return Err(Error::Tokens(format!(
                "grid {i} has {} tokens, a {}x{} grid has {}",
                g.len(),
                grid[0],
                grid[1],
                grid[0] * grid[1]
            )));
        }
        check_codes(&grids, grid, bundle.manifest().tokens.codebook_size)?;
        let settings = Sampling::default().settings(bundle, token_space(bundle).len)?;
        let canvas = Canvas {
            grid: Some(grid),
            decode: DecodeMode::Whole,
            ..Canvas::default()
        };
        Ok(Job {
            images: (0..grids.len() as u64).map(|i| (0, i)).collect(),
            start: Start::Tokens(grids),
            decode: DecodeMode::Whole,
            ..Job::one(0, settings, tiling(bundle, &canvas, grid, None)?)
        })
    }

    /// Sets the columns of a sheet of this job's images: 1..=images.
    pub fn set_columns(&mut self, columns: usize) -> Result<()> {
        self.columns = limits::check_range(Param::Columns, columns, self.images.len())?;
        Ok(())
    }

    /// Checks that this job's images fit in one PNG: at most [`limits::MAX_SHEET_IMAGES`],
    /// and a sheet at most [`limits::MAX_SHEET_SIDE`] pixels a side.
    pub fn check_sheet(&self, bundle: &Bundle) -> Result<()> {
        let n = self.images.len();
        if n > limits::MAX_SHEET_IMAGES {
            return Err(Error::param(
                Param::Count,
                format!(
                    "{n} images into one PNG is above the limit of {}: write them into a directory (-o DIR/)",
                    limits::MAX_SHEET_IMAGES
                ),
            ));
        }
        let g = self.grid(bundle);
        let f = token_pixels(bundle);
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

    fn one(seed: u64, settings: Settings, tiling: Option<Tiling>) -> Job {
        Job {
            start: Start::Masked,
            images: vec![(seed, 0)],
            settings,
            class: None,
            tiling,
            decode: DecodeMode::default(),
            frames: false,
            columns: 1,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// The token grid the job samples.
    pub fn grid(&self, bundle: &Bundle) -> [usize; 2] {
        self.tiling.as_ref().map_or(trained_grid(bundle), Tiling::grid)
    }

    /// The seed of the first image.
    pub fn seed(&self) -> u64 {
        self.images.first().map_or(0, |i| i.0)
    }

    /// Positions to sample in all: what progress counts up to.
    pub fn masked_tokens(&self, bundle: &Bundle) -> usize {
        let [h, w] = self.grid(bundle);
        match &self.start {
            Start::Masked => self.images.len() * h * w,
            Start::Inpaint { token_mask, .. } => token_mask.iter().filter(|&&m| m).count(),
            Start::Outpaint {
                image, extend, edge, ..
            } => {
                let f = token_pixels(bundle);
                let kgrid = [image.height / f[0], image.width / f[1]];
                let kept = (0..kgrid[0] * kgrid[1])
                    .filter(|&i| !outpaint_edge_token(i / kgrid[1], i % kgrid[1], kgrid, *extend, *edge))
                    .count();
                h * w - kept
            }
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
        let names = bundle.manifest().classes.as_deref().unwrap_or_default();
        meta.class = self.class.and_then(|c| names.get(c).cloned());
        let (seed, index) = self.images.get(k).copied().unwrap_or_default();
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

    /// The generate job that made `png` (its metadata `m`), checked against `bundle`: `--from`.
    /// The PNG's image count and sheet columns come along (`images`, `columns`).
    pub fn from_metadata(bundle: &Bundle, provider: &str, png: &Path, m: &Metadata) -> Result<Job> {
        let bad = |message: String| Error::Metadata {
            path: png.to_path_buf(),
            message,
        };
        if m.mode != "generate" {
            return Err(bad(format!(
                "was made by `absorb {}`; only generated images can be reproduced with --from",
                m.mode
            )));
        }
        if m.bundle_sha256 != bundle.sha256() {
            return Err(bad(format!(
                "was made with bundle \"{}\" ({}), but --model loads \"{}\" ({}); pass the bundle it was made with",
                m.bundle,
                m.bundle_sha256,
                bundle.manifest().name,
                bundle.sha256()
            )));
        }
        let (Some(seed), Some(index), Some(count), Some(_), Some(_)) =
            (m.seed, m.index, m.count, m.steps, m.temperature)
        else {
            return Err(bad("metadata lacks seed, index, count, steps or temperature".into()));
        };
        if m.provider.as_deref().is_some_and(|p| p != provider) {
            log::warn!(
                "the PNG was made on provider {:?}, this run uses {provider}: pixels may differ",
                m.provider
            );
        }
        let name = m.sampler.as_deref().unwrap_or(crate::SAMPLER);
        let sampler = SamplerKind::from_name(name)
            .ok_or_else(|| Error::param(Param::Sampler, format!("\"{name}\" is not a sampler this build has")))?;
        let decode = match &m.decode {
            Some(name) => DecodeMode::from_name(name)
                .ok_or_else(|| bad(format!("decode \"{name}\" is not a mode this build has")))?,
            None => DecodeMode::default(),
        };
        let sampling = Sampling {
            steps: m.steps,
            temperature: m.temperature,
            temperature_end: m.temperature_end,
            // Made before top-p existed, or without it: no truncation (not the bundle's default).
            top_p: Some(m.top_p.unwrap_or(1.0)),
            sampler: Some(sampler),
            // Absent: spread over the images again, by seed and index.
            class: m
                .class
                .as_deref()
                .map(|c| class_index(bundle, c))
                .transpose()
                .map_err(|e| match e {
                    Error::Param { message, .. } => bad(format!("its metadata's class: {message}")),
                    e => e,
                })?,
        };
        let canvas = Canvas {
            grid: m.grid,
            stride: m.stride,
            window_margin: m.window_margin,
            decode,
        };
        if count > limits::MAX_SHEET_IMAGES {
            return Err(bad(format!(
                "its metadata's count: {count} images is above the limit of {} in one PNG",
                limits::MAX_SHEET_IMAGES
            )));
        }
        // Checked exactly as the flags are; errors name the PNG and the field.
        let from_png = |e: Error| match e {
            Error::Param { param, message } => bad(format!("its metadata's {param}: {message}")),
            e => e,
        };
        let mut job = Job::generate(bundle, seed, index, count, &sampling, &canvas, None).map_err(from_png)?;
        if let Some(c) = m.columns {
            job.set_columns(c).map_err(from_png)?;
        }
        job.check_sheet(bundle).map_err(from_png)?;
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
