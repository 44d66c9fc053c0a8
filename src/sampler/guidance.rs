//! Classifier-free guidance (Ho and Salimans 2022, as MUSE and class-conditional MaskGIT use it)
//! over any denoiser. A class-conditional bundle's transformer also learned "no class" (a share of
//! its training rows had none), so each call can be made twice: with the chain's class (c) and
//! without (u). The guided logits `c + w (c - u)` push every draw further towards what the class
//! adds; w = 0 is the class's own logits. The reveal rules, the draws and the random streams are
//! the same as without guidance: only the logits they read change.

use super::{Denoiser, NO_CLASS};
use crate::error::{Error, Result};

/// Fills `logits` as the denoiser `inner` would, guided with scale `w`: rows with a class get
/// `c + w (c - u)`, element by element in f32 (no fused multiply-add, so every platform computes
/// the same from the same two passes); rows without a class are `inner`'s as they are. The
/// unconditional pass is a second call of `inner` with the classed rows alone, so no call is
/// larger than the caller's. -> the rows of that second pass (0: none was needed).
pub fn guide(
    w: f32,
    tokens: &[i64],
    classes: &[i64],
    logits: &mut Vec<f32>,
    inner: &mut Denoiser<'_>,
) -> Result<usize> {
    inner(tokens, classes, logits)?;
    let rows = classes.len();
    let guided: Vec<usize> = (0..rows).filter(|&r| classes[r] != NO_CLASS).collect();
    if guided.is_empty() || w == 0.0 {
        return Ok(0);
    }
    let (l, per_row) = (tokens.len() / rows, logits.len() / rows);
    let mut rows_u = Vec::with_capacity(guided.len() * l);
    for &r in &guided {
        rows_u.extend_from_slice(&tokens[r * l..(r + 1) * l]);
    }
    let mut u = Vec::new();
    inner(&rows_u, &vec![NO_CLASS; guided.len()], &mut u)?;
    if u.len() != guided.len() * per_row {
        return Err(Error::Internal(format!(
            "guidance: the unconditional pass gave {} logits for {} rows of {per_row}",
            u.len(),
            guided.len()
        )));
    }
    for (i, &r) in guided.iter().enumerate() {
        let c = &mut logits[r * per_row..(r + 1) * per_row];
        for (c, &u) in c.iter_mut().zip(&u[i * per_row..(i + 1) * per_row]) {
            *c += w * (*c - u);
        }
    }
    Ok(guided.len())
}

#[cfg(test)]
mod tests {
    use super::super::tests::SPACE;
    use super::super::{sample, Chain, Settings, NO_CLASS};
    use super::*;

    /// Logits that say which class a row was fed with: code `class + 1` gets 1 + class / 10, every
    /// other code 0 (no class: code 0 gets 0.5). Counts the rows fed without a class.
    fn by_class(unconditional: &mut usize) -> impl FnMut(&[i64], &[i64], &mut Vec<f32>) -> Result<()> + '_ {
        move |tokens, classes, out| {
            assert_eq!(tokens.len(), classes.len() * SPACE.len);
            out.clear();
            for &c in classes {
                let mut row = vec![0.0f32; SPACE.codebook_size];
                if c == NO_CLASS {
                    *unconditional += 1;
                    row[0] = 0.5;
                } else {
                    row[c as usize + 1] = 1.0 + c as f32 / 10.0;
                }
                for _ in 0..SPACE.len {
                    out.extend_from_slice(&row);
                }
            }
            Ok(())
        }
    }

    #[test]
    fn classed_rows_get_c_plus_w_c_minus_u_and_unclassed_rows_are_left_alone() {
        let (classes, w) = ([2, NO_CLASS, 0], 3.0f32);
        let tokens = vec![SPACE.mask_id; classes.len() * SPACE.len];
        let mut fed_without = 0;
        let mut out = Vec::new();
        let second = guide(w, &tokens, &classes, &mut out, &mut by_class(&mut fed_without)).unwrap();
        assert_eq!(second, 2, "the second pass's rows");
        assert_eq!(
            fed_without,
            1 + 2,
            "the unclassed row once, then the two classed rows' u"
        );
        let k = SPACE.codebook_size;
        let at = |row: usize, code: usize| out[row * SPACE.len * k + code];
        // class 2: c at code 3 (u: 0 there), u = 0.5 at code 0 (c: 0 there)
        let c = 1.0f32 + 2.0 / 10.0;
        assert_eq!(at(0, 3), c + w * (c - 0.0));
        assert_eq!(at(0, 0), 0.0 + w * (0.0 - 0.5));
        assert_eq!(at(0, 1), 0.0);
        // no class: as the denoiser gave it
        assert_eq!((at(1, 0), at(1, 3)), (0.5, 0.0));
        // class 0: c = 1.0 at code 1
        assert_eq!(at(2, 1), 1.0 + 3.0 * 1.0);
        // no classed row: one pass, nothing changed
        let mut fed_without = 0;
        let mut alone = Vec::new();
        let unclassed = vec![SPACE.mask_id; SPACE.len];
        let second = guide(w, &unclassed, &[NO_CLASS], &mut alone, &mut by_class(&mut fed_without)).unwrap();
        assert_eq!(second, 0);
        assert_eq!((fed_without, alone[0]), (1, 0.5));
    }

    #[test]
    fn guidance_sharpens_the_draws_towards_the_class_and_zero_changes_nothing() {
        // Class 0's logits favour code 1 only mildly over what no class favours (code 0): without
        // guidance the draws mix codes, guided at 12 they are all code 1.
        let run = |w: f32| -> Vec<i64> {
            let s = Settings::new(4, 1.0, &SPACE).unwrap().with_guidance(Some(w)).unwrap();
            let mut chains: Vec<Chain> = (0..4u64)
                .map(|i| Chain::masked(&SPACE, &s, 3, i).unwrap().with_class(0))
                .collect();
            let mut n = 0;
            let mut inner = by_class(&mut n);
            let mut denoise = |t: &[i64], c: &[i64], out: &mut Vec<f32>| match s.guidance {
                Some(w) => guide(w, t, c, out, &mut inner).map(|_| ()),
                None => inner(t, c, out),
            };
            sample(&mut chains, &SPACE, &s, &mut denoise, &mut |_| {}).unwrap();
            chains.iter().flat_map(|c| c.tokens().to_vec()).collect()
        };
        let share = |t: &[i64]| t.iter().filter(|&&x| x == 1).count() as f64 / t.len() as f64;
        let (plain, guided) = (run(0.0), run(12.0));
        assert!(share(&plain) < 0.5, "without guidance: {}", share(&plain));
        assert!(share(&guided) > 0.99, "guided: {}", share(&guided));
    }
}
