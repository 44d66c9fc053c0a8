//! Windows of the trained token grid over a larger one ([`Tiling`]), and how a step feeds them
//! ([`Windows`]): the windows that vote for a position drawn this step, of all chains, in calls
//! of at most `max_rows`; a position's logits are the log of its voters' mean probability.

use super::chain::Chain;
use super::draw::softmax_into;
use super::reverse::{check_logits, Feed};
use super::{Denoiser, RunStats, TokenSpace};
use crate::error::{Error, Result};
use crate::limits;
use crate::param::Param;

/// How windows of the trained token grid cover a larger grid (the paper's section 4.3 on larger
/// images, made cheaper).
///
/// Along each axis windows start at 0, stride, 2 stride, ... and a last one is flush with the far
/// edge. A window *votes* for the positions at least `margin` tokens inside each of its edges that
/// face another window (edges on the big grid's border have no margin): a token at a window's
/// inner edge sees context on one side only, so that window's opinion is left out. A position's
/// distribution is the mean of the probabilities of the windows voting for it (the paper's
/// mixture; margin 0 is exactly the paper's rule). Each step evaluates only windows that vote for
/// a position sampled in that step.
#[derive(Debug, Clone)]
pub struct Tiling {
    grid: [usize; 2],
    window: [usize; 2],
    stride: [usize; 2],
    margin: [usize; 2],
    /// Top-left corner of every window, row-major.
    offsets: Vec<[usize; 2]>,
    /// For every position of the big grid, the windows voting for it, ascending.
    voters: Vec<Vec<u32>>,
}

fn axis_offsets(size: usize, window: usize, stride: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..).map(|i| i * stride).take_while(|&o| o + window < size).collect();
    v.push(size - window);
    v
}

impl Tiling {
    /// Windows of `window` (the trained grid, `[h, w]`) over `grid`, `stride` and `margin` per
    /// axis. Errors name the parameter at fault.
    pub fn new(grid: [usize; 2], window: [usize; 2], stride: [usize; 2], margin: [usize; 2]) -> Result<Tiling> {
        for a in 0..2 {
            let axis = ["height", "width"][a];
            if grid[a] < window[a] {
                return Err(Error::param(
                    Param::Grid,
                    format!(
                        "{}x{} is smaller than the trained grid {}x{} ({axis})",
                        grid[0], grid[1], window[0], window[1]
                    ),
                ));
            }
            if grid[a] > limits::MAX_GRID_SIDE {
                return Err(Error::param(
                    Param::Grid,
                    format!(
                        "{}x{}: at most {} tokens per side",
                        grid[0],
                        grid[1],
                        limits::MAX_GRID_SIDE
                    ),
                ));
            }
            // No arithmetic on the caller's numbers before they are bounded: 2 x margin could
            // wrap. 2m >= w is m >= ceil(w / 2).
            if margin[a] >= window[a].div_ceil(2) {
                return Err(Error::param(
                    Param::WindowMargin,
                    format!(
                        "{} leaves no voting core in a window {} wide ({axis})",
                        margin[a], window[a]
                    ),
                ));
            }
            // Where one window spans this axis its stride is never used, but it is recorded in the
            // PNG's metadata: it is still bounded by the window, so no absurd value is kept.
            if stride[a] == 0 || stride[a] > window[a] {
                return Err(Error::param(
                    Param::Stride,
                    format!(
                        "{} is out of range for the {axis}: must be 1..={}",
                        stride[a], window[a]
                    ),
                ));
            }
            if grid[a] > window[a] && stride[a] > window[a] - 2 * margin[a] {
                return Err(Error::param(
                    Param::Stride,
                    format!(
                        "{} is out of range for the {axis}: must be 1..={} (window {} minus twice the margin {}) \
                         so that every position has a voting window",
                        stride[a],
                        window[a] - 2 * margin[a],
                        window[a],
                        margin[a]
                    ),
                ));
            }
        }
        let rows = axis_offsets(grid[0], window[0], stride[0]);
        let cols = axis_offsets(grid[1], window[1], stride[1]);
        let offsets: Vec<[usize; 2]> = rows.iter().flat_map(|&r| cols.iter().map(move |&c| [r, c])).collect();
        let mut voters = vec![Vec::new(); grid[0] * grid[1]];
        for (w, o) in offsets.iter().enumerate() {
            let span = |a: usize| {
                let lo = if o[a] == 0 { 0 } else { margin[a] };
                let hi = if o[a] + window[a] == grid[a] { 0 } else { margin[a] };
                o[a] + lo..o[a] + window[a] - hi
            };
            for r in span(0) {
                for c in span(1) {
                    voters[r * grid[1] + c].push(w as u32);
                }
            }
        }
        // Guaranteed by the stride check; kept as a hard error rather than a silent hole.
        if let Some(p) = voters.iter().position(Vec::is_empty) {
            return Err(Error::param(
                Param::Stride,
                format!("position ({}, {}) has no voting window", p / grid[1], p % grid[1]),
            ));
        }
        Ok(Tiling {
            grid,
            window,
            stride,
            margin,
            offsets,
            voters,
        })
    }

