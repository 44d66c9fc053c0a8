//! Cached attention between steps (`--cache N`): a feed that keeps each chain's keys and values
//! of every layer and computes, on most calls, only the positions that need logits.
//!
//! Each chain counts its own calls (the calls it takes part in, so its passes never depend on its
//! batch). Its call 0, N, 2N, ... is a full pass: every position, a fresh cache. The calls between
//! are cheap passes over the positions the rule samples at that step and the positions whose token
//! changed since their keys and values were computed; those attend to the cached keys and values
//! of every other position (the bundle's `transformer.cached.onnx`, export/cache.py). The cheap
//! pass returns the queried positions' new keys and values, which replace the cache's. `N = 1`
//! makes every pass full.
//!
//! Rows of one call share a query count: a chain with fewer positions repeats its first one (the
//! same token at the same position gives the same values, so the cache is written the same).
//! Full and cheap rows of a step are two calls.

use super::chain::Chain;
use super::reverse::Feed;
use super::{RunStats, TokenSpace};
use crate::error::{Error, Result};

/// The shape of a transformer's cache: layers and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// N, transformer layers.
    pub layers: usize,
    /// D, the width of a key or value (all heads).
    pub width: usize,
}

/// One call of the cached graph.
pub struct CachedCall<'a> {
    /// Rows fed.
    pub rows: usize,
    /// Q, query positions per row.
    pub query: usize,
    /// `(rows, Q)`: each query position's current token.
    pub tokens: &'a [i64],
    /// `(rows, Q)`: the query positions.
    pub positions: &'a [i64],
    /// `(rows)`: each row's class.
    pub classes: &'a [i64],
    /// `(N, rows, L, D)`: the cached keys.
    pub keys: &'a [f32],
    /// `(N, rows, L, D)`: the cached values.
    pub values: &'a [f32],
}

/// What the cached graph returns: logits `(rows, Q, K)`, new keys and values `(N, rows, Q, D)`.
#[derive(Default)]
pub struct CachedOut {
    /// `(rows, Q, K)`.
    pub logits: Vec<f32>,
    /// `(N, rows, Q, D)`.
    pub keys: Vec<f32>,
    /// `(N, rows, Q, D)`.
    pub values: Vec<f32>,
}

/// The cached denoiser: runs one [`CachedCall`] into a [`CachedOut`].
pub type CachedDenoiser<'a> = dyn FnMut(&CachedCall<'_>, &mut CachedOut) -> Result<()> + 'a;

/// One chain's cache.
struct Slot {
    /// `(N, L, D)` keys, then `(N, L, D)` values.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// The token each position had when its keys and values were computed (`None`: never).
    seen: Vec<Option<i64>>,
    /// Calls this chain took part in.
    calls: usize,
    /// `(L, K)` logits of its last call, valid at the positions it asked for.
    logits: Vec<f32>,
}

/// The feed of a cached run (module docs).
pub(super) struct Cached<'d, 'a> {
    denoise: &'d mut CachedDenoiser<'a>,
    period: usize,
    shape: CacheShape,
    l: usize,
    k: usize,
    slots: Vec<Slot>,
    // scratch of one call
    tokens: Vec<i64>,
    positions: Vec<i64>,
    classes: Vec<i64>,
    keys: Vec<f32>,
    values: Vec<f32>,
    query: Vec<Vec<u32>>,
    out: CachedOut,
}

impl<'d, 'a> Cached<'d, 'a> {
    pub(super) fn new(
        space: &TokenSpace,
        shape: CacheShape,
        period: usize,
        chains: usize,
        denoise: &'d mut CachedDenoiser<'a>,
    ) -> Cached<'d, 'a> {
        let (l, k) = (space.len, space.codebook_size);
        let slots = (0..chains)
            .map(|_| Slot {
                keys: vec![0.0; shape.layers * l * shape.width],
                values: vec![0.0; shape.layers * l * shape.width],
                seen: vec![None; l],
                calls: 0,
                logits: vec![0.0; l * k],
            })
            .collect();
        Cached {
            denoise,
            period: period.max(1),
            shape,
            l,
            k,
            slots,
            tokens: Vec::new(),
            positions: Vec::new(),
            classes: Vec::new(),
            keys: Vec::new(),
            values: Vec::new(),
            query: vec![Vec::new(); chains],
            out: CachedOut::default(),
        }
    }

