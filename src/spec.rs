//! What a caller asks for: one spec per kind of request, with named fields and the service's
//! caps, made into a [`Job`] in one validated step ([`GenerateSpec::job`] and its siblings).
//! The command line fills specs from its flags, the service from JSON bodies, `--from` from a
//! PNG's metadata; each check on a request lives here once, and a job is never changed after it
//! is built. Nothing here loads a model: the checks need only the bundle's manifest.

use std::path::Path;

use crate::bundle::{self, Bundle, Manifest};
use crate::error::{Error, Result};
use crate::image::{self, Mask, Metadata, Tensor};
use crate::job::{check_grids, class_index, CacheMode, Canvas, ImageId, Job, Sampling, Start};
use crate::limits;
use crate::param::Param;
use crate::sampler::SamplerKind;
use crate::sampler::{Settings, Tiling};
use crate::DecodeMode;

pub use crate::graphs::DEFAULT_MAX_BATCH;

/// Caps on one request beyond the library's own limits: the service's (`serve --max-count`,
/// `--max-steps`, `--max-grid`). [`Caps::NONE`] on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Images per request.
    pub max_count: usize,
    /// Reverse steps per request; `None`: the grid's token count only.
    pub max_steps: Option<usize>,
    /// Tokens per side of a grid a request may ask for (a larger canvas, an outpainting);
    /// `None`: [`limits::MAX_GRID_SIDE`] and the bundle's pixel limit only.
    pub max_grid: Option<usize>,
}

impl Caps {
    /// No caps but the library's limits.
    pub const NONE: Caps = Caps {
        max_count: limits::MAX_IMAGES,
        max_steps: None,
        max_grid: None,
    };

    /// The steps a request resolves to (its own, else the bundle's), within the cap.
    fn check_steps(&self, bundle: &Bundle, sampling: &Sampling) -> Result<()> {
        let want = sampling.steps.unwrap_or(bundle.manifest().sampling.steps);
        match self.max_steps {
            Some(max) if want > max => Err(Error::param(
                Param::Steps,
                format!("{want} is above this service's limit of {max}"),
            )),
            _ => Ok(()),
        }
    }
}

impl Default for Caps {
    fn default() -> Self {
        Caps::NONE
    }
}

/// `generate`: images `first_index..first_index + count` of `seed` from all-masked grids.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    /// The seed of every image's stream.
    pub seed: u64,
    /// Index of the first image.
    pub first_index: u64,
    /// How many images.
    pub count: usize,
    /// Sampler settings; absent values are the bundle's.
    pub sampling: Sampling,
    /// The token grid (absent: the bundle's), its windows and how it is decoded.
    pub canvas: Canvas,
    /// Columns of a sheet of the images (absent: about square).
    pub columns: Option<usize>,
    /// Also record the reverse process as frames.
    pub frames: bool,
    /// Images (or windows) per transformer call.
    pub max_batch: usize,
    /// The service's caps.
    pub caps: Caps,
}

impl Default for GenerateSpec {
    fn default() -> Self {
        GenerateSpec {
            seed: 0,
            first_index: 0,
            count: 1,
            sampling: Sampling::default(),
            canvas: Canvas::default(),
            columns: None,
            frames: false,
            max_batch: DEFAULT_MAX_BATCH,
            caps: Caps::NONE,
        }
    }
}

impl GenerateSpec {
    /// The job, every field checked against `bundle` and the caps.
    pub fn job(&self, bundle: &Bundle) -> Result<Job> {
        let count = limits::check_range(Param::Count, self.count, self.caps.max_count.min(limits::MAX_IMAGES))?;
        limits::check_indices(Param::FirstIndex, self.first_index, count)?;
        let max_batch = limits::check_range(Param::MaxBatch, self.max_batch, limits::MAX_BATCH)?;
        let grid = self.canvas.grid.unwrap_or(bundle.manifest().grid());
        let tiling = tiling(bundle, &self.canvas, grid, self.caps.max_grid)?;
        let settings = check_sampling(bundle, &self.sampling, &self.caps, grid)?;
        let columns = match self.columns {
            Some(c) => limits::check_range(Param::Columns, c, count)?,
            None => image::grid_columns(count),
        };
        let job = Job {
            start: Start::Masked,
            images: (0..count as u64)
                .map(|i| ImageId {
                    seed: self.seed,
                    index: self.first_index + i,
                })
                .collect(),
            settings,
            class: self.sampling.class(bundle)?,
            tiling,
            decode: self.canvas.decode,
            record_frames: self.frames,
            columns,
            max_batch,
        };
        if self.frames {
            check_frames(&job)?;
        }
        Ok(job)
    }
}

