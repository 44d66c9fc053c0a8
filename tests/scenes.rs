//! The scenes bundle (`models/scenes`): a colour model of stationary images (galaxies, grass,
//! gravel, brick), where windows of a larger grid overlap and vote. On the real graphs: a wide image
//! without seams at the window edges, outpainting that keeps a held-out crop (its border no worse
//! than measured), inpainting that changes only the painted tokens, and the determinism contract for colour.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use absorb::image::{self, Pixels};
use absorb::job::{self, Canvas, Job, Made, Sampling};
use absorb::{GenerateSpec, InpaintSpec, OutpaintSpec};
use absorb::{Pipeline, Progress, Provider, RuntimeOptions};

fn scenes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes")
}

/// One pipeline per test binary (ONNX Runtime allows one environment per process).
fn pipeline() -> MutexGuard<'static, Pipeline> {
    static P: OnceLock<Mutex<Pipeline>> = OnceLock::new();
    P.get_or_init(|| {
        Mutex::new(Pipeline::load(&scenes(), &RuntimeOptions::default(), Provider::Cpu).expect("load models/scenes"))
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

fn quality() -> serde_json::Value {
    let text = std::fs::read_to_string(scenes().join("eval/quality.json")).expect("eval/quality.json");
    serde_json::from_str(&text).expect("quality.json is JSON")
}

/// The seam bar the bundle was measured against (`seams.bar`, 1.3).
fn bar() -> f64 {
    quality()["seams"]["bar"].as_f64().expect("seams.bar")
}

/// Images `0..count` of `seed` on `canvas` with the bundle's sampling.
fn generate(b: &absorb::Bundle, seed: u64, count: usize, canvas: Canvas) -> absorb::Result<Job> {
    GenerateSpec {
        seed,
        count,
        canvas,
        ..GenerateSpec::default()
    }
    .job(b)
}

fn run(p: &mut Pipeline, job: &Job) -> Made {
    p.run(job, &mut Progress::steps(&mut |_| {})).expect("run")
}

fn heldout(n: usize) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(scenes().join("eval/heldout"))
        .expect("eval/heldout")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    // every source: the crops are in a seeded order, so take them spread over the list
    let step = (v.len() / n).max(1);
    v.into_iter().step_by(step).take(n).collect()
}

/// Mean absolute difference (over channels and along the line) between the pixel lines on
/// either side of each boundary `k` (between lines k - 1 and k), per axis: columns, then rows.
fn line_diffs(p: &Pixels) -> [Vec<f64>; 2] {
    let (c, h, w) = (p.channels, p.height, p.width);
    let at = |y: usize, x: usize, ch: usize| p.data[(y * w + x) * c + ch] as f64;
    let cols = (0..w)
        .map(|x| {
            if x == 0 {
                return 0.0;
            }
            let s: f64 = (0..h)
                .flat_map(|y| (0..c).map(move |ch| (y, ch)))
                .map(|(y, ch)| (at(y, x, ch) - at(y, x - 1, ch)).abs())
                .sum();
            s / (h * c) as f64
        })
        .collect();
    let rows = (0..h)
        .map(|y| {
            if y == 0 {
                return 0.0;
            }
            let s: f64 = (0..w)
                .flat_map(|x| (0..c).map(move |ch| (x, ch)))
                .map(|(x, ch)| (at(y, x, ch) - at(y - 1, x, ch)).abs())
                .sum();
            s / (w * c) as f64
        })
        .collect();
    [cols, rows]
}

/// The seam measure of export/judge.py: mean difference across the `edges` (pixel lines per axis,
/// `[columns, rows]`) over the same at every other token boundary. 1.0: no seam.
fn seam_ratio(images: &[Pixels], token: usize, edges: &[Vec<usize>; 2]) -> f64 {
    let (mut e, mut en, mut o, mut on) = (0.0, 0usize, 0.0, 0usize);
    for p in images {
        let d = line_diffs(p);
        for a in 0..2 {
            let side = [p.width, p.height][a];
            for k in (token..side).step_by(token) {
                if edges[a].contains(&k) {
                    (e, en) = (e + d[a][k], en + 1);
                } else {
                    (o, on) = (o + d[a][k], on + 1);
                }
            }
        }
    }
    assert!(en > 0 && on > 0, "no edges ({en}) or no other boundaries ({on})");
    (e / en as f64) / (o / on as f64)
}

/// Pixel lines where windows start or end, excluding the image's own border.
fn window_edges(offsets: &[[usize; 2]], window: [usize; 2], token: usize, size: [usize; 2]) -> [Vec<usize>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for o in offsets {
        for (a, axis) in [(0, 1), (1, 0)] {
            // a: 0 = columns (offset index 1), 1 = rows (offset index 0)
            for line in [o[axis] * token, (o[axis] + window[axis]) * token] {
                if line > 0 && line < size[a] && !out[a].contains(&line) {
                    out[a].push(line);
                }
            }
        }
    }
    out
}

#[test]
fn the_seam_measure_sees_a_step_at_window_edges() {
    // A flat-noise image with every other 16-pixel band brighter: the measure must call it a seam.
    let (w, h) = (128, 64);
    let mut data = Vec::with_capacity(w * h * 3);
    let mut state = 12345u32;
    for _y in 0..h {
        for x in 0..w {
            for _ in 0..3 {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (state >> 24) as usize % 40;
                data.push((100 + noise + if (x / 16) % 2 == 1 { 60 } else { 0 }) as u8);
            }
        }
    }
    let p = Pixels {
        channels: 3,
        height: h,
        width: w,
        data,
    };
    let edges = [(16..w).step_by(16).collect(), Vec::new()];
    assert!(seam_ratio(std::slice::from_ref(&p), 4, &edges) > 2.0);
    let none = [(16..w).step_by(16).collect(), vec![]];
    let mut flat = p.clone();
    for (i, v) in flat.data.iter_mut().enumerate() {
        if ((i / 3) % w / 16) % 2 == 1 {
            *v -= 60;
        }
    }
    let r = seam_ratio(std::slice::from_ref(&flat), 4, &none);
    assert!((0.8..1.25).contains(&r), "noise alone: {r}");
}

#[test]
fn a_wide_image_from_overlapping_windows_has_no_visible_seams() {
    let mut p = pipeline();
    let b = p.bundle();
    let window = b.manifest().grid();
    let token = b.manifest().token_pixels()[1];
    let grid = [2 * window[0], 4 * window[1]]; // 2x taller, 4x wider than trained
    let canvas = Canvas {
        grid: Some(grid),
        ..Canvas::default()
    };
    let job = generate(b, 11, 8, canvas).unwrap();
    let tiling = job.tiling().cloned().expect("a larger grid has windows");
    assert!(
        tiling.stride()[1] < window[1],
        "the bundle's windows must overlap: stride {:?}",
        tiling.stride()
    );
    let made = run(&mut p, &job);
    let size = [grid[1] * token, grid[0] * token];
    let edges = window_edges(tiling.offsets(), window, token, size);
    let ratio = seam_ratio(&made.pixels, token, &edges);
    eprintln!(
        "{}x{} px, stride {:?} margin {:?}: seam ratio {ratio:.3} (recorded {})",
        size[0],
        size[1],
        tiling.stride(),
        tiling.margin(),
        quality()["seams"]["ratio"]
    );
    assert!(
        ratio < bar(),
        "seam ratio {ratio:.3} at the window edges is above {}",
        bar()
    );

    // The same grid in windows that do not overlap (each window alone): printed for comparison.
    let apart = Canvas {
        stride: Some(window),
        window_margin: Some([0, 0]),
        ..canvas
    };
    let job = generate(p.bundle(), 11, 8, apart).unwrap();
    let t = job.tiling().cloned().unwrap();
    let made = run(&mut p, &job);
    let r = seam_ratio(&made.pixels, token, &window_edges(t.offsets(), window, token, size));
    eprintln!("windows side by side, no overlap: seam ratio {r:.3}");
}

#[test]
fn outpainting_a_heldout_crop_keeps_its_pixels_and_tokens_and_its_border_is_no_worse_than_measured() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let token = p.bundle().manifest().token_pixels()[0];
    let pad = p.bundle().manifest().grid()[0] / 2 * token;
    let edge = p.bundle().manifest().sampling.outpaint_edge.unwrap_or(0);
    let mut all = Vec::new();
    for (i, path) in heldout(8).iter().enumerate() {
        let input = image::load_image(path, &spec).unwrap();
        let original = image::to_pixels(&input, spec.range);
        let job = OutpaintSpec {
            seed: 100 + i as u64,
            ..OutpaintSpec::new(input, [pad; 4])
        }
        .job(p.bundle())
        .unwrap();
        let mut made = run(&mut p, &job);
        // The input's tokens are kept but the bundle's edge along the four extended sides.
        let (own, kgrid) = p.encode(&image::load_image(path, &spec).unwrap()).unwrap();
        let at = pad / token;
        for r in 0..kgrid[0] {
            for c in 0..kgrid[1] {
                if !job::outpaint_edge_token(r, c, kgrid, [pad; 4], edge) {
                    assert_eq!(
                        made.tokens[0][(at + r) * made.grid[1] + at + c],
                        own[r * kgrid[1] + c],
                        "{}: the input's token ({r}, {c}) changed",
                        path.display()
                    );
                }
            }
        }
        let out = made.pixels.remove(0);
        assert_eq!((out.width, out.height), (spec.width + 2 * pad, spec.height + 2 * pad));
        for y in 0..spec.height {
            let row = |x: usize| ((y + pad) * out.width + x + pad) * 3;
            assert_eq!(
                &out.data[row(0)..row(spec.width)],
                &original.data[y * spec.width * 3..(y + 1) * spec.width * 3],
                "{}: row {y} of the input changed",
                path.display()
            );
        }
        all.push(out);
    }
    let lines = vec![pad, pad + spec.width];
    let ratio = seam_ratio(&all, token, &[lines.clone(), lines]);
    // The shipped model does not reach the seam bar here yet (the kept input pixels are sharper
    // than its decoder's, and its prior follows the context weakly): the runtime must reproduce
    // what the bundle was measured to do (16 crops at export, 8 here), not be worse.
    let recorded = quality()["outpaint"]["ratio"].as_f64().expect("outpaint.ratio");
    eprintln!(
        "outpainted border seam ratio {ratio:.3} (recorded {recorded:.3}, bar {})",
        bar()
    );
    assert!(
        ratio < recorded * 1.25,
        "the input's border shows more than measured at export: seam ratio {ratio:.3}, recorded {recorded:.3}"
    );
}

