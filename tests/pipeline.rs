//! The library API on the real bundled graphs: contract, shapes, determinism, inpainting,
//! round-trip quality and sample quality judged by the bundle's classifier.

mod common;

use absorb::image::{self, Tensor};
use absorb::job::{Canvas, Job, Sampling};
use absorb::preview::Pacer;
use absorb::{FillSpec, GenerateSpec, InpaintSpec, Made, OutpaintSpec, Pipeline, PreviewSink, Progress};
use common::{judge, pipeline, quality, DIGITS};

fn run(p: &mut Pipeline, job: &Job) -> absorb::Result<Made> {
    p.run(job, &mut Progress::steps(&mut |_| {}))
}

fn sampling(steps: Option<usize>, temperature: Option<f32>) -> Sampling {
    Sampling {
        steps,
        temperature,
        ..Sampling::default()
    }
}

/// A generate job of images `indices` under `seed` on `canvas`, `batch` images per call.
fn generate_job(
    p: &Pipeline,
    seed: u64,
    indices: std::ops::Range<u64>,
    sampling: &Sampling,
    canvas: &Canvas,
    batch: usize,
) -> Job {
    GenerateSpec {
        seed,
        first_index: indices.start,
        count: (indices.end - indices.start) as usize,
        sampling: *sampling,
        canvas: *canvas,
        max_batch: batch,
        ..GenerateSpec::default()
    }
    .job(p.bundle())
    .unwrap()
}

fn generate(
    seed: u64,
    indices: std::ops::Range<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    batch: usize,
) -> Vec<Vec<i64>> {
    let mut p = pipeline();
    let job = generate_job(
        &p,
        seed,
        indices,
        &sampling(steps, temperature),
        &Canvas::default(),
        batch,
    );
    run(&mut p, &job).unwrap().tokens
}

/// Decoded images of the bundle's size, as tensors.
fn decode(tokens: &[Vec<i64>]) -> Vec<Tensor> {
    let mut p = pipeline();
    let grid = p.bundle().manifest().grid();
    let job = Job::decode(p.bundle(), grid, tokens.to_vec())
        .unwrap()
        .with_max_batch(64)
        .unwrap();
    let made = run(&mut p, &job).unwrap();
    tensors(&p, &made)
}

fn tensors(p: &Pipeline, made: &Made) -> Vec<Tensor> {
    let spec = &p.bundle().manifest().image;
    made.pixels.iter().map(|px| image::to_tensor(px, spec)).collect()
}

#[test]
fn generated_grids_and_images_have_the_bundle_shapes() {
    let tokens = generate(1, 0..3, None, None, 16);
    let p = pipeline();
    let space = p.bundle().manifest().token_space();
    let spec = p.bundle().manifest().image.clone();
    drop(p);
    assert_eq!(tokens.len(), 3);
    for t in &tokens {
        assert_eq!(t.len(), space.len);
        assert!(
            t.iter().all(|&x| (0..space.codebook_size as i64).contains(&x)),
            "only codes, no mask left"
        );
    }
    for img in decode(&tokens) {
        assert_eq!(
            (img.channels, img.height, img.width),
            (spec.channels, spec.height, spec.width)
        );
        assert!(img.data.iter().all(|v| v.is_finite()));
        let px = image::to_pixels(&img, spec.range);
        assert!(
            px.data.iter().any(|&v| v > 128) && px.data.iter().any(|&v| v < 64),
            "a digit: some ink, some background"
        );
    }
}

#[test]
fn same_seed_same_tokens_different_seed_different_tokens() {
    let a = generate(7, 0..4, None, None, 16);
    let b = generate(7, 0..4, None, None, 16);
    let c = generate(8, 0..4, None, None, 16);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a[0], a[1], "images of one request differ from each other");
}

#[test]
fn image_i_is_the_same_alone_and_inside_a_batch_of_8() {
    let batch = generate(11, 0..8, None, None, 8);
    let ones = generate(11, 0..8, None, None, 1);
    assert_eq!(batch, ones);
    for i in [0u64, 5] {
        let alone = generate(11, i..i + 1, None, None, 16);
        assert_eq!(alone[0], batch[i as usize], "image {i}");
    }
}

