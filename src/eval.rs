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
}

impl Verdict {
    /// Largest class share.
    pub fn max_class_fraction(&self) -> f64 {
        *self.histogram.iter().max().unwrap_or(&0) as f64 / self.count.max(1) as f64
    }

    /// Every class predicted at least once.
    pub fn all_classes_present(&self) -> bool {
        self.histogram.iter().all(|&h| h > 0)
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
        for chunk in images.chunks(64) {
            let t = &chunk[0];
            let data: Vec<f32> = chunk.iter().flat_map(|i| i.data.iter().copied()).collect();
            let (logits, shape) = self
                .classifier
                .run(&data, &[chunk.len(), t.channels, t.height, t.width])?;
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
            }
        }
        Ok(Verdict {
            count: images.len(),
            mean_confidence: confidence / images.len().max(1) as f64,
            histogram,
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
