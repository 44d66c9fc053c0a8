//! How closely a precision variant's transformer follows the fp32 one, on this machine.
//!
//! An int8 graph's logits depend on the CPU's integer kernels (see `cpu.rs`), so the agreement
//! recorded in a bundle holds only for the CPUs it was measured on. This file measures it here:
//! both transformers run on the bundle's probe rows (`eval/variant-probe.json`, sampled grids of
//! the fp32 model partially re-masked, written by `python -m export variants`), and the argmax
//! of the logits is compared at every masked position, the positions the sampler draws. It
//! measures; it does not quantize (export/variants.py does).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cpu::{self, CpuInfo, VariantRecord};
use crate::error::{Error, Result};
use crate::param::Param;
use crate::Pipeline;

/// The probe file inside a bundle, as `export/variants.py` writes it.
pub const PROBE_FILE: &str = "eval/variant-probe.json";

/// Probe rows per transformer call.
const ROWS_PER_CALL: usize = 16;

#[derive(Deserialize)]
struct Probe {
    rows: Vec<Vec<i64>>,
    /// The class of each row (a class-conditional bundle's); absent: none.
    #[serde(default)]
    classes: Option<Vec<i64>>,
}

/// A bundle's probe: token rows and the class of each (-1 = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRows {
    /// Token rows of the bundle's grid, mask id included.
    pub rows: Vec<Vec<i64>>,
    /// One class per row.
    pub classes: Vec<i64>,
}

/// The result of [`measure`].
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// The variant measured.
    pub variant: String,
    /// Probe rows run.
    pub rows: usize,
    /// Masked positions compared.
    pub positions: usize,
    /// Fraction of masked positions where the variant's argmax equals fp32's.
    pub argmax_agreement: f64,
    /// The bundle's bar for this variant, if it records one.
    pub bar: Option<f64>,
    /// What the bundle records for CPUs of this int8 kernel, if anything.
    pub recorded_here: Option<f64>,
    /// The CPU measured on.
    pub cpu: CpuInfo,
}

impl Agreement {
    /// True unless the bundle records a bar and the measurement is below it.
    pub fn holds(&self) -> bool {
        self.bar.is_none_or(|bar| self.argmax_agreement >= bar)
    }
}

/// Reads `dir`'s probe rows and checks them against the bundle's token space and its `classes`
/// (0: unconditional).
pub fn read_probe(dir: &Path, len: usize, mask_id: i64, classes: usize) -> Result<ProbeRows> {
    let path = dir.join(PROBE_FILE);
    let bytes = std::fs::read(&path).map_err(|error| Error::Io {
        path: path.clone(),
        error,
    })?;
    let bad = |message: String| Error::Manifest {
        path: path.clone(),
        message,
    };
    let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a probe file ({e})")))?;
    if probe.rows.is_empty() {
        return Err(bad("no rows".into()));
    }
    for (i, row) in probe.rows.iter().enumerate() {
        if row.len() != len {
            return Err(bad(format!(
                "row {i} has {} tokens, the bundle's grid {len}",
                row.len()
            )));
        }
        if let Some(t) = row.iter().find(|&&t| !(0..=mask_id).contains(&t)) {
            return Err(bad(format!("row {i} holds token {t}, outside 0..={mask_id}")));
        }
    }
    let row_classes = match probe.classes {
        None => vec![crate::sampler::NO_CLASS; probe.rows.len()],
        Some(_) if classes == 0 => {
            return Err(bad("lists classes, but the bundle is not class-conditional".into()));
        }
        Some(c) if c.len() != probe.rows.len() => {
            return Err(bad(format!("{} classes for {} rows", c.len(), probe.rows.len())));
        }
        Some(c) => {
            if let Some((i, k)) = c.iter().enumerate().find(|(_, &k)| !(-1..classes as i64).contains(&k)) {
                return Err(bad(format!("row {i} has class {k}, outside -1..{classes}")));
            }
            c
        }
    };
    Ok(ProbeRows {
        rows: probe.rows,
        classes: row_classes,
    })
}

