//! The commands that inspect and measure rather than make images: `info`, `check-variant`,
//! `warmup`, `bench`, `eval`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

use absorb::image;
use absorb::{GenerateSpec, Progress, Sampling};

use super::args::{BenchArgs, CheckVariantArgs, Common, EvalArgs, InfoArgs, WarmupArgs};
use super::{load, load_grid, write_atomic};
use absorb::Param;

pub fn info(a: InfoArgs) -> Result<()> {
    if let Some(png) = &a.png {
        let m = image::read_metadata(png)?;
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let p = load(&a.common)?;
    let rt = p.runtime();
    let m = p.bundle().manifest();
    let report = serde_json::json!({
        "bundle": {
            "dir": p.bundle().dir(),
            "name": m.name,
            "sha256": p.bundle().sha256(),
            "image": m.image,
            "tokens": m.tokens,
            "classes": m.classes,
            "sampling": m.sampling,
            "provenance": m.provenance,
        },
        "onnxruntime": {
            "library": rt.library(),
            "threads": rt.threads(),
            "providers_in_library": rt.available_providers(),
            "provider_in_use": p.provider(),
        },
        "cpu": absorb::cpu::detect(),
        "absorb": absorb::VERSION,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

pub fn check_variant(a: CheckVariantArgs) -> Result<()> {
    if a.common.variant.is_none() {
        bail!(absorb::Error::param(
            Param::Variant,
            "name the variant to measure, e.g. --variant int8"
        ));
    }
    if a.rows == Some(0) {
        bail!(absorb::Error::param(Param::Rows, "0 rows: use 1 or more"));
    }
    let mut variant = load(&a.common)?;
    let mut fp32 = load(&Common {
        variant: None,
        ..a.common
    })?;
    let report = absorb::agreement::measure(&mut fp32, &mut variant, a.rows)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.holds() {
        bail!(
            "the {} transformer agrees with fp32 on {:.2}% of the probe's masked positions on this CPU \
             (int8 kernel {}), below the bundle's bar of {:.2}%: use the fp32 transformer here",
            report.variant,
            report.argmax_agreement * 100.0,
            report.cpu.int8_kernel.name(),
            report.bar.unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}

pub fn warmup(a: WarmupArgs) -> Result<()> {
    let start = Instant::now();
    // A heartbeat, so a long engine build is never mistaken for a hang.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let heartbeat = std::thread::spawn(move || {
        while done_rx.recv_timeout(std::time::Duration::from_secs(15)).is_err() {
            log::info!(
                "warming up: {:.0?} so far (TensorRT engine builds can take minutes)",
                start.elapsed()
            );
        }
    });
    let result = (|| -> Result<()> {
        let mut p = load_grid(&a.common, a.max_batch, None)?;
        log::info!("sessions built on {} in {:.1?}", p.provider(), start.elapsed());
        let sampling = Sampling {
            steps: Some(1),
            ..Sampling::default()
        };
        for batch in [1, a.max_batch] {
            let t = Instant::now();
            let job = GenerateSpec {
                count: batch,
                sampling,
                max_batch: batch,
                ..GenerateSpec::default()
            }
            .job(p.bundle())?;
            let made = p.run(&job, &mut Progress::steps(&mut |_| {}))?;
            let spec = p.bundle().manifest().image.clone();
            p.encode(&image::to_tensor(&made.pixels[0], &spec))?;
            log::info!(
                "batch {batch}: transformer, decoder and encoder ran in {:.1?}",
                t.elapsed()
            );
        }
        eprintln!(
            "warm: {} on {} in {:.1?}",
            p.bundle().manifest().name,
            p.provider(),
            start.elapsed()
        );
        Ok(())
    })();
    let _ = done_tx.send(());
    let _ = heartbeat.join();
    result
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.count == 0 || a.runs == 0 {
        bail!(absorb::Error::param(
            Param::Count,
            "--count and --runs must be 1 or more"
        ));
    }
    let start = Instant::now();
    let mut p = load_grid(&a.common, a.max_batch, None)?;
    let load = start.elapsed();
    let sampling = Sampling {
        steps: a.steps,
        temperature: a.temperature,
        sampler: a.sampler,
        cache: a.cache,
        ..Sampling::default()
    };
    let settings = sampling.settings(p.bundle(), p.bundle().manifest().grid())?;
    let b = absorb::bench::BenchSettings {
        settings,
        count: a.count,
        max_batch: a.max_batch,
        runs: a.runs,
        seed: a.seed,
    };
    let report = absorb::bench::measure(&mut p, &b, load)?;
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(path) if path == Path::new("-") => println!("{json}"),
        Some(path) => {
            write_atomic(path, json.as_bytes())?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.count == 0 {
        bail!(absorb::Error::param(Param::Count, "0 images requested: use 1 or more"));
    }
    let mut p = load_grid(&a.common, a.max_batch, None)?;
    let mut judge = absorb::eval::Judge::for_bundle(&p)?;
    let real = judge.judge(&absorb::eval::heldout_images(&p)?)?;
    let steps = if a.steps.is_empty() {
        vec![p.bundle().manifest().sampling.steps]
    } else {
        a.steps.clone()
    };
    // Exact mode first: the cached rows are compared with it, token by token.
    let mut caches = a.caches.clone();
    caches.sort_by_key(|c| c.period().unwrap_or(0));
    caches.dedup();
    let (t0, t1) = a.temperature.map_or((None, None), |(x, y)| (Some(x), y));
    let l = p.bundle().manifest().grid().iter().product::<usize>();
    println!(
        "real held-out images: mean confidence {:.3} over {} images\n",
        real.mean_confidence, real.count
    );
    println!(
        "| sampler | steps | cache | calls per batch | full passes per image | ms per image | mean confidence | vs real | \
         class agreement | KID x 1000 | tokens as exact | classes | max class share | bar |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &kind in &a.samplers {
        for &s in &steps {
            let mut exact: Option<Vec<Vec<i64>>> = None;
            for &cache in &caches {
                let sampling = Sampling {
                    steps: Some(s),
                    temperature: t0,
                    temperature_end: t1,
                    top_p: a.top_p,
                    sampler: Some(kind),
                    // The threshold is the threshold sampler's; the other rows take none.
                    threshold: a.threshold.filter(|_| kind.uses_threshold()),
                    cache: Some(cache),
                    guidance: a.guidance,
                    class: None,
                };
                let job = GenerateSpec {
                    seed: a.seed,
                    count: a.count,
                    sampling,
                    max_batch: a.max_batch,
                    ..GenerateSpec::default()
                }
                .job(p.bundle())?;
                let start = Instant::now();
                let made = p.run(&job, &mut Progress::steps(&mut |_| {}))?;
                let seconds = start.elapsed().as_secs_f64();
                let (settings, timings) = (*job.settings(), made.timings);
                let spec = p.bundle().manifest().image.clone();
                let tensors: Vec<_> = made.pixels.iter().map(|px| image::to_tensor(px, &spec)).collect();
                let v = judge.judge(&tensors)?;
                // A class-conditional bundle: how often the classifier names the class an image was made as.
                let agreement = v.agreement(&made.classes);
                let ratio = v.mean_confidence / real.mean_confidence;
                let meets = v.meets_bar(&real);
                let kid = v.kid_x1000(&real);
                let n = a.count as f64;
                // Calls per batch of max_batch images (each call feeds some of the batch's images);
                // the work per image is the positions computed, in full passes.
                let calls = timings.transformer_calls as f64 * a.max_batch.min(a.count) as f64 / n;
                let full = timings.transformer_positions as f64 / (l as f64 * n);
                let same = match (&exact, cache.period()) {
                    (Some(e), Some(_)) => Some(token_agreement(e, &made.tokens)),
                    _ => None,
                };
                if cache.period().is_none() {
                    exact = Some(made.tokens.clone());
                }
                let cache_name = cache.period().map_or_else(|| "off".to_string(), |n| n.to_string());
                let pct = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{:.1}%", 100.0 * x));
                println!(
                    "| {} | {s} | {cache_name} | {calls:.1} | {full:.2} | {:.1} | {:.3} | {:.3} | {} | {} | {} | {}/{} | {:.2} | {} |",
                    kind.name(),
                    1000.0 * seconds / n,
                    v.mean_confidence,
                    ratio,
                    pct(agreement),
                    kid.map_or_else(|| "-".to_string(), |k| format!("{k:.2}")),
                    pct(same),
                    v.histogram.iter().filter(|&&h| h > 0).count(),
                    v.histogram.len(),
                    v.max_class_fraction(),
                    if meets { "meets" } else { "below" }
                );
                rows.push(serde_json::json!({
                    "sampler": kind.name(), "steps": s, "cache": cache, "temperature": settings.temperature,
                    "temperature_end": settings.temperature_end, "top_p": settings.top_p,
                    "threshold": (kind.uses_threshold()).then(|| settings.threshold_or_default()),
                    "guidance": settings.guidance,
                    "count": v.count, "calls_per_batch": calls, "full_passes_per_image": full,
                    "ms_per_image": 1000.0 * seconds / n,
                    "mean_confidence": v.mean_confidence, "ratio_to_real": ratio, "histogram": v.histogram,
                    "meets_bar": meets, "class_agreement": agreement, "token_agreement_with_exact": same,
                    "kid_x1000": kid,
                }));
            }
        }
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({"real_mean_confidence": real.mean_confidence, "rows": rows});
        write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}

/// The share of positions where two sets of token grids agree.
fn token_agreement(a: &[Vec<i64>], b: &[Vec<i64>]) -> f64 {
    let (same, all) = a.iter().zip(b).fold((0usize, 0usize), |(s, n), (x, y)| {
        (s + x.iter().zip(y).filter(|(p, q)| p == q).count(), n + x.len())
    });
    same as f64 / all.max(1) as f64
}