#[test]
fn inpainting_keeps_every_known_token_and_fills_the_masked_ones() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let (path, _) = &common::heldout()[3];
    let img = image::load_image(path, &spec).unwrap();
    let original = p.encode(&img).unwrap().0;
    let [h, w] = p.bundle().manifest().grid();
    // Regenerate the right half of the image.
    let mask = image::rect_mask(
        [spec.width / 2, 0, spec.width / 2, spec.height],
        spec.width,
        spec.height,
    )
    .unwrap();
    let token_mask = image::pool_mask(&mask, [h, w]);
    assert_eq!(token_mask.iter().filter(|&&m| m).count(), h * w / 2);
    let k = p.bundle().manifest().token_space().codebook_size as i64;
    let mut different = 0;
    for seed in 0..4 {
        let job = InpaintSpec {
            seed,
            ..InpaintSpec::new(img.clone(), mask.clone())
        }
        .job(p.bundle())
        .unwrap();
        let out = run(&mut p, &job).unwrap().tokens.remove(0);
        for i in 0..h * w {
            if token_mask[i] {
                assert!((0..k).contains(&out[i]));
                different += (out[i] != original[i]) as usize;
            } else {
                assert_eq!(out[i], original[i], "known token {i} changed (seed {seed})");
            }
        }
    }
    assert!(different > 0, "the masked half is resampled, not copied");
}

#[test]
fn an_empty_mask_is_an_error_naming_the_mask() {
    let p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let img = image::load_image(&common::heldout()[0].0, &spec).unwrap();
    let empty = image::Mask {
        height: spec.height,
        width: spec.width,
        data: vec![false; spec.height * spec.width],
    };
    let e = InpaintSpec::new(img, empty).job(p.bundle()).unwrap_err();
    assert!(e.to_string().starts_with("invalid mask"), "{e}");
    assert!(e.is_input_error());
}

fn psnr(a: &Tensor, b: &Tensor) -> f64 {
    let mse: f64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| ((x.clamp(0.0, 1.0) - y) as f64).powi(2))
        .sum::<f64>()
        / a.data.len() as f64;
    10.0 * (1.0 / mse.max(1e-12)).log10()
}

#[test]
fn encode_decode_round_trip_keeps_the_recorded_psnr() {
    let mut p = pipeline();
    let real = common::heldout_tensors(&p);
    let grids: Vec<Vec<i64>> = real.iter().map(|t| p.encode(t).unwrap().0).collect();
    drop(p);
    let rec = decode(&grids);
    let mean = real.iter().zip(&rec).map(|(a, b)| psnr(b, a)).sum::<f64>() / real.len() as f64;
    let recorded = quality()["heldout_png_psnr_db"].as_f64().expect("heldout_png_psnr_db");
    eprintln!("round-trip PSNR {mean:.2} dB (recorded {recorded:.2})");
    assert!(
        mean >= recorded - 0.5,
        "PSNR {mean:.2} dB is below the recorded {recorded:.2} dB minus 0.5"
    );
}