impl GenerateSpec {
    /// The request that made `png` (its metadata `m`), checked against `bundle`: `--from`. The
    /// PNG's image count and sheet columns come along; errors name the PNG and the key.
    pub fn from_metadata(bundle: &Bundle, provider: &str, png: &Path, m: &Metadata) -> Result<GenerateSpec> {
        let r = Recorded::read(bundle, provider, png, m, "generate")?;
        let decode = match &m.decode {
            Some(name) => DecodeMode::from_name(name)
                .ok_or_else(|| r.bad(format!("decode \"{name}\" is not a mode this build has")))?,
            None => DecodeMode::default(),
        };
        let canvas = Canvas {
            grid: m.grid,
            stride: m.stride,
            window_margin: m.window_margin,
            decode,
        };
        let spec = GenerateSpec {
            seed: r.seed,
            first_index: r.index,
            count: r.count,
            sampling: r.sampling,
            canvas,
            columns: m.columns,
            caps: Caps::NONE,
            ..GenerateSpec::default()
        };
        spec.job(bundle)
            .map_err(|e| r.naming_png(e))?
            .check_sheet(bundle)
            .map_err(|e| r.naming_png(e))?;
        Ok(spec)
    }
}

/// What a PNG's metadata records of the request that made it, checked against the bundle
/// `--from` loads: the part every mode shares.
struct Recorded {
    png: std::path::PathBuf,
    seed: u64,
    index: u64,
    count: usize,
    sampling: Sampling,
}

