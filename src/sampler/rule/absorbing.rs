//! `absorbing`, the paper's rule (Bond-Taylor et al. 2021, Algorithm 2): at step t each
//! still-masked position is revealed with probability 1/t. Equivalently, and cheaper, each masked
//! position's reveal step is uniform on 1..=S, independently: one `u64` per masked position in
//! raster order, `1 + floor(u * S / 2^64)`.

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use super::super::TokenSpace;
use super::Rule;

/// The paper's rule.
pub(crate) struct Absorbing;

impl Rule for Absorbing {
    fn name(&self) -> &'static str {
        "absorbing"
    }

    fn help(&self) -> &'static str {
        "the paper's rule: each masked position revealed at step t with probability 1/t"
    }

    fn plan(&self, masked: &[u32], _: &TokenSpace, steps: usize, rng: &mut ChaCha20Rng) -> Vec<(u32, u32)> {
        let steps = steps as u128;
        masked
            .iter()
            // Uniform on 1..=S by a widening multiply (bias below 2^-50 for any S <= L).
            .map(|&p| (1 + ((rng.next_u64() as u128 * steps) >> 64) as u32, p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand_core::RngCore;

    use super::super::super::tests::{generate, SPACE};
    use super::super::super::*;

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
        let stats = sample(&mut chains, &SPACE, &s, &mut tests::fake, &mut |_| {}).unwrap();
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
            width: 4,
            codebook_size: 2,
            mask_id: 2,
        };
        let s = Settings::new(steps, 1.0, &space).unwrap();
        let mut ours = vec![0f64; steps + 1];
        let mut reference = vec![0f64; steps + 1];
        for seed in 0..runs {
            let chain = Chain::masked(&space, &s, seed, 0).unwrap();
            for &t in &chain.plan_t {
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
}