/// Runs `fp32` and `variant` (the same bundle loaded with and without `--variant`) on the
/// bundle's probe rows (`rows` of them, evenly spaced, when given) and compares their argmax at
/// the masked positions.
pub fn measure(fp32: &mut Pipeline, variant: &mut Pipeline, rows: Option<usize>) -> Result<Agreement> {
    let name = variant
        .bundle()
        .variant()
        .ok_or_else(|| Error::param(Param::Variant, "name the variant to measure, e.g. --variant int8"))?
        .to_string();
    let space = fp32.bundle().manifest().token_space();
    let probe = read_probe(fp32.bundle().dir(), space.len, space.mask_id, fp32.classes())?;
    let all = &probe.rows;
    let n = rows.unwrap_or(all.len()).clamp(1, all.len());
    // Row i of the probe is masked at rate (i + 0.5) / len: every k-th keeps the spread.
    let picked: Vec<usize> = (0..n).map(|j| j * all.len() / n).collect();
    let rows: Vec<Vec<i64>> = picked.iter().map(|&i| all[i].clone()).collect();
    let classes: Vec<i64> = picked.iter().map(|&i| probe.classes[i]).collect();
    let k = space.codebook_size;
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let (mut same, mut positions) = (0usize, 0usize);
    for (chunk, classes) in rows.chunks(ROWS_PER_CALL).zip(classes.chunks(ROWS_PER_CALL)) {
        let flat = chunk.concat();
        fp32.forward(&flat, classes, &mut want)?;
        variant.forward(&flat, classes, &mut got)?;
        for (p, &t) in flat.iter().enumerate() {
            if t != space.mask_id {
                continue;
            }
            positions += 1;
            let row = p * k..(p + 1) * k;
            same += usize::from(argmax(&want[row.clone()]) == argmax(&got[row]));
        }
    }
    let record = VariantRecord::from_provenance(&fp32.bundle().manifest().provenance, &name);
    let cpu = cpu::detect();
    let recorded_here = record.as_ref().and_then(|r| {
        r.by_cpu
            .iter()
            .find(|(kernel, _)| kernel == cpu.int8_kernel.name())
            .map(|(_, a)| *a)
    });
    Ok(Agreement {
        variant: name,
        rows: rows.len(),
        positions,
        argmax_agreement: same as f64 / positions.max(1) as f64,
        bar: record.map(|r| r.bar),
        recorded_here,
        cpu,
    })
}

/// Index of the first largest value (NaN never wins).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[0.0]), 0);
    }

    #[test]
    fn a_probe_of_another_grid_or_with_foreign_tokens_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("eval")).unwrap();
        let write = |text: &str| std::fs::write(dir.path().join(PROBE_FILE), text).unwrap();
        write(r#"{"rows": [[0, 1, 4, 4]]}"#);
        let probe = read_probe(dir.path(), 4, 4, 0).unwrap();
        assert_eq!((probe.rows, probe.classes), (vec![vec![0, 1, 4, 4]], vec![-1]));
        write(r#"{"rows": [[0, 1, 4]]}"#);
        let e = read_probe(dir.path(), 4, 4, 0).unwrap_err().to_string();
        assert!(e.contains("row 0 has 3 tokens"), "{e}");
        write(r#"{"rows": [[0, 1, 5, 4]]}"#);
        let e = read_probe(dir.path(), 4, 4, 0).unwrap_err().to_string();
        assert!(e.contains("token 5, outside 0..=4"), "{e}");
        write(r#"{"rows": []}"#);
        assert!(read_probe(dir.path(), 4, 4, 0)
            .unwrap_err()
            .to_string()
            .contains("no rows"));
    }

    #[test]
    fn probe_classes_belong_to_a_conditional_bundle_one_per_row_and_in_range() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("eval")).unwrap();
        let write = |text: &str| std::fs::write(dir.path().join(PROBE_FILE), text).unwrap();
        write(r#"{"rows": [[0, 4], [4, 4]], "classes": [2, -1]}"#);
        assert_eq!(read_probe(dir.path(), 2, 4, 3).unwrap().classes, vec![2, -1]);
        let e = read_probe(dir.path(), 2, 4, 0).unwrap_err().to_string();
        assert!(e.contains("not class-conditional"), "{e}");
        let e = read_probe(dir.path(), 2, 4, 2).unwrap_err().to_string();
        assert!(e.contains("row 0 has class 2, outside -1..2"), "{e}");
        write(r#"{"rows": [[0, 4], [4, 4]], "classes": [1]}"#);
        let e = read_probe(dir.path(), 2, 4, 3).unwrap_err().to_string();
        assert!(e.contains("1 classes for 2 rows"), "{e}");
        write(r#"{"rows": [[0, 4]]}"#);
        assert_eq!(
            read_probe(dir.path(), 2, 4, 3).unwrap().classes,
            vec![-1],
            "an older probe: no class"
        );
    }
}