/// The quality recorded with the bundle (`eval/quality.json`): the samples' confidence ratio to
/// real digits measured at export (`bar.confidence_ratio`), less 0.05 for sampling noise (256
/// samples: one standard error of the mean confidence is about 0.02); every class present; no class
/// above `bar.max_class_fraction`. The export issue's own bar (0.85 x real) is printed, not asserted
/// here: the runtime's job is to reproduce what the bundle was measured to do.
fn meets_bar(samples_conf: f32, hist: &[usize; DIGITS], real_conf: f32) -> Result<(), String> {
    let bar = &quality()["bar"];
    let recorded = bar["confidence_ratio"].as_f64().expect("bar.confidence_ratio") as f32;
    let max_fraction = bar["max_class_fraction"].as_f64().expect("bar.max_class_fraction");
    let min_ratio = recorded - 0.05;
    let n: usize = hist.iter().sum();
    let ratio = samples_conf / real_conf;
    eprintln!(
        "ratio to real {ratio:.3} (recorded {recorded:.3}; export bar {})",
        bar["min_confidence_ratio"]
    );
    if ratio < min_ratio {
        return Err(format!(
            "mean confidence {samples_conf:.3} is {ratio:.3} x real {real_conf:.3} < {min_ratio:.3}"
        ));
    }
    if let Some(c) = hist.iter().position(|&h| h == 0) {
        return Err(format!("digit {c} never generated: {hist:?}"));
    }
    if let Some(c) = hist.iter().position(|&h| h as f64 > max_fraction * n as f64) {
        return Err(format!("digit {c} is over {max_fraction} of samples: {hist:?}"));
    }
    Ok(())
}

#[test]
fn samples_at_default_settings_meet_the_quality_bar_and_a_broken_temperature_does_not() {
    let real_conf = {
        let p = pipeline();
        let real = common::heldout_tensors(&p);
        judge(&p, &real).0
    };
    let good = decode(&generate(2024, 0..256, None, None, 64));
    let (conf, hist) = judge(&pipeline(), &good);
    eprintln!("real {real_conf:.3}; samples {conf:.3} {hist:?}");
    meets_bar(conf, &hist, real_conf).unwrap();

    let broken = decode(&generate(2024, 0..256, None, Some(50.0), 64));
    let (bconf, bhist) = judge(&pipeline(), &broken);
    eprintln!("temperature 50: {bconf:.3} {bhist:?}");
    assert!(
        meets_bar(bconf, &bhist, real_conf).is_err(),
        "temperature 50 must fail the bar"
    );
}

fn real_confidence() -> f32 {
    let p = pipeline();
    let real = common::heldout_tensors(&p);
    judge(&p, &real).0
}

#[test]
fn every_sampler_meets_the_bar_at_its_documented_steps_and_fails_at_temperature_50() {
    use absorb::sampler::SamplerKind;
    let real_conf = real_confidence();
    // The README's quality table (`make quality-table`: seed 0, 256 images): even at the bundle's
    // 64 steps, maskgit at 16 (absorbing: the test above).
    for (kind, steps) in [(SamplerKind::Even, 64), (SamplerKind::Maskgit, 16)] {
        let run = |temperature: Option<f32>| {
            let mut p = pipeline();
            let s = Sampling {
                sampler: Some(kind),
                ..sampling(Some(steps), temperature)
            };
            let job = generate_job(&p, 0, 0..256, &s, &Canvas::default(), 64);
            let t = run(&mut p, &job).unwrap().tokens;
            drop(p);
            let images = decode(&t);
            let (conf, hist) = judge(&pipeline(), &images);
            eprintln!(
                "{} at {steps} steps, temperature {temperature:?}: {conf:.3} {hist:?}",
                kind.name()
            );
            meets_bar(conf, &hist, real_conf)
        };
        run(None).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        assert!(
            run(Some(50.0)).is_err(),
            "{} at temperature 50 must fail the bar",
            kind.name()
        );
    }
}

/// Images `indices` of `seed` on the bundle's grid, `batch` per call.
fn make(p: &mut Pipeline, seed: u64, indices: std::ops::Range<u64>, s: &Sampling, batch: usize) -> Made {
    let job = generate_job(p, seed, indices, s, &Canvas::default(), batch);
    run(p, &job).unwrap()
}

