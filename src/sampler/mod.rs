//! The reverse absorbing-diffusion process, pure: no ONNX Runtime, no images, no I/O.
//!
//! The paper's sampler (Bond-Taylor et al. 2021, Algorithm 2) reveals each still-masked position
//! at step t with probability 1/t, for t = S..1. A position masked at the start therefore has its
//! reveal step uniform on 1..=S, independently of the others. So the `absorbing` rule draws every
//! masked position's reveal step once up front, and the step loop walks t = S..1 and calls the
//! denoiser only when some chain reveals something at t, feeding only those chains' rows. The
//! output distribution is the reference's; the number of network calls is smaller (at S = L
//! about 37% of steps are empty).
//!
//! The files:
//! - `settings.rs`: [`Settings`] and [`SamplerKind`], checked once;
//! - `chain.rs`: one image's [`Chain`] and its random streams;
//! - `rule/`: the reveal rules, one file per sampler, each answering the decisions of the
//!   [`rule::Rule`] trait (what is fixed before the first step, which positions a step draws,
//!   which of them it keeps);
//! - `draw.rs`: the categorical draw, nucleus truncation, softmax;
//! - `guidance.rs`: classifier-free guidance over any denoiser;
//! - `reverse.rs`: the one step loop, shared by single-window and windowed runs;
//! - `tiling.rs`: windows of the trained grid over a larger one, and how they are fed.
//!
//! # Determinism contract (docs/design.md, section 4)
//! - Image `index` of a request with seed `seed` draws from its own ChaCha20 stream:
//!   `ChaCha20Rng::seed_from_u64(seed)` with `set_stream(index)`. It is the same image whether
//!   made alone or in any batch.
//! - Draw order within an image: first what the rule fixes before the first step (`absorbing`:
//!   one `u64` per masked position in raster order, its reveal step `1 + floor(u * S / 2^64)`);
//!   then, for t = S..1, one `u64` per position revealed at t in raster order (its token, by
//!   inverse CDF on `u / 2^64` at 53-bit precision).
//! - The categorical draw computes `exp((logit - max) / temperature)` with the pure-Rust `libm`
//!   in f64 and sums in index order, so this code adds no platform variation; the logits
//!   themselves come from ONNX Runtime and are only as reproducible as the provider.
//!
//! Other samplers ([`SamplerKind`]), under the same contract; each rule's file states its draws:
//! - `even`: reveal steps from a seeded shuffle, exactly the expected number per step;
//! - `maskgit` (Chang et al. 2022): every step samples every still-masked position, keeps the
//!   most confident (log-probability plus annealed Gumbel noise), cosine schedule.
//! - A linear temperature schedule `start:end` sets step s's temperature to
//!   `start + (end - start) s / (S - 1)` (computed in f64).
//! - Nucleus (top-p) truncation, when set below 1: after the temperature, only the most probable
//!   codes whose mass first reaches `p` of the total are kept (every code whose weight equals the
//!   smallest kept one as well), the others get weight 0, and the draw is the same inverse CDF over
//!   what is left (still one `u64`). MaskGIT's confidence is the log-probability under the
//!   truncated distribution. Unset (or 1), nothing changes.
//! - Larger grids ([`sample_windows`]): the same draws over the big grid's positions in raster
//!   order; a position's distribution is the mean of its voting windows' softmax probabilities
//!   (f64, `libm`, windows in ascending order), drawn with the step's temperature as `p^(1/T)`
//!   renormalised. Which windows vote is fixed by the [`Tiling`] (grid, stride, margin).
//! - A class-conditional bundle: each chain carries one class ([`NO_CLASS`] = none), fed with
//!   every row of it (each window of a larger grid too). A class chosen for a request without
//!   one ([`spread_class`]) comes from a stream of its own, so the image's stream is untouched:
//!   image `i` made as class `c` is the image asked for with class `c`.
//! - Classifier-free guidance (`guidance` w > 0, `guidance.rs`): a chain with a class reads the
//!   logits `c + w (c - u)` (f32, element by element), c from a pass with its class and u from a
//!   pass of its rows without one; chains without a class read theirs unchanged. The draws and
//!   streams are as above.
//!
//! Changing any of this changes the tokens for a given seed: a breaking change.

mod cached;
mod chain;
mod draw;
mod guidance;
mod reverse;
pub(crate) mod rule;
mod settings;
mod tiling;

