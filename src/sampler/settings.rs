//! Validated sampling settings: steps, temperature (constant or a linear schedule), nucleus
//! truncation, and which sampler. Checked once, against the token space; nothing here draws.

use crate::error::{Error, Result};
use crate::limits::{MAX_CACHE_PERIOD, MAX_GUIDANCE, MAX_TEMPERATURE};
use crate::param::Param;

use super::rule::threshold::DEFAULT_THRESHOLD;
use super::rule::{self, Rule};
use super::TokenSpace;

/// Which sampler: the reveal rule that decides which positions are drawn at each step. Each
/// variant's rule lives in a file of its own in `src/sampler/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// The paper's rule: each masked position revealed at step t with probability 1/t.
    #[default]
    Absorbing,
    /// Exactly the expected number of reveals per step, in a seeded random order.
    Even,
    /// Confidence-based: sample every masked position, keep the most confident, cosine schedule.
    Maskgit,
    /// Positions in a 2-D Halton order, spread over the image; arccos count per step.
    Halton,
    /// Adaptive: each call reveals every masked position drawn with probability >= the threshold.
    Threshold,
    /// MaskGIT that also reveals every draw whose probability reaches the threshold.
    #[serde(rename = "maskgit-threshold")]
    MaskgitThreshold,
}

impl SamplerKind {
    /// Every sampler, in the order help texts list them.
    pub const ALL: &'static [SamplerKind] = &[
        SamplerKind::Absorbing,
        SamplerKind::Even,
        SamplerKind::Maskgit,
        SamplerKind::Halton,
        SamplerKind::Threshold,
        SamplerKind::MaskgitThreshold,
    ];

    /// The name used on the command line, in JSON and in PNG metadata.
    pub fn name(self) -> &'static str {
        self.rule().name()
    }

    /// One line saying what the sampler does (the CLI's help).
    pub fn help(self) -> &'static str {
        self.rule().help()
    }

    /// Parses a name written by [`SamplerKind::name`].
    pub fn from_name(name: &str) -> Option<SamplerKind> {
        SamplerKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// The names of every sampler, for messages: `absorbing, even, maskgit`.
    pub fn names() -> String {
        SamplerKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }

    /// Whether the sampler reads a threshold (`--threshold`).
    pub fn uses_threshold(self) -> bool {
        matches!(self, SamplerKind::Threshold | SamplerKind::MaskgitThreshold)
    }

    /// The reveal rule.
    pub(super) fn rule(self) -> &'static dyn Rule {
        match self {
            SamplerKind::Absorbing => &rule::absorbing::Absorbing,
            SamplerKind::Even => &rule::even::Even,
            SamplerKind::Maskgit => &rule::maskgit::Maskgit { threshold: false },
            SamplerKind::Halton => &rule::halton::Halton,
            SamplerKind::Threshold => &rule::threshold::Threshold,
            SamplerKind::MaskgitThreshold => &rule::maskgit::Maskgit { threshold: true },
        }
    }
}

/// Validated sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// S, the number of reverse steps, 1..=L.
    pub steps: usize,
    /// Logits are divided by this before the softmax; finite and > 0. With `temperature_end`,
    /// the temperature of the first step.
    pub temperature: f32,
    /// Temperature of the last step for a linear schedule; `None` = constant.
    pub temperature_end: Option<f32>,
    /// Nucleus sampling: keep the smallest set of most probable codes holding this much of the
    /// probability, in (0, 1]; `None` (or 1) = no truncation.
    pub top_p: Option<f32>,
    /// Which reveal rule.
    pub sampler: SamplerKind,
    /// The `threshold` sampler's least probability for a reveal, in (0, 1]; `None` = its default
    /// ([`DEFAULT_THRESHOLD`]). Only that sampler reads it; with another it is `None`.
    pub threshold: Option<f32>,
    /// Cached attention between steps: a full pass every this many of an image's transformer
    /// calls, cheap passes between (`--cache N`); `None` = exact mode (`--cache off`), every call
    /// a full pass of the bundle's transformer.
    pub cache: Option<usize>,
    /// Classifier-free guidance scale w > 0 (`--guidance W`): a class-conditional bundle's logits
    /// become `c + w (c - u)`, c with the chain's class and u with none (a second pass of the
    /// transformer per call); `None` (or 0) = the class's logits as they are.
    pub guidance: Option<f32>,
}