#[test]
fn the_class_asked_for_is_the_digit_made_and_without_one_the_digits_take_turns() {
    let mut p = pipeline();
    assert_eq!(p.classes(), DIGITS, "the digits bundle is class-conditional");
    let mut asked = Vec::new();
    for c in 0..DIGITS {
        let s = Sampling {
            class: Some(c),
            ..Sampling::default()
        };
        let made = make(&mut p, 7, 0..16, &s, 16);
        assert!(made.classes.iter().all(|&k| k == Some(c)), "{:?}", made.classes);
        asked.push(tensors(&p, &made));
    }
    // Without a class: the classes spread over the images (each block of ten indices has every
    // digit once), the same alone as in a batch, and each image is the one its class asks for.
    let made = make(&mut p, 11, 0..64, &Sampling::default(), 64);
    let drawn: Vec<usize> = made.classes.iter().map(|c| c.expect("a drawn class")).collect();
    let alone = make(&mut p, 11, 9..10, &Sampling::default(), 1);
    assert_eq!((alone.classes[0], &alone.tokens[0]), (Some(drawn[9]), &made.tokens[9]));
    let asked_for = Sampling {
        class: Some(drawn[9]),
        ..Sampling::default()
    };
    let same = make(&mut p, 11, 9..10, &asked_for, 1);
    assert_eq!(same.tokens[0], made.tokens[9], "image 9 is the one its class asks for");
    let mut seen = [0usize; DIGITS];
    drawn.iter().for_each(|&c| seen[c] += 1);
    assert!(
        seen.iter().all(|&n| n == 6 || n == 7),
        "64 images, 6 or 7 of each digit: {seen:?}"
    );
    let drawn_images = tensors(&p, &made);
    // Edits use no class unless asked for one.
    let image = drawn_images[0].clone();
    let mask = image::rect_mask([0, 0, 32, 16], 32, 32).unwrap();
    let edit = |class| {
        InpaintSpec {
            seed: 1,
            sampling: Sampling {
                class,
                ..Sampling::default()
            },
            ..InpaintSpec::new(image.clone(), mask.clone())
        }
        .job(p.bundle())
        .unwrap()
    };
    let (none, three) = (edit(None), edit(Some(3)));
    assert_eq!(run(&mut p, &none).unwrap().classes, vec![None]);
    assert_eq!(run(&mut p, &three).unwrap().classes, vec![Some(3)]);
    let e = GenerateSpec {
        sampling: Sampling {
            class: Some(DIGITS),
            ..Sampling::default()
        },
        ..GenerateSpec::default()
    }
    .job(p.bundle())
    .unwrap_err()
    .to_string();
    assert!(e.contains("class") && e.contains("out of range"), "{e}");
    // The graph call itself refuses a class the transformer does not have.
    let mask = p.bundle().manifest().token_space().mask_id;
    let mut logits = Vec::new();
    p.forward(&[mask; 64], &[DIGITS as i64 - 1], &mut logits).unwrap();
    let e = p
        .forward(&[mask; 64], &[DIGITS as i64], &mut logits)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class 10 given to a transformer of 10 classes"), "{e}");
    drop(p);
    // The bundle's classifier names the digit asked for (it never saw the prior or its classes).
    for (c, images) in asked.iter().enumerate() {
        let right = common::classify(&pipeline(), images)
            .iter()
            .filter(|r| r.1 == c)
            .count();
        eprintln!("class {c}: {right} of 16 classified as {c}");
        assert!(right >= 12, "class {c}: only {right} of 16 images classified as {c}");
    }
    // And the classes given in turn are the digits made.
    let labels = common::classify(&pipeline(), &drawn_images);
    let agree = labels.iter().zip(&drawn).filter(|(l, &c)| l.1 == c).count();
    eprintln!("drawn classes: {agree} of 64 classified as drawn");
    assert!(agree >= 48, "only {agree} of 64 images are the digit drawn for them");
}

/// Left and right halves (32x32 each) of 64x32 images.
fn halves(images: &[Tensor]) -> Vec<Tensor> {
    let mut out = Vec::new();
    for im in images {
        assert_eq!((im.height, im.width), (32, 64));
        for h in 0..2 {
            let mut data = Vec::with_capacity(32 * 32);
            for y in 0..32 {
                data.extend_from_slice(&im.data[y * 64 + h * 32..y * 64 + h * 32 + 32]);
            }
            out.push(Tensor {
                channels: 1,
                height: 32,
                width: 32,
                data,
            });
        }
    }
    out
}

