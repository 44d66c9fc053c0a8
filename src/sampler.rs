//! The reverse absorbing-diffusion process, pure: no ONNX Runtime, no images, no I/O.
//!
//! The paper's sampler (spec section 4.1) reveals each still-masked position at step t with
//! probability 1/t, for t = S..1. A position masked at the start therefore has its reveal step
//! uniform on 1..=S, independently of the others. So this module draws every masked position's
//! reveal step once up front, then walks t = S..1 and calls the denoiser only when some chain
//! reveals something at t, feeding only those chains' rows. The output distribution is the
//! reference's; the number of network calls is smaller (at S = L about 37% of steps are empty).
//!
//! # Determinism contract (design section 5)
//! - Image `index` of a request with seed `seed` draws from its own ChaCha20 stream:
//!   `ChaCha20Rng::seed_from_u64(seed)` with `set_stream(index)`. It is the same image whether
//!   made alone or in any batch.
//! - Draw order within an image: first one `u64` per masked position in raster order (its reveal
//!   step, `1 + floor(u * S / 2^64)`); then, for t = S..1, one `u64` per position revealed at t in
//!   raster order (its token, by inverse CDF on `u / 2^64` at 53-bit precision).
//! - The categorical draw computes `exp((logit - max) / temperature)` with the pure-Rust `libm`
//!   in f64 and sums in index order, so this code adds no platform variation; the logits
//!   themselves come from ONNX Runtime and are only as reproducible as the provider.
//!
//! Other samplers ([`SamplerKind`]), under the same contract:
//! - `even`: the same loop, but reveal steps come from a seeded shuffle of the masked positions
//!   (Fisher-Yates from the last position down, one `u64` per swap) cut into S runs of
//!   `floor(m(s+1)/S) - floor(ms/S)` positions: exactly the expected number per step.
//! - `maskgit` (Chang et al. 2022): every step samples every still-masked position (raster order,
//!   one `u64` each for the token, then one `u64` each for Gumbel noise), scores it by its
//!   log-probability plus Gumbel noise scaled by `MASKGIT_CHOICE_TEMPERATURE * (1 - (s+1)/S)`,
//!   reveals the best-scoring ones (ties by position) and re-masks the rest; after step s,
//!   `floor(m cos(pi/2 (s+1)/S))` positions stay masked (cosine schedule), at least one is
//!   revealed per step, none after the last.
//! - A linear temperature schedule `start:end` sets step s's temperature to
//!   `start + (end - start) s / (S - 1)` (computed in f64).
//! - Nucleus (top-p) truncation, when set below 1: after the temperature, only the most probable
//!   codes whose mass first reaches `p` of the total are kept (every code whose weight equals the
//!   smallest kept one as well), the others get weight 0, and the draw is the same inverse CDF over
//!   what is left (still one `u64`). MaskGIT's confidence is the log-probability under the
//!   truncated distribution. Unset (or 1), nothing changes.
//!
//! - Larger grids ([`run_tiled`]): the same draws over the big grid's positions in raster order;
//!   a position's distribution is the mean of its voting windows' softmax probabilities (f64,
//!   `libm`, windows in ascending order), drawn with the step's temperature as `p^(1/T)`
//!   renormalised. Which windows vote is fixed by the [`Tiling`] (grid, stride, margin).
//!
//! - A class-conditional bundle: each chain carries one class ([`NO_CLASS`] = none), fed with
//!   every row of it (each window of a larger grid too). A class chosen for a request without
//!   one ([`spread_class`]) comes from a stream of its own, so the image's stream is untouched:
//!   image `i` made as class `c` is the image asked for with class `c`.
//!
//! Changing any of this changes the tokens for a given seed: a breaking change.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::{Error, Result};

/// The token space of a bundle, as the sampler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpace {
    /// L, positions per image (row-major grid).
    pub len: usize,
    /// K, the number of codes; the denoiser returns K logits per position.
    pub codebook_size: usize,
    /// The absorbing (masked) state, outside `0..K`.
    pub mask_id: i64,
}

/// Validated sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// S, the number of reverse steps, 1..=L.
    pub steps: usize,
    /// Logits are divided by this before the softmax; finite and > 0. With `temperature_end`,
    /// the temperature of the first step.
    pub temperature: f32,
    /// Temperature of the last step for a linear schedule; `None` = constant.
    pub temperature_end: Option<f32>,
    /// Nucleus sampling: keep the smallest set of most probable codes holding this much of the
    /// probability, in (0, 1]; `None` (or 1) = no truncation.
    pub top_p: Option<f32>,
    /// Which reveal rule.
    pub sampler: SamplerKind,
}

/// How positions are chosen for revealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// The paper's rule: each masked position revealed at step t with probability 1/t.
    #[default]
    Absorbing,
    /// Exactly the expected number of reveals per step, in a seeded random order.
    Even,
    /// Confidence-based: sample every masked position, keep the most confident, cosine schedule.
    Maskgit,
}

impl SamplerKind {
    /// The name used on the command line, in JSON and in PNG metadata.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Absorbing => "absorbing",
            SamplerKind::Even => "even",
            SamplerKind::Maskgit => "maskgit",
        }
    }

    /// Parses a name written by [`SamplerKind::name`].
    pub fn from_name(name: &str) -> Option<SamplerKind> {
        [SamplerKind::Absorbing, SamplerKind::Even, SamplerKind::Maskgit]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// Gumbel-noise scale of the MaskGIT sampler at its first step (MaskGIT's default choice
/// temperature), annealed linearly to 0.
pub const MASKGIT_CHOICE_TEMPERATURE: f64 = 4.5;

fn check_temperature(name: &'static str, t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 && t <= MAX_TEMPERATURE {
        Ok(())
    } else {
        Err(Error::param(
            name,
            format!("{t} is out of range: must be a number > 0 and <= {MAX_TEMPERATURE}"),
        ))
    }
}

/// Largest temperature accepted. Far above anything useful (softmax is nearly uniform well
/// before), it only keeps nonsense out.
pub const MAX_TEMPERATURE: f32 = 1000.0;

impl Settings {
    /// Checks `steps` in 1..=L and `temperature` finite in (0, MAX_TEMPERATURE].
    pub fn new(steps: usize, temperature: f32, space: &TokenSpace) -> Result<Settings> {
        if steps == 0 || steps > space.len {
            return Err(Error::param(
                "steps",
                format!(
                    "{steps} is out of range: must be 1..={} (the number of tokens)",
                    space.len
                ),
            ));
        }
        check_temperature("temperature", temperature)?;
        Ok(Settings {
            steps,
            temperature,
            temperature_end: None,
            top_p: None,
            sampler: SamplerKind::Absorbing,
        })
    }

    /// With nucleus (top-p) truncation: `p` finite in (0, 1]; 1 is stored as `None`.
    pub fn with_top_p(self, p: Option<f32>) -> Result<Settings> {
        if let Some(p) = p {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(Error::param(
                    "top_p",
                    format!("{p} is out of range: must be a number > 0 and <= 1"),
                ));
            }
        }
        // 1 keeps every code: the same as none, and recorded as none.
        Ok(Settings {
            top_p: p.filter(|&p| p < 1.0),
            ..self
        })
    }

    /// The top-p of every step as the draw uses it (1 = off).
    fn nucleus(&self) -> f64 {
        self.top_p.map_or(1.0, f64::from)
    }

    /// With another sampler.
    pub fn with_sampler(self, sampler: SamplerKind) -> Settings {
        Settings { sampler, ..self }
    }

    /// With a linear temperature schedule from `temperature` to `end`.
    pub fn with_temperature_end(self, end: Option<f32>) -> Result<Settings> {
        if let Some(e) = end {
            check_temperature("temperature", e)?;
        }
        Ok(Settings {
            temperature_end: end,
            ..self
        })
    }

    /// The temperature of step index `s` (0 for the first executed step t = S).
    pub fn temperature_at(&self, s: usize) -> f64 {
        match self.temperature_end {
            Some(end) if self.steps > 1 => {
                let (a, b) = (self.temperature as f64, end as f64);
                a + (b - a) * s as f64 / (self.steps - 1) as f64
            }
            _ => self.temperature as f64,
        }
    }
}

