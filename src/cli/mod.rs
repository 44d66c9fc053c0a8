//! The commands of the `absorb` binary, one file per group: each builds a [`absorb::Job`] from
//! its flags (`args.rs`), runs it with [`absorb::Pipeline::run`] and writes what it made. This
//! file holds what several commands share: finding and loading the bundle, the progress bar,
//! timing logs, atomic writes.

pub mod args;
pub mod edit;
pub mod generate;
pub mod serve;
pub mod shard;
pub mod tokens;
pub mod tools;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use absorb::image;
use absorb::{Pipeline, RuntimeOptions, Timings};

use absorb::Param;
use args::{Common, FrameArgs};

/// The bundled default model: `models/digits` under the working directory, else under the
/// source tree this binary was built from.
pub fn model_dir(common: &Common) -> PathBuf {
    if let Some(m) = common.model.first() {
        return m.clone();
    }
    let local = PathBuf::from("models/digits");
    if local.join("model.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits")
}

/// The runtime options of `common`'s flags.
pub fn runtime_options(common: &Common) -> RuntimeOptions {
    RuntimeOptions {
        ort_lib: common.ort_lib.clone(),
        threads: common.threads,
    }
}

/// The provider settings of `common`'s flags, with TensorRT profiles covering batches up to
/// `max_batch` and decoder grids up to `max_grid`.
pub fn provider_config(common: &Common, max_batch: usize, max_grid: Option<[usize; 2]>) -> absorb::ProviderConfig {
    absorb::ProviderConfig {
        provider: common.provider,
        fp16: common.fp16,
        cache_dir: common.cache_dir.clone(),
        max_batch,
        device_id: common.device,
        variant: common.variant.clone(),
        max_grid,
    }
}

/// Loads the bundle with the default batch size.
pub fn load(common: &Common) -> Result<Pipeline> {
    load_grid(common, absorb::DEFAULT_MAX_BATCH, None)
}

/// Loads the bundle with profiles for `max_batch` and `max_grid` (see [`provider_config`]).
pub fn load_grid(common: &Common, max_batch: usize, max_grid: Option<[usize; 2]>) -> Result<Pipeline> {
    let dir = model_dir(common);
    let config = provider_config(common, max_batch, max_grid);
    Pipeline::load_with(&dir, &runtime_options(common), &config)
        .with_context(|| format!("loading the model from {}", dir.display()))
}

/// The given seed, or a fresh one (printed by the caller).
pub fn seed_or_fresh(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(absorb::fresh_seed)
}

/// A progress bar in tokens revealed, on stderr only when it is a terminal.
pub fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {elapsed}") {
        bar.set_style(style);
    }
    bar
}

/// Runs `job` with a progress bar in tokens revealed (on a terminal); returns what it made and
/// how long the run took.
pub fn run_with_progress(p: &mut Pipeline, job: &absorb::Job) -> Result<(absorb::Made, Duration)> {
    let bar = progress(job.masked_tokens(p.bundle()) as u64);
    let start = std::time::Instant::now();
    let made = p.run(
        job,
        &mut absorb::Progress::steps(&mut |r: &absorb::sampler::StepReport| bar.inc(r.revealed as u64)),
    )?;
    bar.finish_and_clear();
    Ok((made, start.elapsed()))
}

/// `-v`: where the time of a run went.
pub fn log_timings(p: &Pipeline, t: &Timings, sampled: Duration, count: usize) {
    log::info!(
        "load {:.1?}; sampling {:.1?} for {count} images: {} transformer calls {:.1?} ({:.2?}/call), sampler {:.1?}; decode {:.1?}",
        p.load_time(),
        sampled,
        t.transformer_calls,
        t.transformer,
        t.transformer.checked_div(t.transformer_calls.max(1) as u32).unwrap_or_default(),
        t.sampler,
        t.decode
    );
}

/// Writes `--frames` when the run made them.
pub fn write_frames(args: &FrameArgs, made: &absorb::Made) -> Result<()> {
    let (Some(path), Some(frames)) = (&args.frames, &made.frames) else {
        return Ok(());
    };
    let format = image::AnimationFormat::from_path(path, Param::Frames)?;
    let bytes = image::animation_bytes(frames, format, args.frame_ms, 1500)?;
    write_atomic(path, &bytes)?;
    eprintln!("wrote {} ({} frames)", path.display(), frames.len());
    Ok(())
}

/// Checks that the directory an output file goes into exists (a usage error otherwise, before
/// any work is done).
pub fn check_out_dir(out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if !dir.is_dir() {
        return Err(absorb::Error::param(
            Param::Out,
            format!("{}: the directory {} does not exist", out.display(), dir.display()),
        )
        .into());
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(absorb::atomic::write(path, bytes, absorb::atomic::Temp::FILE)?)
}