fn check_temperature(param: Param, t: f32) -> Result<()> {
    if t.is_finite() && t > 0.0 && t <= MAX_TEMPERATURE {
        Ok(())
    } else {
        Err(Error::param(
            param,
            format!("{t} is out of range: must be a number > 0 and <= {MAX_TEMPERATURE}"),
        ))
    }
}

impl Settings {
    /// Checks `steps` in 1..=L and `temperature` finite in (0, MAX_TEMPERATURE].
    pub fn new(steps: usize, temperature: f32, space: &TokenSpace) -> Result<Settings> {
        if steps == 0 || steps > space.len {
            return Err(Error::param(
                Param::Steps,
                format!(
                    "{steps} is out of range: must be 1..={} (the number of tokens)",
                    space.len
                ),
            ));
        }
        check_temperature(Param::Temperature, temperature)?;
        Ok(Settings {
            steps,
            temperature,
            temperature_end: None,
            top_p: None,
            sampler: SamplerKind::Absorbing,
            threshold: None,
            cache: None,
            guidance: None,
        })
    }

    /// With nucleus (top-p) truncation: `p` finite in (0, 1]; 1 is stored as `None`.
    pub fn with_top_p(self, p: Option<f32>) -> Result<Settings> {
        if let Some(p) = p {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(Error::param(
                    Param::TopP,
                    format!("{p} is out of range: must be a number > 0 and <= 1"),
                ));
            }
        }
        // 1 keeps every code: the same as none, and recorded as none.
        Ok(Settings {
            top_p: p.filter(|&p| p < 1.0),
            ..self
        })
    }

    /// The top-p of every step as the draw uses it (1 = off).
    pub(super) fn nucleus(&self) -> f64 {
        self.top_p.map_or(1.0, f64::from)
    }

    /// With another sampler (a threshold is kept only for the `threshold` sampler).
    pub fn with_sampler(self, sampler: SamplerKind) -> Settings {
        let threshold = self.threshold.filter(|_| sampler.uses_threshold());
        Settings {
            sampler,
            threshold,
            ..self
        }
    }

    /// With the `threshold` sampler's threshold: `p` finite in (0, 1]. Set after the sampler: a
    /// threshold for another sampler is refused (it would change nothing).
    pub fn with_threshold(self, p: Option<f32>) -> Result<Settings> {
        let Some(p) = p else { return Ok(self) };
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return Err(Error::param(
                Param::Threshold,
                format!("{p} is out of range: must be a number > 0 and <= 1"),
            ));
        }
        if !self.sampler.uses_threshold() {
            return Err(Error::param(
                Param::Threshold,
                format!(
                    "only the threshold samplers have a threshold (this is {}); add sampler threshold or leave it out",
                    self.sampler.name()
                ),
            ));
        }
        Ok(Settings {
            threshold: Some(p),
            ..self
        })
    }

    /// With cached attention (a full pass every `period` calls of an image; 1..=MAX_CACHE_PERIOD),
    /// or exact mode (`None`).
    pub fn with_cache(self, period: Option<usize>) -> Result<Settings> {
        if let Some(n) = period {
            crate::limits::check_range(Param::Cache, n, MAX_CACHE_PERIOD)?;
        }
        Ok(Settings { cache: period, ..self })
    }

    /// With classifier-free guidance of scale `w`, finite in [0, MAX_GUIDANCE]; 0 is stored as
    /// `None` (no guidance). Set after the cache: cached attention does not guide (yet), so the
    /// two together are refused.
    pub fn with_guidance(self, w: Option<f32>) -> Result<Settings> {
        let Some(w) = w else { return Ok(self) };
        if !(w.is_finite() && (0.0..=MAX_GUIDANCE).contains(&w)) {
            return Err(Error::param(
                Param::Guidance,
                format!("{w} is out of range: must be a number >= 0 and <= {MAX_GUIDANCE}"),
            ));
        }
        if w > 0.0 && self.cache.is_some() {
            return Err(Error::param(
                Param::Guidance,
                "cached attention (cache) does not guide: set cache off to use guidance".to_string(),
            ));
        }
        Ok(Settings {
            guidance: Some(w).filter(|&w| w > 0.0),
            ..self
        })
    }

    /// The threshold the `threshold` sampler uses.
    pub fn threshold_or_default(&self) -> f32 {
        self.threshold.unwrap_or(DEFAULT_THRESHOLD)
    }

    /// With a linear temperature schedule from `temperature` to `end`.
    pub fn with_temperature_end(self, end: Option<f32>) -> Result<Settings> {
        if let Some(e) = end {
            check_temperature(Param::TemperatureEnd, e)?;
        }
        Ok(Settings {
            temperature_end: end,
            ..self
        })
    }

    /// The temperature of step index `s` (0 for the first executed step t = S).
    pub fn temperature_at(&self, s: usize) -> f64 {
        match self.temperature_end {
            Some(end) if self.steps > 1 => {
                let (a, b) = (self.temperature as f64, end as f64);
                a + (b - a) * s as f64 / (self.steps - 1) as f64
            }
            _ => self.temperature as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::SPACE;
    use super::*;

    #[test]
    fn a_temperature_schedule_interpolates_linearly() {
        let s = Settings::new(5, 1.2, &SPACE)
            .unwrap()
            .with_temperature_end(Some(0.4))
            .unwrap();
        let t: Vec<f64> = (0..5).map(|i| s.temperature_at(i)).collect();
        assert!(
            (t[0] - 1.2).abs() < 1e-6 && (t[2] - 0.8).abs() < 1e-6 && (t[4] - 0.4).abs() < 1e-6,
            "{t:?}"
        );
        assert!(Settings::new(5, 1.0, &SPACE)
            .unwrap()
            .with_temperature_end(Some(0.0))
            .is_err());
        assert_eq!(SamplerKind::from_name("maskgit"), Some(SamplerKind::Maskgit));
    }

    #[test]
    fn every_sampler_has_one_name_that_reads_back() {
        for &k in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_name(k.name()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()), "serde spells it as name()");
        }
        assert_eq!(
            SamplerKind::names(),
            "absorbing, even, maskgit, halton, threshold, maskgit-threshold"
        );
    }

    #[test]
    fn bad_settings_are_rejected_naming_the_parameter() {
        for steps in [0, 17] {
            let e = Settings::new(steps, 1.0, &SPACE).unwrap_err().to_string();
            assert!(e.starts_with("invalid steps"), "{e}");
        }
        for t in [0.0, -1.0, f32::NAN, f32::INFINITY, 2000.0] {
            let e = Settings::new(4, t, &SPACE).unwrap_err().to_string();
            assert!(e.starts_with("invalid temperature"), "{e}");
        }
        let s = Settings::new(4, 1.0, &SPACE).unwrap();
        for w in [-0.5, f32::NAN, f32::INFINITY, 101.0] {
            let e = s.with_guidance(Some(w)).unwrap_err().to_string();
            assert!(e.starts_with("invalid guidance"), "{e}");
        }
        assert_eq!(s.with_guidance(Some(0.0)).unwrap().guidance, None, "0 is no guidance");
        assert_eq!(s.with_guidance(Some(2.5)).unwrap().guidance, Some(2.5));
        let e = s
            .with_cache(Some(4))
            .unwrap()
            .with_guidance(Some(2.0))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid guidance") && e.contains("cache off"), "{e}");
    }
}