    /// One call for the chains `rows` (each with its query positions in `self.query`), padded to
    /// the longest query; writes back logits, keys and values.
    fn run(&mut self, chains: &[Chain], rows: &[usize], stats: &mut RunStats) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (n, l, d, k) = (self.shape.layers, self.l, self.shape.width, self.k);
        let q = rows.iter().map(|&c| self.query[c].len()).max().unwrap_or(0);
        self.tokens.clear();
        self.positions.clear();
        self.classes.clear();
        for &c in rows {
            let pos = &self.query[c];
            let tokens = chains[c].tokens();
            for i in 0..q {
                let p = pos.get(i).copied().unwrap_or(pos[0]) as usize;
                self.tokens.push(tokens[p]);
                self.positions.push(p as i64);
            }
            self.classes.push(chains[c].class());
        }
        // (N, rows, L, D), layer-major as the graph takes it.
        self.keys.clear();
        self.values.clear();
        for layer in 0..n {
            for &c in rows {
                let at = layer * l * d..(layer + 1) * l * d;
                self.keys.extend_from_slice(&self.slots[c].keys[at.clone()]);
                self.values.extend_from_slice(&self.slots[c].values[at]);
            }
        }
        let call = CachedCall {
            rows: rows.len(),
            query: q,
            tokens: &self.tokens,
            positions: &self.positions,
            classes: &self.classes,
            keys: &self.keys,
            values: &self.values,
        };
        (self.denoise)(&call, &mut self.out)?;
        let r = rows.len();
        if self.out.logits.len() != r * q * k
            || self.out.keys.len() != n * r * q * d
            || self.out.values.len() != n * r * q * d
        {
            return Err(Error::Internal(format!(
                "cached graph returned {} logits and {} keys for {r} rows of {q} positions, expected {} and {}",
                self.out.logits.len(),
                self.out.keys.len(),
                r * q * k,
                n * r * q * d
            )));
        }
        stats.calls += 1;
        stats.positions += r * q;
        for (row, &c) in rows.iter().enumerate() {
            let slot = &mut self.slots[c];
            let tokens = chains[c].tokens();
            for (i, &p) in self.query[c].iter().enumerate() {
                let p = p as usize;
                let src = (row * q + i) * k;
                slot.logits[p * k..(p + 1) * k].copy_from_slice(&self.out.logits[src..src + k]);
                for layer in 0..n {
                    let src = ((layer * r + row) * q + i) * d;
                    let dst = (layer * l + p) * d;
                    slot.keys[dst..dst + d].copy_from_slice(&self.out.keys[src..src + d]);
                    slot.values[dst..dst + d].copy_from_slice(&self.out.values[src..src + d]);
                }
                slot.seen[p] = Some(tokens[p]);
            }
        }
        Ok(())
    }
}

impl Feed for Cached<'_, '_> {
    fn call(&mut self, chains: &[Chain], needed: &[Vec<u32>], stats: &mut RunStats) -> Result<usize> {
        let mut full = Vec::new();
        let mut cheap = Vec::new();
        for (c, chain) in chains.iter().enumerate() {
            self.query[c].clear();
            if needed[c].is_empty() {
                continue;
            }
            let slot = &mut self.slots[c];
            if slot.calls % self.period == 0 {
                self.query[c].extend(0..self.l as u32);
                full.push(c);
            } else {
                // The positions the step samples and those whose token changed since their keys
                // and values were computed, in raster order.
                let tokens = chain.tokens();
                let mut q: Vec<u32> = (0..self.l as u32)
                    .filter(|&p| slot.seen[p as usize] != Some(tokens[p as usize]))
                    .collect();
                q.extend_from_slice(&needed[c]);
                q.sort_unstable();
                q.dedup();
                self.query[c] = q;
                cheap.push(c);
            }
            slot.calls += 1;
        }
        self.run(chains, &full, stats)?;
        self.run(chains, &cheap, stats)?;
        Ok(full.len() + cheap.len())
    }

    fn logits(&mut self, c: usize, _: &[u32]) -> &[f32] {
        &self.slots[c].logits
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fake, SPACE};
    use super::super::*;

    const SHAPE: CacheShape = CacheShape { layers: 1, width: 1 };

    /// The cached twin of the tests' fake denoiser, as a one-layer model: a position's value is 1
    /// when its token is known; its key is the number of known tokens in the row as the pass sees
    /// them (the query positions' values, the cache's for the others): context, like a real
    /// layer's. Logits prefer code (position + the mean key) mod K. On a full pass every key is the
    /// true count: `fake`'s logits. On a cheap pass the other positions' keys are as old as their
    /// last refresh, so the mean lags.
    fn fake_cached(call: &CachedCall<'_>, out: &mut CachedOut) -> Result<()> {
        let (l, k, q) = (SPACE.len, SPACE.codebook_size, call.query);
        out.logits.clear();
        out.keys.clear();
        out.values.clear();
        for r in 0..call.rows {
            let mut values = call.values[r * l..(r + 1) * l].to_vec();
            let mut keys = call.keys[r * l..(r + 1) * l].to_vec();
            let fresh = |i: usize| f32::from(call.tokens[r * q + i] != SPACE.mask_id);
            for i in 0..q {
                values[call.positions[r * q + i] as usize] = fresh(i);
            }
            let count: f32 = values.iter().sum();
            for i in 0..q {
                keys[call.positions[r * q + i] as usize] = count;
            }
            let mean = (keys.iter().sum::<f32>() / l as f32).round() as usize;
            for i in 0..q {
                let p = call.positions[r * q + i] as usize;
                out.logits
                    .extend((0..k).map(|c| if c == (p + mean) % k { 2.0 } else { 0.0 }));
                out.keys.push(count);
                out.values.push(fresh(i));
            }
        }
        Ok(())
    }