/// The class fed for a chain without one: a conditional transformer's "no class".
pub const NO_CLASS: i64 = -1;

/// The class of image `index` under `seed` when a request names none, for a bundle of `n`
/// classes: images `b n .. b n + n - 1` are the `n` classes, each once, in an order shuffled for
/// block `b`. So `k n` images from index 0 (or any multiple of `n`) have each class exactly `k`
/// times, and any image's class depends only on its seed and index, never on its batch.
///
/// The order: Fisher-Yates from the last position down (one `u64` per swap, a widening multiply)
/// over `0..n`, from ChaCha20 keyed by the seed's 8 little-endian bytes followed by `"classes"`
/// and zeros, stream `b`: a key no image stream has ([`image_rng`] expands the seed otherwise).
pub fn spread_class(seed: u64, index: u64, n: usize) -> i64 {
    let n = n.max(1);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..15].copy_from_slice(b"classes");
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(index / n as u64);
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order[(index % n as u64) as usize]
}

/// The random stream of image `index` under `seed`.
pub fn image_rng(seed: u64, index: u64) -> ChaCha20Rng {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// One image's reverse chain: its tokens and the step at which each masked position is revealed.
#[derive(Debug, Clone)]
pub struct Chain {
    tokens: Vec<i64>,
    /// (step t, position) for every masked position, sorted by t descending then position.
    reveals: Vec<(u32, u32)>,
    /// Next entry of `reveals` to execute.
    cursor: usize,
    rng: ChaCha20Rng,
    /// Positions still masked, in raster order (MaskGIT).
    masked: Vec<u32>,
    /// Masked positions at the start.
    initial_masked: usize,
    /// Positions revealed so far.
    revealed: usize,
    /// The class fed with this chain's rows ([`NO_CLASS`]: none).
    class: i64,
}

impl Chain {
    /// A chain over `tokens` (length L): positions holding `mask_id` are sampled, all others are
    /// kept. Draws the reveal steps from `rng` (see the module docs for the order).
    pub fn new(tokens: Vec<i64>, space: &TokenSpace, settings: &Settings, mut rng: ChaCha20Rng) -> Result<Chain> {
        if tokens.len() != space.len {
            return Err(Error::Tokens(format!(
                "{} tokens given, the grid has {}",
                tokens.len(),
                space.len
            )));
        }
        if let Some(p) = tokens
            .iter()
            .position(|&t| t != space.mask_id && !(0..space.codebook_size as i64).contains(&t))
        {
            return Err(Error::Tokens(format!(
                "token {} at position {p} is outside 0..{} and is not the mask id {}",
                tokens[p], space.codebook_size, space.mask_id
            )));
        }
        let steps = settings.steps as u64;
        let masked: Vec<u32> = (0..tokens.len())
            .filter(|&p| tokens[p] == space.mask_id)
            .map(|p| p as u32)
            .collect();
        let mut reveals: Vec<(u32, u32)> = match settings.sampler {
            SamplerKind::Absorbing => masked
                .iter()
                // Uniform on 1..=S by a widening multiply (bias below 2^-50 for any S <= L).
                .map(|&p| (1 + ((rng.next_u64() as u128 * steps as u128) >> 64) as u32, p))
                .collect(),
            SamplerKind::Even => {
                let mut order = masked.clone();
                for i in (1..order.len()).rev() {
                    let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
                    order.swap(i, j);
                }
                let m = order.len() as u64;
                let mut out = Vec::with_capacity(order.len());
                let mut next = order.into_iter();
                for step in 0..steps {
                    let n = m * (step + 1) / steps - m * step / steps;
                    let t = (steps - step) as u32;
                    out.extend(next.by_ref().take(n as usize).map(|p| (t, p)));
                }
                out
            }
            // Chosen while sampling, by confidence.
            SamplerKind::Maskgit => Vec::new(),
        };
        reveals.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let initial_masked = masked.len();
        Ok(Chain {
            tokens,
            reveals,
            cursor: 0,
            rng,
            masked,
            initial_masked,
            revealed: 0,
            class: NO_CLASS,
        })
    }

    /// The same chain conditioned on `class` (an index into the bundle's classes, or [`NO_CLASS`]).
    pub fn with_class(mut self, class: i64) -> Chain {
        self.class = class;
        self
    }

    /// The class fed with this chain's rows.
    pub fn class(&self) -> i64 {
        self.class
    }

    /// A fully masked chain for unconditional generation of image `index` under `seed`.
    pub fn masked(space: &TokenSpace, settings: &Settings, seed: u64, index: u64) -> Result<Chain> {
        Chain::new(vec![space.mask_id; space.len], space, settings, image_rng(seed, index))
    }

    /// The current tokens (masked positions hold the mask id until revealed).
    pub fn tokens(&self) -> &[i64] {
        &self.tokens
    }

    /// The tokens, consuming the chain.
    pub fn into_tokens(self) -> Vec<i64> {
        self.tokens
    }

    /// How many positions this chain samples in total.
    pub fn masked_count(&self) -> usize {
        self.initial_masked
    }

    /// How many positions are still masked.
    pub fn still_masked(&self) -> usize {
        self.initial_masked - self.revealed
    }

    /// The positions revealed at step `t`, in raster order.
    fn pending_at(&self, t: u32) -> &[(u32, u32)] {
        let rest = &self.reveals[self.cursor..];
        let n = rest.iter().take_while(|(s, _)| *s == t).count();
        &rest[..n]
    }
}

/// What happened in one executed step, for progress reporting and previews.
#[derive(Debug, Clone, Copy)]
pub struct StepReport<'a> {
    /// The step index t (counts down from S to 1).
    pub t: usize,
    /// S.
    pub steps: usize,
    /// Rows fed to the denoiser in this step.
    pub rows: usize,
    /// Tokens revealed in this step across all chains.
    pub revealed: usize,
    /// The chains of this run after the step (masked positions still hold the mask id).
    pub chains: &'a [Chain],
}

/// Totals of one `run`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Denoiser calls made.
    pub calls: usize,
    /// Steps that revealed nothing in any chain, so no call was made.
    pub skipped_steps: usize,
    /// Rows fed over all calls (a call feeds only the chains that reveal something).
    pub rows: usize,
    /// Tokens drawn.
    pub revealed: usize,
}

/// The denoiser: given token rows of length L concatenated, `(rows, L)`, and each row's class
/// (`rows` of them; [`NO_CLASS`] = none), fill `logits` with `(rows, L, K)` values.
pub type Denoiser<'a> = dyn FnMut(&[i64], &[i64], &mut Vec<f32>) -> Result<()> + 'a;

