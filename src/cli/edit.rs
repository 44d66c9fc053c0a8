//! `absorb inpaint` and `absorb outpaint`: an image and where to regenerate or extend it,
//! made into a job; the image's known tokens never change.

use anyhow::{bail, Context, Result};

use absorb::image;
use absorb::{spec, InpaintSpec, OutpaintSpec};

use super::args::{InpaintArgs, OutpaintArgs};
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
