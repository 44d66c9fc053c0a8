//! absorb: discrete absorbing diffusion ("Unleashing Transformers", Bond-Taylor et al. 2021)
//! on ONNX Runtime.
//!
//! A bundle holds three exported graphs (VQGAN encoder, decoder, bidirectional transformer) and
//! a `model.json`. [`Pipeline`] loads them; generation starts from an all-masked token grid,
//! reveals positions over a few steps, draws each revealed token from the transformer's logits,
//! and decodes the grid to pixels.
//!
//! The reverse process itself is pure and needs no model: [`sampler::run`] takes the denoiser
//! as a closure. With a fake denoiser that always prefers code 3:
//!
//! ```
//! use absorb::sampler::{self, Chain, Settings, TokenSpace};
//!
//! let space = TokenSpace { len: 16, codebook_size: 8, mask_id: 8 };
//! let settings = Settings::new(4, 1.0, &space)?;
//! let mut chains = vec![Chain::masked(&space, &settings, 42, 0)?];
//! let mut denoise = |tokens: &[i64], rows: usize, logits: &mut Vec<f32>| {
//!     logits.clear();
//!     for _ in 0..rows * 16 {
//!         logits.extend((0..8).map(|k| if k == 3 { 30.0 } else { 0.0 }));
//!     }
//!     assert_eq!(tokens.len(), rows * 16);
//!     Ok(())
//! };
//! let stats = sampler::run(&mut chains, &space, &settings, &mut denoise, &mut |_| {})?;
//! assert!(chains[0].tokens().iter().all(|&t| t == 3));
//! assert!(stats.calls <= 4);
//! # Ok::<(), absorb::Error>(())
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod agreement;
pub mod batch;
pub mod bench;
pub mod bundle;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod graphs;
pub mod image;
pub mod sampler;
pub mod server;

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

pub use crate::bundle::Bundle;
pub use crate::error::{Error, Result};
pub use crate::graphs::{Provider, ProviderConfig, Runtime, RuntimeOptions};

use crate::graphs::Graphs;
use crate::image::{Metadata, Pixels, Tensor};
use crate::sampler::{Chain, RunStats, Settings, StepReport, Tiling, TokenSpace};

/// This crate's version, recorded in PNG metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of the default sampler, recorded in PNG metadata.
pub const SAMPLER: &str = "absorbing";

/// Writes a larger-than-trained grid, its windows and decode mode into PNG metadata (nothing for
/// the bundle's own grid, so those PNGs are unchanged).
pub fn record_tiling(meta: &mut Metadata, tiling: &Tiling, trained: [usize; 2], decode: DecodeMode) {
    if tiling.grid() != trained {
        meta.grid = Some(tiling.grid());
        meta.stride = Some(tiling.stride());
        meta.window_margin = Some(tiling.margin());
        meta.decode = Some(decode.name().to_string());
    }
}

/// How a grid larger than the bundle's is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Window by window in the decoder's trained shape, overlaps blended (one batched run).
    #[default]
    Tiles,
    /// The whole grid in one piece (the paper's way; the decoder is convolutional, but its
    /// attention and normalisation then see a shape they were not trained on).
    Whole,
}

