//! `absorb generate`: images from all-masked grids into one PNG (a sheet when there are
//! several) or, for a directory, one PNG per image, sharded and resumable (`absorb::batch`).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use absorb::image::{self, Metadata};
use absorb::sampler::StepReport;
use absorb::{Bundle, GenerateSpec, ImageId, Job, Pipeline, Progress};

use super::args::GenerateArgs;
use super::{load_grid, log_timings, progress, run_with_progress, seed_or_fresh, write_atomic, write_frames};
use absorb::Param;

pub fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(path) = &a.frames.frames {
        image::AnimationFormat::from_path(path, Param::Frames)?;
        super::check_out_dir(path)?;
    }
    if let Some(path) = &a.tokens_out {
        super::check_out_dir(path)?;
    }
    let dir_output = is_dir_output(&a.out)?;
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let seeded = a.sampling.seed.is_some() || a.from.is_some();
    let shard = super::shard::resolve_shard(a.shard, a.shards, dir_output, seeded, &env)?;
    let max_grid = a.grid.or(a.size.map(|[w, h]| [h, w]));
    let mut p = load_grid(&a.common, a.max_batch, max_grid)?;
    let provider = p.provider().to_string();
    let spec = match &a.from {
        Some(png) => GenerateSpec::from_metadata(p.bundle(), &provider, png, &image::read_metadata(png)?)?,
        None => GenerateSpec {
            seed: seed_or_fresh(a.sampling.seed),
            first_index: a.first_index,
            count: a.count,
            sampling: a.sampling.sampling(p.bundle())?,
            canvas: a.windows.canvas(requested_grid(p.bundle(), a.grid, a.size)?),
            columns: a.columns,
            ..GenerateSpec::default()
        },
    };
    let job = GenerateSpec {
        max_batch: a.max_batch,
        frames: a.frames.frames.is_some(),
        ..spec
    }
    .job(p.bundle())?;
    eprintln!("seed {}", job.seed());
    if dir_output {
        return generate_dir(&mut p, &a, &job, shard);
    }
    job.check_sheet(p.bundle())?;
    let (made, sampled) = run_with_progress(&mut p, &job)?;
    let count = job.images().len();
    if let Some(path) = &a.tokens_out {
        write_tokens(
            p.bundle(),
            path,
            job.seed(),
            job.images()[0].index,
            made.grid,
            &made.tokens,
        )?;
    }
    write_frames(&a.frames, &made)?;
    let meta = job.metadata(p.bundle(), &provider, 0, count);
    let img = if count == 1 {
        made.pixels[0].clone()
    } else {
        image::grid(&made.pixels, job.columns())
    };
    image::write_png(&a.out, &img, Some(&meta))?;
    eprintln!("wrote {}", a.out.display());
    log_timings(&p, &made.timings, sampled, count);
    Ok(())
}

/// A directory (existing, or a path ending in `/`) or a `.png` file.
fn is_dir_output(out: &Path) -> Result<bool> {
    let s = out.to_string_lossy();
    if out.is_dir() || s.ends_with('/') {
        Ok(true)
    } else if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        super::check_out_dir(out)?;
        Ok(false)
    } else {
        Err(absorb::Error::param(
            Param::Out,
            format!("{s} must end in .png or name a directory (end it with /)"),
        )
        .into())
    }
}

/// The token grid a request asks for: `--grid`, `--size` in pixels, or `None` for the bundle's.
fn requested_grid(bundle: &Bundle, grid: Option<[usize; 2]>, size: Option<[usize; 2]>) -> Result<Option<[usize; 2]>> {
    let Some([w, h]) = size else {
        return Ok(grid);
    };
    let f = bundle.manifest().token_pixels();
    let max = bundle.manifest().max_grid_side();
    let (max_w, max_h) = (max[1] * f[1], max[0] * f[0]);
    if w > max_w || h > max_h {
        bail!(absorb::Error::param(
            Param::Size,
            format!("{w}x{h} (width x height) is above the limit of {max_w}x{max_h} pixels")
        ));
    }
    let spec = &bundle.manifest().image;
    if w < spec.width || h < spec.height {
        bail!(absorb::Error::param(
            Param::Size,
            format!(
                "{w}x{h} (width x height) is smaller than the bundle's {}x{} images",
                spec.width, spec.height
            )
        ));
    }
    if h % f[0] != 0 || w % f[1] != 0 {
        bail!(absorb::Error::param(
            Param::Size,
            format!(
                "{w}x{h} is not a whole number of tokens: width and height must be multiples of {}x{} pixels",
                f[1], f[0]
            )
        ));
    }
    Ok(Some([h / f[0], w / f[1]]))
}