/// Runs the reverse process on all `chains` to completion. Chains are independent: each one's
/// result depends only on its own tokens, reveal steps and random stream, never on its batch.
pub fn run(
    chains: &mut [Chain],
    space: &TokenSpace,
    settings: &Settings,
    denoise: &mut Denoiser<'_>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let (l, k) = (space.len, space.codebook_size);
    let mut stats = RunStats::default();
    let mut input: Vec<i64> = Vec::with_capacity(chains.len() * l);
    let mut logits: Vec<f32> = Vec::new();
    let mut weights: Vec<f64> = vec![0.0; 2 * k]; // draw's scratch
    let mut rows: Vec<usize> = Vec::with_capacity(chains.len());
    let mut classes: Vec<i64> = Vec::with_capacity(chains.len());
    let maskgit = settings.sampler == SamplerKind::Maskgit;
    for t in (1..=settings.steps as u32).rev() {
        rows.clear();
        rows.extend((0..chains.len()).filter(|&c| {
            if maskgit {
                !chains[c].masked.is_empty()
            } else {
                !chains[c].pending_at(t).is_empty()
            }
        }));
        if rows.is_empty() {
            stats.skipped_steps += 1;
            continue;
        }
        input.clear();
        classes.clear();
        for &c in &rows {
            input.extend_from_slice(&chains[c].tokens);
            classes.push(chains[c].class);
        }
        denoise(&input, &classes, &mut logits)?;
        check_logits(&logits, rows.len(), l, k)?;
        let mut revealed = 0;
        for (r, &c) in rows.iter().enumerate() {
            let row_logits = &logits[r * l * k..(r + 1) * l * k];
            revealed += advance(&mut chains[c], row_logits, t, settings, space.mask_id, &mut weights);
        }
        stats.calls += 1;
        stats.rows += rows.len();
        stats.revealed += revealed;
        on_step(&StepReport {
            t: t as usize,
            steps: settings.steps,
            rows: rows.len(),
            revealed,
            chains,
        });
    }
    debug_assert!(chains
        .iter()
        .all(|c| c.cursor == c.reveals.len() && (!maskgit || c.masked.is_empty())));
    Ok(stats)
}

/// How windows of the trained token grid cover a larger grid (spec section 4.3, made cheaper).
///
/// Along each axis windows start at 0, stride, 2 stride, ... and a last one is flush with the far
/// edge. A window *votes* for the positions at least `margin` tokens inside each of its edges that
/// face another window (edges on the big grid's border have no margin): a token at a window's
/// inner edge sees context on one side only, so that window's opinion is left out. A position's
/// distribution is the mean of the probabilities of the windows voting for it (the paper's
/// mixture; margin 0 is exactly the paper's rule). Each step evaluates only windows that vote for
/// a position sampled in that step.
#[derive(Debug, Clone)]
pub struct Tiling {
    grid: [usize; 2],
    window: [usize; 2],
    stride: [usize; 2],
    margin: [usize; 2],
    /// Top-left corner of every window, row-major.
    offsets: Vec<[usize; 2]>,
    /// For every position of the big grid, the windows voting for it, ascending.
    voters: Vec<Vec<u32>>,
}

fn axis_offsets(size: usize, window: usize, stride: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..).map(|i| i * stride).take_while(|&o| o + window < size).collect();
    v.push(size - window);
    v
}

impl Tiling {
    /// Windows of `window` (the trained grid, `[h, w]`) over `grid`, `stride` and `margin` per
    /// axis. Errors name the parameter at fault.
    pub fn new(grid: [usize; 2], window: [usize; 2], stride: [usize; 2], margin: [usize; 2]) -> Result<Tiling> {
        for a in 0..2 {
            let axis = ["height", "width"][a];
            if grid[a] < window[a] {
                return Err(Error::param(
                    "grid",
                    format!(
                        "{}x{} is smaller than the trained grid {}x{} ({axis})",
                        grid[0], grid[1], window[0], window[1]
                    ),
                ));
            }
            if grid[a] > MAX_GRID_SIDE {
                return Err(Error::param(
                    "grid",
                    format!("{}x{}: at most {MAX_GRID_SIDE} tokens per side", grid[0], grid[1]),
                ));
            }
            // No arithmetic on the caller's numbers before they are bounded: 2 x margin could
            // wrap. 2m >= w is m >= ceil(w / 2).
            if margin[a] >= window[a].div_ceil(2) {
                return Err(Error::param(
                    "window-margin",
                    format!(
                        "{} leaves no voting core in a window {} wide ({axis})",
                        margin[a], window[a]
                    ),
                ));
            }
            // Where one window spans this axis its stride is never used, but it is recorded in the
            // PNG's metadata: it is still bounded by the window, so no absurd value is kept.
            if stride[a] == 0 || stride[a] > window[a] {
                return Err(Error::param(
                    "stride",
                    format!(
                        "{} is out of range for the {axis}: must be 1..={}",
                        stride[a], window[a]
                    ),
                ));
            }
            if grid[a] > window[a] && stride[a] > window[a] - 2 * margin[a] {
                return Err(Error::param(
                    "stride",
                    format!(
                        "{} is out of range for the {axis}: must be 1..={} (window {} minus twice the margin {}) \
                         so that every position has a voting window",
                        stride[a],
                        window[a] - 2 * margin[a],
                        window[a],
                        margin[a]
                    ),
                ));
            }
        }
        let rows = axis_offsets(grid[0], window[0], stride[0]);
        let cols = axis_offsets(grid[1], window[1], stride[1]);
        let offsets: Vec<[usize; 2]> = rows.iter().flat_map(|&r| cols.iter().map(move |&c| [r, c])).collect();
        let mut voters = vec![Vec::new(); grid[0] * grid[1]];
        for (w, o) in offsets.iter().enumerate() {
            let span = |a: usize| {
                let lo = if o[a] == 0 { 0 } else { margin[a] };
                let hi = if o[a] + window[a] == grid[a] { 0 } else { margin[a] };
                o[a] + lo..o[a] + window[a] - hi
            };
            for r in span(0) {
                for c in span(1) {
                    voters[r * grid[1] + c].push(w as u32);
                }
            }
        }
        // Guaranteed by the stride check; kept as a hard error rather than a silent hole.
        if let Some(p) = voters.iter().position(Vec::is_empty) {
            return Err(Error::param(
                "stride",
                format!("position ({}, {}) has no voting window", p / grid[1], p % grid[1]),
            ));
        }
        Ok(Tiling {
            grid,
            window,
            stride,
            margin,
            offsets,
            voters,
        })
    }

    /// The default: stride half a window (rounded up), margin an eighth of a window.
    pub fn with_defaults(grid: [usize; 2], window: [usize; 2]) -> Result<Tiling> {
        Tiling::new(
            grid,
            window,
            Tiling::default_stride(window),
            Tiling::default_margin(window),
        )
    }

    /// Half a `window` (rounded up) per axis.
    pub fn default_stride(window: [usize; 2]) -> [usize; 2] {
        [window[0].div_ceil(2), window[1].div_ceil(2)]
    }

    /// An eighth of a `window` per axis.
    pub fn default_margin(window: [usize; 2]) -> [usize; 2] {
        [window[0] / 8, window[1] / 8]
    }

    /// The big grid `[H, W]`.
    pub fn grid(&self) -> [usize; 2] {
        self.grid
    }

    /// The window stride `[rows, cols]`.
    pub fn stride(&self) -> [usize; 2] {
        self.stride
    }

    /// The window margin `[rows, cols]`.
    pub fn margin(&self) -> [usize; 2] {
        self.margin
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.offsets.len()
    }

    /// Top-left corners of the windows, row-major.
    pub fn offsets(&self) -> &[[usize; 2]] {
        &self.offsets
    }

    /// The windows voting for position `p` of the big grid.
    pub fn voters(&self, p: usize) -> &[u32] {
        &self.voters[p]
    }

    fn cut(&self, tokens: &[i64], w: usize, out: &mut Vec<i64>) {
        let [r0, c0] = self.offsets[w];
        for r in r0..r0 + self.window[0] {
            out.extend_from_slice(&tokens[r * self.grid[1] + c0..r * self.grid[1] + c0 + self.window[1]]);
        }
    }
}