    /// The default: stride half a window (rounded up), margin an eighth of a window.
    pub fn with_defaults(grid: [usize; 2], window: [usize; 2]) -> Result<Tiling> {
        Tiling::new(
            grid,
            window,
            Tiling::default_stride(window),
            Tiling::default_margin(window),
        )
    }

    /// Half a `window` (rounded up) per axis.
    pub fn default_stride(window: [usize; 2]) -> [usize; 2] {
        [window[0].div_ceil(2), window[1].div_ceil(2)]
    }

    /// An eighth of a `window` per axis.
    pub fn default_margin(window: [usize; 2]) -> [usize; 2] {
        [window[0] / 8, window[1] / 8]
    }

    /// The big grid `[H, W]`.
    pub fn grid(&self) -> [usize; 2] {
        self.grid
    }

    /// The window: the trained grid `[h, w]`.
    pub fn window(&self) -> [usize; 2] {
        self.window
    }

    /// The window stride `[rows, cols]`.
    pub fn stride(&self) -> [usize; 2] {
        self.stride
    }

    /// The window margin `[rows, cols]`.
    pub fn margin(&self) -> [usize; 2] {
        self.margin
    }

    /// Number of windows.
    pub fn windows(&self) -> usize {
        self.offsets.len()
    }

    /// Top-left corners of the windows, row-major.
    pub fn offsets(&self) -> &[[usize; 2]] {
        &self.offsets
    }

    /// The windows voting for position `p` of the big grid.
    pub fn voters(&self, p: usize) -> &[u32] {
        &self.voters[p]
    }

    pub(super) fn cut(&self, tokens: &[i64], w: usize, out: &mut Vec<i64>) {
        let [r0, c0] = self.offsets[w];
        for r in r0..r0 + self.window[0] {
            out.extend_from_slice(&tokens[r * self.grid[1] + c0..r * self.grid[1] + c0 + self.window[1]]);
        }
    }
}

/// The rows of a windowed step: `(chain, window)` pairs, and each chain's combined logits.
pub(super) struct Windows<'t, 'd, 'a> {
    denoise: &'d mut Denoiser<'a>,
    tiling: &'t Tiling,
    l: usize,
    k: usize,
    max_rows: usize,
    /// Row of (chain, window) in this step's logits, if fed.
    row_of: Vec<Option<usize>>,
    selected: Vec<(usize, usize)>,
    windows: Vec<usize>,
    input: Vec<i64>,
    classes: Vec<i64>,
    part: Vec<f32>,
    logits: Vec<f32>,
    /// One chain's `(big L, K)` logits at the positions it draws.
    combined: Vec<f32>,
    acc: Vec<f64>,
    probs: Vec<f64>,
}

