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
            sampler: SamplerKind::Absorbing,
        })
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
        })
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

    /// The positions revealed at step `t`, in raster order.
    fn pending_at(&self, t: u32) -> &[(u32, u32)] {
        let rest = &self.reveals[self.cursor..];
        let n = rest.iter().take_while(|(s, _)| *s == t).count();
        &rest[..n]
    }
}

/// What happened in one executed step, for progress reporting and previews.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// The step index t (counts down from S to 1).
    pub t: usize,
    /// S.
    pub steps: usize,
    /// Rows fed to the denoiser in this step.
    pub rows: usize,
    /// Tokens revealed in this step across all chains.
    pub revealed: usize,
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

/// The denoiser: given `rows` token rows of length L concatenated, `(rows, L)`, fill `logits`
/// with `(rows, L, K)` values.
pub type Denoiser<'a> = dyn FnMut(&[i64], usize, &mut Vec<f32>) -> Result<()> + 'a;

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
    let mut weights: Vec<f64> = vec![0.0; k];
    let mut rows: Vec<usize> = Vec::with_capacity(chains.len());
    let maskgit = settings.sampler == SamplerKind::Maskgit;
    for t in (1..=settings.steps as u32).rev() {
        let step = settings.steps - t as usize;
        let temperature = settings.temperature_at(step);
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
        for &c in &rows {
            input.extend_from_slice(&chains[c].tokens);
        }
        denoise(&input, rows.len(), &mut logits)?;
        if logits.len() != rows.len() * l * k {
            return Err(Error::Tokens(format!(
                "denoiser returned {} logits for {} rows, expected {} ({} x {l} x {k})",
                logits.len(),
                rows.len(),
                rows.len() * l * k,
                rows.len()
            )));
        }
        let mut revealed = 0;
        for (r, &c) in rows.iter().enumerate() {
            let chain = &mut chains[c];
            let row_logits = &logits[r * l * k..(r + 1) * l * k];
            revealed += if maskgit {
                maskgit_step(
                    chain,
                    row_logits,
                    temperature,
                    step,
                    settings.steps,
                    space.mask_id,
                    &mut weights,
                )
            } else {
                let n = chain.pending_at(t).len();
                for i in chain.cursor..chain.cursor + n {
                    let p = chain.reveals[i].1 as usize;
                    let (token, _) = draw(
                        &row_logits[p * k..(p + 1) * k],
                        temperature,
                        &mut weights,
                        &mut chain.rng,
                    );
                    chain.tokens[p] = token as i64;
                }
                chain.cursor += n;
                n
            };
        }
        stats.calls += 1;
        stats.rows += rows.len();
        stats.revealed += revealed;
        on_step(&StepReport {
            t: t as usize,
            steps: settings.steps,
            rows: rows.len(),
            revealed,
        });
    }
    debug_assert!(chains
        .iter()
        .all(|c| c.cursor == c.reveals.len() && (!maskgit || c.masked.is_empty())));
    Ok(stats)
}

/// One MaskGIT step on one chain; returns how many positions it revealed.
fn maskgit_step(
    chain: &mut Chain,
    logits: &[f32],
    temperature: f64,
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
            let (token, logp) = draw(&logits[p * k..(p + 1) * k], temperature, weights, &mut chain.rng);
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
    n_reveal
}

/// One categorical draw from softmax(logits / temperature), by inverse CDF. Returns the code and
/// its log-probability. `weights` is scratch space of length K.
fn draw(logits: &[f32], temperature: f64, weights: &mut [f64], rng: &mut ChaCha20Rng) -> (usize, f64) {
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
    fn fake(tokens: &[i64], rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let (l, k) = (SPACE.len, SPACE.codebook_size);
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
        let mut weights = vec![0.0; 4];
        let mut rng = image_rng(3, 0);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[draw(&logits, 1.0, &mut weights, &mut rng).0] += 1;
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
        let mut weights = vec![0.0; 2];
        let share = |t: f32| {
            let mut rng = image_rng(11, 0);
            let mut w = weights.clone();
            (0..10_000)
                .filter(|_| draw(&logits, t as f64, &mut w, &mut rng).0 == 0)
                .count() as f64
                / 10_000.0
        };
        assert!(share(50.0) > 0.45);
        assert!(share(0.1) < 0.001);
        weights.clear();
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
        let mut sure = |tokens: &[i64], rows: usize, out: &mut Vec<f32>| -> Result<()> {
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
}
