//! Sample quality as a bundle's own judge sees it: a classifier graph shipped with the bundle
//! (`eval/classifier.onnx`, else `eval/judge.onnx`; input `image`, output `logits` whose last
//! class is "not real content", optionally `features`) rates generated images; the same graph on
//! the bundle's held-out real images (`eval/heldout/*.png`) gives the reference. Reports mean
//! confidence, its ratio to the real images', the class histogram, and with features the KID
//! against the held-out images: small, honest stand-ins for FID on a toy model.
//!
//! It judges; it does not generate (the caller passes the images).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::graphs::{Auxiliary, Runtime};
use crate::image::{self, Tensor};
use crate::Pipeline;

/// Input and output names of an eval classifier.
pub const CLASSIFIER_INPUT: &str = "image";
/// Output: class logits `(B, classes)`.
pub const CLASSIFIER_OUTPUT: &str = "logits";
/// Optional output: `(B, F)` features, where KID is measured.
pub const CLASSIFIER_FEATURES: &str = "features";

/// The bar's least mean confidence, as a multiple of the real images'.
pub const BAR_RATIO: f64 = 0.92;
/// The bar's least share of the images per class.
pub const BAR_MIN_SHARE: f64 = 0.05;
/// The bar's largest share of the images per class.
pub const BAR_MAX_SHARE: f64 = 0.15;

/// A loaded judge.
pub struct Judge {
    classifier: Auxiliary,
    /// Classes that count as real content (all but the last, reject class); `None`: all but the
    /// last of what the graph returns.
    content_classes: Option<usize>,
    /// The graph has a `features` output.
    features: bool,
}

/// Mean confidence and class spread of a set of images.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Images judged.
    pub count: usize,
    /// Mean over images of max over content classes of softmax over all classes.
    pub mean_confidence: f64,
    /// Images per predicted content class.
    pub histogram: Vec<usize>,
    /// Each image's predicted content class, in order.
    pub predicted: Vec<usize>,
    /// Each image's features, `(count, F)` flat (empty when the judge has none).
    pub features: Vec<f32>,
}

impl Verdict {
    /// Largest class share.
    pub fn max_class_fraction(&self) -> f64 {
        *self.histogram.iter().max().unwrap_or(&0) as f64 / self.count.max(1) as f64
    }

    /// Smallest class share.
    pub fn min_class_fraction(&self) -> f64 {
        *self.histogram.iter().min().unwrap_or(&0) as f64 / self.count.max(1) as f64
    }

    /// The digits bar (issue 13's target): mean confidence at least 0.92 x `real`'s, every class
    /// between 5% and 15% of the images.
    pub fn meets_bar(&self, real: &Verdict) -> bool {
        self.mean_confidence / real.mean_confidence >= BAR_RATIO
            && self.min_class_fraction() >= BAR_MIN_SHARE
            && self.max_class_fraction() <= BAR_MAX_SHARE
    }

    /// KID x 1000 of these images against `reference`'s (the held-out images): the unbiased
    /// squared MMD with the cubic polynomial kernel `(x.y / d + 1)^3` (Binkowski et al. 2018) on
    /// the judge's features, both divided by one number (the root mean square of `reference`'s),
    /// as `export/judge.py` computes it. `None` without features.
    pub fn kid_x1000(&self, reference: &Verdict) -> Option<f64> {
        let (n, m) = (self.count, reference.count);
        if self.features.is_empty() || reference.features.is_empty() || n < 2 || m < 2 {
            return None;
        }
        let d = reference.features.len() / m;
        let ms = reference.features.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / (m * d) as f64;
        let unit = if ms > 0.0 { ms.sqrt() } else { 1.0 };
        let scaled = |f: &[f32]| -> Vec<f64> { f.iter().map(|&x| x as f64 / unit).collect() };
        let (a, b) = (scaled(&self.features), scaled(&reference.features));
        let k = |x: &[f64], y: &[f64]| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            libm::pow(dot / d as f64 + 1.0, 3.0)
        };
        let row = |v: &[f64], i: usize| v[i * d..(i + 1) * d].to_vec();
        let mean_within = |v: &[f64], count: usize| {
            let mut s = 0.0;
            for i in 0..count {
                for j in 0..count {
                    if i != j {
                        s += k(&row(v, i), &row(v, j));
                    }
                }
            }
            s / (count * (count - 1)) as f64
        };
        let mut cross = 0.0;
        for i in 0..n {
            for j in 0..m {
                cross += k(&row(&a, i), &row(&b, j));
            }
        }
        Some(1000.0 * (mean_within(&a, n) + mean_within(&b, m) - 2.0 * cross / (n * m) as f64))
    }

    /// Every class predicted at least once.
    pub fn all_classes_present(&self) -> bool {
        self.histogram.iter().all(|&h| h > 0)
    }

    /// The share of images whose predicted class is the one they were made as (`made[i]`, a
    /// class-conditional bundle's [`Made::classes`](crate::Made)); `None` when none was.
    pub fn agreement(&self, made: &[Option<usize>]) -> Option<f64> {
        let pairs: Vec<(usize, usize)> = self
            .predicted
            .iter()
            .zip(made)
            .filter_map(|(&p, m)| m.map(|m| (p, m)))
            .collect();
        (!pairs.is_empty()).then(|| pairs.iter().filter(|(p, m)| p == m).count() as f64 / pairs.len() as f64)
    }
}

impl Judge {
    /// Loads `classifier` (with `content_classes` real classes followed by a reject class; `None`:
    /// every class it returns but the last).
    pub fn load(runtime: &Runtime, classifier: &Path, content_classes: Option<usize>) -> Result<Judge> {
        let classifier = Auxiliary::load(runtime, classifier, CLASSIFIER_INPUT, CLASSIFIER_OUTPUT)?;
        let features = classifier.has_output(CLASSIFIER_FEATURES);
        Ok(Judge {
            classifier,
            content_classes,
            features,
        })
    }

