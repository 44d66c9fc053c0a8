//! `even`: exactly the expected number of reveals per step, in a seeded random order. The masked
//! positions are shuffled (Fisher-Yates from the last position down, one `u64` per swap, a
//! widening multiply) and cut into S runs of `floor(m(s+1)/S) - floor(ms/S)` positions.

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use super::super::TokenSpace;
use super::Rule;

/// Exactly the expected count per step.
pub(crate) struct Even;

impl Rule for Even {
    fn name(&self) -> &'static str {
        "even"
    }

    fn help(&self) -> &'static str {
        "exactly the expected number of reveals per step, in a seeded random order"
    }

    fn plan(&self, masked: &[u32], _: &TokenSpace, steps: usize, rng: &mut ChaCha20Rng) -> Vec<(u32, u32)> {
        let steps = steps as u64;
        let mut order = masked.to_vec();
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
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{generate_with, SPACE};
    use super::super::super::*;

    #[test]
    fn even_reveals_exactly_the_expected_count_every_step() {
        // 16 positions over 5 steps: 3 or 4 per step, floor(16(s+1)/5) - floor(16s/5).
        let (_, stats, per_step) = generate_with(SamplerKind::Even, &[(3, 0)], 5);
        assert_eq!(per_step, vec![3, 3, 3, 3, 4]);
        assert_eq!(stats.skipped_steps, 0);
        // Different seeds reveal in different orders.
        let order = |seed| {
            let s = Settings::new(5, 1.0, &SPACE).unwrap().with_sampler(SamplerKind::Even);
            Chain::masked(&SPACE, &s, seed, 0).unwrap().plan_pos
        };
        assert_ne!(order(1), order(2));
    }
}
