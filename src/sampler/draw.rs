//! Drawing one token: the categorical draw from logits at a temperature, nucleus (top-p)
//! truncation, and the softmax windows are mixed with. f64 and the pure-Rust `libm` throughout, in
//! a fixed summation order, so the draws add no platform variation (module docs, "Determinism").

use rand_chacha::ChaCha20Rng;
use rand_core::RngCore;

/// softmax(x) at temperature 1 into `out`, in f64 with `libm` (NaN logits get probability 0).
pub(super) fn softmax_into(x: &[f32], out: &mut [f64]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sum = 0.0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v.is_nan() { 0.0 } else { libm::exp((v - max) as f64) };
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// One categorical draw from softmax(logits / temperature), truncated to its top-p nucleus when
/// `top_p` < 1, by inverse CDF. Returns the code and its log-probability (under the truncated
/// distribution). `scratch` has length 2K: weights, then a sorted copy for the nucleus.
pub(super) fn draw(
    logits: &[f32],
    temperature: f64,
    top_p: f64,
    scratch: &mut [f64],
    rng: &mut ChaCha20Rng,
) -> (usize, f64) {
    let (weights, sorted) = scratch.split_at_mut(logits.len());
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
    if top_p < 1.0 {
        sum = truncate_to_nucleus(weights, &mut sorted[..logits.len()], sum, top_p);
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

/// Zeroes every weight outside the nucleus: the largest weights, in decreasing order, until their
/// sum reaches `top_p * sum`, and any weight equal to the last one taken. Returns the new sum (in
/// index order, like the draw's). `sorted` is scratch of the same length.
fn truncate_to_nucleus(weights: &mut [f64], sorted: &mut [f64], sum: f64, top_p: f64) -> f64 {
    sorted.copy_from_slice(weights);
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let goal = top_p * sum;
    let mut acc = 0.0f64;
    let mut threshold = 0.0f64;
    for &w in sorted.iter() {
        acc += w;
        threshold = w;
        if acc >= goal {
            break;
        }
    }
    let mut kept = 0.0f64;
    for w in weights.iter_mut() {
        if *w < threshold {
            *w = 0.0;
        }
        kept += *w;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::super::image_rng;
    use super::*;

    #[test]
    fn categorical_draws_match_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY];
        let mut weights = vec![0.0; 8];
        let mut rng = image_rng(3, 0);
        let mut counts = [0usize; 4];
        let n = 40_000;
        for _ in 0..n {
            counts[draw(&logits, 1.0, 1.0, &mut weights, &mut rng).0] += 1;
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
        let mut weights = vec![0.0; 4];
        let share = |t: f32| {
            let mut rng = image_rng(11, 0);
            let mut w = weights.clone();
            (0..10_000)
                .filter(|_| draw(&logits, t as f64, 1.0, &mut w, &mut rng).0 == 0)
                .count() as f64
                / 10_000.0
        };
        assert!(share(50.0) > 0.45);
        assert!(share(0.1) < 0.001);
        weights.clear();
    }

    #[test]
    fn the_nucleus_keeps_the_most_probable_codes_and_renormalises() {
        // softmax of ln(w): probabilities 0.5, 0.3, 0.15, 0.05 (shuffled over the indices).
        let logits = [0.15f32, 0.5, 0.05, 0.3].map(|p| p.ln());
        let mut scratch = vec![0.0; 8];
        let n = 40_000;
        for (top_p, kept) in [
            (0.5, vec![1]),
            (0.6, vec![1, 3]),
            (0.8, vec![1, 3]),
            (0.81, vec![0, 1, 3]),
            (1.0, vec![0, 1, 2, 3]),
        ] {
            let mut rng = image_rng(5, 0);
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let (i, logp) = draw(&logits, 1.0, top_p, &mut scratch, &mut rng);
                counts[i] += 1;
                let mass: f64 = kept.iter().map(|&j| logits[j].exp() as f64).sum();
                assert!(
                    (logp - (logits[i].exp() as f64 / mass).ln()).abs() < 1e-6,
                    "top_p {top_p}: log-prob of {i}"
                );
            }
            let mass: f64 = kept.iter().map(|&j| logits[j].exp() as f64).sum();
            for (i, &c) in counts.iter().enumerate() {
                let want = if kept.contains(&i) {
                    logits[i].exp() as f64 / mass
                } else {
                    0.0
                };
                let f = c as f64 / n as f64;
                assert!(
                    (f - want).abs() < 0.01,
                    "top_p {top_p}: code {i} drawn {f}, expected {want}"
                );
            }
        }
        // Ties with the smallest kept weight stay in: two equal codes, either may be drawn.
        let tied = [0.0f32, 0.0, -5.0];
        let mut rng = image_rng(6, 0);
        let drawn: std::collections::BTreeSet<usize> = (0..200)
            .map(|_| draw(&tied, 1.0, 0.3, &mut scratch[..6], &mut rng).0)
            .collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }
}
