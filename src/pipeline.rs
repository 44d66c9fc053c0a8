//! The pipeline: a loaded bundle and its three sessions, and [`Pipeline::run`], which carries
//! out a [`Job`] from start to pixels.
//!
//! A run goes top to bottom: (1) the starting token grids (all masked, or encoded from the
//! job's image and masked where it says), (2) the reverse process on the bundle's grid or with
//! windows over a larger one (`sampler/`, which calls the transformer through a closure),
//! (3) decoding (window by window with blended overlaps, or whole), previews, and the input's
//! own pixels put back where the job keeps them. It writes no files and knows no HTTP: the CLI
//! and the service take the [`Made`] and write it.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::graphs::{Graphs, Provider, ProviderConfig, Runtime, RuntimeOptions};
use crate::image::{self, Pixels, Tensor};
use crate::job::{self, ImageId, Job, Made, Start};
use crate::param::Param;
use crate::preview::Pacer;
use crate::sampler::{self, Chain, StepReport, Tiling, TokenSpace};
use crate::spec;
use crate::{cpu, DecodeMode};

/// Wall-clock time per phase of one run, for `-v` and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Inside the transformer graph.
    pub transformer: Duration,
    /// Transformer calls made.
    pub transformer_calls: usize,
    /// Positions the transformer computed over those calls (a full pass: L per image; cached
    /// attention's cheap passes fewer).
    pub transformer_positions: usize,
    /// Sampling outside the transformer: reveal schedule, softmax, draws, buffer copies.
    pub sampler: Duration,
    /// Encoder and decoder graphs.
    pub decode: Duration,
    /// Live previews (decoding the chains while they are sampled).
    pub preview: Duration,
    /// Live previews made.
    pub previews: usize,
}

impl Timings {
    /// Adds `other`'s times and calls to these.
    pub fn add(&mut self, other: &Timings) {
        self.transformer += other.transformer;
        self.transformer_calls += other.transformer_calls;
        self.transformer_positions += other.transformer_positions;
        self.sampler += other.sampler;
        self.decode += other.decode;
        self.preview += other.preview;
        self.previews += other.previews;
    }
}

/// What a run reports while it goes, and how it is stopped.
pub struct Progress<'a> {
    /// Called after every step that ran the transformer.
    pub on_step: &'a mut dyn FnMut(&StepReport),
    /// Asked before every batch of images; true ends the run with [`Error::Cancelled`].
    pub cancelled: &'a dyn Fn() -> bool,
    /// Where live previews go, paced by [`Pacer`]; `None` makes none.
    pub preview: Option<&'a mut dyn crate::PreviewSink>,
}

impl<'a> Progress<'a> {
    /// Reports steps to `on_step`; never cancelled.
    pub fn steps(on_step: &'a mut dyn FnMut(&StepReport)) -> Progress<'a> {
        Progress {
            on_step,
            cancelled: &|| false,
            preview: None,
        }
    }
}

/// A loaded bundle with its three sessions: the object every command works through.
pub struct Pipeline {
    bundle: Bundle,
    graphs: Graphs,
    runtime: &'static Runtime,
    load_time: Duration,
}

impl Pipeline {
    /// Loads ONNX Runtime (once per process), the bundle in `dir`, and its three graphs on
    /// `provider`, checking each graph against the manifest.
    pub fn load(dir: &Path, options: &RuntimeOptions, provider: Provider) -> Result<Pipeline> {
        Pipeline::load_with(dir, options, &ProviderConfig::new(provider))
    }

    /// [`Pipeline::load`] with provider settings (TensorRT precision, engine cache, profiles,
    /// the transformer variant).
    pub fn load_with(dir: &Path, options: &RuntimeOptions, config: &ProviderConfig) -> Result<Pipeline> {
        let bundle = Bundle::load_variant(dir, config.variant.as_deref())?;
        Pipeline::load_bundle(bundle, options, config)
    }