#[test]
fn inpainting_a_heldout_crop_changes_only_the_painted_tokens_and_repeats_byte_for_byte() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let path = &heldout(1)[0];
    let input = image::load_image(path, &spec).unwrap();
    let original = image::to_pixels(&input, spec.range);
    let (s, q) = (spec.width, spec.width / 4);
    let mask = image::rect_mask([q, q, s / 2, s / 2], s, s).unwrap();
    let make = |p: &mut Pipeline| {
        let job = InpaintSpec {
            seed: 5,
            ..InpaintSpec::new(input.clone(), mask.clone())
        }
        .job(p.bundle())
        .unwrap();
        run(p, &job).pixels.remove(0)
    };
    let a = make(&mut p);
    let b = make(&mut p);
    assert_eq!(a.data, b.data, "the same seed gave other bytes");
    let (mut inside, mut changed) = (0, 0);
    for y in 0..s {
        for x in 0..s {
            let i = (y * s + x) * 3;
            let painted = (q..q + s / 2).contains(&x) && (q..q + s / 2).contains(&y);
            if painted {
                inside += 1;
                changed += usize::from(a.data[i..i + 3] != original.data[i..i + 3]);
            } else {
                assert_eq!(
                    a.data[i..i + 3],
                    original.data[i..i + 3],
                    "pixel {x},{y} outside the mask changed"
                );
            }
        }
    }
    assert!(
        changed * 2 > inside,
        "only {changed} of {inside} painted pixels were regenerated"
    );
}

