//! `absorb inpaint`, `absorb outpaint` and `absorb vary`: an image and where to regenerate or
//! extend it (or how much of it to redo), made into a job.

use anyhow::{bail, Context, Result};

use absorb::image;
use absorb::{spec, InpaintSpec, OutpaintSpec, VarySpec};

use super::args::{InpaintArgs, OutpaintArgs, VaryArgs};
use super::{load, load_grid, log_timings, model_dir, run_with_progress, seed_or_fresh, write_frames};
use absorb::Param;

pub fn inpaint(a: InpaintArgs) -> Result<()> {
    super::check_out_dir(&a.out)?;
    let mut p = load(&a.common)?;
    let spec = p.bundle().manifest().image.clone();
    let input = image::load_image(&a.image, &spec)?;
    let mask = match (&a.mask, a.rect) {
        (Some(path), _) => image::load_mask(path, spec.width, spec.height)?,
        (None, Some(rect)) => image::rect_mask(rect, spec.width, spec.height)?,
        (None, None) => bail!(absorb::Error::param(Param::Mask, "give --mask FILE or --rect x,y,w,h")),
    };
    let seed = seed_or_fresh(a.sampling.seed);
    let job = InpaintSpec {
        seed,
        sampling: a.sampling.sampling(p.bundle())?,
        keep_input: !a.decode_all,
        ..InpaintSpec::new(input, mask)
    }
    .job(p.bundle())?;
    eprintln!("seed {seed}");
    let masked = job.masked_tokens(p.bundle());
    let (made, took) = run_with_progress(&mut p, &job)?;
    let meta = job.metadata(p.bundle(), &p.provider().to_string(), 0, 1);
    image::write_png(&a.out, &made.pixels[0], Some(&meta))?;
    let total = made.grid[0] * made.grid[1];
    eprintln!("regenerated {masked} of {total} tokens; wrote {}", a.out.display());
    log_timings(&p, &made.timings, took, 1);
    Ok(())
}

pub fn outpaint(a: OutpaintArgs) -> Result<()> {
    super::check_out_dir(&a.out)?;
    if let Some(path) = &a.frames.frames {
        image::AnimationFormat::from_path(path, Param::Frames)?;
    }
    // The manifest first: the grid (and TensorRT's decoder profile) depends on the image size.
    let (manifest, _) = absorb::bundle::read_manifest(&model_dir(&a.common))?;
    let spec = manifest.image.clone();
    let token_px = manifest.token_pixels();
    let side = absorb::limits::MAX_GRID_SIDE;
    let input = image::load_image_any(&a.image, &spec, [side * token_px[1], side * token_px[0]])?;
    let (grid, _) = spec::outpaint_grid(
        [input.height, input.width],
        token_px,
        a.extend,
        absorb::limits::MAX_GRID_SIDE,
    )?;
    let mut p = load_grid(&a.common, a.max_batch, Some(grid))?;
    let seed = seed_or_fresh(a.sampling.seed);
    let (width, height) = (input.width, input.height);
    let canvas = a.windows.canvas(Some(grid));
    let job = OutpaintSpec {
        seed,
        sampling: a.sampling.sampling(p.bundle())?,
        canvas,
        keep_input: !a.decode_all,
        edge: a.outpaint_edge,
        frames: a.frames.frames.is_some(),
        max_batch: a.max_batch,
        ..OutpaintSpec::new(input, a.extend)
    }
    .job(p.bundle())?;
    eprintln!("seed {seed}");
    let masked = job.masked_tokens(p.bundle());
    let (made, took) = run_with_progress(&mut p, &job)?;
    write_frames(&a.frames, &made)?;
    let pixels = made.pixels.first().context("outpainting made no image")?;
    let meta = job.metadata(p.bundle(), &p.provider().to_string(), 0, 1);
    image::write_png(&a.out, pixels, Some(&meta))?;
    let windows = job.tiling().map_or(1, |t| t.windows());
    eprintln!(
        "extended {width}x{height} to {}x{} ({masked} tokens sampled, {windows} windows); wrote {}",
        pixels.width,
        pixels.height,
        a.out.display()
    );
    log_timings(&p, &made.timings, took, 1);
    Ok(())
}

pub fn vary(a: VaryArgs) -> Result<()> {
    super::check_out_dir(&a.out)?;
    if !a.out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        bail!(absorb::Error::param(
            Param::Out,
            format!("{} must end in .png", a.out.display())
        ));
    }
    let mut p = super::load_grid(&a.common, a.max_batch, None)?;
    let spec = p.bundle().manifest().image.clone();
    let input = image::load_image(&a.image, &spec)?;
    // The file as it was decoded: its sha256 goes into the metadata.
    let source = std::fs::read(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    let provider = p.provider().to_string();
    let spec = match &a.from {
        Some(png) => VarySpec::from_metadata(p.bundle(), &provider, png, &image::read_metadata(png)?, input, &source)?,
        None => VarySpec {
            strength: a.strength,
            seed: seed_or_fresh(a.sampling.seed),
            first_index: a.first_index,
            count: a.count,
            sampling: a.sampling.sampling(p.bundle())?,
            columns: a.columns,
            ..VarySpec::new(input, &source)
        },
    };
    let job = VarySpec {
        max_batch: a.max_batch,
        ..spec
    }
    .job(p.bundle())?;
    job.check_sheet(p.bundle())?;
    eprintln!("seed {}", job.seed());
    let count = job.images().len();
    let masked = job.masked_tokens(p.bundle()) / count.max(1);
    let (made, took) = run_with_progress(&mut p, &job)?;
    let meta = job.metadata(p.bundle(), &provider, 0, count);
    let img = if count == 1 {
        made.pixels[0].clone()
    } else {
        image::grid(&made.pixels, job.columns())
    };
    image::write_png(&a.out, &img, Some(&meta))?;
    let total = made.grid[0] * made.grid[1];
    eprintln!(
        "redid {masked} of {total} tokens in each of {count} variation(s); wrote {}",
        a.out.display()
    );
    log_timings(&p, &made.timings, took, count);
    Ok(())
}