/// Largest big-grid side accepted, in tokens (keeps memory bounded: 1024 x 1024 codes).
pub const MAX_GRID_SIDE: usize = 1024;

/// Runs the reverse process on `chains` over the big grid of `tiling` (each chain's tokens are
/// that grid, row-major; known tokens are kept). `window_space` is the trained grid's token space
/// (the denoiser's row length). Each step feeds the windows that vote for a position sampled in
/// that step, of all chains together, at most `max_rows` per denoiser call. Chains stay
/// independent: each one's result never depends on the others.
///
/// Determinism: each chain's draws follow the module contract over the big grid's positions; the
/// combined distribution of a position is computed in f64 (`libm`), summing its voting windows in
/// ascending order, then drawn with the step's temperature (`p^(1/T)` renormalised).
pub fn run_tiled(
    chains: &mut [Chain],
    tiling: &Tiling,
    window_space: &TokenSpace,
    settings: &Settings,
    max_rows: usize,
    denoise: &mut Denoiser<'_>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let (l, k) = (window_space.len, window_space.codebook_size);
    let big = tiling.grid[0] * tiling.grid[1];
    if l != tiling.window[0] * tiling.window[1] {
        return Err(Error::Tokens(format!(
            "tiled run: windows of {l} tokens, the tiling's are {}x{}",
            tiling.window[0], tiling.window[1]
        )));
    }
    if let Some(c) = chains.iter().find(|c| c.tokens.len() != big) {
        return Err(Error::Tokens(format!(
            "tiled run: a chain of {} tokens over a {}x{} grid",
            c.tokens.len(),
            tiling.grid[0],
            tiling.grid[1]
        )));
    }
    let max_rows = max_rows.max(1);
    let maskgit = settings.sampler == SamplerKind::Maskgit;
    let nw = tiling.windows();
    let mut stats = RunStats::default();
    let mut combined: Vec<f32> = vec![0.0; big * k];
    let mut weights: Vec<f64> = vec![0.0; 2 * k]; // draw's scratch
    let mut acc: Vec<f64> = vec![0.0; k];
    // Row of (chain, window) in this step's logits, if fed.
    let mut row_of: Vec<Option<usize>> = vec![None; chains.len() * nw];
    let mut selected: Vec<(usize, usize)> = Vec::new();
    let mut input: Vec<i64> = Vec::new();
    let mut classes: Vec<i64> = Vec::new();
    let mut part: Vec<f32> = Vec::new();
    let mut logits: Vec<f32> = Vec::new();
    // Per chain, the positions sampled in this step (reused buffers).
    let mut needed: Vec<Vec<u32>> = vec![Vec::new(); chains.len()];
    let mut windows: Vec<usize> = Vec::new();
    for t in (1..=settings.steps as u32).rev() {
        row_of.iter_mut().for_each(|r| *r = None);
        selected.clear();
        for (c, chain) in chains.iter().enumerate() {
            let positions = &mut needed[c];
            positions.clear();
            if maskgit {
                positions.extend_from_slice(&chain.masked);
            } else {
                positions.extend(chain.pending_at(t).iter().map(|&(_, p)| p));
            }
            windows.clear();
            windows.extend(
                positions
                    .iter()
                    .flat_map(|&p| tiling.voters(p as usize).iter().map(|&w| w as usize)),
            );
            windows.sort_unstable();
            windows.dedup();
            selected.extend(windows.iter().map(|&w| (c, w)));
        }
        if selected.is_empty() {
            stats.skipped_steps += 1;
            continue;
        }
        for (r, &(c, w)) in selected.iter().enumerate() {
            row_of[c * nw + w] = Some(r);
        }
        logits.clear();
        for chunk in selected.chunks(max_rows) {
            input.clear();
            classes.clear();
            for &(c, w) in chunk {
                tiling.cut(&chains[c].tokens, w, &mut input);
                classes.push(chains[c].class);
            }
            denoise(&input, &classes, &mut part)?;
            check_logits(&part, chunk.len(), l, k)?;
            logits.extend_from_slice(&part);
            stats.calls += 1;
        }
        let mut revealed = 0;
        for (c, chain) in chains.iter_mut().enumerate() {
            let positions = &needed[c];
            if positions.is_empty() {
                continue;
            }
            for &p in positions {
                let p = p as usize;
                let (r, col) = (p / tiling.grid[1], p % tiling.grid[1]);
                acc.iter_mut().for_each(|a| *a = 0.0);
                let voters = tiling.voters(p);
                for &w in voters {
                    let [r0, c0] = tiling.offsets[w as usize];
                    let local = (r - r0) * tiling.window[1] + (col - c0);
                    let row = row_of[c * nw + w as usize].unwrap_or(0);
                    let x = &logits[(row * l + local) * k..(row * l + local + 1) * k];
                    softmax_into(x, &mut weights[..k]);
                    for (a, &q) in acc.iter_mut().zip(weights.iter()) {
                        *a += q;
                    }
                }
                let n = voters.len() as f64;
                for (o, &a) in combined[p * k..(p + 1) * k].iter_mut().zip(acc.iter()) {
                    *o = libm::log(a / n) as f32;
                }
            }
            revealed += advance(chain, &combined, t, settings, window_space.mask_id, &mut weights);
        }
        stats.rows += selected.len();
        stats.revealed += revealed;
        on_step(&StepReport {
            t: t as usize,
            steps: settings.steps,
            rows: selected.len(),
            revealed,
            chains,
        });
    }
    Ok(stats)
}

/// The denoiser must return `(rows, L, K)` logits.
fn check_logits(logits: &[f32], rows: usize, l: usize, k: usize) -> Result<()> {
    if logits.len() == rows * l * k {
        return Ok(());
    }
    Err(Error::Tokens(format!(
        "denoiser returned {} logits for {rows} rows, expected {} ({rows} x {l} x {k})",
        logits.len(),
        rows * l * k,
    )))
}