pub use cached::{CacheShape, CachedCall, CachedDenoiser, CachedOut};
pub use chain::{image_rng, spread_class, Chain, NO_CLASS};
pub use guidance::guide;
pub use settings::{SamplerKind, Settings};
pub use tiling::Tiling;

use crate::error::{Error, Result};

/// The token space of a bundle, as the sampler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSpace {
    /// L, positions per image (row-major grid).
    pub len: usize,
    /// Columns of the grid: position `p` is row `p / width`, column `p % width`.
    pub width: usize,
    /// K, the number of codes; the denoiser returns K logits per position.
    pub codebook_size: usize,
    /// The absorbing (masked) state, outside `0..K`.
    pub mask_id: i64,
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

/// Totals of one run of the reverse process.
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
    /// Positions the denoiser computed over all calls (a full pass: L per row; a cached run's
    /// cheap pass: its query positions).
    pub positions: usize,
}

/// The denoiser: given token rows of length L concatenated, `(rows, L)`, and each row's class
/// (`rows` of them; [`NO_CLASS`] = none), fill `logits` with `(rows, L, K)` values.
pub type Denoiser<'a> = dyn FnMut(&[i64], &[i64], &mut Vec<f32>) -> Result<()> + 'a;

/// Runs the reverse process on all `chains` to completion, each chain one row of the denoiser.
/// Chains are independent: each one's result depends only on its own tokens, reveal steps and
/// random stream, never on its batch.
pub fn sample(
    chains: &mut [Chain],
    space: &TokenSpace,
    settings: &Settings,
    denoise: &mut Denoiser<'_>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let mut feed = reverse::Rows::new(space, denoise);
    reverse::reverse(chains, &mut feed, space, settings, on_step)
}

/// Runs the reverse process on `chains` (the bundle's own grid) with cached attention between
/// steps (`settings.cache`: a full pass every that many of a chain's calls, cheap passes between;
/// `cached.rs`). Chains stay independent.
pub fn sample_cached(
    chains: &mut [Chain],
    space: &TokenSpace,
    settings: &Settings,
    shape: CacheShape,
    denoise: &mut CachedDenoiser<'_>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let Some(period) = settings.cache else {
        return Err(Error::Internal("a cached run without a cache period".into()));
    };
    let mut feed = cached::Cached::new(space, shape, period, chains.len(), denoise);
    reverse::reverse(chains, &mut feed, space, settings, on_step)
}

/// Runs the reverse process on `chains` over the big grid of `tiling` (each chain's tokens are
/// that grid, row-major; known tokens are kept). `window_space` is the trained grid's token space
/// (the denoiser's row length). Each step feeds the windows that vote for a position sampled in
/// that step, of all chains together, at most `max_rows` per denoiser call. Chains stay
/// independent: each one's result never depends on the others.
///
/// Determinism: each chain's draws follow the module contract over the big grid's positions; the
/// combined distribution of a position is computed in f64 (`libm`), summing its voting windows in
/// ascending order, then drawn with the step's temperature (`p^(1/T)` renormalised).
pub fn sample_windows(
    chains: &mut [Chain],
    tiling: &Tiling,
    window_space: &TokenSpace,
    settings: &Settings,
    max_rows: usize,
    denoise: &mut Denoiser<'_>,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let [h, w] = tiling.window();
    if window_space.len != h * w {
        return Err(Error::Internal(format!(
            "windowed run: windows of {} tokens, the tiling's are {h}x{w}",
            window_space.len
        )));
    }
    let big = tiling.grid()[0] * tiling.grid()[1];
    if let Some(c) = chains.iter().find(|c| c.tokens().len() != big) {
        return Err(Error::Internal(format!(
            "windowed run: a chain of {} tokens over a {}x{} grid",
            c.tokens().len(),
            tiling.grid()[0],
            tiling.grid()[1]
        )));
    }
    let mut feed = tiling::Windows::new(tiling, window_space, chains.len(), max_rows, denoise);
    reverse::reverse(chains, &mut feed, window_space, settings, on_step)
}

#[cfg(test)]
pub(crate) mod tests {
    //! The fake denoisers and runs the files' tests share.
    use super::*;

    pub(crate) const SPACE: TokenSpace = TokenSpace {
        len: 16,
        width: 4,
        codebook_size: 8,
        mask_id: 8,
    };