    /// The bundle's own judge: `eval/classifier.onnx` (the digits' and emoji's: their classes and
    /// a reject class), else `eval/judge.onnx` (`python -m export train`'s: one class per source
    /// and "fake").
    pub fn for_bundle(p: &Pipeline) -> Result<Judge> {
        let dir = p.bundle().dir().join("eval");
        let Some(path) = ["classifier.onnx", "judge.onnx"]
            .iter()
            .map(|f| dir.join(f))
            .find(|f| f.exists())
        else {
            return Err(Error::GraphFile {
                graph: "classifier",
                path: dir.join("classifier.onnx"),
                message: "this bundle has no eval classifier or judge; quality cannot be measured".into(),
            });
        };
        Judge::load(p.runtime(), &path, None)
    }

    /// Judges images (all of one shape), 64 at a time.
    pub fn judge(&mut self, images: &[Tensor]) -> Result<Verdict> {
        let mut confidence = 0.0f64;
        let mut histogram = Vec::new();
        let mut predicted = Vec::with_capacity(images.len());
        let mut features = Vec::new();
        let names: &[&str] = if self.features {
            &[CLASSIFIER_OUTPUT, CLASSIFIER_FEATURES]
        } else {
            &[CLASSIFIER_OUTPUT]
        };
        for chunk in images.chunks(64) {
            let t = &chunk[0];
            let data: Vec<f32> = chunk.iter().flat_map(|i| i.data.iter().copied()).collect();
            let mut outs =
                self.classifier
                    .infer_outputs(&data, &[chunk.len(), t.channels, t.height, t.width], names)?;
            if self.features {
                features.extend_from_slice(&outs[1].0);
            }
            let (logits, shape) = outs.swap_remove(0);
            let classes = shape.get(1).copied().unwrap_or(0);
            let content = self.content_classes.unwrap_or(classes.saturating_sub(1));
            if classes < content.max(1) {
                return Err(Error::Tokens(format!(
                    "classifier returned {classes} classes, expected at least {}",
                    content.max(1)
                )));
            }
            histogram.resize(content.max(1), 0);
            let content = content.max(1);
            for row in logits.chunks(classes) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let exp: Vec<f64> = row.iter().map(|&x| libm::exp(x as f64 - max)).collect();
                let sum: f64 = exp.iter().sum();
                let (best, p) = exp[..content]
                    .iter()
                    .enumerate()
                    .fold((0, 0.0), |b, (i, &e)| if e > b.1 { (i, e) } else { b });
                confidence += p / sum;
                histogram[best] += 1;
                predicted.push(best);
            }
        }
        Ok(Verdict {
            count: images.len(),
            mean_confidence: confidence / images.len().max(1) as f64,
            histogram,
            predicted,
            features,
        })
    }
}

/// The bundle's held-out real images (`eval/heldout/*.png`), sorted by name.
pub fn heldout_images(p: &Pipeline) -> Result<Vec<Tensor>> {
    let dir = p.bundle().dir().join("eval/heldout");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    let spec = &p.bundle().manifest().image;
    paths.iter().map(|path| image::load_image(path, spec)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(mean_confidence: f64, histogram: Vec<usize>) -> Verdict {
        let predicted = histogram
            .iter()
            .enumerate()
            .flat_map(|(c, &n)| std::iter::repeat_n(c, n))
            .collect();
        Verdict {
            count: histogram.iter().sum(),
            mean_confidence,
            histogram,
            predicted,
            features: Vec::new(),
        }
    }

    #[test]
    fn kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() {
        use rand_core::RngCore;
        // 200 images' features in 4 dimensions, uniform on [offset, offset + 1), from a seeded stream.
        let draws = |offset: f64, seed: u64| -> Vec<f32> {
            let mut rng = crate::sampler::image_rng(seed, 0);
            (0..800)
                .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 + offset) as f32)
                .collect()
        };
        let with = |features: Vec<f32>| Verdict {
            features,
            ..verdict(0.9, vec![100, 100])
        };
        let real = with(draws(0.0, 1));
        let same = with(draws(0.0, 7)).kid_x1000(&real).unwrap();
        let moved = with(draws(0.3, 7)).kid_x1000(&real).unwrap();
        assert!(
            same.abs() < 5.0 && moved > 20.0 * same.abs().max(1.0),
            "same {same}, moved {moved}"
        );
        assert_eq!(
            verdict(0.9, vec![100, 100]).kid_x1000(&real),
            None,
            "no features, no KID"
        );
    }

    #[test]
    fn the_bar_asks_for_confidence_and_every_class_at_5_to_15_percent() {
        let real = verdict(0.9, vec![10; 10]);
        assert!(verdict(0.85, vec![10; 10]).meets_bar(&real));
        assert!(!verdict(0.82, vec![10; 10]).meets_bar(&real), "0.91 x real");
        assert!(
            !verdict(0.9, vec![16, 4, 10, 10, 10, 10, 10, 10, 10, 10]).meets_bar(&real),
            "16% and 4%"
        );
        assert!(verdict(0.9, vec![15, 5, 10, 10, 10, 10, 10, 10, 10, 10]).meets_bar(&real));
    }

    #[test]
    fn agreement_counts_only_images_made_as_a_class() {
        let v = verdict(0.9, vec![2, 1, 1]); // predicted 0, 0, 1, 2
        assert_eq!(v.agreement(&[None; 4]), None);
        assert_eq!(v.agreement(&[Some(0), Some(1), Some(1), None]), Some(2.0 / 3.0));
    }
}
