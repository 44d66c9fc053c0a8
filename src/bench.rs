//! Benchmark: times a loaded pipeline the way users compare runners, and reports numbers only
//! (it never fails on a time). Per-image time, images/s, transformer calls made vs steps, time
//! per call, the runner's own share of the time (everything outside ONNX Runtime), decode time,
//! an isolated transformer forward for comparison, what live previews cost (after every call,
//! and paced as the service paces them), and peak RSS.
//!
//! It does not load anything itself: the caller passes the pipeline and the load time.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::job::{ImageId, Job, Start};
use crate::preview::Pacer;
use crate::sampler::Settings;
use crate::{DecodeMode, Pipeline, PreviewSink, Progress, Timings};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Sampling settings.
    pub settings: Settings,
    /// Images per timed run.
    pub count: usize,
    /// Images per transformer call at most.
    pub max_batch: usize,
    /// Timed runs (after one untimed warm-up run).
    pub runs: usize,
    /// Seed of the first run (run r uses seed + r).
    pub seed: u64,
}

/// The measured numbers, machine-readable.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Bundle name.
    pub bundle: String,
    /// Transformer variant (`fp32` when none).
    pub variant: String,
    /// Execution provider.
    pub provider: String,
    /// ONNX Runtime version.
    pub onnxruntime: String,
    /// Intra-op threads.
    pub threads: usize,
    /// Reverse steps S.
    pub steps: usize,
    /// Tokens per image L.
    pub tokens: usize,
    /// Temperature.
    pub temperature: f32,
    /// Sampler.
    pub sampler: String,
    /// Cached attention's period (`None`: exact mode).
    pub cache: Option<usize>,
    /// Positions the transformer computed per image, in full passes (L positions each).
    pub full_passes_per_image: f64,
    /// Images per timed run.
    pub count: usize,
    /// Images per transformer call at most.
    pub max_batch: usize,
    /// Timed runs.
    pub runs: usize,
    /// Loading ONNX Runtime, the bundle and the three sessions, seconds.
    pub load_s: f64,
    /// From the end of loading to the first decoded image (batch 1), seconds.
    pub first_image_s: f64,
    /// Mean wall time per image over the timed runs, milliseconds.
    pub per_image_ms: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Transformer calls per run.
    pub transformer_calls: f64,
    /// Calls the paper's loop would make per run (S per batch).
    pub reference_calls: f64,
    /// Mean time per transformer call, milliseconds.
    pub per_call_ms: f64,
    /// Mean rows (images) per call.
    pub rows_per_call: f64,
    /// Isolated transformer forward at the mean batch, milliseconds (median of several).
    pub isolated_forward_ms: f64,
    /// Decode time per image, milliseconds.
    pub decode_per_image_ms: f64,
    /// Share of the run time spent outside ONNX Runtime (sampler, copies, bookkeeping).
    pub runner_overhead: f64,
    /// (calls x isolated forward + decode) / measured run time: 1.0 = the runner adds nothing.
    /// Exact at `max_batch` 1; with batching, calls feed varying row counts and this is rough.
    pub predicted_over_measured: f64,
    /// One live preview of a run's images (decoding with masked tokens grey), milliseconds.
    pub preview_ms: f64,
    /// Time a preview after every transformer call adds to a run (share of its run time).
    pub preview_every_call_share: f64,
    /// Transformer calls per preview under the service's pacing (the measured k).
    pub paced_calls_per_preview: f64,
    /// Time paced previews add to a run (share of its run time).
    pub paced_preview_share: f64,
    /// Peak resident memory of the process, MiB (Linux `VmHWM`).
    pub peak_rss_mib: Option<f64>,
}

/// Takes previews and drops them: what they cost is what is measured.
struct Discard(Pacer);

impl PreviewSink for Discard {
    fn wanted(&self) -> bool {
        true
    }

    fn preview(&mut self, _: usize, _: usize, _: Vec<crate::image::Pixels>) {}

