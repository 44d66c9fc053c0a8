//! One image's reverse chain: its tokens, what its reveal rule fixed before the first step, its
//! random stream and its class; and the streams themselves ([`image_rng`], [`spread_class`]).

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use super::{Settings, TokenSpace};
use crate::error::{Error, Result};

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

/// One image's reverse chain: its tokens and, for rules that fix them up front, the step at which
/// each masked position is revealed.
#[derive(Debug, Clone)]
pub struct Chain {
    pub(super) tokens: Vec<i64>,
    /// Reveal steps fixed before the first step, sorted by t descending then position:
    /// `plan_t[i]` is the step of position `plan_pos[i]`. Empty for rules that choose while
    /// sampling.
    pub(super) plan_t: Vec<u32>,
    pub(super) plan_pos: Vec<u32>,
    /// Next entry of the plan to execute.
    pub(super) cursor: usize,
    pub(super) rng: ChaCha20Rng,
    /// Positions still masked, in raster order (kept up to date by rules that choose while
    /// sampling; the masked positions at the start for the others).
    pub(super) masked: Vec<u32>,
    /// Masked positions at the start.
    pub(super) initial_masked: usize,
    /// Positions revealed so far.
    pub(super) revealed: usize,
    /// The class fed with this chain's rows ([`NO_CLASS`]: none).
    class: i64,
}

impl Chain {
    /// A chain over `tokens` (length L): positions holding `mask_id` are sampled, all others are
    /// kept. Draws what the reveal rule fixes up front from `rng` (see the module docs).
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
        let masked: Vec<u32> = (0..tokens.len())
            .filter(|&p| tokens[p] == space.mask_id)
            .map(|p| p as u32)
            .collect();
        let mut plan = settings.sampler.rule().plan(&masked, space, settings.steps, &mut rng);
        plan.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let (plan_t, plan_pos) = plan.into_iter().unzip();
        let initial_masked = masked.len();
        Ok(Chain {
            tokens,
            plan_t,
            plan_pos,
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

    /// The positions the plan reveals at step `t`, in raster order.
    pub(super) fn planned_at(&self, t: u32) -> &[u32] {
        let n = self.plan_t[self.cursor..].iter().take_while(|&&s| s == t).count();
        &self.plan_pos[self.cursor..self.cursor + n]
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::SPACE;
    use super::*;

    #[test]
    fn out_of_range_tokens_are_rejected() {
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        let mut tokens = vec![0i64; 16];
        tokens[5] = 9;
        let e = Chain::new(tokens, &SPACE, &s, image_rng(0, 0)).unwrap_err().to_string();
        assert!(e.contains("position 5"), "{e}");
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
}