#[test]
fn a_two_grid_wide_image_has_a_digit_in_each_half_and_overlapping_windows_do_not() {
    let real_conf = real_confidence();
    let wide = |stride: Option<[usize; 2]>, margin: Option<[usize; 2]>| {
        let mut p = pipeline();
        let canvas = Canvas {
            grid: Some([8, 16]),
            stride,
            window_margin: margin,
            ..Canvas::default()
        };
        let rows = p.transformer_rows();
        let job = generate_job(&p, 5, 0..128, &Sampling::default(), &canvas, 16);
        let made = run(&mut p, &job).unwrap();
        let rows = (p.transformer_rows() - rows) as f64 / 128.0;
        let images = tensors(&p, &made);
        drop(p);
        let (conf, hist) = judge(&pipeline(), &halves(&images));
        eprintln!("stride {stride:?} margin {margin:?}: halves {conf:.3} {hist:?}, {rows:.1} windows per image");
        (meets_bar(conf, &hist, real_conf), rows)
    };
    // The bundle's windows (model.json: stride 8, margin 0: digits do not tile).
    let (verdict, rows) = wide(None, None);
    verdict.unwrap();
    // A window is fed only in steps that reveal one of its positions: with the absorbing sampler
    // at 64 steps one image takes about 40.6 rows, 64 (1 - (63/64)^64), and two windows side by
    // side about twice that (5% for the draw of reveal steps), not the 128 of feeding every window
    // every step. (MaskGIT reveals in every step: 64 and 128, which cannot tell the two apart.)
    let rows_per_image = |canvas: &Canvas| {
        let mut p = pipeline();
        let before = p.transformer_rows();
        let s = Sampling {
            sampler: Some(absorb::sampler::SamplerKind::Absorbing),
            ..sampling(Some(64), None)
        };
        let job = generate_job(&p, 5, 0..128, &s, canvas, 16);
        run(&mut p, &job).unwrap();
        (p.transformer_rows() - before) as f64 / 128.0
    };
    let single = rows_per_image(&Canvas::default());
    let two = rows_per_image(&Canvas {
        grid: Some([8, 16]),
        ..Canvas::default()
    });
    eprintln!("absorbing, 64 steps: one trained-size image {single:.1} rows, two windows {two:.1} (bundle default: {rows:.1})");
    assert!(
        (38.0..43.0).contains(&single) && two <= 2.0 * single * 1.05,
        "{two} rows per two-window image against {single} for one image"
    );
    // Windows overlapping by half each ask for a digit centred on themselves: the halves fail.
    assert!(wide(Some([4, 4]), Some([1, 1])).0.is_err());
}

#[test]
fn windowed_generation_and_outpainting_keep_known_tokens_and_reproduce() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let img = image::load_image(&common::heldout()[7].0, &spec).unwrap();
    let known = p.encode(&img).unwrap().0;
    let mask_id = p.bundle().manifest().token_space().mask_id;
    // Outpaint 4 tokens right and 4 down: a 12x12 grid with the image's tokens top-left.
    let grid = [12, 12];
    let mut tokens = vec![mask_id; 144];
    for r in 0..8 {
        tokens[r * 12..r * 12 + 8].copy_from_slice(&known[r * 8..r * 8 + 8]);
    }
    for (stride, margin) in [(None, None), (Some([4, 4]), Some([1, 1])), (Some([2, 2]), Some([0, 0]))] {
        let canvas = Canvas {
            grid: Some(grid),
            stride,
            window_margin: margin,
            ..Canvas::default()
        };
        // Known tokens to fill around: outpainting's start, given as tokens.
        let mut fill = |seed: u64, batch: usize| {
            let job = FillSpec {
                seed,
                canvas,
                max_batch: batch,
                ..FillSpec::new(vec![tokens.clone()])
            }
            .job(p.bundle())
            .unwrap();
            run(&mut p, &job).unwrap().tokens.remove(0)
        };
        let out = fill(3, 16);
        let again = fill(3, 4);
        assert_eq!(out, again, "same seed, other batch size: same tokens");
        for i in 0..144 {
            if tokens[i] == mask_id {
                assert!((0..mask_id).contains(&out[i]), "position {i} left unfilled");
            } else {
                assert_eq!(out[i], tokens[i], "known token {i} changed (stride {stride:?})");
            }
        }
        let other = fill(4, 16);
        assert_ne!(out, other, "another seed fills differently");
    }
    // Generation on a larger grid: image i is the same alone and in a batch.
    let canvas = Canvas {
        grid: Some([8, 20]),
        ..Canvas::default()
    };
    let s = sampling(Some(40), None);
    let (jb, ja) = (
        generate_job(&p, 9, 0..4, &s, &canvas, 16),
        generate_job(&p, 9, 2..3, &s, &canvas, 1),
    );
    let batch = run(&mut p, &jb).unwrap().tokens;
    let alone = run(&mut p, &ja).unwrap().tokens;
    assert_eq!(alone[0], batch[2]);
}