impl Recorded {
    /// Reads `m` (of `png`, made by `absorb {mode}`).
    fn read(bundle: &Bundle, provider: &str, png: &Path, m: &Metadata, mode: &str) -> Result<Recorded> {
        let bad = |message: String| Error::Metadata {
            path: png.to_path_buf(),
            message,
        };
        if m.mode != mode {
            return Err(bad(format!(
                "was made by `absorb {}`; `absorb {mode} --from` reproduces only images made by `absorb {mode}`{}",
                m.mode,
                if matches!(m.mode.as_str(), "generate" | "vary") {
                    format!(": use `absorb {} --from`", m.mode)
                } else {
                    String::new()
                }
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
        // Made before the sampler was recorded: the default one, the only one then.
        let name = m.sampler.as_deref().unwrap_or(SamplerKind::default().name());
        let sampler = SamplerKind::from_name(name)
            .ok_or_else(|| Error::param(Param::Sampler, format!("\"{name}\" is not a sampler this build has")))?;
        let sampling = Sampling {
            steps: m.steps,
            temperature: m.temperature,
            temperature_end: m.temperature_end,
            // Made before top-p existed, or without it: no truncation (not the bundle's default).
            top_p: Some(m.top_p.unwrap_or(1.0)),
            sampler: Some(sampler),
            threshold: m.threshold,
            // Absent: exact mode (not the bundle's default).
            cache: Some(m.cache.map_or(CacheMode::Off, CacheMode::Every)),
            // Absent: no guidance (not the bundle's default).
            guidance: Some(m.guidance.unwrap_or(0.0)),
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
        if count > limits::MAX_SHEET_IMAGES {
            return Err(bad(format!(
                "its metadata's count: {count} images is above the limit of {} in one PNG",
                limits::MAX_SHEET_IMAGES
            )));
        }
        Ok(Recorded {
            png: png.to_path_buf(),
            seed,
            index,
            count,
            sampling,
        })
    }

    fn bad(&self, message: String) -> Error {
        Error::Metadata {
            path: self.png.clone(),
            message,
        }
    }

    /// A parameter error raised by the recorded values, as an error naming the PNG and the key:
    /// they are checked exactly as the flags are.
    fn naming_png(&self, e: Error) -> Error {
        match e {
            Error::Param { param, message } => self.bad(format!("its metadata's {param}: {message}")),
            e => e,
        }
    }
}

/// A variation's strength: `given`, else the bundle's `sampling.strength`, else
/// [`crate::job::DEFAULT_STRENGTH`]; checked to lie in (0, 1].
pub fn strength(bundle: &Bundle, given: Option<f32>) -> Result<f32> {
    let s = given
        .or(bundle.manifest().sampling.strength)
        .unwrap_or(crate::job::DEFAULT_STRENGTH);
    if !(s.is_finite() && s > 0.0 && s <= 1.0) {
        return Err(Error::param(
            Param::Strength,
            format!("{s} is not in (0, 1]: it is the share of the image's tokens to redo"),
        ));
    }
    Ok(s)
}

/// `vary`: variations of `image` (the bundle's size). It is encoded once; image `index` of
/// `seed` masks its own seeded draw of `strength` of the tokens (at least one) and runs the
/// reverse process from there: the forward process applied part way, then undone. Each image
/// is the same whatever else is made with it.
#[derive(Debug, Clone)]
pub struct VarySpec {
    /// The source image.
    pub image: Tensor,
    /// sha256 of the source image's file (recorded, and checked by `--from`).
    pub source_sha256: String,
    /// The share of tokens redone, in (0, 1]; absent: the bundle's `sampling.strength`, else
    /// [`crate::job::DEFAULT_STRENGTH`].
    pub strength: Option<f32>,
    /// The seed of every image's stream.
    pub seed: u64,
    /// Index of the first image.
    pub first_index: u64,
    /// How many variations.
    pub count: usize,
    /// Sampler settings; absent values are the bundle's.
    pub sampling: Sampling,
    /// Columns of a sheet of the images (absent: about square).
    pub columns: Option<usize>,
    /// Images per transformer call.
    pub max_batch: usize,
    /// The service's caps.
    pub caps: Caps,
}

impl VarySpec {
    /// One variation of `image`, whose file held `source` (bytes), with the defaults: seed 0,
    /// the bundle's strength and sampling.
    pub fn new(image: Tensor, source: &[u8]) -> VarySpec {
        VarySpec {
            image,
            source_sha256: bundle::sha256_hex(source),
            strength: None,
            seed: 0,
            first_index: 0,
            count: 1,
            sampling: Sampling::default(),
            columns: None,
            max_batch: DEFAULT_MAX_BATCH,
            caps: Caps::NONE,
        }
    }

    /// The strength this spec resolves to with `bundle`, checked.
    pub fn strength(&self, bundle: &Bundle) -> Result<f32> {
        strength(bundle, self.strength)
    }

    /// The job, every field checked against `bundle` and the caps.
    pub fn job(self, bundle: &Bundle) -> Result<Job> {
        let strength = self.strength(bundle)?;
        let count = limits::check_range(Param::Count, self.count, self.caps.max_count.min(limits::MAX_IMAGES))?;
        limits::check_indices(Param::FirstIndex, self.first_index, count)?;
        let max_batch = limits::check_range(Param::MaxBatch, self.max_batch, limits::MAX_BATCH)?;
        let grid = bundle.manifest().grid();
        let settings = check_sampling(bundle, &self.sampling, &self.caps, grid)?;
        let columns = match self.columns {
            Some(c) => limits::check_range(Param::Columns, c, count)?,
            None => image::grid_columns(count),
        };
        let masked = crate::job::vary_count(strength, grid[0] * grid[1]);
        Ok(Job {
            start: Start::Vary {
                image: self.image,
                source_sha256: self.source_sha256,
                strength,
                masked,
            },
            images: (0..count as u64)
                .map(|i| ImageId {
                    seed: self.seed,
                    index: self.first_index + i,
                })
                .collect(),
            settings,
            class: self.sampling.class(bundle)?,
            tiling: None,
            decode: DecodeMode::default(),
            record_frames: false,
            columns,
            max_batch,
        })
    }

    /// The variation `png` (its metadata `m`) of `image`, whose file held `source`: `absorb
    /// vary --from`. The source must be the one recorded (by sha256); errors name the PNG and
    /// the key.
    pub fn from_metadata(
        bundle: &Bundle,
        provider: &str,
        png: &Path,
        m: &Metadata,
        image: Tensor,
        source: &[u8],
    ) -> Result<VarySpec> {
        let r = Recorded::read(bundle, provider, png, m, "vary")?;
        let (Some(strength), Some(recorded)) = (m.strength, m.source_sha256.as_deref()) else {
            return Err(r.bad("metadata lacks strength or source_sha256".into()));
        };
        let spec = VarySpec {
            strength: Some(strength),
            seed: r.seed,
            first_index: r.index,
            count: r.count,
            sampling: r.sampling,
            columns: m.columns,
            ..VarySpec::new(image, source)
        };
        if spec.source_sha256 != recorded {
            return Err(r.bad(format!(
                "is a variation of an image with sha256 {recorded}, but --image has {}: pass the image it was made from",
                spec.source_sha256
            )));
        }
        spec.clone()
            .job(bundle)
            .map_err(|e| r.naming_png(e))?
            .check_sheet(bundle)
            .map_err(|e| r.naming_png(e))?;
        Ok(spec)
    }
}

/// `inpaint`: regenerate the pixels of `image` under `mask` (pooled to tokens), from stream
/// (`seed`, 0); tokens outside the mask never change.
#[derive(Debug, Clone)]
pub struct InpaintSpec {
    /// The image to edit, the bundle's size.
    pub image: Tensor,
    /// Pixels to regenerate.
    pub mask: Mask,
    /// The seed.
    pub seed: u64,
    /// Sampler settings; absent values are the bundle's.
    pub sampling: Sampling,
    /// Keep the input's own pixels outside the mask (else the decoder's everywhere).
    pub keep_input: bool,
    /// How many inpaintings, images `0..count` of the seed (each from its own stream).
    pub count: usize,
    /// Images per transformer call.
    pub max_batch: usize,
    /// The service's caps.
    pub caps: Caps,
}

impl InpaintSpec {
    /// Inpainting `image` under `mask` with the defaults: seed 0, the bundle's sampling, the
    /// input's pixels kept.
    pub fn new(image: Tensor, mask: Mask) -> InpaintSpec {
        InpaintSpec {
            image,
            mask,
            seed: 0,
            sampling: Sampling::default(),
            keep_input: true,
            count: 1,
            max_batch: DEFAULT_MAX_BATCH,
            caps: Caps::NONE,
        }
    }

    /// The job, every field checked against `bundle` and the caps.
    pub fn job(self, bundle: &Bundle) -> Result<Job> {
        let settings = check_sampling(bundle, &self.sampling, &self.caps, bundle.manifest().grid())?;
        let grid = bundle.manifest().grid();
        let token_mask = image::pool_mask(&self.mask, grid);
        if !token_mask.iter().any(|&m| m) {
            return Err(Error::param(
                Param::Mask,
                "the mask is empty: mark the region to regenerate in white",
            ));
        }
        let count = limits::check_range(Param::Count, self.count, self.caps.max_count.min(limits::MAX_IMAGES))?;
        let start = Start::Inpaint {
            image: self.image,
            mask: self.mask,
            token_mask,
            keep_input: self.keep_input,
        };
        let job =
            Job::one(start, self.seed, settings, self.sampling.class(bundle)?, None).with_max_batch(self.max_batch)?;
        if count == 1 {
            return Ok(job);
        }
        job.with_images(
            (0..count as u64)
                .map(|index| ImageId { seed: self.seed, index })
                .collect(),
        )
    }
}

/// `outpaint`: extend `image` by `extend` pixels `[left, right, up, down]` from stream (`seed`,
/// 0); the image's tokens never change but `edge` of them (absent: the bundle's
/// `sampling.outpaint_edge`, else 0) along each extended side.
#[derive(Debug, Clone)]
pub struct OutpaintSpec {
    /// The image to extend: any size of whole tokens, at least the bundle's.
    pub image: Tensor,
    /// Pixels added per side, `[left, right, up, down]`.
    pub extend: [usize; 4],
    /// The seed.
    pub seed: u64,
    /// Sampler settings; absent values are the bundle's.
    pub sampling: Sampling,
    /// The windows of the outpainted grid and how it is decoded (its grid is the result's).
    pub canvas: Canvas,
    /// Keep the input's own pixels (else the decoder's everywhere).
    pub keep_input: bool,
    /// How deep along each extended side the input's tokens are regenerated too.
    pub edge: Option<usize>,
    /// Also record the reverse process as frames.
    pub frames: bool,
    /// Windows per transformer call.
    pub max_batch: usize,
    /// The service's caps.
    pub caps: Caps,
}

impl OutpaintSpec {
    /// Extending `image` by `extend` with the defaults.
    pub fn new(image: Tensor, extend: [usize; 4]) -> OutpaintSpec {
        OutpaintSpec {
            image,
            extend,
            seed: 0,
            sampling: Sampling::default(),
            canvas: Canvas::default(),
            keep_input: true,
            edge: None,
            frames: false,
            max_batch: DEFAULT_MAX_BATCH,
            caps: Caps::NONE,
        }
    }

    /// The job, every field checked against `bundle` and the caps.
    pub fn job(self, bundle: &Bundle) -> Result<Job> {
        let m = bundle.manifest();
        check_tileable(&self.image, m)?;
        let max_batch = limits::check_range(Param::MaxBatch, self.max_batch, limits::MAX_BATCH)?;
        let trained = m.grid();
        let edge = self.edge.or(m.sampling.outpaint_edge).unwrap_or(0);
        if !bundle::outpaint_edge_fits(edge, trained) {
            return Err(Error::param(
                Param::OutpaintEdge,
                format!(
                    "{edge} must be less than half the trained grid {}x{} (some of the input's tokens must stay)",
                    trained[0], trained[1]
                ),
            ));
        }
        let (grid, at) = outpaint_grid(
            [self.image.height, self.image.width],
            m.token_pixels(),
            self.extend,
            self.caps.max_grid.unwrap_or(limits::MAX_GRID_SIDE),
        )?;
        let canvas = Canvas {
            grid: Some(grid),
            ..self.canvas
        };
        let tiling = tiling(bundle, &canvas, grid, self.caps.max_grid)?;
        let settings = check_sampling(bundle, &self.sampling, &self.caps, grid)?;
        let class = self.sampling.class(bundle)?;
        let start = Start::Outpaint {
            image: self.image,
            extend: self.extend,
            at,
            edge,
            keep_input: self.keep_input,
        };
        let job = Job {
            decode: canvas.decode,
            record_frames: self.frames,
            max_batch,
            ..Job::one(start, self.seed, settings, class, tiling)
        };
        if self.frames {
            check_frames(&job)?;
        }
        Ok(job)
    }
}

/// Known token grids, one per image, on `canvas`'s grid (absent: the bundle's): positions
/// holding the mask id are sampled, image `i` from stream (`seed`, `i`); the others are kept.
/// How a partly known grid is finished (outpainting is one, starting from an image).
#[derive(Debug, Clone)]
pub struct FillSpec {
    /// The grids, row-major; tokens are codes or the mask id.
    pub grids: Vec<Vec<i64>>,
    /// The seed.
    pub seed: u64,
    /// Sampler settings; absent values are the bundle's.
    pub sampling: Sampling,
    /// The token grid, its windows and how it is decoded.
    pub canvas: Canvas,
    /// Images (or windows) per transformer call.
    pub max_batch: usize,
    /// The service's caps.
    pub caps: Caps,
}

impl FillSpec {
    /// Filling `grids` with the defaults.
    pub fn new(grids: Vec<Vec<i64>>) -> FillSpec {
        FillSpec {
            grids,
            seed: 0,
            sampling: Sampling::default(),
            canvas: Canvas::default(),
            max_batch: DEFAULT_MAX_BATCH,
            caps: Caps::NONE,
        }
    }

    /// The job, every field checked against `bundle` and the caps.
    pub fn job(self, bundle: &Bundle) -> Result<Job> {
        let m = bundle.manifest();
        let count = limits::check_range(
            Param::Count,
            self.grids.len(),
            self.caps.max_count.min(limits::MAX_IMAGES),
        )?;
        let max_batch = limits::check_range(Param::MaxBatch, self.max_batch, limits::MAX_BATCH)?;
        let grid = self.canvas.grid.unwrap_or(m.grid());
        let tiling = tiling(bundle, &self.canvas, grid, self.caps.max_grid)?;
        check_grids(&self.grids, grid, m.tokens.codebook_size, Some(m.tokens.mask_id))?;
        let settings = check_sampling(bundle, &self.sampling, &self.caps, grid)?;
        let images = (0..count as u64)
            .map(|index| ImageId { seed: self.seed, index })
            .collect();
        Ok(Job {
            start: Start::Tokens(self.grids),
            images,
            settings,
            class: self.sampling.class(bundle)?,
            tiling,
            decode: self.canvas.decode,
            record_frames: false,
            columns: image::grid_columns(count),
            max_batch,
        })
    }
}

/// The settings a request's sampler fields resolve to on a token `grid`, within the caps: every
/// spec's one sampler check (the service runs it on the bundle's grid before an edit's images
/// are decoded).
pub fn check_sampling(bundle: &Bundle, sampling: &Sampling, caps: &Caps, grid: [usize; 2]) -> Result<Settings> {
    caps.check_steps(bundle, sampling)?;
    let settings = sampling.settings(bundle, grid)?;
    if settings.cache.is_none() {
        return Ok(settings);
    }
    let own = bundle.manifest().grid();
    if grid != own {
        // A bundle's default gives way to exact mode on larger grids; a request's own is refused.
        if sampling.cache.is_none() {
            return Ok(Settings {
                cache: None,
                ..settings
            });
        }
        return Err(Error::param(
            Param::Cache,
            format!(
                "cached attention runs on the bundle's own {}x{} token grid, not {}x{}: use cache off for larger grids",
                own[0], own[1], grid[0], grid[1]
            ),
        ));
    }
    bundle.cache_graph()?;
    Ok(settings)
}

/// Windows of the bundle's grid over `grid`; stride and margin default to the bundle's
/// (`sampling.window_stride`, `sampling.window_margin`), else half and an eighth of a window.
/// `None` for the bundle's own grid. `max_grid`: a service's cap on tokens per side.
pub fn tiling(bundle: &Bundle, canvas: &Canvas, grid: [usize; 2], max_grid: Option<usize>) -> Result<Option<Tiling>> {
    let m = bundle.manifest();
    let window = m.grid();
    if let Some(max_grid) = max_grid.filter(|&m| grid[0] > m || grid[1] > m) {
        return Err(Error::param(
            Param::Grid,
            format!(
                "{}x{} tokens is above this service's limit of {max_grid} per side",
                grid[0], grid[1]
            ),
        ));
    }
    check_grid(m, grid, Param::Grid)?;
    if grid == window {
        return Ok(None);
    }
    if canvas.decode == DecodeMode::Whole {
        check_whole_decode(m, grid, Param::Decode)?;
    }
    let d = &m.sampling;
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

/// Checks `grid` (`[rows, cols]` of tokens) against the limits, before any arithmetic on it;
/// `param` is where it came from.
pub fn check_grid(m: &Manifest, grid: [usize; 2], param: Param) -> Result<()> {
    let max = m.max_grid_side();
    if grid[0] > max[0] || grid[1] > max[1] {
        let f = m.token_pixels();
        return Err(Error::param(
            param,
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
pub fn check_whole_decode(m: &Manifest, grid: [usize; 2], param: Param) -> Result<()> {
    check_grid(m, grid, param)?;
    let f = m.token_pixels();
    let px = [grid[0] * f[0], grid[1] * f[1]];
    let max = limits::MAX_WHOLE_DECODE_SIDE;
    if px[0] > max || px[1] > max {
        return Err(Error::param(
            param,
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

/// Checks that `image` can be encoded tile by tile with the bundle of `m`: its channels, at
/// least the bundle's size, a whole number of tokens.
pub fn check_tileable(image: &Tensor, m: &Manifest) -> Result<()> {
    let spec = &m.image;
    let f = m.token_pixels();
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

/// Previews record every image of one batch: a larger grid one image at a time, at most a
/// batch of images.
fn check_frames(job: &Job) -> Result<()> {
    let count = job.images().len();
    if job.tiling().is_some() && count > 1 {
        return Err(Error::param(
            Param::Frames,
            "previews of a larger grid are made one image at a time: ask for 1 image",
        ));
    }
    if count > job.max_batch() {
        return Err(Error::param(
            Param::Frames,
            format!(
                "a preview shows all images in one batch: {count} images is above the batch size {}",
                job.max_batch()
            ),
        ));
    }
    Ok(())
}
