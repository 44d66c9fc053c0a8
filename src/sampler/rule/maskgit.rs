//! `maskgit` (Chang et al. 2022): every step samples every still-masked position (raster order,
//! one `u64` each for the token, then one `u64` each for Gumbel noise), scores it by its
//! log-probability plus Gumbel noise scaled by `MASKGIT_CHOICE_TEMPERATURE * (1 - (s+1)/S)`,
//! reveals the best-scoring ones (ties by position) and re-masks the rest; after step s,
//! `floor(m cos(pi/2 (s+1)/S))` positions stay masked (cosine schedule), at least one is revealed
//! per step, none after the last.
//!
//! `maskgit-threshold` is the same rule that also reveals, at every step, each draw whose
//! probability (under the step's tempered, truncated distribution) reaches `--threshold P`,
//! whatever its score: the same draws from the same stream, and the schedule's count is then
//! what the step reveals at least (`max(1, masked - floor(m cos(..)))`). An image whose positions
//! are all revealed leaves the batch, so sure images take fewer calls than `S`; where no draw
//! reaches `P` its tokens equal `maskgit`'s. (Plain `threshold`, which reveals the single most
//! probable draw when none is sure, builds uncertain images greedily: measured on the scenes
//! bundle, KID above 6,000 against MaskGIT's 133; the same greedy order with the cosine
//! schedule's counts also collapsed there, which is why this rule keeps MaskGIT's noisy choice.)

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use super::super::chain::Chain;
use super::super::draw::draw;
use super::super::TokenSpace;
use super::{Rule, Step};

/// Gumbel-noise scale of the MaskGIT sampler at its first step (MaskGIT's default choice
/// temperature), annealed linearly to 0.
pub const MASKGIT_CHOICE_TEMPERATURE: f64 = 4.5;

/// Confidence-based reveals on a cosine schedule; with `threshold`, also every sure draw.
pub(crate) struct Maskgit {
    pub threshold: bool,
}