impl DecodeMode {
    /// The name used on the command line, in JSON and in PNG metadata.
    pub fn name(self) -> &'static str {
        match self {
            DecodeMode::Tiles => "tiles",
            DecodeMode::Whole => "whole",
        }
    }

    /// Parses a name written by [`DecodeMode::name`].
    pub fn from_name(name: &str) -> Option<DecodeMode> {
        [DecodeMode::Tiles, DecodeMode::Whole]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// Writes the sampling settings (sampler, steps, temperature schedule) into PNG metadata.
pub fn record_settings(meta: &mut Metadata, settings: &Settings) {
    meta.sampler = Some(settings.sampler.name().to_string());
    meta.steps = Some(settings.steps);
    meta.temperature = Some(settings.temperature);
    meta.temperature_end = settings.temperature_end;
}

/// A fresh seed from the clock and process id, for requests that give none (it is printed and
/// recorded, so the image can still be reproduced).
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    // splitmix64 finaliser, so nearby clocks give unrelated seeds
    let mut z = mixed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Images fed to the transformer together at most, by default.
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Windows of a bundle's `window` grid over `grid`; `stride` and `margin` default to the bundle's
/// (`defaults.window_stride`, `defaults.window_margin`), else half and an eighth of a window.
pub fn tiling_for(
    window: [usize; 2],
    defaults: &bundle::SamplingDefaults,
    grid: [usize; 2],
    stride: Option<[usize; 2]>,
    margin: Option<[usize; 2]>,
) -> Result<Tiling> {
    Tiling::new(
        grid,
        window,
        stride
            .or(defaults.window_stride)
            .unwrap_or_else(|| Tiling::default_stride(window)),
        margin
            .or(defaults.window_margin)
            .unwrap_or_else(|| Tiling::default_margin(window)),
    )
}

/// Checks that `image` can be encoded tile by tile by a bundle of image `spec` and token `grid`:
/// its channels, at least the bundle's size, a whole number of tokens.
pub fn check_tileable(image: &Tensor, spec: &bundle::ImageSpec, grid: [usize; 2]) -> Result<()> {
    let f = [spec.height / grid[0], spec.width / grid[1]];
    if image.channels != spec.channels
        || image.height < spec.height
        || image.width < spec.width
        || image.height % f[0] != 0
        || image.width % f[1] != 0
    {
        return Err(Error::param(
            "image",
            format!(
                "image is {}x{} with {} channel(s): must have {} channel(s), be at least {}x{} and a multiple of {}x{} pixels (one token)",
                image.width, image.height, image.channels, spec.channels, spec.width, spec.height, f[1], f[0]
            ),
        ));
    }
    Ok(())
}

/// How a generate or outpaint request is carried out beyond its sampling settings.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// Windows over a grid larger than the bundle's; `None` = the bundle's grid.
    pub tiling: Option<&'a Tiling>,
    /// How a larger grid is decoded.
    pub decode: DecodeMode,
    /// Also render one preview frame per step that revealed something.
    pub frames: bool,
    /// Grid columns of a frame showing several images.
    pub columns: usize,
    /// Images (or windows) per transformer call.
    pub max_batch: usize,
}

/// What a request made.
#[derive(Debug, Clone)]
pub struct Made {
    /// The token grids, one per image (row-major, `grid`).
    pub tokens: Vec<Vec<i64>>,
    /// The decoded images.
    pub pixels: Vec<Pixels>,
    /// The token grid size.
    pub grid: [usize; 2],
    /// Preview frames when asked for.
    pub frames: Option<Vec<Pixels>>,
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
    for (side, px, unit) in [
        ("left", left, token_px[1]),
        ("right", right, token_px[1]),
        ("up", up, token_px[0]),
        ("down", down, token_px[0]),
    ] {
        if px % unit != 0 {
            return Err(Error::param(
                "extend",
                format!("{side}={px} is not a whole number of tokens: use a multiple of {unit} pixels"),
            ));
        }
    }
    if extend == [0; 4] {
        return Err(Error::param("extend", "nothing to extend: give e.g. right=32"));
    }
    let grid = [
        (image[0] + up + down) / token_px[0],
        (image[1] + left + right) / token_px[1],
    ];
    if grid[0] > max_side || grid[1] > max_side {
        return Err(Error::param(
            "extend",
            format!(
                "the result would be {}x{} tokens: at most {max_side} per side",
                grid[0], grid[1]
            ),
        ));
    }
    Ok((grid, [up / token_px[0], left / token_px[1]]))
}

/// Logs a warning when the bundle records that `variant` falls below its agreement bar on CPUs
/// with this one's int8 kernel (see [`cpu::VariantRecord`]).
fn warn_if_variant_falls_short(bundle: &Bundle, variant: &str) {
    let kernel = cpu::detect().int8_kernel;
    match cpu::VariantRecord::from_provenance(&bundle.manifest().provenance, variant) {
        Some(record) => match record.warning(variant, kernel) {
            Some(w) => log::warn!("{w}"),
            None if !record.by_cpu.iter().any(|(k, _)| k == kernel.name()) => log::info!(
                "the {variant} transformer was not measured on CPUs like this one (int8 kernel {}): \
                 `absorb check-variant --variant {variant}` measures it",
                kernel.name()
            ),
            None => {}
        },
        None => log::info!("the bundle records no per-CPU agreement for its {variant} transformer"),
    }
}

/// A loaded bundle with its three sessions: the object every command works through.
pub struct Pipeline {
    bundle: Bundle,
    graphs: Graphs,
    runtime: &'static Runtime,
    load_time: Duration,
}

/// Wall-clock time per phase of one request, for `-v` and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Inside the transformer graph.
    pub transformer: Duration,
    /// Transformer calls made.
    pub transformer_calls: usize,
    /// Sampling outside the transformer: reveal schedule, softmax, draws, buffer copies.
    pub sampler: Duration,
    /// Decoder graph.
    pub decode: Duration,
}