/// softmax(x) at temperature 1 into `out`, in f64 with `libm` (NaN logits get probability 0).
fn softmax_into(x: &[f32], out: &mut [f64]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sum = 0.0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v.is_nan() { 0.0 } else { libm::exp((v - max) as f64) };
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Executes step `t` of `chain` given its `(L, K)` logits (only the positions sampled at `t` are
/// read); returns how many positions it revealed.
fn advance(chain: &mut Chain, logits: &[f32], t: u32, settings: &Settings, mask_id: i64, weights: &mut [f64]) -> usize {
    let step = settings.steps - t as usize;
    let temperature = settings.temperature_at(step);
    let top_p = settings.nucleus();
    if settings.sampler == SamplerKind::Maskgit {
        return maskgit_step(
            chain,
            logits,
            (temperature, top_p),
            step,
            settings.steps,
            mask_id,
            weights,
        );
    }
    let k = logits.len() / chain.tokens.len();
    let n = chain.pending_at(t).len();
    for i in chain.cursor..chain.cursor + n {
        let p = chain.reveals[i].1 as usize;
        let (token, _) = draw(&logits[p * k..(p + 1) * k], temperature, top_p, weights, &mut chain.rng);
        chain.tokens[p] = token as i64;
    }
    chain.cursor += n;
    chain.revealed += n;
    n
}

/// One MaskGIT step on one chain; returns how many positions it revealed.
fn maskgit_step(
    chain: &mut Chain,
    logits: &[f32],
    (temperature, top_p): (f64, f64),
    step: usize,
    steps: usize,
    mask_id: i64,
    weights: &mut [f64],
) -> usize {
    let k = logits.len() / chain.tokens.len(); // (L, K) logits of this row
    let ratio = (step + 1) as f64 / steps as f64;
    let keep_masked = if step + 1 == steps {
        0
    } else {
        let cos = libm::cos(std::f64::consts::FRAC_PI_2 * ratio);
        ((chain.initial_masked as f64 * cos).floor() as usize).min(chain.masked.len() - 1)
    };
    let n_reveal = chain.masked.len() - keep_masked;
    // Sample every masked position (raster order), then draw its Gumbel noise (raster order).
    let mut candidates: Vec<(f64, u32, i64)> = chain
        .masked
        .iter()
        .map(|&p| {
            let p = p as usize;
            let (token, logp) = draw(&logits[p * k..(p + 1) * k], temperature, top_p, weights, &mut chain.rng);
            (logp, p as u32, token as i64)
        })
        .collect();
    let scale = MASKGIT_CHOICE_TEMPERATURE * (1.0 - ratio);
    for c in candidates.iter_mut() {
        let u = ((chain.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        c.0 += scale * -libm::log(-libm::log(u));
    }
    // Most confident first; NaN-free by construction (finite log-probs, u in (0, 1)).
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, p, token) in &candidates[..n_reveal] {
        chain.tokens[p as usize] = token;
    }
    // Revealed positions now hold a code; the rest still hold the mask id.
    chain.masked.retain(|&p| chain.tokens[p as usize] == mask_id);
    chain.revealed += n_reveal;
    n_reveal
}

/// One categorical draw from softmax(logits / temperature), truncated to its top-p nucleus when
/// `top_p` < 1, by inverse CDF. Returns the code and its log-probability (under the truncated
/// distribution). `scratch` has length 2K: weights, then a sorted copy for the nucleus.
fn draw(logits: &[f32], temperature: f64, top_p: f64, scratch: &mut [f64], rng: &mut ChaCha20Rng) -> (usize, f64) {
    let (weights, sorted) = scratch.split_at_mut(logits.len());
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let inv_t = 1.0 / temperature;
    let mut sum = 0.0f64;
    for (w, &x) in weights.iter_mut().zip(logits) {
        // NaN logits get weight 0 (never drawn) rather than poisoning the sum.
        *w = if x.is_nan() {
            0.0
        } else {
            libm::exp((x - max) as f64 * inv_t)
        };
        sum += *w;
    }
    if top_p < 1.0 {
        sum = truncate_to_nucleus(weights, &mut sorted[..logits.len()], sum, top_p);
    }
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let target = u * sum;
    let mut acc = 0.0f64;
    let mut chosen = None;
    let mut last_nonzero = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            acc += w;
            last_nonzero = i;
            if acc > target {
                chosen = Some(i);
                break;
            }
        }
    }
    // Rounding can leave target == acc at the very end: the last code with weight wins.
    let i = chosen.unwrap_or(last_nonzero);
    (i, libm::log(weights[i] / sum))
}

/// Zeroes every weight outside the nucleus: the largest weights, in decreasing order, until their
/// sum reaches `top_p * sum`, and any weight equal to the last one taken. Returns the new sum (in
/// index order, like the draw's). `sorted` is scratch of the same length.
fn truncate_to_nucleus(weights: &mut [f64], sorted: &mut [f64], sum: f64, top_p: f64) -> f64 {
    sorted.copy_from_slice(weights);
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let goal = top_p * sum;
    let mut acc = 0.0f64;
    let mut threshold = 0.0f64;
    for &w in sorted.iter() {
        acc += w;
        threshold = w;
        if acc >= goal {
            break;
        }
    }
    let mut kept = 0.0f64;
    for w in weights.iter_mut() {
        if *w < threshold {
            *w = 0.0;
        }
        kept += *w;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: TokenSpace = TokenSpace {
        len: 16,
        codebook_size: 8,
        mask_id: 8,
    };

    /// A deterministic fake denoiser whose logits depend only on each row's own tokens:
    /// prefers code (position + number of revealed tokens) mod K.
    fn fake(tokens: &[i64], classes: &[i64], out: &mut Vec<f32>) -> Result<()> {
        let (l, k, rows) = (SPACE.len, SPACE.codebook_size, classes.len());
        out.clear();
        for r in 0..rows {
            let row = &tokens[r * l..(r + 1) * l];
            let known = row.iter().filter(|&&t| t != SPACE.mask_id).count();
            for p in 0..l {
                for c in 0..k {
                    out.push(if c == (p + known) % k { 2.0 } else { 0.0 });
                }
            }
        }
        Ok(())
    }

    fn generate(seeds: &[(u64, u64)], steps: usize, temperature: f32) -> (Vec<Vec<i64>>, RunStats) {
        let s = Settings::new(steps, temperature, &SPACE).unwrap();
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let stats = run(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    #[test]
    fn no_mask_is_left_and_every_token_is_a_code() {
        for steps in [1, 2, 7, 16] {
            let (out, stats) = generate(&[(1, 0), (1, 1), (2, 0)], steps, 1.0);
            for tokens in out {
                assert!(tokens.iter().all(|&t| (0..8).contains(&t)), "{tokens:?}");
            }
            assert_eq!(stats.revealed, 3 * 16);
        }
    }

    #[test]
    fn steps_one_makes_exactly_one_call() {
        let (_, stats) = generate(&[(5, 0), (5, 1)], 1, 1.0);
        assert_eq!((stats.calls, stats.rows, stats.skipped_steps), (1, 2, 0));
    }

    #[test]
    fn empty_steps_make_no_call() {
        // One chain, S = L: every step with no reveal is skipped; calls + skipped = S.
        let (_, stats) = generate(&[(9, 0)], 16, 1.0);
        assert_eq!(stats.calls + stats.skipped_steps, 16);
        assert!(
            stats.skipped_steps > 0,
            "with 16 positions and 16 steps some step is empty"
        );
    }

    #[test]
    fn same_seed_gives_same_tokens_and_different_seeds_differ() {
        let a = generate(&[(42, 0)], 8, 1.0).0;
        let b = generate(&[(42, 0)], 8, 1.0).0;
        let c = generate(&[(43, 0)], 8, 1.0).0;
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn an_image_is_the_same_alone_and_inside_a_batch() {
        let batch: Vec<(u64, u64)> = (0..8).map(|i| (7, i)).collect();
        let together = generate(&batch, 6, 1.0).0;
        for (i, tokens) in together.iter().enumerate() {
            let alone = generate(&[(7, i as u64)], 6, 1.0).0;
            assert_eq!(&alone[0], tokens, "image {i}");
        }
    }

    #[test]
    fn known_tokens_are_never_changed() {
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let mut tokens: Vec<i64> = (0..16).map(|p| (p % 8) as i64).collect();
        for p in [3, 4, 10] {
            tokens[p] = SPACE.mask_id;
        }
        let mut chains = vec![Chain::new(tokens.clone(), &SPACE, &s, image_rng(1, 0)).unwrap()];
        assert_eq!(chains[0].masked_count(), 3);
        let stats = run(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
        let out = chains[0].tokens();
        for p in 0..16 {
            if ![3, 4, 10].contains(&p) {
                assert_eq!(out[p], tokens[p], "position {p}");
            } else {
                assert_ne!(out[p], SPACE.mask_id);
            }
        }
        assert_eq!(stats.revealed, 3);
    }

    #[test]
    fn reveal_counts_follow_the_one_over_t_rule() {
        // Reference: the paper's loop, each still-masked position revealed with probability 1/t.
        // Compare the mean number revealed at each step over many seeds with ours.
        let (l, steps, runs) = (16usize, 5usize, 4000u64);
        let space = TokenSpace {
            len: l,
            codebook_size: 2,
            mask_id: 2,
        };
        let s = Settings::new(steps, 1.0, &space).unwrap();
        let mut ours = vec![0f64; steps + 1];
        let mut reference = vec![0f64; steps + 1];
        for seed in 0..runs {
            let chain = Chain::masked(&space, &s, seed, 0).unwrap();
            for &(t, _) in &chain.reveals {
                ours[t as usize] += 1.0;
            }
            let mut rng = image_rng(seed + 1_000_000, 0);
            let mut masked = l;
            for t in (1..=steps).rev() {
                let mut n = 0;
                for _ in 0..masked {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    if u < 1.0 / t as f64 {
                        n += 1;
                    }
                }
                masked -= n;
                reference[t] += n as f64;
            }
            assert_eq!(masked, 0);
        }
        for t in 1..=steps {
            let (a, b) = (ours[t] / runs as f64, reference[t] / runs as f64);
            // Expected l / S = 3.2 per step; std of the mean is about 0.03.
            assert!((a - b).abs() < 0.15, "step {t}: ours {a}, reference {b}");
            assert!((a - l as f64 / steps as f64).abs() < 0.15, "step {t}: ours {a}");
        }
    }

    #[test]
    fn categorical_draws_match_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY];
        let mut weights = vec![0.0; 8];
        let mut rng = image_rng(3, 0);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[draw(&logits, 1.0, 1.0, &mut weights, &mut rng).0] += 1;
        }
        let z: f64 = [0.0f64, 1.0, 2.0].iter().map(|x| x.exp()).sum();
        for (i, &count) in counts.iter().take(3).enumerate() {
            let p = (i as f64).exp() / z;
            let f = count as f64 / n as f64;
            assert!((f - p).abs() < 0.01, "code {i}: {f} vs {p}");
        }
        assert_eq!(counts[3], 0, "a code with zero probability is never drawn");
    }

    #[test]
    fn high_temperature_flattens_and_low_sharpens() {
        let logits = [0.0f32, 3.0];
        let mut weights = vec![0.0; 4];
        let share = |t: f32| {
            let mut rng = image_rng(11, 0);
            let mut w = weights.clone();
            (0..10_000)
                .filter(|_| draw(&logits, t as f64, 1.0, &mut w, &mut rng).0 == 0)
                .count() as f64
                / 10_000.0
        };
        assert!(share(50.0) > 0.45);
        assert!(share(0.1) < 0.001);
        weights.clear();
    }

    #[test]
    fn the_nucleus_keeps_the_most_probable_codes_and_renormalises() {
        // softmax of ln(w): probabilities 0.5, 0.3, 0.15, 0.05 (shuffled over the indices).
        let logits = [0.15f32, 0.5, 0.05, 0.3].map(|p| p.ln());
        let mut scratch = vec![0.0; 8];
        let n = 40_000;
        for (top_p, kept) in [
            (0.5, vec![1]),
            (0.6, vec![1, 3]),
            (0.8, vec![1, 3]),
            (0.81, vec![0, 1, 3]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            let mut rng = image_rng(5, 0);
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let (i, logp) = draw(&logits, 1.0, top_p, &mut scratch, &mut rng);
                counts[i] += 1;
                let mass: f64 = kept.iter().map(|&j| logits[j].exp() as f64).sum();
                assert!(
                    (logp - (logits[i].exp() as f64 / mass).ln()).abs() < 1e-6,
                    "top_p {top_p}: log-prob of {i}"
                );
            }
            let mass: f64 = kept.iter().map(|&j| logits[j].exp() as f64).sum();
            for (i, &c) in counts.iter().enumerate() {
                let want = if kept.contains(&i) {
                    logits[i].exp() as f64 / mass
                } else {
                    0.0
                };
                let f = c as f64 / n as f64;
                assert!(
                    (f - want).abs() < 0.01,
                    "top_p {top_p}: code {i} drawn {f}, expected {want}"
                );
            }
        }
        // Ties with the smallest kept weight stay in: two equal codes, either may be drawn.
        let tied = [0.0f32, 0.0, -5.0];
        let mut rng = image_rng(6, 0);
        let drawn: std::collections::BTreeSet<usize> = (0..200)
            .map(|_| draw(&tied, 1.0, 0.3, &mut scratch[..6], &mut rng).0)
            .collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn top_p_one_or_unset_changes_no_token_and_below_one_does() {
        for kind in [SamplerKind::Absorbing, SamplerKind::Maskgit] {
            let base = Settings::new(8, 1.0, &SPACE).unwrap().with_sampler(kind);
            let run_with = |s: Settings| {
                let mut chains: Vec<Chain> = (0..4).map(|i| Chain::masked(&SPACE, &s, 21, i).unwrap()).collect();
                run(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
                chains.into_iter().map(Chain::into_tokens).collect::<Vec<_>>()
            };
            let plain = run_with(base);
            assert_eq!(plain, run_with(base.with_top_p(Some(1.0)).unwrap()), "{kind:?}");
            assert_ne!(plain, run_with(base.with_top_p(Some(0.3)).unwrap()), "{kind:?}");
            assert_eq!(
                run_with(base.with_top_p(Some(0.3)).unwrap()),
                run_with(base.with_top_p(Some(0.3)).unwrap())
            );
        }
        for bad in [0.0, -0.5, 1.01, f32::NAN, f32::INFINITY] {
            let e = Settings::new(8, 1.0, &SPACE)
                .unwrap()
                .with_top_p(Some(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("top_p"), "{e}");
        }
    }

    fn generate_with(kind: SamplerKind, seeds: &[(u64, u64)], steps: usize) -> (Vec<Vec<i64>>, RunStats, Vec<usize>) {
        let s = Settings::new(steps, 1.0, &SPACE).unwrap().with_sampler(kind);
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let mut per_step = Vec::new();
        let stats = run(&mut chains, &SPACE, &s, &mut fake, &mut |r| per_step.push(r.revealed)).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats, per_step)
    }

    #[test]
    fn every_sampler_leaves_no_mask_and_is_deterministic_and_batch_independent() {
        for kind in [SamplerKind::Absorbing, SamplerKind::Even, SamplerKind::Maskgit] {
            for steps in [1, 3, 16] {
                let batch: Vec<(u64, u64)> = (0..4).map(|i| (21, i)).collect();
                let (out, stats, _) = generate_with(kind, &batch, steps);
                assert_eq!(stats.revealed, 4 * 16, "{kind:?} S={steps}");
                assert!(out.iter().flatten().all(|&t| (0..8).contains(&t)), "{kind:?}");
                assert_eq!(out, generate_with(kind, &batch, steps).0, "{kind:?} repeat");
                for (i, tokens) in out.iter().enumerate() {
                    let alone = generate_with(kind, &[(21, i as u64)], steps).0;
                    assert_eq!(&alone[0], tokens, "{kind:?} alone");
                }
            }
        }
    }

    #[test]
    fn still_masked_counts_the_mask_ids_after_every_step() {
        for kind in [SamplerKind::Absorbing, SamplerKind::Even, SamplerKind::Maskgit] {
            let s = Settings::new(5, 1.0, &SPACE).unwrap().with_sampler(kind);
            let mut chains: Vec<Chain> = (0..3).map(|i| Chain::masked(&SPACE, &s, 9, i).unwrap()).collect();
            assert!(chains.iter().all(|c| c.still_masked() == 16), "{kind:?} at the start");
            let mut seen = Vec::new();
            run(&mut chains, &SPACE, &s, &mut fake, &mut |r| {
                for c in r.chains {
                    let mask_ids = c.tokens().iter().filter(|&&t| t == SPACE.mask_id).count();
                    assert_eq!(c.still_masked(), mask_ids, "{kind:?} at t={}", r.t);
                }
                seen.push(r.chains[0].still_masked());
            })
            .unwrap();
            assert_eq!(seen.last(), Some(&0), "{kind:?}: {seen:?}");
        }
    }

    #[test]
    fn even_reveals_exactly_the_expected_count_every_step() {
        // 16 positions over 5 steps: 3 or 4 per step, floor(16(s+1)/5) - floor(16s/5).
        let (_, stats, per_step) = generate_with(SamplerKind::Even, &[(3, 0)], 5);
        assert_eq!(per_step, vec![3, 3, 3, 3, 4]);
        assert_eq!(stats.skipped_steps, 0);
        // Different seeds reveal in different orders.
        let order = |seed| {
            let s = Settings::new(5, 1.0, &SPACE).unwrap().with_sampler(SamplerKind::Even);
            Chain::masked(&SPACE, &s, seed, 0).unwrap().reveals
        };
        assert_ne!(order(1), order(2));
    }

    #[test]
    fn maskgit_follows_the_cosine_schedule_and_calls_every_step() {
        let (_, stats, per_step) = generate_with(SamplerKind::Maskgit, &[(4, 0)], 4);
        // Masked after step s: floor(16 cos(pi/2 (s+1)/4)) = 14, 11, 6, then 0.
        assert_eq!(per_step, vec![2, 3, 5, 6]);
        assert_eq!((stats.calls, stats.skipped_steps), (4, 0));
        // With S = L every step reveals exactly one token.
        let (_, _, per_step) = generate_with(SamplerKind::Maskgit, &[(4, 0)], 16);
        assert!(
            per_step.iter().all(|&n| n >= 1) && per_step.iter().sum::<usize>() == 16,
            "{per_step:?}"
        );
    }

    #[test]
    fn maskgit_reveals_the_most_confident_positions_first() {
        // A denoiser certain about even positions and unsure about odd ones: with one step to go
        // before the end, the first reveals are the certain ones.
        let mut sure = |tokens: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            let rows = classes.len();
            out.clear();
            for _ in 0..rows {
                for p in 0..16 {
                    out.extend((0..8).map(|c| if p % 2 == 0 && c == 1 { 50.0 } else { 0.0 }));
                }
            }
            assert_eq!(tokens.len(), rows * 16);
            Ok(())
        };
        let s = Settings::new(2, 1.0, &SPACE)
            .unwrap()
            .with_sampler(SamplerKind::Maskgit);
        let mut chains = vec![Chain::masked(&SPACE, &s, 9, 0).unwrap()];
        let mut first = Vec::new();
        run(&mut chains, &SPACE, &s, &mut sure, &mut |r| first.push(r.revealed)).unwrap();
        // After step 1 of 2, floor(16 cos(pi/4)) = 11 stay masked: 5 revealed, all even positions.
        assert_eq!(first[0], 5);
        let tokens = chains[0].tokens();
        assert!((0..16).step_by(2).all(|p| tokens[p] == 1), "{tokens:?}");
    }

    #[test]
    fn a_temperature_schedule_interpolates_linearly() {
        let s = Settings::new(5, 1.2, &SPACE)
            .unwrap()
            .with_temperature_end(Some(0.4))
            .unwrap();
        let t: Vec<f64> = (0..5).map(|i| s.temperature_at(i)).collect();
        assert!(
            (t[0] - 1.2).abs() < 1e-6 && (t[2] - 0.8).abs() < 1e-6 && (t[4] - 0.4).abs() < 1e-6,
            "{t:?}"
        );
        assert!(Settings::new(5, 1.0, &SPACE)
            .unwrap()
            .with_temperature_end(Some(0.0))
            .is_err());
        assert_eq!(SamplerKind::from_name("maskgit"), Some(SamplerKind::Maskgit));
    }

    #[test]
    fn bad_settings_are_rejected_naming_the_parameter() {
        for steps in [0, 17] {
            let e = Settings::new(steps, 1.0, &SPACE).unwrap_err().to_string();
            assert!(e.starts_with("invalid steps"), "{e}");
        }
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY, 2000.0] {
            let e = Settings::new(4, t, &SPACE).unwrap_err().to_string();
            assert!(e.starts_with("invalid temperature"), "{e}");
        }
    }

    #[test]
    fn out_of_range_tokens_are_rejected() {
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let mut tokens = vec![0i64; 16];
        tokens[5] = 9;
        let e = Chain::new(tokens, &SPACE, &s, image_rng(0, 0)).unwrap_err().to_string();
        assert!(e.contains("position 5"), "{e}");
    }

    /// A 4x4 window (SPACE's 16 tokens) over larger grids.
    const WINDOW: [usize; 2] = [4, 4];

    #[test]
    fn windows_cover_the_grid_and_vote_only_inside_their_margins() {
        // 4x8 grid, 4x4 windows, stride 2, margin 1: windows at columns 0, 2, 4.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [1, 1]).unwrap();
        assert_eq!(t.offsets(), &[[0, 0], [0, 2], [0, 4]]);
        // Window 0 votes for columns 0..3 (its right edge is inner), window 1 for 3..5, window 2
        // for 5..8 (its right edge is the grid's).
        let by_col: Vec<Vec<u32>> = (0..8).map(|c| t.voters(c).to_vec()).collect();
        assert_eq!(
            by_col,
            vec![vec![0], vec![0], vec![0], vec![1], vec![1], vec![2], vec![2], vec![2]]
        );
        // Margin 0 is the paper's rule: every covering window votes.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [0, 0]).unwrap();
        assert_eq!(t.voters(3), &[0, 1]);
        assert_eq!(t.voters(4), &[1, 2]);
        // The last window is flush with the far edge when the stride does not divide.
        let t = Tiling::new([5, 7], WINDOW, [3, 3], [0, 0]).unwrap();
        assert_eq!(t.offsets(), &[[0, 0], [0, 3], [1, 0], [1, 3]]);
        for g in [[4, 4], [5, 9], [9, 5], [12, 13], [4, 17]] {
            for (stride, margin) in [([2, 2], [1, 1]), ([4, 4], [0, 0]), ([1, 3], [0, 0]), ([2, 1], [1, 1])] {
                let t = Tiling::new(g, WINDOW, stride, margin).unwrap();
                assert!(
                    (0..g[0] * g[1]).all(|p| !t.voters(p).is_empty()),
                    "{g:?} {stride:?} {margin:?}"
                );
            }
        }
    }

    #[test]
    fn bad_tilings_are_rejected_naming_the_parameter() {
        let e = Tiling::new([3, 8], WINDOW, [2, 2], [0, 0]).unwrap_err().to_string();
        assert!(e.contains("grid") && e.contains("smaller"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [3, 3], [1, 1]).unwrap_err().to_string();
        assert!(e.contains("stride") && e.contains("1..=2"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [0, 0], [0, 0]).unwrap_err().to_string();
        assert!(e.contains("stride"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [1, 1], [2, 2]).unwrap_err().to_string();
        assert!(e.contains("window-margin"), "{e}");
        let e = Tiling::new([4, MAX_GRID_SIDE + 1], WINDOW, [2, 2], [0, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most"), "{e}");
    }

    fn tiled(
        grid: [usize; 2],
        tiling: &Tiling,
        kind: SamplerKind,
        seeds: &[u64],
        steps: usize,
    ) -> (Vec<Vec<i64>>, RunStats) {
        let big = TokenSpace {
            len: grid[0] * grid[1],
            ..SPACE
        };
        let s = Settings::new(steps, 1.0, &big).unwrap().with_sampler(kind);
        let mut chains: Vec<Chain> = seeds.iter().map(|&i| Chain::masked(&big, &s, 1, i).unwrap()).collect();
        let stats = run_tiled(&mut chains, tiling, &SPACE, &s, 5, &mut fake, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    #[test]
    fn tiled_runs_fill_every_position_reproducibly_and_batch_independently() {
        let grid = [6, 10];
        let t = Tiling::new(grid, WINDOW, [2, 2], [1, 1]).unwrap();
        for kind in [SamplerKind::Absorbing, SamplerKind::Even, SamplerKind::Maskgit] {
            let (all, stats) = tiled(grid, &t, kind, &[0, 1, 2], 12);
            assert!(all.iter().flatten().all(|&x| (0..8).contains(&x)), "{kind:?}");
            assert_eq!(stats.revealed, 3 * 60);
            let (alone, _) = tiled(grid, &t, kind, &[1], 12);
            assert_eq!(alone[0], all[1], "{kind:?}: image 1 alone and in a batch");
            assert_ne!(all[0], all[1], "{kind:?}");
        }
    }

    #[test]
    fn a_single_window_tiling_is_the_plain_sampler() {
        let t = Tiling::new([4, 4], WINDOW, [2, 2], [1, 1]).unwrap();
        for kind in [SamplerKind::Absorbing, SamplerKind::Maskgit] {
            let (tiles, _) = tiled([4, 4], &t, kind, &[0, 1], 6);
            let (plain, _, _) = generate_with(kind, &[(1, 0), (1, 1)], 6);
            assert_eq!(tiles, plain, "{kind:?}");
        }
    }

    #[test]
    fn a_position_draws_from_the_mean_of_its_voting_windows() {
        // 4x8 grid, windows at columns 0, 2, 4 (margin 0). Known tokens in row 0 name each
        // window: column 0 holds 1 (window 0's first token), column 2 holds 2, column 4 holds 3.
        // The denoiser puts all mass on the code a row's first token names. Column 1 is voted by
        // window 0 only; column 3 by windows 0 and 1: half its draws are 1 and half 2.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [0, 0]).unwrap();
        let big = TokenSpace { len: 32, ..SPACE };
        let named = |tokens: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            let rows = classes.len();
            out.clear();
            for r in 0..rows {
                let code = tokens[r * 16];
                for _ in 0..16 {
                    out.extend((0..8).map(|c| if c as i64 == code { 40.0 } else { 0.0 }));
                }
            }
            Ok(())
        };
        let mut counts = [[0usize; 8]; 2];
        for seed in 0..400 {
            let s = Settings::new(4, 1.0, &big).unwrap();
            let mut tokens = vec![SPACE.mask_id; 32];
            tokens[..6].copy_from_slice(&[1, 0, 2, 0, 3, 0]);
            tokens[8 + 1] = SPACE.mask_id;
            let mut chains = vec![Chain::new(tokens, &big, &s, image_rng(seed, 0)).unwrap()];
            run_tiled(&mut chains, &t, &SPACE, &s, 8, &mut { named }, &mut |_| {}).unwrap();
            counts[0][chains[0].tokens()[8 + 1] as usize] += 1;
            counts[1][chains[0].tokens()[8 + 3] as usize] += 1;
        }
        assert_eq!(counts[0][1], 400, "{:?}", counts[0]);
        assert_eq!(counts[1][1] + counts[1][2], 400, "{:?}", counts[1]);
        assert!((160..240).contains(&counts[1][1]), "{:?}", counts[1]);
    }

    #[test]
    fn each_row_is_fed_with_its_chains_class_alone_and_in_windows() {
        // The denoiser is sure of code (class + 1): a chain's tokens say which class it was fed.
        let by_class = |tokens: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            assert_eq!(tokens.len(), classes.len() * 16);
            out.clear();
            for &c in classes {
                for _ in 0..16 {
                    out.extend((0..8).map(|k| if k as i64 == c + 1 { 40.0 } else { 0.0 }));
                }
            }
            Ok(())
        };
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let classes = [NO_CLASS, 2, 0, 6];
        let mut chains: Vec<Chain> = classes
            .iter()
            .enumerate()
            .map(|(i, &c)| Chain::masked(&SPACE, &s, 3, i as u64).unwrap().with_class(c))
            .collect();
        run(&mut chains, &SPACE, &s, &mut { by_class }, &mut |_| {}).unwrap();
        for (chain, &c) in chains.iter().zip(&classes) {
            assert_eq!(chain.class(), c);
            assert!(
                chain.tokens().iter().all(|&t| t == c + 1),
                "class {c}: {:?}",
                chain.tokens()
            );
        }
        // Every window of a larger grid is fed its chain's class.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [0, 0]).unwrap();
        let big = TokenSpace { len: 32, ..SPACE };
        let s = Settings::new(4, 1.0, &big).unwrap();
        let mut chains: Vec<Chain> = classes
            .iter()
            .enumerate()
            .map(|(i, &c)| Chain::masked(&big, &s, 3, i as u64).unwrap().with_class(c))
            .collect();
        run_tiled(&mut chains, &t, &SPACE, &s, 3, &mut { by_class }, &mut |_| {}).unwrap();
        for (chain, &c) in chains.iter().zip(&classes) {
            assert!(
                chain.tokens().iter().all(|&t| t == c + 1),
                "class {c}: {:?}",
                chain.tokens()
            );
        }
    }

    #[test]
    fn spread_classes_take_each_class_once_per_block_in_orders_that_vary() {
        let mut orders = std::collections::BTreeSet::new();
        for seed in [0, 1, u64::MAX] {
            for block in [0u64, 1, 2, u64::MAX / 10 - 1] {
                let order: Vec<i64> = (0..10).map(|k| spread_class(seed, block * 10 + k, 10)).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..10).collect::<Vec<_>>(),
                    "seed {seed} block {block}: {order:?}"
                );
                orders.insert(order);
            }
        }
        assert!(orders.len() >= 11, "blocks and seeds shuffle differently: {orders:?}");
        // The last index and a single class.
        assert!((0..7).contains(&spread_class(3, u64::MAX, 7)));
        assert_eq!(spread_class(3, 12, 1), 0);
        // Not the image's own stream: its first draws are not where the order comes from.
        let first: Vec<i64> = (0..10)
            .map(|i| ((image_rng(0, i).next_u64() as u128 * 10) >> 64) as i64)
            .collect();
        let spread: Vec<i64> = (0..10).map(|i| spread_class(0, i, 10)).collect();
        assert_ne!(first, spread);
    }

    #[test]
    fn a_two_window_wide_grid_feeds_at_most_three_times_one_image() {
        // The trained grid 16x16 (paper size) at S = 256, 1x2 wide, the default windows.
        let space = TokenSpace {
            len: 256,
            codebook_size: 4,
            mask_id: 4,
        };
        let wide = TokenSpace { len: 512, ..space };
        let zeros = |_: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            out.clear();
            out.resize(classes.len() * 256 * 4, 0.0);
            Ok(())
        };
        let t = Tiling::with_defaults([16, 32], [16, 16]).unwrap();
        assert_eq!(t.windows(), 3);
        let (mut one, mut two) = (0, 0);
        for seed in 0..4 {
            let s = Settings::new(256, 1.0, &space).unwrap();
            let mut c = vec![Chain::masked(&space, &s, seed, 0).unwrap()];
            one += run(&mut c, &space, &s, &mut { zeros }, &mut |_| {}).unwrap().rows;
            let s = Settings::new(256, 1.0, &wide).unwrap();
            let mut c = vec![Chain::masked(&wide, &s, seed, 0).unwrap()];
            two += run_tiled(&mut c, &t, &space, &s, 16, &mut { zeros }, &mut |_| {})
                .unwrap()
                .rows;
        }
        let ratio = two as f64 / one as f64;
        eprintln!("rows: one image {one}, 1x2 wide {two}: {ratio:.2}x (the paper's loop: 8704 per image)");
        assert!(ratio <= 3.0, "{ratio}");
    }
}
