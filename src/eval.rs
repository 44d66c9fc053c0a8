//! Sample quality as a bundle's own judge sees it: a classifier graph shipped with the bundle
//! (`eval/classifier.onnx`, input `image`, output `logits` whose last class may be "not a digit")
//! rates generated images; the same classifier on the bundle's held-out real images
//! (`eval/heldout/*.png`) gives the reference. Reports mean confidence, its ratio to the real
//! images', and the class histogram: a small, honest stand-in for FID on a toy model.
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

/// The bar's least mean confidence, as a multiple of the real images'.
pub const BAR_RATIO: f64 = 0.92;
/// The bar's least share of the images per class.
pub const BAR_MIN_SHARE: f64 = 0.05;
/// The bar's largest share of the images per class.
pub const BAR_MAX_SHARE: f64 = 0.15;

/// A loaded judge.
pub struct Judge {
    classifier: Auxiliary,
    /// Classes that count as real content (all but the last, reject class).
    content_classes: usize,
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
    /// Loads `classifier` (with `content_classes` real classes followed by a reject class).
    pub fn load(runtime: &Runtime, classifier: &Path, content_classes: usize) -> Result<Judge> {
        let classifier = Auxiliary::load(runtime, classifier, CLASSIFIER_INPUT, CLASSIFIER_OUTPUT)?;
        Ok(Judge {
            classifier,
            content_classes,
        })
    }

    /// The bundle's own judge: `eval/classifier.onnx`, 10 digit classes + reject.
    pub fn for_bundle(p: &Pipeline) -> Result<Judge> {
        let path = p.bundle().dir().join("eval/classifier.onnx");
        if !path.exists() {
            return Err(Error::GraphFile {
                graph: "classifier",
                path,
                message: "this bundle has no eval classifier; quality cannot be measured".into(),
            });
        }
        Judge::load(p.runtime(), &path, 10)
    }

    /// Judges images (all of one shape), 64 at a time.
    pub fn judge(&mut self, images: &[Tensor]) -> Result<Verdict> {
        let mut confidence = 0.0f64;
        let mut histogram = vec![0usize; self.content_classes];
        let mut predicted = Vec::with_capacity(images.len());
        for chunk in images.chunks(64) {
            let t = &chunk[0];
            let data: Vec<f32> = chunk.iter().flat_map(|i| i.data.iter().copied()).collect();
            let (logits, shape) = self
                .classifier
                .infer(&data, &[chunk.len(), t.channels, t.height, t.width])?;
            let classes = shape.get(1).copied().unwrap_or(0);
            if classes < self.content_classes {
                return Err(Error::Tokens(format!(
                    "classifier returned {classes} classes, expected at least {}",
                    self.content_classes
                )));
            }
            for row in logits.chunks(classes) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let exp: Vec<f64> = row.iter().map(|&x| libm::exp(x as f64 - max)).collect();
                let sum: f64 = exp.iter().sum();
                let (best, p) = exp[..self.content_classes]
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
        }
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