impl Pipeline {
    /// Loads ONNX Runtime (once per process), the bundle in `dir`, and its three graphs on
    /// `provider`, checking each graph against the manifest.
    pub fn load(dir: &Path, options: &RuntimeOptions, provider: Provider) -> Result<Pipeline> {
        Pipeline::load_with(dir, options, &ProviderConfig::new(provider))
    }

    /// [`Pipeline::load`] with provider settings (TensorRT precision, engine cache, profiles).
    pub fn load_with(dir: &Path, options: &RuntimeOptions, config: &ProviderConfig) -> Result<Pipeline> {
        let start = Instant::now();
        let runtime = Runtime::init(options)?;
        let bundle = Bundle::load_variant(dir, config.variant.as_deref())?;
        let graphs = Graphs::load(&bundle, runtime, config)?;
        let load_time = start.elapsed();
        log::info!(
            "loaded bundle \"{}\" from {} on {} in {:.0?}",
            bundle.manifest().name,
            dir.display(),
            graphs.provider(),
            load_time
        );
        if let (Some(variant), Provider::Cpu) = (bundle.variant(), graphs.provider()) {
            warn_if_variant_falls_short(&bundle, variant);
        }
        Ok(Pipeline {
            bundle,
            graphs,
            runtime,
            load_time,
        })
    }

