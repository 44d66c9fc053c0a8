//! The library API on the real bundled graphs: contract, shapes, determinism, inpainting,
//! round-trip quality and sample quality judged by the bundle's classifier.

mod common;

use absorb::image::{self, Tensor};
use absorb::Timings;
use common::{judge, pipeline, quality, DIGITS};

fn generate(
    seed: u64,
    indices: std::ops::Range<u64>,
    steps: Option<usize>,
    temperature: Option<f32>,
    batch: usize,
) -> Vec<Vec<i64>> {
    let mut p = pipeline();
    let s = p.settings(steps, temperature).unwrap();
    p.generate(seed, indices, &s, batch, &mut |_| {}, &mut Timings::default())
        .unwrap()
}

fn decode(tokens: &[Vec<i64>]) -> Vec<Tensor> {
    let mut p = pipeline();
    let grid = p.grid();
    p.decode(tokens, grid, 64, &mut Timings::default()).unwrap()
}

#[test]
fn generated_grids_and_images_have_the_bundle_shapes() {
    let tokens = generate(1, 0..3, None, None, 16);
    let p = pipeline();
    let space = p.token_space();
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
    let original = p.encode(&img).unwrap();
    let [h, w] = p.grid();
    // Regenerate the right half of the image.
    let mask = image::rect_mask(
        [spec.width / 2, 0, spec.width / 2, spec.height],
        spec.width,
        spec.height,
    )
    .unwrap();
    let token_mask = image::pool_mask(&mask, [h, w]);
    assert_eq!(token_mask.iter().filter(|&&m| m).count(), h * w / 2);
    let s = p.settings(None, None).unwrap();
    let mut different = 0;
    for seed in 0..4 {
        let out = p
            .inpaint(&img, &token_mask, seed, &s, &mut |_| {}, &mut Timings::default())
            .unwrap();
        for i in 0..h * w {
            if token_mask[i] {
                assert!((0..p.token_space().codebook_size as i64).contains(&out[i]));
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
    let mut p = pipeline();
    let spec = p.bundle().manifest().image.clone();
    let img = image::load_image(&common::heldout()[0].0, &spec).unwrap();
    let s = p.settings(None, None).unwrap();
    let l = p.token_space().len;
    let e = p
        .inpaint(&img, &vec![false; l], 0, &s, &mut |_| {}, &mut Timings::default())
        .unwrap_err();
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
    let grids: Vec<Vec<i64>> = real.iter().map(|t| p.encode(t).unwrap()).collect();
    let grid = p.grid();
    let rec = p.decode(&grids, grid, 64, &mut Timings::default()).unwrap();
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