    /// [`Pipeline::load_with`] for a bundle already read and checked (the service's catalog);
    /// `config.variant` is the bundle's own.
    pub fn load_bundle(bundle: Bundle, options: &RuntimeOptions, config: &ProviderConfig) -> Result<Pipeline> {
        let start = Instant::now();
        let runtime = Runtime::init(options)?;
        let dir = bundle.dir().to_path_buf();
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

    /// Rows fed to the transformer since loading.
    pub fn transformer_rows(&self) -> usize {
        self.graphs.transformer_stats.rows
    }

    /// Carries out `job`: starting grids, the reverse process, decoding, previews (module docs).
    pub fn run(&mut self, job: &Job, progress: &mut Progress<'_>) -> Result<Made> {
        let grid = job.grid(&self.bundle);
        let mut timings = Timings::default();
        let mut snapshots: Vec<Vec<Vec<i64>>> = Vec::new();
        let space = TokenSpace {
            len: grid[0] * grid[1],
            width: grid[1],
            ..self.bundle.manifest().token_space()
        };
        // (1) + (2): images whose windows fill about max_batch rows per step go together.
        let per_run = match job.tiling() {
            Some(t) => (job.max_batch() / t.windows().min(job.max_batch())).max(1),
            None => job.max_batch(),
        };
        let mut tokens = Vec::with_capacity(job.images().len());
        let mut classes = Vec::with_capacity(job.images().len());
        let known = match job.start() {
            // Nothing masked: decoding only (`absorb decode`).
            Start::Tokens(grids) if !grids.iter().flatten().any(|&t| t == space.mask_id) => Some(grids),
            _ => None,
        };
        for (n, chunk) in job.images().chunks(per_run).enumerate() {
            if let Some(grids) = known {
                tokens.extend_from_slice(&grids[n * per_run..n * per_run + chunk.len()]);
                classes.extend(chunk.iter().map(|_| None));
                continue;
            }
            if (progress.cancelled)() {
                return Err(Error::Cancelled);
            }
            let mut chains = self.start_chains(job, n * per_run, chunk, &space)?;
            if chains.iter().any(|c| c.masked_count() > 0) {
                let frames = job.records_frames().then_some(&mut snapshots);
                self.sample(&mut chains, job, n * per_run, progress, frames, &mut timings)?;
            }
            classes.extend(chains.iter().map(|c| usize::try_from(c.class()).ok()));
            tokens.extend(chains.into_iter().map(Chain::into_tokens));
        }
        // (3)
        let tiled = job.tiling().map(|t| (t, job.decode_mode()));
        let mut pixels = self.decode_pixels(&tokens, grid, tiled, job.max_batch(), &mut timings)?;
        let frames = if job.records_frames() {
            Some(self.render_frames(&snapshots, grid, tiled, job.columns(), job.max_batch(), &mut timings)?)
        } else {
            None
        };
        let range = self.bundle.manifest().image.range;
        match job.start() {
            Start::Inpaint {
                image,
                mask,
                keep_input: true,
                ..
            } => {
                let input = image::to_pixels(image, range);
                for p in &mut pixels {
                    image::composite(p, &input, mask);
                }
            }
            Start::Outpaint {
                image,
                at,
                keep_input: true,
                ..
            } => {
                let f = self.bundle.manifest().token_pixels();
                image::paste(
                    &mut pixels[0],
                    &image::to_pixels(image, range),
                    at[1] * f[1],
                    at[0] * f[0],
                );
            }
            _ => {}
        }
        Ok(Made {
            tokens,
            classes,
            pixels,
            grid,
            frames,
            timings,
        })
    }

    /// Encodes an image of any size that is a whole number of tokens and at least the bundle's
    /// size, tile by tile with the bundle's fixed-size encoder (tiles flush with the far edges
    /// where the size is not a multiple). Returns the tokens and their grid.
    pub fn encode(&mut self, image: &Tensor) -> Result<(Vec<i64>, [usize; 2])> {
        let s = self.bundle.manifest().image.clone();
        let g = self.grid();
        let f = self.bundle.manifest().token_pixels();
        spec::check_tileable(image, self.bundle.manifest())?;
        if (image.height, image.width) == (s.height, s.width) {
            return Ok((self.graphs.encode(&image.data, 1)?, g));
        }
        let mask_id = self.bundle.manifest().tokens.mask_id;
        let grid = [image.height / f[0], image.width / f[1]];
        let mut tokens = vec![mask_id; grid[0] * grid[1]];
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
                        if *dst == mask_id {
                            *dst = t[r * g[1] + c];
                        }
                    }
                }
            }
        }
        Ok((tokens, grid))
    }

    /// One transformer forward outside any sampling loop (benchmarks, the variant check):
    /// `tokens` `(rows, L)` and each row's class (`rows` of them, [`sampler::NO_CLASS`] = none)
    /// -> `logits` `(rows, L, K)`.
    pub fn forward(&mut self, tokens: &[i64], classes: &[i64], logits: &mut Vec<f32>) -> Result<()> {
        self.graphs.transformer(tokens, classes, logits)
    }

    /// Classes of the bundle's transformer (0: unconditional).
    pub fn classes(&self) -> usize {
        self.graphs.classes()
    }

    fn grid(&self) -> [usize; 2] {
        self.bundle.manifest().grid()
    }

    /// The chains of images `chunk` (the job's images `first..`): all masked, or the job's
    /// image encoded and masked where it says.
    fn start_chains(&mut self, job: &Job, first: usize, chunk: &[ImageId], space: &TokenSpace) -> Result<Vec<Chain>> {
        let settings = job.settings();
        let given = job.class().map_or(sampler::NO_CLASS, |c| c as i64);
        // Edits (and known grids) take the job's class or none.
        let one = |tokens: Vec<i64>, &ImageId { seed, index }: &ImageId| {
            Ok(Chain::new(tokens, space, settings, sampler::image_rng(seed, index))?.with_class(given))
        };
        let classes = self.graphs.classes();
        Ok(match job.start() {
            // Generation without a class spreads the classes over the images (seeded, by index).
            Start::Masked => chunk
                .iter()
                .map(|&ImageId { seed, index: i }| {
                    let class = match job.class() {
                        None if classes > 0 => sampler::spread_class(seed, i, classes),
                        _ => given,
                    };
                    Ok(Chain::masked(space, settings, seed, i)?.with_class(class))
                })
                .collect::<Result<_>>()?,
            Start::Inpaint { image, token_mask, .. } => {
                let (mut tokens, _) = self.encode_exact(image)?;
                for (t, &m) in tokens.iter_mut().zip(token_mask) {
                    if m {
                        *t = space.mask_id;
                    }
                }
                chunk.iter().map(|id| one(tokens.clone(), id)).collect::<Result<_>>()?
            }
            Start::Outpaint {
                image,
                at,
                extend,
                edge,
                ..
            } => {
                let (known, kgrid) = self.encode(image)?;
                let gw = job.grid(&self.bundle)[1];
                let mut tokens = vec![space.mask_id; space.len];
                for r in 0..kgrid[0] {
                    for c in 0..kgrid[1] {
                        // The edge facing the new area was encoded without what lies beyond it.
                        if !job::outpaint_edge_token(r, c, kgrid, *extend, *edge) {
                            tokens[(at[0] + r) * gw + at[1] + c] = known[r * kgrid[1] + c];
                        }
                    }
                }
                let chain = one(tokens, &chunk[0])?;
                if chain.masked_count() == 0 {
                    return Err(Error::param(Param::Extend, "nothing to fill: every token is known"));
                }
                vec![chain]
            }
            Start::Vary { image, masked, .. } => {
                let (source, _) = self.encode_exact(image)?;
                chunk
                    .iter()
                    .map(|id| {
                        let mut tokens = source.clone();
                        for p in job::vary_positions(id.seed, id.index, tokens.len(), *masked) {
                            tokens[p] = space.mask_id;
                        }
                        one(tokens, id)
                    })
                    .collect::<Result<_>>()?
            }
            Start::Tokens(grids) => grids[first..first + chunk.len()]
                .iter()
                .zip(chunk)
                .map(|(g, id)| {
                    if g.len() != space.len {
                        return Err(Error::Internal(format!(
                            "a grid has {} tokens, expected {}",
                            g.len(),
                            space.len
                        )));
                    }
                    one(g.clone(), id)
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Encodes an image of exactly the bundle's size.
    fn encode_exact(&mut self, image: &Tensor) -> Result<(Vec<i64>, [usize; 2])> {
        let s = &self.bundle.manifest().image;
        if (image.channels, image.height, image.width) != (s.channels, s.height, s.width) {
            return Err(Error::Internal(format!(
                "image tensor is {}x{}x{}, the bundle expects {}x{}x{}",
                image.channels, image.height, image.width, s.channels, s.height, s.width
            )));
        }
        Ok((self.graphs.encode(&image.data, 1)?, self.grid()))
    }

    /// Runs the sampler on `chains` (the job's images `first..`; windowed and `max_batch`
    /// rows per call as the job says), reporting to `progress`, recording every step in
    /// `frames` when given, and adds the time inside and outside the transformer to `timings`.
    fn sample(
        &mut self,
        chains: &mut [Chain],
        job: &Job,
        first: usize,
        progress: &mut Progress<'_>,
        mut frames: Option<&mut Vec<Vec<Vec<i64>>>>,
        timings: &mut Timings,
    ) -> Result<()> {
        // The trained grid's space: windows of a larger grid are fed in the trained shape.
        let space = self.bundle.manifest().token_space();
        let before = self.graphs.transformer_stats;
        let start = Instant::now();
        let grid = job.grid(&self.bundle);
        let tiled = job.tiling().map(|t| (t, job.decode_mode()));
        let Progress {
            on_step,
            cancelled,
            preview,
        } = progress;
        let mut previews = Timings::default();
        let mut pacer = preview.as_deref().map_or_else(Pacer::new, |p| p.pacer());
        let (mut steps, mut previewing) = (0, preview.is_some());
        // The transformer and the preview decoder take turns: the sampler calls one, then
        // reports the step, never both at once.
        let this = RefCell::new(&mut *self);
        // A cancelled run stops before its next transformer call. With guidance each call is two
        // passes of the transformer (with the chains' classes, then without).
        // Those second passes' positions count in the timings' positions computed.
        let guidance = job.settings().guidance;
        let guided_positions = std::cell::Cell::new(0usize);
        let mut denoise = |tokens: &[i64], classes: &[i64], logits: &mut Vec<f32>| {
            if cancelled() {
                return Err(Error::Cancelled);
            }
            let mut pass = |t: &[i64], c: &[i64], out: &mut Vec<f32>| this.borrow_mut().graphs.transformer(t, c, out);
            match guidance {
                Some(w) => {
                    let rows = sampler::guide(w, tokens, classes, logits, &mut pass)?;
                    let row_len = tokens.len() / classes.len().max(1);
                    guided_positions.set(guided_positions.get() + rows * row_len);
                    Ok(())
                }
                None => pass(tokens, classes, logits),
            }
        };
        let mut report = |r: &StepReport| {
            on_step(r);
            steps += 1;
            if let Some(frames) = frames.as_deref_mut() {
                frames.push(r.chains.iter().map(|c| c.tokens().to_vec()).collect());
            }
            let Some(sink) = preview.as_deref_mut() else { return };
            let now = Instant::now();
            // The last step's images are the run's result: no preview of them.
            let unfinished = r.chains.iter().any(|c| c.still_masked() > 0);
            if !(previewing && unfinished && pacer.due(now) && sink.wanted()) {
                return;
            }
            let grids: Vec<Vec<i64>> = r.chains.iter().map(|c| c.tokens().to_vec()).collect();
            match this
                .borrow_mut()
                .render(&grids, grid, tiled, job.max_batch(), &mut previews)
            {
                Ok(pixels) => sink.preview(first, steps, pixels),
                Err(e) => {
                    log::warn!("no more previews in this run: {e:#}");
                    previewing = false;
                }
            }
            let end = Instant::now();
            pacer.record(now, end);
            previews.preview += end - now;
            previews.previews += 1;
        };
        let settings = job.settings();
        let stats = match (job.tiling(), settings.cache) {
            (Some(t), _) => {
                sampler::sample_windows(chains, t, &space, settings, job.max_batch(), &mut denoise, &mut report)?
            }
            (None, Some(_)) => {
                let bundle = this.borrow().bundle.clone();
                let (graph, _) = bundle.cache_graph()?;
                let shape = sampler::CacheShape {
                    layers: graph.layers,
                    width: graph.width,
                };
                let mut cached = |call: &sampler::CachedCall<'_>, out: &mut sampler::CachedOut| {
                    if cancelled() {
                        return Err(Error::Cancelled);
                    }
                    this.borrow_mut().graphs.cached(&bundle, call, out)
                };
                sampler::sample_cached(chains, &space, settings, shape, &mut cached, &mut report)?
            }
            (None, None) => sampler::sample(chains, &space, settings, &mut denoise, &mut report)?,
        };
        let total = start.elapsed();
        let after = self.graphs.transformer_stats;
        let in_graph = after.time - before.time;
        timings.transformer += in_graph;
        timings.transformer_calls += after.calls - before.calls;
        timings.transformer_positions += stats.positions + guided_positions.get();
        timings.sampler += total.saturating_sub(in_graph + previews.preview);
        timings.preview += previews.preview;
        timings.previews += previews.previews;
        Ok(())
    }

    /// Decodes token grids of size `grid` to 8-bit pixels: the bundle's grid directly, a larger
    /// one as `tiled` says.
    fn decode_pixels(
        &mut self,
        tokens: &[Vec<i64>],
        grid: [usize; 2],
        tiled: Option<(&Tiling, DecodeMode)>,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let range = self.bundle.manifest().image.range;
        let tensors = match tiled {
            Some((t, DecodeMode::Tiles)) => self.decode_tiled(tokens, t, max_batch, timings)?,
            _ => self.decode(tokens, grid, max_batch, timings)?,
        };
        Ok(tensors.iter().map(|t| image::to_pixels(t, range)).collect())
    }

    /// Decodes token grids of size `grid` (any size: the decoder is fully convolutional) into
    /// image tensors, `max_batch` at a time.
    fn decode(
        &mut self,
        grids: &[Vec<i64>],
        grid: [usize; 2],
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Tensor>> {
        let k = self.bundle.manifest().tokens.codebook_size;
        for (i, g) in grids.iter().enumerate() {
            if g.len() != grid[0] * grid[1] {
                return Err(Error::Internal(format!(
                    "grid {i} has {} tokens, expected {}x{}",
                    g.len(),
                    grid[0],
                    grid[1]
                )));
            }
        }
        job::check_grids(grids, grid, k, None)?;
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

    /// Decodes token grids of `tiling`'s size window by window (each window in the decoder's
    /// trained shape, all in one batched run), blending overlaps with weights that fall off
    /// towards a window's inner edges. The decoder's attention and normalisation see exactly
    /// what they were trained on, which decoding the whole grid at once does not give.
    fn decode_tiled(
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
                return Err(Error::Internal(format!(
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

    /// Token grids of size `grid` caught mid-run (still-masked positions holding the mask id)
    /// decoded with the masked tokens painted as neutral grey tiles.
    fn render(
        &mut self,
        grids: &[Vec<i64>],
        grid: [usize; 2],
        tiled: Option<(&Tiling, DecodeMode)>,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let mask_id = self.bundle.manifest().tokens.mask_id;
        let filled: Vec<Vec<i64>> = grids
            .iter()
            .map(|g| g.iter().map(|&t| if t == mask_id { 0 } else { t }).collect())
            .collect();
        let mut pixels = self.decode_pixels(&filled, grid, tiled, max_batch, timings)?;
        for (px, g) in pixels.iter_mut().zip(grids) {
            let masked: Vec<bool> = g.iter().map(|&t| t == mask_id).collect();
            image::paint_masked(px, &masked, grid);
        }
        Ok(pixels)
    }

    /// Preview frames of a reverse process: each snapshot (one token grid of size `grid` per
    /// image) rendered as [`Pipeline::render`] does; several images per snapshot are laid out
    /// `columns` wide.
    fn render_frames(
        &mut self,
        snapshots: &[Vec<Vec<i64>>],
        grid: [usize; 2],
        tiled: Option<(&Tiling, DecodeMode)>,
        columns: usize,
        max_batch: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Pixels>> {
        let mut frames = Vec::with_capacity(snapshots.len());
        for snap in snapshots {
            let mut pixels = self.render(snap, grid, tiled, max_batch, timings)?;
            frames.push(if pixels.len() == 1 {
                pixels.remove(0)
            } else {
                image::grid(&pixels, columns)
            });
        }
        Ok(frames)
    }
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