#[test]
fn outpainting_regenerates_exactly_the_edge_it_is_asked_to_and_keeps_the_rest() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let path = &common::heldout()[3].0;
    let known = p.encode(&image::load_image(path, &spec).unwrap()).unwrap().0;
    // 16 pixels (4 tokens) right, 8 (2 tokens) down: a 10x12 grid, the input's 8x8 top-left.
    let outpaint = |bundle: &absorb::bundle::Bundle, edge: usize| {
        let img = image::load_image(path, &spec).unwrap();
        OutpaintSpec {
            seed: 5,
            edge: Some(edge),
            ..OutpaintSpec::new(img, [0, 16, 0, 8])
        }
        .job(bundle)
    };
    for (edge, sampled) in [(0, 120 - 64), (1, 120 - 7 * 7), (2, 120 - 6 * 6), (3, 120 - 5 * 5)] {
        let job = outpaint(p.bundle(), edge).unwrap();
        assert_eq!(job.masked_tokens(p.bundle()), sampled, "edge {edge}: tokens to sample");
        let mut revealed = 0;
        let made = p
            .run(&job, &mut Progress::steps(&mut |r| revealed += r.revealed))
            .unwrap();
        assert_eq!(revealed, sampled, "edge {edge}: tokens the run revealed");
        let out = &made.tokens[0];
        for r in 0..8 - edge {
            for c in 0..8 - edge {
                assert_eq!(
                    out[r * 12 + c],
                    known[r * 8 + c],
                    "edge {edge}: kept token ({r}, {c}) changed"
                );
            }
        }
    }
    let Err(e) = outpaint(p.bundle(), 4) else {
        panic!("edge 4 of an 8x8 grid was accepted")
    };
    assert!(e.to_string().starts_with("invalid outpaint_edge:"), "{e}");
}

#[test]
fn an_image_larger_than_the_bundle_encodes_tile_by_tile() {
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let a = image::load_image(&common::heldout()[1].0, &spec).unwrap();
    let b = image::load_image(&common::heldout()[2].0, &spec).unwrap();
    // Side by side, 64x32.
    let mut data = Vec::new();
    for y in 0..32 {
        data.extend_from_slice(&a.data[y * 32..y * 32 + 32]);
        data.extend_from_slice(&b.data[y * 32..y * 32 + 32]);
    }
    let wide = Tensor {
        channels: 1,
        height: 32,
        width: 64,
        data,
    };
    let (tokens, grid) = p.encode(&wide).unwrap();
    assert_eq!(grid, [8, 16]);
    let (ta, tb) = (p.encode(&a).unwrap().0, p.encode(&b).unwrap().0);
    for r in 0..8 {
        assert_eq!(&tokens[r * 16..r * 16 + 8], &ta[r * 8..r * 8 + 8]);
        assert_eq!(&tokens[r * 16 + 8..r * 16 + 16], &tb[r * 8..r * 8 + 8]);
    }
    let odd = Tensor {
        channels: 1,
        height: 32,
        width: 62,
        data: vec![0.0; 32 * 62],
    };
    let e = p.encode(&odd).unwrap_err().to_string();
    assert!(e.contains("multiple of 4x4"), "{e}");
}

