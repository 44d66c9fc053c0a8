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

pub mod bench;
pub mod bundle;
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
use crate::sampler::{Chain, RunStats, Settings, StepReport, TokenSpace};

/// This crate's version, recorded in PNG metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Name of the default sampler, recorded in PNG metadata.
pub const SAMPLER: &str = "absorbing";

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
        self.settings(m.steps, m.temperature)?
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
        let space = self.token_space();
        let before = self.graphs.transformer_stats;
        let start = Instant::now();
        let graphs = &mut self.graphs;
        let mut denoise = |tokens: &[i64], rows: usize, logits: &mut Vec<f32>| graphs.transformer(tokens, rows, logits);
        let stats = sampler::run(chains, &space, settings, &mut denoise, on_step)?;
        let total = start.elapsed();
        let after = self.graphs.transformer_stats;
        let in_graph = after.time - before.time;
        timings.transformer += in_graph;
        timings.transformer_calls += after.calls - before.calls;
        timings.sampler += total.saturating_sub(in_graph);
        Ok(stats)
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

    /// Decodes token grids of the bundle's size to 8-bit pixels, `max_batch` at a time.
    pub fn tokens_to_pixels(
        &mut self,
        tokens: &[Vec<i64>],
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let grid = self.grid();
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
        }
    }
}