    /// The bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The ONNX Runtime in use.
    pub fn runtime(&self) -> &'static Runtime {
        self.runtime
    }

    /// The provider the graphs run on.
    pub fn provider(&self) -> Provider {
        self.graphs.provider()
    }

    /// Time `load` took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The bundle's token space.
    pub fn token_space(&self) -> TokenSpace {
        let t = &self.bundle.manifest().tokens;
        TokenSpace {
            len: t.len(),
            codebook_size: t.codebook_size,
            mask_id: t.mask_id,
        }
    }

    /// The token grid `[h, w]`.
    pub fn grid(&self) -> [usize; 2] {
        let t = &self.bundle.manifest().tokens;
        [t.height, t.width]
    }

    /// The settings recorded in a PNG's metadata, validated against this bundle.
    pub fn settings_from_metadata(&self, m: &Metadata) -> Result<Settings> {
        let name = m.sampler.as_deref().unwrap_or(SAMPLER);
        let kind = sampler::SamplerKind::from_name(name)
            .ok_or_else(|| Error::param("sampler", format!("\"{name}\" is not a sampler this build has")))?;
        self.settings_for(m.grid.unwrap_or(self.grid()), m.steps, m.temperature)?
            .with_sampler(kind)
            .with_temperature_end(m.temperature_end)
    }

    /// Validated settings: the given values, or the bundle's defaults.
    pub fn settings(&self, steps: Option<usize>, temperature: Option<f32>) -> Result<Settings> {
        let d = &self.bundle.manifest().sampling;
        Settings::new(
            steps.unwrap_or(d.steps),
            temperature.unwrap_or(d.temperature),
            &self.token_space(),
        )
    }

    /// Generates the token grids of images `indices` under `seed`, at most `max_batch` images
    /// per transformer call. Image `i` is the same whatever the range and batch size.
    pub fn generate(
        &mut self,
        seed: u64,
        indices: Range<u64>,
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<Vec<i64>>> {
        let streams: Vec<(u64, u64)> = indices.map(|i| (seed, i)).collect();
        self.generate_streams(&streams, settings, max_batch, on_step, timings)
    }

    /// Generates one token grid per `(seed, index)` stream, at most `max_batch` images per
    /// transformer call whatever their seeds: the service batches concurrent requests with equal
    /// settings this way. Each image is the one [`Pipeline::generate`] gives for its seed and index.
    pub fn generate_streams(
        &mut self,
        streams: &[(u64, u64)],
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<Vec<i64>>> {
        if max_batch == 0 {
            return Err(Error::param("max-batch", "0 is not allowed: use 1 or more"));
        }
        let space = self.token_space();
        let mut out = Vec::with_capacity(streams.len());
        for chunk in streams.chunks(max_batch) {
            let mut chains: Vec<Chain> = chunk
                .iter()
                .map(|&(seed, i)| Chain::masked(&space, settings, seed, i))
                .collect::<Result<_>>()?;
            self.run_chains(&mut chains, settings, on_step, timings)?;
            out.extend(chains.into_iter().map(Chain::into_tokens));
        }
        Ok(out)
    }

    /// Inpaints: encodes `image`, masks the tokens where `token_mask` is true, and samples only
    /// those under image stream (`seed`, 0). Known tokens are never changed.
    pub fn inpaint(
        &mut self,
        image: &Tensor,
        token_mask: &[bool],
        seed: u64,
        settings: &Settings,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<i64>> {
        let space = self.token_space();
        if token_mask.len() != space.len {
            return Err(Error::Tokens(format!(
                "mask has {} positions, the grid has {}",
                token_mask.len(),
                space.len
            )));
        }
        if !token_mask.iter().any(|&m| m) {
            return Err(Error::param(
                "mask",
                "the mask is empty: mark the region to regenerate in white",
            ));
        }
        let mut tokens = self.encode(image)?;
        for (t, &m) in tokens.iter_mut().zip(token_mask) {
            if m {
                *t = space.mask_id;
            }
        }
        let mut chains = vec![Chain::new(tokens, &space, settings, sampler::image_rng(seed, 0))?];
        self.run_chains(&mut chains, settings, on_step, timings)?;
        Ok(chains.remove(0).into_tokens())
    }

    fn run_chains(
        &mut self,
        chains: &mut [Chain],
        settings: &Settings,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<RunStats> {
        self.run_with(chains, settings, None, on_step, timings)
    }

    /// Runs the sampler on `chains` (windowed over `tiled`'s tiling, `max_batch` rows per call,
    /// when given) and adds the time inside and outside the transformer to `timings`.
    fn run_with(
        &mut self,
        chains: &mut [Chain],
        settings: &Settings,
        tiled: Option<(&Tiling, usize)>,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<RunStats> {
        let space = self.token_space();
        let before = self.graphs.transformer_stats;
        let start = Instant::now();
        let graphs = &mut self.graphs;
        let mut denoise = |tokens: &[i64], rows: usize, logits: &mut Vec<f32>| graphs.transformer(tokens, rows, logits);
        let stats = match tiled {
            Some((tiling, max_batch)) => {
                sampler::run_tiled(chains, tiling, &space, settings, max_batch, &mut denoise, on_step)?
            }
            None => sampler::run(chains, &space, settings, &mut denoise, on_step)?,
        };
        let total = start.elapsed();
        let after = self.graphs.transformer_stats;
        let in_graph = after.time - before.time;
        timings.transformer += in_graph;
        timings.transformer_calls += after.calls - before.calls;
        timings.sampler += total.saturating_sub(in_graph);
        Ok(stats)
    }

    /// The token space of a `grid` of this bundle's codes (the bundle's own grid or a larger one).
    pub fn token_space_of(&self, grid: [usize; 2]) -> TokenSpace {
        TokenSpace {
            len: grid[0] * grid[1],
            ..self.token_space()
        }
    }

    /// Validated settings for sampling a `grid` (steps may go up to its number of tokens).
    pub fn settings_for(&self, grid: [usize; 2], steps: Option<usize>, temperature: Option<f32>) -> Result<Settings> {
        let d = &self.bundle.manifest().sampling;
        Settings::new(
            steps.unwrap_or(d.steps),
            temperature.unwrap_or(d.temperature),
            &self.token_space_of(grid),
        )
    }

    /// Windows of this bundle's grid over `grid`; `stride` and `margin` default to the bundle's
    /// (`sampling.window_stride`, `sampling.window_margin`), else half and an eighth of a window.
    pub fn tiling(&self, grid: [usize; 2], stride: Option<[usize; 2]>, margin: Option<[usize; 2]>) -> Result<Tiling> {
        tiling_for(self.grid(), &self.bundle.manifest().sampling, grid, stride, margin)
    }

    /// Decodes token grids of `tiling`'s size window by window (each window in the decoder's
    /// trained shape, all in one batched run), blending overlaps with weights that fall off
    /// towards a window's inner edges. The decoder's attention and normalisation see exactly
    /// what they were trained on, which decoding the whole grid at once does not give.
    pub fn decode_tiled(
        &mut self,
        grids: &[Vec<i64>],
        tiling: &Tiling,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Tensor>> {
        let [gh, gw] = tiling.grid();
        let w = self.grid();
        let mut cuts = Vec::with_capacity(grids.len() * tiling.windows());
        for g in grids {
            if g.len() != gh * gw {
                return Err(Error::Tokens(format!(
                    "a grid has {} tokens, expected {gh}x{gw}",
                    g.len()
                )));
            }
            for &[r0, c0] in tiling.offsets() {
                cuts.push(
                    (r0..r0 + w[0])
                        .flat_map(|r| g[r * gw + c0..r * gw + c0 + w[1]].iter().copied())
                        .collect(),
                );
            }
        }
        let tiles = self.decode(&cuts, w, max_batch, timings)?;
        let (c, th, tw) = (tiles[0].channels, tiles[0].height, tiles[0].width);
        let f = [th / w[0], tw / w[1]];
        let (ph, pw) = (gh * f[0], gw * f[1]);
        // Per axis: distance (pixels) to the nearest inner edge, capped at half a window.
        let weight = |pos: usize, start: usize, len: usize, total: usize| {
            let lo = if start == 0 {
                f64::INFINITY
            } else {
                (pos - start) as f64 + 0.5
            };
            let hi = if start + len == total {
                f64::INFINITY
            } else {
                (start + len - pos) as f64 - 0.5
            };
            lo.min(hi).min(len as f64 / 2.0)
        };
        let mut out = Vec::with_capacity(grids.len());
        for tiles in tiles.chunks(tiling.windows()) {
            let mut acc = vec![0f64; c * ph * pw];
            let mut norm = vec![0f64; ph * pw];
            for (tile, &[r0, c0]) in tiles.iter().zip(tiling.offsets()) {
                let (y0, x0) = (r0 * f[0], c0 * f[1]);
                for y in 0..th {
                    let wy = weight(y0 + y, y0, th, ph);
                    for x in 0..tw {
                        let wt = wy * weight(x0 + x, x0, tw, pw);
                        let o = (y0 + y) * pw + x0 + x;
                        norm[o] += wt;
                        for ch in 0..c {
                            acc[ch * ph * pw + o] += wt * tile.data[(ch * th + y) * tw + x] as f64;
                        }
                    }
                }
            }
            let data = acc
                .iter()
                .enumerate()
                .map(|(i, &a)| (a / norm[i % (ph * pw)]) as f32)
                .collect();
            out.push(Tensor {
                channels: c,
                height: ph,
                width: pw,
                data,
            });
        }
        Ok(out)
    }

    /// Generates images `indices` under `seed` on the big grid of `tiling`, each from its own
    /// stream, the windows of each step batched `max_batch` per transformer call. A tiling of
    /// the bundle's own grid is plain [`Pipeline::generate`].
    #[allow(clippy::too_many_arguments)]
    pub fn generate_tiled(
        &mut self,
        seed: u64,
        indices: Range<u64>,
        tiling: &Tiling,
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<Vec<i64>>> {
        if tiling.grid() == self.grid() {
            return self.generate(seed, indices, settings, max_batch, on_step, timings);
        }
        if max_batch == 0 {
            return Err(Error::param("max-batch", "0 is not allowed: use 1 or more"));
        }
        let big = self.token_space_of(tiling.grid());
        let indices: Vec<u64> = indices.collect();
        let mut out = Vec::with_capacity(indices.len());
        // Images whose windows fill about max_batch rows per step go together.
        let per_run = (max_batch / tiling.windows().min(max_batch)).max(1);
        for chunk in indices.chunks(per_run) {
            let mut chains: Vec<Chain> = chunk
                .iter()
                .map(|&i| Chain::masked(&big, settings, seed, i))
                .collect::<Result<_>>()?;
            self.run_tiled(&mut chains, tiling, settings, max_batch, on_step, timings)?;
            out.extend(chains.into_iter().map(Chain::into_tokens));
        }
        Ok(out)
    }

    /// Samples the masked positions of `tokens` (a grid of `tiling`'s size holding codes and the
    /// mask id) under stream (`seed`, 0) with windows, keeping every known token: outpainting.
    #[allow(clippy::too_many_arguments)]
    pub fn fill_tiled(
        &mut self,
        tokens: Vec<i64>,
        tiling: &Tiling,
        seed: u64,
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<i64>> {
        let big = self.token_space_of(tiling.grid());
        let mut chain = Chain::new(tokens, &big, settings, sampler::image_rng(seed, 0))?;
        if chain.masked_count() == 0 {
            return Err(Error::param("extend", "nothing to fill: every token is known"));
        }
        if tiling.grid() == self.grid() {
            self.run_chains(std::slice::from_mut(&mut chain), settings, on_step, timings)?;
        } else {
            self.run_tiled(
                std::slice::from_mut(&mut chain),
                tiling,
                settings,
                max_batch,
                on_step,
                timings,
            )?;
        }
        Ok(chain.into_tokens())
    }

    fn run_tiled(
        &mut self,
        chains: &mut [Chain],
        tiling: &Tiling,
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<RunStats> {
        self.run_with(chains, settings, Some((tiling, max_batch)), on_step, timings)
    }

    /// Encodes an image of any size that is a whole number of tokens and at least the bundle's
    /// size, tile by tile with the bundle's fixed-size encoder (tiles flush with the far edges
    /// where the size is not a multiple). Returns the tokens and their grid.
    pub fn encode_any(&mut self, image: &Tensor) -> Result<(Vec<i64>, [usize; 2])> {
        let s = self.bundle.manifest().image.clone();
        let g = self.grid();
        let f = [s.height / g[0], s.width / g[1]];
        check_tileable(image, &s, g)?;
        if (image.height, image.width) == (s.height, s.width) {
            return Ok((self.encode(image)?, g));
        }
        let grid = [image.height / f[0], image.width / f[1]];
        let mut tokens = vec![self.token_space().mask_id; grid[0] * grid[1]];
        let starts = |size: usize, tile: usize| {
            let mut v: Vec<usize> = (0..).map(|i| i * tile).take_while(|&o| o + tile < size).collect();
            v.push(size - tile);
            v
        };
        for y in starts(image.height, s.height) {
            for x in starts(image.width, s.width) {
                let mut tile = Vec::with_capacity(s.channels * s.height * s.width);
                for c in 0..s.channels {
                    for r in y..y + s.height {
                        let row = (c * image.height + r) * image.width;
                        tile.extend_from_slice(&image.data[row + x..row + x + s.width]);
                    }
                }
                let t = self.graphs.encode(&tile, 1)?;
                let (ty, tx) = (y / f[0], x / f[1]);
                for r in 0..g[0] {
                    for c in 0..g[1] {
                        let dst = &mut tokens[(ty + r) * grid[1] + tx + c];
                        // Tiles flush with the far edge overlap earlier ones: the first tile wins.
                        if *dst == self.token_space().mask_id {
                            *dst = t[r * g[1] + c];
                        }
                    }
                }
            }
        }
        Ok((tokens, grid))
    }

    /// Pixels per token `[rows, cols]`.
    pub fn token_pixels(&self) -> [usize; 2] {
        let s = &self.bundle.manifest().image;
        let g = self.grid();
        [s.height / g[0], s.width / g[1]]
    }

    /// Generates and decodes images `indices` under `seed` as `plan` says (the bundle's grid or a
    /// larger one, previews): what the CLI and the service both run.
    pub fn make(
        &mut self,
        seed: u64,
        indices: Range<u64>,
        settings: &Settings,
        plan: &Plan<'_>,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Made> {
        let count = indices.end.saturating_sub(indices.start) as usize;
        if plan.frames {
            if plan.tiling.is_some_and(|t| t.grid() != self.grid()) && count > 1 {
                return Err(Error::param(
                    "frames",
                    "previews of a larger grid are made one image at a time: ask for 1 image",
                ));
            }
            if count > plan.max_batch {
                return Err(Error::param(
                    "frames",
                    format!(
                        "a preview shows all images in one batch: {count} images is above the batch size {}",
                        plan.max_batch
                    ),
                ));
            }
        }
        let mut snapshots = Vec::new();
        let mut record = |r: &StepReport| {
            on_step(r);
            if plan.frames {
                snapshots.push(r.chains.iter().map(|c| c.tokens().to_vec()).collect());
            }
        };
        let (tokens, grid) = match plan.tiling {
            Some(t) => (
                self.generate_tiled(seed, indices, t, settings, plan.max_batch, &mut record, timings)?,
                t.grid(),
            ),
            None => (
                self.generate(seed, indices, settings, plan.max_batch, &mut record, timings)?,
                self.grid(),
            ),
        };
        self.finish(tokens, grid, snapshots, plan, timings)
    }

    /// Outpaints: encodes `image` (any size of whole tokens, at least the bundle's), surrounds it
    /// by `extend` pixels `[left, right, up, down]` of masked tokens and fills them under stream
    /// (`seed`, 0) with the windows of `plan.tiling`. The image's tokens never change; with
    /// `keep_input` its own pixels replace the decoder's output where it was.
    #[allow(clippy::too_many_arguments)]
    pub fn outpaint(
        &mut self,
        image: &Tensor,
        extend: [usize; 4],
        keep_input: bool,
        seed: u64,
        settings: &Settings,
        plan: &Plan<'_>,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Made> {
        let tiling = plan
            .tiling
            .ok_or_else(|| Error::param("extend", "outpainting needs the tiling of its grid"))?;
        let (grid, at) = outpaint_grid(
            [image.height, image.width],
            self.token_pixels(),
            extend,
            sampler::MAX_GRID_SIDE,
        )?;
        if tiling.grid() != grid {
            return Err(Error::param(
                "extend",
                format!("the tiling covers {:?}, the outpainted grid is {grid:?}", tiling.grid()),
            ));
        }
        let (known, kgrid) = self.encode_any(image)?;
        let mut tokens = vec![self.token_space().mask_id; grid[0] * grid[1]];
        for r in 0..kgrid[0] {
            let dst = (at[0] + r) * grid[1] + at[1];
            tokens[dst..dst + kgrid[1]].copy_from_slice(&known[r * kgrid[1]..(r + 1) * kgrid[1]]);
        }
        let mut snapshots = Vec::new();
        let mut record = |r: &StepReport| {
            on_step(r);
            if plan.frames {
                snapshots.push(r.chains.iter().map(|c| c.tokens().to_vec()).collect());
            }
        };
        let filled = self.fill_tiled(tokens, tiling, seed, settings, plan.max_batch, &mut record, timings)?;
        let mut made = self.finish(vec![filled], grid, snapshots, plan, timings)?;
        if keep_input {
            let f = self.token_pixels();
            let range = self.bundle.manifest().image.range;
            image::paste(
                &mut made.pixels[0],
                &image::to_pixels(image, range),
                at[1] * f[1],
                at[0] * f[0],
            );
        }
        Ok(made)
    }

    fn finish(
        &mut self,
        tokens: Vec<Vec<i64>>,
        grid: [usize; 2],
        snapshots: Vec<Vec<Vec<i64>>>,
        plan: &Plan<'_>,
        timings: &mut Timings,
    ) -> Result<Made> {
        let tiled = plan.tiling.map(|t| (t, plan.decode));
        let pixels = match tiled {
            Some((t, mode)) => self.tiled_to_pixels(&tokens, t, mode, plan.max_batch, timings)?,
            None => self.grid_to_pixels(&tokens, grid, plan.max_batch, timings)?,
        };
        let frames = if plan.frames {
            Some(self.render_frames(&snapshots, grid, tiled, plan.columns, plan.max_batch, timings)?)
        } else {
            None
        };
        Ok(Made {
            tokens,
            pixels,
            grid,
            frames,
        })
    }

    /// One transformer forward outside any sampling loop (benchmarks): `tokens` `(rows, L)` ->
    /// `logits` `(rows, L, K)`.
    pub fn forward(&mut self, tokens: &[i64], rows: usize, logits: &mut Vec<f32>) -> Result<()> {
        self.graphs.transformer(tokens, rows, logits)
    }

    /// Rows fed to the transformer since loading.
    pub fn transformer_rows(&self) -> usize {
        self.graphs.transformer_stats.rows
    }

    /// Encodes one image to its token grid (row-major, length L).
    pub fn encode(&mut self, image: &Tensor) -> Result<Vec<i64>> {
        let s = &self.bundle.manifest().image;
        if (image.channels, image.height, image.width) != (s.channels, s.height, s.width) {
            return Err(Error::Tokens(format!(
                "image tensor is {}x{}x{}, the bundle expects {}x{}x{}",
                image.channels, image.height, image.width, s.channels, s.height, s.width
            )));
        }
        self.graphs.encode(&image.data, 1)
    }

    /// Decodes token grids of size `grid` (any size: the decoder is fully convolutional) into
    /// image tensors, `max_batch` at a time.
    pub fn decode(
        &mut self,
        grids: &[Vec<i64>],
        grid: [usize; 2],
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Tensor>> {
        let k = self.token_space().codebook_size as i64;
        for (i, g) in grids.iter().enumerate() {
            if g.len() != grid[0] * grid[1] {
                return Err(Error::Tokens(format!(
                    "grid {i} has {} tokens, expected {}x{}",
                    g.len(),
                    grid[0],
                    grid[1]
                )));
            }
            if let Some(p) = g.iter().position(|&t| !(0..k).contains(&t)) {
                return Err(Error::Tokens(format!(
                    "grid {i}: token {} at row {}, column {} is outside 0..{k}; only codes can be decoded",
                    g[p],
                    p / grid[1],
                    p % grid[1]
                )));
            }
        }
        let start = Instant::now();
        let channels = self.bundle.manifest().image.channels;
        let mut out = Vec::with_capacity(grids.len());
        for chunk in grids.chunks(max_batch.max(1)) {
            let flat: Vec<i64> = chunk.concat();
            let (pixels, [h, w]) = self.graphs.decode(&flat, chunk.len(), grid)?;
            let per = channels * h * w;
            out.extend(pixels.chunks(per).map(|d| Tensor {
                channels,
                height: h,
                width: w,
                data: d.to_vec(),
            }));
        }
        timings.decode += start.elapsed();
        Ok(out)
    }

    /// Generates images `indices` under `seed` and decodes them to 8-bit pixels: what the CLI
    /// and the service write. Pair each with [`Pipeline::generate_metadata`].
    pub fn generate_pixels(
        &mut self,
        seed: u64,
        indices: Range<u64>,
        settings: &Settings,
        max_batch: usize,
        on_step: &mut dyn FnMut(&StepReport),
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let tokens = self.generate(seed, indices, settings, max_batch, on_step, timings)?;
        self.tokens_to_pixels(&tokens, max_batch, timings)
    }

    /// Preview frames of a reverse process: each snapshot (one token grid of size `grid` per image,
    /// still-masked positions holding the mask id) decoded with masked tokens painted as neutral
    /// tiles; several images per snapshot are laid out `columns` wide.
    /// A larger grid is decoded as `tiling` and `mode` say.
    pub fn render_frames(
        &mut self,
        snapshots: &[Vec<Vec<i64>>],
        grid: [usize; 2],
        tiled: Option<(&Tiling, DecodeMode)>,
        columns: usize,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let mask_id = self.token_space().mask_id;
        let mut frames = Vec::with_capacity(snapshots.len());
        for snap in snapshots {
            let filled: Vec<Vec<i64>> = snap
                .iter()
                .map(|g| g.iter().map(|&t| if t == mask_id { 0 } else { t }).collect())
                .collect();
            let mut pixels = match tiled {
                Some((t, mode)) => self.tiled_to_pixels(&filled, t, mode, max_batch, timings)?,
                None => self.grid_to_pixels(&filled, grid, max_batch, timings)?,
            };
            for (px, g) in pixels.iter_mut().zip(snap) {
                let masked: Vec<bool> = g.iter().map(|&t| t == mask_id).collect();
                image::paint_masked(px, &masked, grid);
            }
            frames.push(if pixels.len() == 1 {
                pixels.remove(0)
            } else {
                image::grid(&pixels, columns)
            });
        }
        Ok(frames)
    }

    /// Decodes token grids of the bundle's size to 8-bit pixels, `max_batch` at a time.
    pub fn tokens_to_pixels(
        &mut self,
        tokens: &[Vec<i64>],
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let grid = self.grid();
        self.grid_to_pixels(tokens, grid, max_batch, timings)
    }

    /// Decodes token grids of `tiling`'s size to 8-bit pixels: the bundle's own grid directly,
    /// a larger one by `mode`.
    pub fn tiled_to_pixels(
        &mut self,
        tokens: &[Vec<i64>],
        tiling: &Tiling,
        mode: DecodeMode,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        if mode == DecodeMode::Whole || tiling.grid() == self.grid() {
            return self.grid_to_pixels(tokens, tiling.grid(), max_batch, timings);
        }
        let range = self.bundle.manifest().image.range;
        let tensors = self.decode_tiled(tokens, tiling, max_batch, timings)?;
        Ok(tensors.iter().map(|t| image::to_pixels(t, range)).collect())
    }

    /// Decodes token grids of size `grid` to 8-bit pixels, `max_batch` at a time.
    pub fn grid_to_pixels(
        &mut self,
        tokens: &[Vec<i64>],
        grid: [usize; 2],
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let range = self.bundle.manifest().image.range;
        let tensors = self.decode(tokens, grid, max_batch, timings)?;
        Ok(tensors.iter().map(|t| image::to_pixels(t, range)).collect())
    }

    /// Metadata of a generated PNG holding `count` images from `index` on (a grid of `columns`
    /// when `count > 1`). A single image's metadata is the same wherever it is written, so the
    /// CLI and the service produce identical bytes for the same seed and settings.
    pub fn generate_metadata(
        &self,
        seed: u64,
        settings: &Settings,
        index: u64,
        count: usize,
        columns: Option<usize>,
    ) -> Metadata {
        let mut meta = self.metadata("generate");
        record_settings(&mut meta, settings);
        meta.seed = Some(seed);
        meta.index = Some(index);
        meta.count = Some(count);
        meta.columns = if count > 1 { columns } else { None };
        meta
    }

    /// Metadata naming this bundle and provider, for a PNG made in `mode`.
    pub fn metadata(&self, mode: &str) -> Metadata {
        Metadata {
            absorb: VERSION.to_string(),
            mode: mode.to_string(),
            bundle: self.bundle.manifest().name.clone(),
            bundle_sha256: self.bundle.sha256().to_string(),
            sampler: None,
            seed: None,
            index: None,
            count: None,
            columns: None,
            steps: None,
            temperature: None,
            temperature_end: None,
            provider: Some(self.provider().to_string()),
            variant: self.bundle.variant().map(str::to_string),
            grid: None,
            stride: None,
            window_margin: None,
            decode: None,
        }
    }
}