    fn pacer(&self) -> Pacer {
        self.0.clone()
    }
}

/// One run of `job` with previews paced by `pacer`: (share of the run's time they took,
/// calls per preview, milliseconds per preview).
fn preview_cost(p: &mut Pipeline, job: &Job, pacer: Pacer) -> Result<(f64, f64, f64)> {
    let start = Instant::now();
    let made = p.run(
        job,
        &mut Progress {
            on_step: &mut |_| {},
            cancelled: &|| false,
            preview: Some(&mut Discard(pacer)),
        },
    )?;
    let run_s = start.elapsed().as_secs_f64();
    let (t, n) = (made.timings.preview.as_secs_f64(), made.timings.previews.max(1) as f64);
    Ok((t / run_s, made.timings.transformer_calls as f64 / n, 1e3 * t / n))
}

/// Images `0..count` of `seed` on the bundle's grid with `settings`.
fn job(settings: &Settings, seed: u64, count: usize, max_batch: usize) -> Job {
    Job {
        start: Start::Masked,
        images: (0..count as u64).map(|index| ImageId { seed, index }).collect(),
        settings: *settings,
        class: None,
        tiling: None,
        decode: DecodeMode::default(),
        record_frames: false,
        columns: 1,
        max_batch,
    }
}

/// Runs the benchmark on `p` (`load` = how long loading took).
pub fn measure(p: &mut Pipeline, b: &BenchSettings, load: Duration) -> Result<BenchReport> {
    let settings = &b.settings;
    let start = Instant::now();
    let quiet = &mut |_: &crate::sampler::StepReport| {};
    p.run(&job(settings, b.seed, 1, 1), &mut Progress::steps(quiet))?;
    let first_image = start.elapsed();
    // Warm-up at the timed batch size, untimed.
    p.run(
        &job(settings, b.seed, b.count, b.max_batch),
        &mut Progress::steps(quiet),
    )?;

    let mut t = Timings::default();
    let mut total = Duration::ZERO;
    let mut rows = 0usize;
    for r in 0..b.runs {
        let before = p.transformer_rows();
        let run_start = Instant::now();
        let made = p.run(
            &job(settings, b.seed + 1 + r as u64, b.count, b.max_batch),
            &mut Progress::steps(quiet),
        )?;
        total += run_start.elapsed();
        t.add(&made.timings);
        rows += p.transformer_rows() - before;
    }
    let runs = b.runs.max(1) as f64;
    let calls = t.transformer_calls as f64 / runs;
    let rows_per_call = rows as f64 / t.transformer_calls.max(1) as f64;
    let batches = b.count.div_ceil(b.max_batch) as f64;

    // The same forward in isolation: a fully masked batch of the mean size, median of 9.
    let space = p.bundle().manifest().token_space();
    let n = (rows_per_call.round() as usize).max(1);
    let tokens = vec![space.mask_id; n * space.len];
    let mut logits = Vec::new();
    let classes = vec![crate::sampler::NO_CLASS; n];
    p.forward(&tokens, &classes, &mut logits)?; // a new batch shape: let ONNX Runtime plan it untimed
    let mut samples: Vec<Duration> = (0..9)
        .map(|_| {
            let s = Instant::now();
            p.forward(&tokens, &classes, &mut logits).map(|_| s.elapsed())
        })
        .collect::<Result<_>>()?;
    samples.sort();
    let isolated = samples[samples.len() / 2];

    // Live previews: after every call, and paced as the service does.
    let preview_job = job(settings, b.seed + 1, b.count, b.max_batch);
    let (every_share, _, preview_ms) = preview_cost(p, &preview_job, Pacer::every_step())?;
    let (paced_share, paced_k, _) = preview_cost(p, &preview_job, Pacer::new())?;

    let run_s = total.as_secs_f64() / runs;
    let in_ort = (t.transformer + t.decode).as_secs_f64() / runs;
    let predicted = calls * isolated.as_secs_f64() + t.decode.as_secs_f64() / runs;
    let m = p.bundle().manifest();
    Ok(BenchReport {
        bundle: m.name.clone(),
        variant: p.bundle().variant().unwrap_or("fp32").to_string(),
        provider: p.provider().to_string(),
        onnxruntime: p.runtime().library().version.clone(),
        threads: p.runtime().threads(),
        steps: settings.steps,
        tokens: space.len,
        temperature: settings.temperature,
        sampler: settings.sampler.name().to_string(),
        cache: settings.cache,
        full_passes_per_image: t.transformer_positions as f64 / (runs * b.count as f64 * space.len as f64),
        count: b.count,
        max_batch: b.max_batch,
        runs: b.runs,
        load_s: load.as_secs_f64(),
        first_image_s: first_image.as_secs_f64(),
        per_image_ms: 1e3 * run_s / b.count as f64,
        images_per_s: b.count as f64 / run_s,
        transformer_calls: calls,
        reference_calls: settings.steps as f64 * batches,
        per_call_ms: 1e3 * t.transformer.as_secs_f64() / t.transformer_calls.max(1) as f64,
        rows_per_call,
        isolated_forward_ms: 1e3 * isolated.as_secs_f64(),
        decode_per_image_ms: 1e3 * t.decode.as_secs_f64() / (runs * b.count as f64),
        runner_overhead: ((run_s - in_ort) / run_s).max(0.0),
        predicted_over_measured: predicted / run_s,
        preview_ms,
        preview_every_call_share: every_share,
        paced_calls_per_preview: paced_k,
        paced_preview_share: paced_share,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Peak resident set size of this process in MiB, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

impl BenchReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let rows: Vec<(&str, String)> = vec![
            (
                "bundle",
                format!("{} ({}, {} tokens)", self.bundle, self.variant, self.tokens),
            ),
            (
                "provider",
                format!(
                    "{} (ONNX Runtime {}, {} threads)",
                    self.provider, self.onnxruntime, self.threads
                ),
            ),
            (
                "settings",
                format!(
                    "{} sampler, steps {}, temperature {}, cache {}, {} images x {} runs, batch <= {}",
                    self.sampler,
                    self.steps,
                    self.temperature,
                    self.cache
                        .map_or_else(|| "off".to_string(), |n| format!("every {n} calls")),
                    self.count,
                    self.runs,
                    self.max_batch
                ),
            ),
            (
                "work per image",
                format!("{:.2} full transformer passes", self.full_passes_per_image),
            ),
            ("load", format!("{:.3} s", self.load_s)),
            ("first image", format!("{:.3} s after load", self.first_image_s)),
            (
                "per image",
                format!("{:.2} ms ({:.1} images/s)", self.per_image_ms, self.images_per_s),
            ),
            (
                "transformer calls",
                format!(
                    "{:.1} per run vs {:.0} in the reference loop ({:.1} rows/call)",
                    self.transformer_calls, self.reference_calls, self.rows_per_call
                ),
            ),
            (
                "per call",
                format!(
                    "{:.3} ms (isolated forward {:.3} ms)",
                    self.per_call_ms, self.isolated_forward_ms
                ),
            ),
            ("decode", format!("{:.3} ms per image", self.decode_per_image_ms)),
            (
                "runner overhead",
                format!("{:.1}% of run time outside ONNX Runtime", 100.0 * self.runner_overhead),
            ),
            ("predicted/measured", format!("{:.3}", self.predicted_over_measured)),
            (
                "live previews",
                format!(
                    "{:.3} ms each; after every call +{:.0}% of the run, paced 1 per {:.1} calls +{:.0}%",
                    self.preview_ms,
                    100.0 * self.preview_every_call_share,
                    self.paced_calls_per_preview,
                    100.0 * self.paced_preview_share
                ),
            ),
            (
                "peak RSS",
                self.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0} MiB")),
            ),
        ];
        rows.iter().map(|(k, v)| format!("{k:>20}  {v}\n")).collect()
    }
}