impl<'t, 'd, 'a> Windows<'t, 'd, 'a> {
    pub(super) fn new(
        tiling: &'t Tiling,
        window_space: &TokenSpace,
        chains: usize,
        max_rows: usize,
        denoise: &'d mut Denoiser<'a>,
    ) -> Windows<'t, 'd, 'a> {
        let k = window_space.codebook_size;
        let big = tiling.grid[0] * tiling.grid[1];
        Windows {
            denoise,
            tiling,
            l: window_space.len,
            k,
            max_rows: max_rows.max(1),
            row_of: vec![None; chains * tiling.windows()],
            selected: Vec::new(),
            windows: Vec::new(),
            input: Vec::new(),
            classes: Vec::new(),
            part: Vec::new(),
            logits: Vec::new(),
            combined: vec![0.0; big * k],
            acc: vec![0.0; k],
            probs: vec![0.0; k],
        }
    }
}

impl Feed for Windows<'_, '_, '_> {
    fn call(&mut self, chains: &[Chain], needed: &[Vec<u32>], stats: &mut RunStats) -> Result<usize> {
        let (tiling, nw) = (self.tiling, self.tiling.windows());
        self.row_of.iter_mut().for_each(|r| *r = None);
        self.selected.clear();
        for (c, positions) in needed.iter().enumerate() {
            self.windows.clear();
            self.windows.extend(
                positions
                    .iter()
                    .flat_map(|&p| tiling.voters(p as usize).iter().map(|&w| w as usize)),
            );
            self.windows.sort_unstable();
            self.windows.dedup();
            self.selected.extend(self.windows.iter().map(|&w| (c, w)));
        }
        for (r, &(c, w)) in self.selected.iter().enumerate() {
            self.row_of[c * nw + w] = Some(r);
        }
        self.logits.clear();
        for chunk in self.selected.chunks(self.max_rows) {
            self.input.clear();
            self.classes.clear();
            for &(c, w) in chunk {
                tiling.cut(chains[c].tokens(), w, &mut self.input);
                self.classes.push(chains[c].class());
            }
            (self.denoise)(&self.input, &self.classes, &mut self.part)?;
            check_logits(&self.part, chunk.len(), self.l, self.k)?;
            self.logits.extend_from_slice(&self.part);
            stats.calls += 1;
            stats.positions += chunk.len() * self.l;
        }
        Ok(self.selected.len())
    }

    fn logits(&mut self, c: usize, positions: &[u32]) -> &[f32] {
        let (tiling, nw, l, k) = (self.tiling, self.tiling.windows(), self.l, self.k);
        for &p in positions {
            let p = p as usize;
            let (r, col) = (p / tiling.grid[1], p % tiling.grid[1]);
            self.acc.iter_mut().for_each(|a| *a = 0.0);
            let voters = tiling.voters(p);
            for &w in voters {
                let [r0, c0] = tiling.offsets[w as usize];
                let local = (r - r0) * tiling.window[1] + (col - c0);
                // Every voter of a needed position was selected in `call`.
                let row = self.row_of[c * nw + w as usize].unwrap_or(0);
                let x = &self.logits[(row * l + local) * k..(row * l + local + 1) * k];
                softmax_into(x, &mut self.probs);
                for (a, &q) in self.acc.iter_mut().zip(self.probs.iter()) {
                    *a += q;
                }
            }
            let n = voters.len() as f64;
            for (o, &a) in self.combined[p * k..(p + 1) * k].iter_mut().zip(self.acc.iter()) {
                *o = libm::log(a / n) as f32;
            }
        }
        &self.combined
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fake, generate_with, SPACE};
    use super::super::*;
    use super::*;

    /// A 4x4 window (SPACE's 16 tokens) over larger grids.
    const WINDOW: [usize; 2] = [4, 4];

    #[test]
    fn windows_cover_the_grid_and_vote_only_inside_their_margins() {
        // 4x8 grid, 4x4 windows, stride 2, margin 1: windows at columns 0, 2, 4.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [1, 1]).unwrap();
        assert_eq!(t.offsets(), &[[0, 0], [0, 2], [0, 4]]);
        // Window 0 votes for columns 0..3 (its right edge is inner), window 1 for 3..5, window 2
        // for 5..8 (its right edge is the grid's).
        let by_col: Vec<Vec<u32>> = (0..8).map(|c| t.voters(c).to_vec()).collect();
        assert_eq!(
            by_col,
            vec![vec![0], vec![0], vec![0], vec![1], vec![1], vec![2], vec![2], vec![2]]
        );
        // Margin 0 is the paper's rule: every covering window votes.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [0, 0]).unwrap();
        assert_eq!(t.voters(3), &[0, 1]);
        assert_eq!(t.voters(4), &[1, 2]);
        // The last window is flush with the far edge when the stride does not divide.
        let t = Tiling::new([5, 7], WINDOW, [3, 3], [0, 0]).unwrap();
        assert_eq!(t.offsets(), &[[0, 0], [0, 3], [1, 0], [1, 3]]);
        for g in [[4, 4], [5, 9], [9, 5], [12, 13], [4, 17]] {
            for (stride, margin) in [([2, 2], [1, 1]), ([4, 4], [0, 0]), ([1, 3], [0, 0]), ([2, 1], [1, 1])] {
                let t = Tiling::new(g, WINDOW, stride, margin).unwrap();
                assert!(
                    (0..g[0] * g[1]).all(|p| !t.voters(p).is_empty()),
                    "{g:?} {stride:?} {margin:?}"
                );
            }
        }
    }

    #[test]
    fn bad_tilings_are_rejected_naming_the_parameter() {
        let e = Tiling::new([3, 8], WINDOW, [2, 2], [0, 0]).unwrap_err().to_string();
        assert!(e.contains("grid") && e.contains("smaller"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [3, 3], [1, 1]).unwrap_err().to_string();
        assert!(e.contains("stride") && e.contains("1..=2"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [0, 0], [0, 0]).unwrap_err().to_string();
        assert!(e.contains("stride"), "{e}");
        let e = Tiling::new([4, 8], WINDOW, [1, 1], [2, 2]).unwrap_err().to_string();
        assert!(e.starts_with("invalid window_margin:"), "{e}");
        let e = Tiling::new([4, limits::MAX_GRID_SIDE + 1], WINDOW, [2, 2], [0, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most"), "{e}");
    }

    fn tiled(
        grid: [usize; 2],
        tiling: &Tiling,
        kind: SamplerKind,
        seeds: &[u64],
        steps: usize,
    ) -> (Vec<Vec<i64>>, RunStats) {
        let big = TokenSpace {
            len: grid[0] * grid[1],
            width: grid[1],
            ..SPACE
        };
        let s = Settings::new(steps, 1.0, &big).unwrap().with_sampler(kind);
        let mut chains: Vec<Chain> = seeds.iter().map(|&i| Chain::masked(&big, &s, 1, i).unwrap()).collect();
        let stats = sample_windows(&mut chains, tiling, &SPACE, &s, 5, &mut fake, &mut |_| {}).unwrap();
        (chains.into_iter().map(Chain::into_tokens).collect(), stats)
    }

    #[test]
    fn tiled_runs_fill_every_position_reproducibly_and_batch_independently() {
        let grid = [6, 10];
        let t = Tiling::new(grid, WINDOW, [2, 2], [1, 1]).unwrap();
        for kind in [SamplerKind::Absorbing, SamplerKind::Even, SamplerKind::Maskgit] {
            let (all, stats) = tiled(grid, &t, kind, &[0, 1, 2], 12);
            assert!(all.iter().flatten().all(|&x| (0..8).contains(&x)), "{kind:?}");
            assert_eq!(stats.revealed, 3 * 60);
            let (alone, _) = tiled(grid, &t, kind, &[1], 12);
            assert_eq!(alone[0], all[1], "{kind:?}: image 1 alone and in a batch");
            assert_ne!(all[0], all[1], "{kind:?}");
        }
    }

    #[test]
    fn a_single_window_tiling_is_the_plain_sampler() {
        let t = Tiling::new([4, 4], WINDOW, [2, 2], [1, 1]).unwrap();
        for kind in [SamplerKind::Absorbing, SamplerKind::Maskgit] {
            let (tiles, _) = tiled([4, 4], &t, kind, &[0, 1], 6);
            let (plain, _, _) = generate_with(kind, &[(1, 0), (1, 1)], 6);
            assert_eq!(tiles, plain, "{kind:?}");
        }
    }

    #[test]
    fn a_position_draws_from_the_mean_of_its_voting_windows() {
        // 4x8 grid, windows at columns 0, 2, 4 (margin 0). Known tokens in row 0 name each
        // window: column 0 holds 1 (window 0's first token), column 2 holds 2, column 4 holds 3.
        // The denoiser puts all mass on the code a row's first token names. Column 1 is voted by
        // window 0 only; column 3 by windows 0 and 1: half its draws are 1 and half 2.
        let t = Tiling::new([4, 8], WINDOW, [2, 2], [0, 0]).unwrap();
        let big = TokenSpace {
            len: 32,
            width: 8,
            ..SPACE
        };
        let named = |tokens: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            let rows = classes.len();
            out.clear();
            for r in 0..rows {
                let code = tokens[r * 16];
                for _ in 0..16 {
                    out.extend((0..8).map(|c| if c as i64 == code { 40.0 } else { 0.0 }));
                }
            }
            Ok(())
        };
        let mut counts = [[0usize; 8]; 2];
        for seed in 0..400 {
            let s = Settings::new(4, 1.0, &big).unwrap();
            let mut tokens = vec![SPACE.mask_id; 32];
            tokens[..6].copy_from_slice(&[1, 0, 2, 0, 3, 0]);
            tokens[8 + 1] = SPACE.mask_id;
            let mut chains = vec![Chain::new(tokens, &big, &s, image_rng(seed, 0)).unwrap()];
            sample_windows(&mut chains, &t, &SPACE, &s, 8, &mut { named }, &mut |_| {}).unwrap();
            counts[0][chains[0].tokens()[8 + 1] as usize] += 1;
            counts[1][chains[0].tokens()[8 + 3] as usize] += 1;
        }
        assert_eq!(counts[0][1], 400, "{:?}", counts[0]);
        assert_eq!(counts[1][1] + counts[1][2], 400, "{:?}", counts[1]);
        assert!((160..240).contains(&counts[1][1]), "{:?}", counts[1]);
    }

    #[test]
    fn a_two_window_wide_grid_feeds_at_most_three_times_one_image() {
        // The trained grid 16x16 (paper size) at S = 256, 1x2 wide, the default windows.
        let space = TokenSpace {
            len: 256,
            width: 16,
            codebook_size: 4,
            mask_id: 4,
        };
        let wide = TokenSpace {
            len: 512,
            width: 32,
            ..space
        };
        let zeros = |_: &[i64], classes: &[i64], out: &mut Vec<f32>| -> Result<()> {
            out.clear();
            out.resize(classes.len() * 256 * 4, 0.0);
            Ok(())
        };
        let t = Tiling::with_defaults([16, 32], [16, 16]).unwrap();
        assert_eq!(t.windows(), 3);
        let (mut one, mut two) = (0, 0);
        for seed in 0..4 {
            let s = Settings::new(256, 1.0, &space).unwrap();
            let mut c = vec![Chain::masked(&space, &s, seed, 0).unwrap()];
            one += sample(&mut c, &space, &s, &mut { zeros }, &mut |_| {}).unwrap().rows;
            let s = Settings::new(256, 1.0, &wide).unwrap();
            let mut c = vec![Chain::masked(&wide, &s, seed, 0).unwrap()];
            two += sample_windows(&mut c, &t, &space, &s, 16, &mut { zeros }, &mut |_| {})
                .unwrap()
                .rows;
        }
        let ratio = two as f64 / one as f64;
        eprintln!("rows: one image {one}, 1x2 wide {two}: {ratio:.2}x (the paper's loop: 8704 per image)");
        assert!(ratio <= 3.0, "{ratio}");
    }
}