#[test]
fn colour_tokens_for_a_seed_do_not_depend_on_batching() {
    let mut p = pipeline();
    let canvas = Canvas {
        grid: Some([8, 16]),
        ..Canvas::default()
    };
    let mut tokens = Vec::new();
    for batch in [1, 16] {
        let job = GenerateSpec {
            seed: 3,
            count: 4,
            canvas,
            max_batch: batch,
            ..GenerateSpec::default()
        }
        .job(p.bundle())
        .unwrap();
        tokens.push(run(&mut p, &job).tokens);
    }
    assert_eq!(tokens[0], tokens[1]);
}

#[test]
fn an_unconditional_bundle_takes_no_class_and_draws_none() {
    let mut p = pipeline();
    assert_eq!(p.classes(), 0);
    let s = Sampling {
        class: Some(0),
        ..Sampling::default()
    };
    let e = GenerateSpec {
        sampling: s,
        ..GenerateSpec::default()
    }
    .job(p.bundle())
    .unwrap_err()
    .to_string();
    assert!(e.contains("not class-conditional"), "{e}");
    let e = job::class_index(p.bundle(), "0").unwrap_err().to_string();
    assert!(e.contains("not class-conditional"), "{e}");
    let job = generate(p.bundle(), 0, 2, Canvas::default()).unwrap();
    assert_eq!(run(&mut p, &job).classes, vec![None, None]);
    let mask = p.bundle().manifest().token_space().mask_id;
    let mut logits = Vec::new();
    let e = p.forward(&[mask; 64], &[0], &mut logits).unwrap_err().to_string();
    assert!(e.contains("class 0 given to a transformer of 0 classes"), "{e}");
}