impl Rule for Maskgit {
    fn name(&self) -> &'static str {
        if self.threshold {
            "maskgit-threshold"
        } else {
            "maskgit"
        }
    }

    fn help(&self) -> &'static str {
        if self.threshold {
            "maskgit that also reveals every draw with probability >= --threshold (at most --steps calls, fewer when sure)"
        } else {
            "confidence-based: sample every masked position, keep the most confident, cosine schedule"
        }
    }

    fn plan(&self, _: &[u32], _: &TokenSpace, _: usize, _: &mut ChaCha20Rng) -> Vec<(u32, u32)> {
        Vec::new() // chosen while sampling, by confidence
    }

    fn sampled<'c>(&self, chain: &'c Chain, _: u32) -> &'c [u32] {
        &chain.masked
    }

    fn reveal(&self, chain: &mut Chain, logits: &[f32], step: &Step, scratch: &mut [f64]) -> usize {
        let k = logits.len() / chain.tokens.len(); // (L, K) logits of this row
        let ratio = (step.index + 1) as f64 / step.steps as f64;
        let keep_masked = if step.index + 1 == step.steps {
            0
        } else {
            let cos = libm::cos(std::f64::consts::FRAC_PI_2 * ratio);
            ((chain.initial_masked as f64 * cos).floor() as usize).min(chain.masked.len() - 1)
        };
        let least = chain.masked.len() - keep_masked;
        // Sample every masked position (raster order), then draw its Gumbel noise (raster order).
        let mut candidates: Vec<(f64, u32, i64)> = Vec::with_capacity(chain.masked.len());
        for &p in &chain.masked {
            let p = p as usize;
            let (token, logp) = draw(
                &logits[p * k..(p + 1) * k],
                step.temperature,
                step.top_p,
                scratch,
                &mut chain.rng,
            );
            candidates.push((logp, p as u32, token as i64));
        }
        let logps: Vec<f64> = if self.threshold {
            candidates.iter().map(|c| c.0).collect()
        } else {
            Vec::new()
        };
        let scale = MASKGIT_CHOICE_TEMPERATURE * (1.0 - ratio);
        for c in candidates.iter_mut() {
            let u = ((chain.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            c.0 += scale * -libm::log(-libm::log(u));
        }
        // maskgit-threshold: the sure draws first, whatever their score (a step reveals them all).
        let mut n_reveal = least;
        if self.threshold {
            let log_threshold = libm::log(step.threshold);
            for (c, &logp) in candidates.iter_mut().zip(&logps) {
                if logp >= log_threshold {
                    c.0 = f64::INFINITY;
                }
            }
            n_reveal = n_reveal.max(logps.iter().filter(|&&l| l >= log_threshold).count());
        }
        // Most confident first; NaN-free by construction (finite log-probs, u in (0, 1)).
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, p, token) in &candidates[..n_reveal] {
            chain.tokens[p as usize] = token;
        }
        // Revealed positions now hold a code; the rest still hold the mask id.
        let mask_id = step.mask_id;
        let tokens = &chain.tokens;
        chain.masked.retain(|&p| tokens[p as usize] == mask_id);
        chain.revealed += n_reveal;
        n_reveal
    }

    fn done(&self, chain: &Chain) -> bool {
        chain.masked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{generate_with, sure_at, SPACE};
    use super::super::super::*;
    use crate::error::Result;

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
        sample(&mut chains, &SPACE, &s, &mut sure, &mut |r| first.push(r.revealed)).unwrap();
        // After step 1 of 2, floor(16 cos(pi/4)) = 11 stay masked: 5 revealed, all even positions.
        assert_eq!(first[0], 5);
        let tokens = chains[0].tokens();
        assert!((0..16).step_by(2).all(|p| tokens[p] == 1), "{tokens:?}");
    }

    fn run(kind: SamplerKind, steps: usize, sure: fn(usize) -> bool) -> (Vec<usize>, Vec<i64>) {
        let s = Settings::new(steps, 1.0, &SPACE).unwrap().with_sampler(kind);
        let mut chains = vec![Chain::masked(&SPACE, &s, 9, 0).unwrap()];
        let mut per_step = Vec::new();
        sample(&mut chains, &SPACE, &s, &mut sure_at(sure), &mut |r| {
            per_step.push(r.revealed)
        })
        .unwrap();
        (per_step, chains[0].tokens().to_vec())
    }

    #[test]
    fn maskgit_threshold_reveals_every_sure_draw_and_equals_maskgit_where_none_is_sure() {
        // Never sure (1/8 < 0.9): the same counts and the same tokens as maskgit.
        let never = |_| false;
        assert_eq!(
            run(SamplerKind::MaskgitThreshold, 4, never),
            run(SamplerKind::Maskgit, 4, never)
        );
        assert_eq!(run(SamplerKind::MaskgitThreshold, 4, never).0, vec![2, 3, 5, 6]);
        // Sure of the even positions: the first step reveals all 8 (maskgit: the schedule's 2);
        // the schedule is then ahead, so the next steps reveal one each and the last the rest.
        let (per_step, tokens) = run(SamplerKind::MaskgitThreshold, 4, |p| p % 2 == 0);
        assert_eq!(per_step, vec![8, 1, 1, 6]);
        assert!((0..16).step_by(2).all(|p| tokens[p] == 1), "{tokens:?}");
        assert_eq!(run(SamplerKind::Maskgit, 4, |p| p % 2 == 0).0, vec![2, 3, 5, 6]);
        // Sure of everything: one call, whatever the steps.
        assert_eq!(run(SamplerKind::MaskgitThreshold, 16, |_| true).0, vec![16]);
        // Its name, and the threshold it reads.
        assert_eq!(
            SamplerKind::from_name("maskgit-threshold"),
            Some(SamplerKind::MaskgitThreshold)
        );
        let s = Settings::new(4, 1.0, &SPACE)
            .unwrap()
            .with_sampler(SamplerKind::MaskgitThreshold);
        assert_eq!(s.with_threshold(Some(0.5)).unwrap().threshold, Some(0.5));
    }
}