    fn run_cached(kind: SamplerKind, seeds: &[(u64, u64)], steps: usize, period: usize) -> (Vec<Vec<i64>>, RunStats) {
        let s = Settings::new(steps, 1.0, &SPACE)
            .unwrap()
            .with_sampler(kind)
            .with_cache(Some(period))
            .unwrap();
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let stats = sample_cached(&mut chains, &SPACE, &s, SHAPE, &mut fake_cached, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    fn run_exact(kind: SamplerKind, seeds: &[(u64, u64)], steps: usize) -> (Vec<Vec<i64>>, RunStats) {
        let s = Settings::new(steps, 1.0, &SPACE).unwrap().with_sampler(kind);
        let mut chains: Vec<Chain> = seeds
            .iter()
            .map(|&(seed, i)| Chain::masked(&SPACE, &s, seed, i).unwrap())
            .collect();
        let stats = sample(&mut chains, &SPACE, &s, &mut fake, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    #[test]
    fn a_full_pass_every_call_is_exact_mode() {
        let batch: Vec<(u64, u64)> = (0..3).map(|i| (5, i)).collect();
        for &kind in SamplerKind::ALL {
            for steps in [1, 4, 16] {
                let (exact, stats) = run_exact(kind, &batch, steps);
                let (cached, cstats) = run_cached(kind, &batch, steps, 1);
                assert_eq!(cached, exact, "{kind:?} S={steps}");
                assert_eq!(
                    cstats.positions, stats.positions,
                    "{kind:?} S={steps}: every pass computes L"
                );
            }
        }
    }

    #[test]
    fn cheap_passes_compute_fewer_positions_and_stay_deterministic_and_batch_independent() {
        let batch: Vec<(u64, u64)> = (0..4).map(|i| (9, i)).collect();
        for &kind in SamplerKind::ALL {
            let (exact, stats) = run_exact(kind, &batch, 16);
            let (cached, cstats) = run_cached(kind, &batch, 16, 4);
            assert!(
                cached.iter().flatten().all(|&t| (0..8).contains(&t)),
                "{kind:?}: nothing left masked"
            );
            assert!(
                cstats.positions < stats.positions,
                "{kind:?}: {} vs {}",
                cstats.positions,
                stats.positions
            );
            assert_eq!(cached, run_cached(kind, &batch, 16, 4).0, "{kind:?}: repeatable");
            for (i, tokens) in cached.iter().enumerate() {
                assert_eq!(
                    &run_cached(kind, &[(9, i as u64)], 16, 4).0[0],
                    tokens,
                    "{kind:?}: alone = in a batch"
                );
            }
            // The stale cache lags: with this fake, some image comes out other than exact's.
            if kind == SamplerKind::Maskgit {
                assert_ne!(cached, exact, "a cheap pass sees stale keys");
            }
        }
    }

    #[test]
    fn a_cheap_pass_queries_the_sampled_positions_and_those_whose_token_changed() {
        // MaskGIT, 4 steps, one full pass then cheap ones: call 1 asks for every still-masked
        // position (the rule samples them) plus the positions revealed by call 0.
        let s = Settings::new(4, 1.0, &SPACE)
            .unwrap()
            .with_sampler(SamplerKind::Maskgit)
            .with_cache(Some(8))
            .unwrap();
        let mut chains = vec![Chain::masked(&SPACE, &s, 3, 0).unwrap()];
        let mut asked: Vec<Vec<i64>> = Vec::new();
        let mut record = |call: &CachedCall<'_>, out: &mut CachedOut| {
            asked.push(call.positions.to_vec());
            fake_cached(call, out)
        };
        let stats = sample_cached(&mut chains, &SPACE, &s, SHAPE, &mut record, &mut |_| {}).unwrap();
        assert_eq!(stats.calls, 4);
        assert_eq!(asked[0], (0..16).collect::<Vec<i64>>(), "call 0 is a full pass");
        // Every later call asks for all 16 positions' worth of what changed or is masked: a
        // position revealed before the previous call and unchanged since is not asked again.
        assert!(
            asked[1].len() == 16,
            "after call 0 every position is masked or just revealed"
        );
        assert!(asked[3].len() < 16, "{:?}", asked[3]);
        assert!(
            asked.iter().all(|a| a.windows(2).all(|w| w[0] < w[1])),
            "raster order, no repeats"
        );
    }
}
