//! The one step loop of the reverse process, for single-window and windowed runs alike: for
//! t = S..1, ask each chain's rule which positions the step draws, skip the step if none, feed the
//! denoiser (a [`Feed`] turns chains into rows and logits back into each chain's `(L, K)`),
//! reveal, report.

use super::chain::Chain;
use super::rule::Step;
use super::{Denoiser, RunStats, Settings, StepReport, TokenSpace};
use crate::error::{Error, Result};

/// How a step's chains become the denoiser's rows, and its logits each chain's. A feed holds its
/// denoiser.
pub(super) trait Feed {
    /// Calls the denoiser for every chain `c` with positions in `needed[c]` (an empty list: the
    /// chain sits this step out); counts the calls and positions computed in `stats`; returns the
    /// rows fed.
    fn call(&mut self, chains: &[Chain], needed: &[Vec<u32>], stats: &mut RunStats) -> Result<usize>;

    /// Chain `c`'s `(L, K)` logits from the last call, valid at `positions` (its `needed`).
    fn logits(&mut self, c: usize, positions: &[u32]) -> &[f32];
}

/// Runs `chains` to the end: the loop of the module docs.
pub(super) fn reverse(
    chains: &mut [Chain],
    feed: &mut dyn Feed,
    space: &TokenSpace,
    settings: &Settings,
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<RunStats> {
    let rule = settings.sampler.rule();
    let mut stats = RunStats::default();
    let mut scratch: Vec<f64> = vec![0.0; 2 * space.codebook_size]; // the draw's
    let mut needed: Vec<Vec<u32>> = vec![Vec::new(); chains.len()];
    for t in (1..=settings.steps as u32).rev() {
        for (n, chain) in needed.iter_mut().zip(chains.iter()) {
            n.clear();
            n.extend_from_slice(rule.sampled(chain, t));
        }
        if needed.iter().all(Vec::is_empty) {
            stats.skipped_steps += 1;
            continue;
        }
        let rows = feed.call(chains, &needed, &mut stats)?;
        let step = Step::new(settings, t, space.mask_id);
        let mut revealed = 0;
        for (c, chain) in chains.iter_mut().enumerate() {
            if !needed[c].is_empty() {
                revealed += rule.reveal(chain, feed.logits(c, &needed[c]), &step, &mut scratch);
            }
        }
        stats.rows += rows;
        stats.revealed += revealed;
        on_step(&StepReport {
            t: t as usize,
            steps: settings.steps,
            rows,
            revealed,
            chains,
        });
    }
    debug_assert!(chains.iter().all(|c| rule.done(c)));
    Ok(stats)
}

/// The denoiser must return `(rows, L, K)` logits.
pub(super) fn check_logits(logits: &[f32], rows: usize, l: usize, k: usize) -> Result<()> {
    if logits.len() == rows * l * k {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "denoiser returned {} logits for {rows} rows, expected {} ({rows} x {l} x {k})",
        logits.len(),
        rows * l * k,
    )))
}

/// Each chain one row of the denoiser (the bundle's own grid).
pub(super) struct Rows<'d, 'a> {
    denoise: &'d mut Denoiser<'a>,
    l: usize,
    k: usize,
    input: Vec<i64>,
    classes: Vec<i64>,
    logits: Vec<f32>,
    /// The row of each chain in the last call.
    row_of: Vec<usize>,
}

impl<'d, 'a> Rows<'d, 'a> {
    pub(super) fn new(space: &TokenSpace, denoise: &'d mut Denoiser<'a>) -> Rows<'d, 'a> {
        Rows {
            denoise,
            l: space.len,
            k: space.codebook_size,
            input: Vec::new(),
            classes: Vec::new(),
            logits: Vec::new(),
            row_of: Vec::new(),
        }
    }
}

impl Feed for Rows<'_, '_> {
    fn call(&mut self, chains: &[Chain], needed: &[Vec<u32>], stats: &mut RunStats) -> Result<usize> {
        self.input.clear();
        self.classes.clear();
        self.row_of.clear();
        self.row_of.resize(chains.len(), 0);
        for (c, chain) in chains.iter().enumerate() {
            if !needed[c].is_empty() {
                self.row_of[c] = self.classes.len();
                self.input.extend_from_slice(chain.tokens());
                self.classes.push(chain.class());
            }
        }
        let rows = self.classes.len();
        (self.denoise)(&self.input, &self.classes, &mut self.logits)?;
        check_logits(&self.logits, rows, self.l, self.k)?;
        stats.calls += 1;
        stats.positions += rows * self.l;
        Ok(rows)
    }

    fn logits(&mut self, c: usize, _: &[u32]) -> &[f32] {
        let size = self.l * self.k;
        &self.logits[self.row_of[c] * size..(self.row_of[c] + 1) * size]
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fake, SPACE};
    use super::super::*;

    #[test]
    fn logits_of_the_wrong_size_are_a_bug_not_an_input_error() {
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let mut chains = vec![Chain::masked(&SPACE, &s, 1, 0).unwrap()];
        let mut short = |t: &[i64], c: &[i64], out: &mut Vec<f32>| {
            fake(t, c, out)?;
            out.pop();
            Ok(())
        };
        let e = sample(&mut chains, &SPACE, &s, &mut short, &mut |_| {}).unwrap_err();
        assert!(matches!(e, Error::Internal(_)) && !e.is_input_error(), "{e}");
        assert!(e.to_string().contains("expected 128"), "{e}");
    }
}