    /// A deterministic fake denoiser whose logits depend only on each row's own tokens:
    /// prefers code (position + number of revealed tokens) mod K.
    pub(crate) fn fake(tokens: &[i64], classes: &[i64], out: &mut Vec<f32>) -> Result<()> {
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

    /// A fake denoiser sure (logit 50) of code 1 at the positions `sure` says, flat elsewhere.
    pub(crate) fn sure_at(sure: fn(usize) -> bool) -> impl FnMut(&[i64], &[i64], &mut Vec<f32>) -> Result<()> {
        move |_tokens: &[i64], classes: &[i64], out: &mut Vec<f32>| {
            out.clear();
            for _ in 0..classes.len() {
                for p in 0..SPACE.len {
                    out.extend((0..SPACE.codebook_size).map(|c| if sure(p) && c == 1 { 50.0 } else { 0.0 }));
                }
            }
            Ok(())
        }
    }

    /// Images `seeds` (seed, index) with `kind` at `steps`: tokens, totals, reveals per step.
    pub(crate) fn generate_with(
        kind: SamplerKind,
        seeds: &[(u64, u64)],
        steps: usize,
    ) -> (Vec<Vec<i64>>, RunStats, Vec<usize>) {
        let s = Settings::new(steps, 1.0, &SPACE).unwrap().with_sampler(kind);
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let mut per_step = Vec::new();
        let stats = sample(&mut chains, &SPACE, &s, &mut fake, &mut |r| per_step.push(r.revealed)).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats, per_step)
    }

    /// The paper's sampler at a constant temperature.
    pub(crate) fn generate(seeds: &[(u64, u64)], steps: usize, temperature: f32) -> (Vec<Vec<i64>>, RunStats) {
        let s = Settings::new(steps, temperature, &SPACE).unwrap();
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let stats = sample(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    #[test]
    fn every_sampler_leaves_no_mask_and_is_deterministic_and_batch_independent() {
        for &kind in SamplerKind::ALL {
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
        for &kind in SamplerKind::ALL {
            let s = Settings::new(5, 1.0, &SPACE).unwrap().with_sampler(kind);
            let mut chains: Vec<Chain> = (0..3).map(|i| Chain::masked(&SPACE, &s, 9, i).unwrap()).collect();
            assert!(chains.iter().all(|c| c.still_masked() == 16), "{kind:?} at the start");
            let mut seen = Vec::new();
            sample(&mut chains, &SPACE, &s, &mut fake, &mut |r| {
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
    fn top_p_one_or_unset_changes_no_token_and_below_one_does() {
        for kind in [SamplerKind::Absorbing, SamplerKind::Maskgit] {
            let base = Settings::new(8, 1.0, &SPACE).unwrap().with_sampler(kind);
            let run_with = |s: Settings| {
                let mut chains: Vec<Chain> = (0..4).map(|i| Chain::masked(&SPACE, &s, 21, i).unwrap()).collect();
                sample(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
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
        sample(&mut chains, &SPACE, &s, &mut { by_class }, &mut |_| {}).unwrap();
        for (chain, &c) in chains.iter().zip(&classes) {
            assert_eq!(chain.class(), c);
            assert!(
                chain.tokens().iter().all(|&t| t == c + 1),
                "class {c}: {:?}",
                chain.tokens()
            );
        }
        // Every window of a larger grid is fed its chain's class.
        let t = Tiling::new([4, 8], [4, 4], [2, 2], [0, 0]).unwrap();
        let big = TokenSpace {
            len: 32,
            width: 8,
            ..SPACE
        };
        let s = Settings::new(4, 1.0, &big).unwrap();
        let mut chains: Vec<Chain> = classes
            .iter()
            .enumerate()
            .map(|(i, &c)| Chain::masked(&big, &s, 3, i as u64).unwrap().with_class(c))
            .collect();
        sample_windows(&mut chains, &t, &SPACE, &s, 3, &mut { by_class }, &mut |_| {}).unwrap();
        for (chain, &c) in chains.iter().zip(&classes) {
            assert!(
                chain.tokens().iter().all(|&t| t == c + 1),
                "class {c}: {:?}",
                chain.tokens()
            );
        }
    }

    #[test]
    fn a_windowed_run_refuses_chains_that_do_not_fit_its_tiling_as_a_bug() {
        let t = Tiling::new([4, 8], [4, 4], [2, 2], [0, 0]).unwrap();
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let mut chains = vec![Chain::masked(&SPACE, &s, 1, 0).unwrap()];
        let e = sample_windows(&mut chains, &t, &SPACE, &s, 3, &mut fake, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
        assert!(!e.is_input_error());
    }
}
