//! Reveal rules: what makes one sampler differ from another. A rule answers three decisions,
//! one method each, and the step loop (`reverse.rs`) asks them in the same order for every rule:
//!
//! 1. [`Rule::plan`], once per chain before the first step: which positions are revealed at which
//!    step, when the rule fixes that up front (drawn from the chain's own stream);
//! 2. [`Rule::sampled`], at each step: which positions the step draws (their logits are what the
//!    step needs; none: the chain sits the step out, and a step no chain needs makes no call);
//! 3. [`Rule::reveal`]: draw those positions and keep the ones the rule reveals.
//!
//! A rule that fixes its plan up front (`absorbing`, `even`) needs only the first: the other two
//! default to "draw and keep what the plan reveals at t". One file per rule; a new sampler is a
//! new file here and a variant of [`SamplerKind`](super::SamplerKind).

use rand_chacha::ChaCha20Rng;

use super::chain::Chain;
use super::draw::draw;
use super::{Settings, TokenSpace};

pub(crate) mod absorbing;
pub(crate) mod even;
pub(crate) mod halton;
pub(crate) mod maskgit;
pub(crate) mod threshold;

/// The step being executed, as a rule sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// t, counting down from S to 1.
    pub t: u32,
    /// The step's index s = S - t, 0 for the first.
    pub index: usize,
    /// S.
    pub steps: usize,
    /// This step's temperature.
    pub temperature: f64,
    /// Nucleus share (1 = off).
    pub top_p: f64,
    /// The `threshold` sampler's least probability for a reveal.
    pub threshold: f64,
    /// The absorbing state.
    pub mask_id: i64,
}

impl Step {
    pub(crate) fn new(settings: &Settings, t: u32, mask_id: i64) -> Step {
        let index = settings.steps - t as usize;
        Step {
            t,
            index,
            steps: settings.steps,
            temperature: settings.temperature_at(index),
            top_p: settings.nucleus(),
            threshold: settings.threshold_or_default() as f64,
            mask_id,
        }
    }
}

/// One sampler's reveal rule (module docs).
pub(crate) trait Rule: Sync {
    /// The name on the command line, in JSON and in PNG metadata.
    fn name(&self) -> &'static str;

    /// One line for help texts.
    fn help(&self) -> &'static str;

    /// `(t, position)` for every position of `masked` (raster order, positions of `space`'s grid)
    /// whose reveal step is fixed before sampling, drawn from `rng`; empty when the rule chooses
    /// while sampling.
    fn plan(&self, masked: &[u32], space: &TokenSpace, steps: usize, rng: &mut ChaCha20Rng) -> Vec<(u32, u32)>;

    /// The positions of `chain` that step `t` draws, in raster order.
    fn sampled<'c>(&self, chain: &'c Chain, t: u32) -> &'c [u32] {
        chain.planned_at(t)
    }

    /// Draws the positions [`Rule::sampled`] named from `logits` (`(L, K)` for this chain; only
    /// those positions are read) and reveals those the rule keeps; returns how many.
    /// `scratch` holds 2K floats.
    fn reveal(&self, chain: &mut Chain, logits: &[f32], step: &Step, scratch: &mut [f64]) -> usize {
        let k = logits.len() / chain.tokens.len();
        let n = chain.planned_at(step.t).len();
        for i in chain.cursor..chain.cursor + n {
            let p = chain.plan_pos[i] as usize;
            let (token, _) = draw(
                &logits[p * k..(p + 1) * k],
                step.temperature,
                step.top_p,
                scratch,
                &mut chain.rng,
            );
            chain.tokens[p] = token as i64;
        }
        chain.cursor += n;
        chain.revealed += n;
        n
    }

    /// Whether `chain` has nothing left to reveal.
    fn done(&self, chain: &Chain) -> bool {
        chain.cursor == chain.plan_pos.len()
    }
}