/// `generate --out DIR/`: one shard (or all) of the job, resumable, with a manifest
/// (`absorb::batch`); each PNG holds one image, made as the job's own would be.
fn generate_dir(p: &mut Pipeline, a: &GenerateArgs, job: &Job, shard: Option<absorb::batch::Shard>) -> Result<()> {
    if job.records_frames() {
        // A resumed run samples only the images it lacks: a preview of those would be partial.
        bail!(absorb::Error::param(
            Param::Frames,
            "previews go with a .png output, not a directory: make the preview in a run of its own"
        ));
    }
    let (seed, first, count) = (job.seed(), job.images()[0].index, job.images().len() as u64);
    let shard = shard.unwrap_or(absorb::batch::Shard::WHOLE);
    let indices = shard.indices(first, count);
    if shard != absorb::batch::Shard::WHOLE {
        eprintln!(
            "shard {shard}: images {}..{} of {first}..{}",
            indices.start,
            indices.end,
            first + count
        );
    }
    let grid = job.grid(p.bundle());
    let f = p.bundle().manifest().token_pixels();
    let mut image = p.bundle().manifest().image.clone();
    (image.height, image.width) = (f[0] * grid[0], f[1] * grid[1]);
    let req = absorb::batch::Request {
        dir: &a.out,
        seed,
        first,
        count,
        shard,
        chunk: job.max_batch(),
        image: &image,
        make_kept: a.tokens_out.is_some(),
    };
    // What every PNG of the job carries but for its index.
    let template = job.metadata(p.bundle(), &p.provider().to_string(), 0, 1);
    let metadata = |index: u64| Metadata {
        index: Some(index),
        ..template.clone()
    };
    let bar = progress((indices.end - indices.start) * (grid[0] * grid[1]) as u64);
    let mut timings = absorb::Timings::default();
    let mut tokens = Vec::new();
    let mut make = |indices: &[u64]| -> absorb::Result<Vec<image::Pixels>> {
        // Each image is the same whatever else is made with it.
        let part = job.with_images(indices.iter().map(|&index| ImageId { seed, index }).collect())?;
        let made = p.run(
            &part,
            &mut Progress::steps(&mut |r: &StepReport| bar.inc(r.revealed as u64)),
        )?;
        timings.add(&made.timings);
        if a.tokens_out.is_some() {
            tokens.extend(made.tokens);
        }
        Ok(made.pixels)
    };
    let mut summary = absorb::batch::Summary::default();
    let start = Instant::now();
    let result = absorb::batch::write(&req, &metadata, &mut make, &mut summary);
    bar.finish_and_clear();
    eprintln!("{}: {summary}", a.out.display());
    result.with_context(|| format!("writing shard {shard} into {}", a.out.display()))?;
    if let Some(path) = &a.tokens_out {
        write_tokens(p.bundle(), path, seed, indices.start, grid, &tokens)?;
    }
    log_timings(
        p,
        &timings,
        start.elapsed(),
        summary.made + summary.regenerated + summary.foreign,
    );
    Ok(())
}

/// `--tokens-out`: the token grids of images `first..` as JSON.
fn write_tokens(
    bundle: &Bundle,
    path: &Path,
    seed: u64,
    first: u64,
    grid: [usize; 2],
    tokens: &[Vec<i64>],
) -> Result<()> {
    let images: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"index": first + i as u64, "tokens": t.chunks(grid[1]).collect::<Vec<_>>()}))
        .collect();
    let json = serde_json::json!({
        "bundle": bundle.manifest().name, "bundle_sha256": bundle.sha256(), "seed": seed,
        "height": grid[0], "width": grid[1], "images": images,
    });
    write_atomic(path, serde_json::to_string(&json)?.as_bytes())
}
