//! `halton` (Besnier et al., "Halton Scheduler for Masked Generative Image Transformers", ICLR
//! 2025): positions are revealed in the order of a 2-D Halton sequence over the grid, so the
//! tokens revealed in one step are spread over the image instead of clustered; how many per step
//! follows the arccos schedule. Revealed tokens are kept, as with every rule here (the authors'
//! sampler draws the revealed ones again at each step; this one is the absorbing process's).
//!
//! - The order of an `H x W` grid: Halton points `i = 1, 2, ...` (the radical inverse of `i` in
//!   base 2 for the column, in base 3 for the row, in exact integer arithmetic), point `i` in cell
//!   `(floor(y H), floor(x W))`; a cell takes its place when a point first lands in it; cells no
//!   point reaches within `64 H W` points follow in raster order. Only masked positions are kept.
//! - Draws: one `u64` from the chain's stream rotates that order (it starts at index
//!   `floor(u m / 2^64)` of the `m` masked positions and wraps), so images do not all start in
//!   the same place; then the tokens, as for every rule (per step, in raster order).
//! - Counts: after step `s` (0-based) of `S`, `max(s + 1, floor((1 - acos((s + 1) / S) / (pi / 2)) m))`
//!   positions are revealed (at most `m`; all of them after the last step), in f64 with `libm`.

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

use super::super::TokenSpace;
use super::Rule;

/// Spread-out reveals in Halton order.
pub(crate) struct Halton;

impl Rule for Halton {
    fn name(&self) -> &'static str {
        "halton"
    }

    fn help(&self) -> &'static str {
        "positions in a 2-D Halton order, spread over the image; arccos count per step"
    }

    fn plan(&self, masked: &[u32], space: &TokenSpace, steps: usize, rng: &mut ChaCha20Rng) -> Vec<(u32, u32)> {
        let m = masked.len();
        if m == 0 {
            return Vec::new();
        }
        let mut is_masked = vec![false; space.len];
        masked.iter().for_each(|&p| is_masked[p as usize] = true);
        let order: Vec<u32> = order(space.len / space.width.max(1), space.width)
            .into_iter()
            .filter(|&p| is_masked[p as usize])
            .collect();
        let start = ((rng.next_u64() as u128 * m as u128) >> 64) as usize;
        let mut out = Vec::with_capacity(m);
        for s in 0..steps {
            let t = (steps - s) as u32;
            while out.len() < revealed_after(s, steps, m) {
                out.push((t, order[(start + out.len()) % m]));
            }
        }
        out
    }
}

/// How many of `m` positions are revealed once step `s` (0-based) of `steps` is done.
fn revealed_after(s: usize, steps: usize, m: usize) -> usize {
    if s + 1 >= steps {
        return m;
    }
    let ratio = (s + 1) as f64 / steps as f64;
    let share = 1.0 - libm::acos(ratio) / std::f64::consts::FRAC_PI_2;
    ((share * m as f64).floor() as usize).max(s + 1).min(m)
}

/// Every position of an `h x w` grid (row-major), in Halton order (module docs).
pub(crate) fn order(h: usize, w: usize) -> Vec<u32> {
    let l = h * w;
    let mut seen = vec![false; l];
    let mut out = Vec::with_capacity(l);
    let mut i = 1u64;
    while out.len() < l && i <= 64 * l as u64 {
        let p = cell(i, 3, h) * w + cell(i, 2, w);
        if !seen[p] {
            seen[p] = true;
            out.push(p as u32);
        }
        i += 1;
    }
    out.extend((0..l).filter(|&p| !seen[p]).map(|p| p as u32));
    out
}

/// `floor(phi_b(i) * cells)`, `phi_b` the radical inverse in base `b`: `i`'s digits mirrored
/// behind the point, as an exact fraction.
fn cell(mut i: u64, base: u64, cells: usize) -> usize {
    let (b, mut num, mut den) = (base as u128, 0u128, 1u128);
    while i > 0 {
        num = num * b + (i % base) as u128;
        den *= b;
        i /= base;
    }
    (num * cells as u128 / den) as usize
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::{generate_with, SPACE};
    use super::super::super::*;
    use super::*;

    #[test]
    fn the_order_holds_every_position_once_on_any_grid() {
        for (h, w) in [(1, 1), (4, 4), (8, 8), (16, 16), (5, 7), (1, 9), (32, 64)] {
            let o = order(h, w);
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..(h * w) as u32).collect::<Vec<_>>(), "{h}x{w}");
        }
        // The first Halton points: (1/2, 1/3), (1/4, 2/3), (3/4, 1/9), (1/8, 4/9) on 16x16.
        assert_eq!(&order(16, 16)[..4], &[5 * 16 + 8, 10 * 16 + 4, 16 + 12, 7 * 16 + 2]);
    }

    #[test]
    fn no_two_of_the_first_reveals_touch() {
        let o = order(16, 16);
        let at = |p: u32| ((p / 16) as i64, (p % 16) as i64);
        for (i, &a) in o[..8].iter().enumerate() {
            for &b in &o[..i] {
                let ((r0, c0), (r1, c1)) = (at(a), at(b));
                let d = (r0 - r1).abs().max((c0 - c1).abs());
                assert!(d >= 2, "{:?} and {:?} of the first 8 touch", at(a), at(b));
            }
        }
    }

    #[test]
    fn counts_follow_the_arccos_schedule_and_end_with_every_position() {
        // 16 positions over 4 steps: floor(16 (1 - acos(s/4) / (pi/2))) = 2, 5, 8, then 16.
        let (_, stats, per_step) = generate_with(SamplerKind::Halton, &[(3, 0)], 4);
        assert_eq!(per_step, vec![2, 3, 3, 8]);
        assert_eq!((stats.calls, stats.revealed), (4, 16));
        // S = L: one per step.
        let (_, _, per_step) = generate_with(SamplerKind::Halton, &[(3, 0)], 16);
        assert_eq!(per_step, vec![1; 16]);
    }

    #[test]
    fn images_start_the_order_at_their_own_place_and_only_masked_positions_are_planned() {
        let s = Settings::new(4, 1.0, &SPACE).unwrap().with_sampler(SamplerKind::Halton);
        let first = |seed| Chain::masked(&SPACE, &s, seed, 0).unwrap().plan_pos[0];
        let starts: std::collections::BTreeSet<u32> = (0..16).map(first).collect();
        assert!(starts.len() > 4, "rotations vary with the stream: {starts:?}");
        let mut tokens = vec![0i64; 16];
        for p in [1, 6, 11] {
            tokens[p] = SPACE.mask_id;
        }
        let c = Chain::new(tokens, &SPACE, &s, image_rng(1, 0)).unwrap();
        let mut planned = c.plan_pos.clone();
        planned.sort_unstable();
        assert_eq!(planned, vec![1, 6, 11]);
    }
}
