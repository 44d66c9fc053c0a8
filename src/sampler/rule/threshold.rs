//! `threshold`: confidence-threshold parallel decoding (as in Fast-dLLM, Wu et al. 2025, for
//! masked diffusion language models). Every call samples every still-masked position and reveals
//! each whose drawn token has probability at least the threshold `P` (`--threshold`), and always
//! at least one: the most probable draw. The number of calls thus adapts to each image: a chain
//! whose positions are all revealed leaves the batch, and `--steps S` is only the most calls an
//! image may take (the last one reveals every position left).
//!
//! - Draws: at each call, one `u64` per masked position in raster order for its token (the same
//!   categorical draw at the step's temperature and top-p as every rule), nothing else.
//! - Confidence: the drawn token's probability under that (tempered, truncated) distribution, in
//!   f64 with `libm`; the position revealed when none reaches `P` is the highest (ties: the lower
//!   position). Revealed tokens are kept.

use rand_chacha::ChaCha20Rng;

use super::super::chain::Chain;
use super::super::draw::draw;
use super::super::TokenSpace;
use super::{Rule, Step};

/// The threshold when none is given (Fast-dLLM's choice for its language models).
pub const DEFAULT_THRESHOLD: f32 = 0.9;

/// Reveal what the denoiser is sure of; at least one per call.
pub(crate) struct Threshold;

impl Rule for Threshold {
    fn name(&self) -> &'static str {
        "threshold"
    }

    fn help(&self) -> &'static str {
        "adaptive: each call reveals every masked position drawn with probability >= --threshold (at least one)"
    }

    fn plan(&self, _: &[u32], _: &TokenSpace, _: usize, _: &mut ChaCha20Rng) -> Vec<(u32, u32)> {
        Vec::new() // chosen while sampling, by probability
    }

    fn sampled<'c>(&self, chain: &'c Chain, _: u32) -> &'c [u32] {
        &chain.masked
    }

    fn reveal(&self, chain: &mut Chain, logits: &[f32], step: &Step, scratch: &mut [f64]) -> usize {
        let k = logits.len() / chain.tokens.len(); // (L, K) logits of this row
        let last = step.index + 1 == step.steps;
        let log_threshold = libm::log(step.threshold);
        let mut best: Option<(f64, u32, i64)> = None;
        let mut revealed = 0;
        for i in 0..chain.masked.len() {
            let p = chain.masked[i] as usize;
            let (token, logp) = draw(
                &logits[p * k..(p + 1) * k],
                step.temperature,
                step.top_p,
                scratch,
                &mut chain.rng,
            );
            if last || logp >= log_threshold {
                chain.tokens[p] = token as i64;
                revealed += 1;
            } else if best.is_none_or(|(b, _, _)| logp > b) {
                best = Some((logp, p as u32, token as i64));
            }
        }
        if revealed == 0 {
            // Nothing sure enough: the most probable draw (a step always reveals one).
            if let Some((_, p, token)) = best {
                chain.tokens[p as usize] = token;
                revealed = 1;
            }
        }
        let mask_id = step.mask_id;
        let tokens = &chain.tokens;
        chain.masked.retain(|&p| tokens[p as usize] == mask_id);
        chain.revealed += revealed;
        revealed
    }

    fn done(&self, chain: &Chain) -> bool {
        chain.masked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{generate_with, sure_at, SPACE};
    use super::super::super::*;

    fn run(settings: &Settings, denoise: &mut crate::sampler::Denoiser<'_>) -> (Vec<usize>, Vec<i64>) {
        let mut chains = vec![Chain::masked(&SPACE, settings, 9, 0).unwrap()];
        let mut per_step = Vec::new();
        sample(&mut chains, &SPACE, settings, denoise, &mut |r| {
            per_step.push(r.revealed)
        })
        .unwrap();
        (per_step, chains[0].tokens().to_vec())
    }

    #[test]
    fn a_call_reveals_every_sure_position_and_at_least_one_otherwise() {
        let s = Settings::new(16, 1.0, &SPACE)
            .unwrap()
            .with_sampler(SamplerKind::Threshold);
        // Sure of the even positions: the first call reveals all 8 of them; the odd ones are
        // flat (1/8 < 0.9): one per call, until the steps run out.
        let (per_step, tokens) = run(&s, &mut sure_at(|p| p % 2 == 0));
        assert_eq!(per_step, vec![8, 1, 1, 1, 1, 1, 1, 1, 1], "{per_step:?}");
        assert!((0..16).step_by(2).all(|p| tokens[p] == 1), "{tokens:?}");
        // Sure of everything: one call.
        let (per_step, _) = run(&s, &mut sure_at(|_| true));
        assert_eq!(per_step, vec![16]);
        // A cap of 3 calls: the last reveals whatever is left.
        let capped = Settings::new(3, 1.0, &SPACE)
            .unwrap()
            .with_sampler(SamplerKind::Threshold);
        let (per_step, _) = run(&capped, &mut sure_at(|p| p % 2 == 0));
        assert_eq!(per_step, vec![8, 1, 7]);
    }

    #[test]
    fn a_lower_threshold_reveals_more_per_call() {
        // Flat logits over 8 codes: every draw has probability 1/8.
        let s = |p: f32| {
            Settings::new(16, 1.0, &SPACE)
                .unwrap()
                .with_sampler(SamplerKind::Threshold)
                .with_threshold(Some(p))
                .unwrap()
        };
        let (per_step, _) = run(&s(0.125), &mut sure_at(|_| false));
        assert_eq!(per_step, vec![16], "1/8 reaches a threshold of 1/8");
        let (per_step, _) = run(&s(0.13), &mut sure_at(|_| false));
        assert_eq!(per_step.len(), 16, "one per call below it: {per_step:?}");
    }

    #[test]
    fn chains_that_finish_leave_the_batch() {
        // The fake denoiser of the tests is sure enough for some chains earlier than for others;
        // the run makes as many calls as its slowest chain needs, and rows only for live chains.
        let (_, stats, per_step) = generate_with(SamplerKind::Threshold, &[(4, 0), (4, 1), (4, 2)], 16);
        assert!(stats.calls <= 16 && per_step.iter().sum::<usize>() == 3 * 16);
        assert!(stats.rows <= 3 * stats.calls);
    }
}