/// Keeps every live preview, one per step (whatever they cost).
#[derive(Default)]
struct Recorder {
    previews: Vec<(usize, usize, Vec<image::Pixels>)>,
}

impl PreviewSink for Recorder {
    fn wanted(&self) -> bool {
        true
    }

    fn preview(&mut self, first: usize, steps: usize, pixels: Vec<image::Pixels>) {
        self.previews.push((first, steps, pixels));
    }

    fn pacer(&self) -> Pacer {
        Pacer::every_step()
    }
}

#[test]
fn previews_paint_the_masked_tokens_grey_shrink_step_by_step_and_change_nothing() {
    let mut p = pipeline();
    let mask_id = p.bundle().manifest().tokens.mask_id;
    let wide = Canvas {
        grid: Some([8, 16]),
        ..Canvas::default()
    };
    for (canvas, count) in [(Canvas::default(), 3), (wide, 1)] {
        let job = generate_job(&p, 11, 0..count, &sampling(Some(12), None), &canvas, 8);
        let grid = job.grid(p.bundle());
        let plain = run(&mut p, &job).unwrap();
        let mut masked_after: Vec<Vec<Vec<bool>>> = Vec::new();
        let mut rec = Recorder::default();
        let made = p
            .run(
                &job,
                &mut Progress {
                    on_step: &mut |r| {
                        masked_after.push(
                            r.chains
                                .iter()
                                .map(|c| c.tokens().iter().map(|&t| t == mask_id).collect())
                                .collect(),
                        )
                    },
                    cancelled: &|| false,
                    preview: Some(&mut rec),
                },
            )
            .unwrap();
        assert_eq!(made.tokens, plain.tokens, "previews changed the tokens");
        assert_eq!(made.pixels, plain.pixels);
        // One after every step but the last (whose images are the result).
        assert_eq!(rec.previews.len(), masked_after.len() - 1, "grid {grid:?}");
        assert_eq!(made.timings.previews, rec.previews.len());
        let mut grey_before = usize::MAX;
        for (first, steps, pixels) in &rec.previews {
            assert_eq!(*first, 0);
            assert_eq!(pixels.len(), count as usize);
            let masks = &masked_after[steps - 1];
            let mut grey = 0;
            for ((px, mask), done) in pixels.iter().zip(masks).zip(&made.pixels) {
                assert_eq!(
                    (px.channels, px.height, px.width),
                    (done.channels, done.height, done.width)
                );
                let (fy, fx) = (px.height / grid[0], px.width / grid[1]);
                let tile_grey = |i: usize| {
                    let (r, c) = (i / grid[1], i % grid[1]);
                    (r * fy..(r + 1) * fy).all(|y| {
                        let row = (y * px.width + c * fx) * px.channels;
                        px.data[row..row + fx * px.channels]
                            .iter()
                            .all(|&v| v == image::MASKED_GREY)
                    })
                };
                for (i, &m) in mask.iter().enumerate() {
                    assert!(!m || tile_grey(i), "step {steps}: masked token {i} is not grey");
                }
                // Revealed tokens are decoded: their tiles are not all grey, but for a chance few.
                let revealed_grey = mask.iter().enumerate().filter(|&(i, &m)| !m && tile_grey(i)).count();
                let revealed = mask.iter().filter(|&&m| !m).count();
                assert!(
                    revealed_grey * 4 <= revealed.max(4),
                    "step {steps}: {revealed_grey} of {revealed}"
                );
                grey += mask.iter().filter(|&&m| m).count();
            }
            assert!(grey < grey_before, "step {steps}: {grey} masked, {grey_before} before");
            grey_before = grey;
        }
    }
}
