//! The `absorb` binary on the real bundle: reproducibility across processes and thread counts,
//! `--from`, output layouts, inpainting pixels, and every bad input giving a clear error and the
//! documented exit code (2 = bad input, 1 = model/library/machine), never a panic.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{absorb, model_arg, stderr};

fn ok(dir: &Path, args: &[&str]) {
    let o = absorb(dir, args);
    assert!(o.status.success(), "absorb {args:?} failed: {}", stderr(&o));
}

/// Runs absorb expecting failure with `code` and a message containing every `needles` entry.
fn fails(dir: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
    let o = absorb(dir, args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "absorb {args:?}: expected exit {code}, stderr: {err}"
    );
    assert!(!err.contains("panicked"), "absorb {args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "absorb {args:?}: stderr lacks {n:?}: {err}");
    }
    err
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn the_same_seed_gives_byte_identical_pngs_across_processes_and_thread_counts() {
    let d = tmp();
    let m = model_arg();
    ok(
        d.path(),
        &[
            "generate",
            "-m",
            &m,
            "--seed",
            "7",
            "--count",
            "4",
            "-o",
            "a.png",
            "--threads",
            "1",
        ],
    );
    ok(
        d.path(),
        &[
            "generate",
            "-m",
            &m,
            "--seed",
            "7",
            "--count",
            "4",
            "-o",
            "b.png",
            "--threads",
            "2",
        ],
    );
    ok(
        d.path(),
        &["generate", "-m", &m, "--seed", "7", "--count", "4", "-o", "c.png"],
    );
    ok(
        d.path(),
        &["generate", "-m", &m, "--seed", "8", "--count", "4", "-o", "d.png"],
    );
    let read = |n: &str| fs::read(d.path().join(n)).unwrap();
    assert_eq!(read("a.png"), read("b.png"), "threads 1 vs 2");
    assert_eq!(read("a.png"), read("c.png"), "two processes");
    assert_ne!(read("a.png"), read("d.png"), "different seeds");
}

#[test]
fn from_reproduces_a_png_bit_for_bit() {
    let d = tmp();
    let m = model_arg();
    ok(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "123", "--count", "6", "--steps", "5", "-t", "0.9", "-o", "orig.png",
        ],
    );
    ok(
        d.path(),
        &["generate", "-m", &m, "--from", "orig.png", "-o", "again.png"],
    );
    assert_eq!(
        fs::read(d.path().join("orig.png")).unwrap(),
        fs::read(d.path().join("again.png")).unwrap()
    );
    let info = absorb(d.path(), &["info", "again.png"]);
    let meta: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        (meta["seed"].as_u64(), meta["steps"].as_u64(), meta["count"].as_u64()),
        (Some(123), Some(5), Some(6))
    );
}

#[test]
fn a_directory_gets_one_png_per_image_equal_to_single_generations() {
    let d = tmp();
    let m = model_arg();
    ok(
        d.path(),
        &["generate", "-m", &m, "--seed", "5", "--count", "3", "-o", "many/"],
    );
    let mut files: Vec<PathBuf> = fs::read_dir(d.path().join("many"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(d.path().join("many/manifest-5-00000-of-00001.jsonl").exists());
    ok(
        d.path(),
        &[
            "generate",
            "-m",
            &m,
            "--seed",
            "5",
            "--first-index",
            "2",
            "-o",
            "two.png",
        ],
    );
    assert_eq!(
        fs::read(&files[2]).unwrap(),
        fs::read(d.path().join("two.png")).unwrap()
    );
}

#[test]
fn encode_then_decode_round_trips_through_json() {
    let d = tmp();
    let m = model_arg();
    let digit = common::heldout()[0].0.to_string_lossy().into_owned();
    ok(d.path(), &["encode", "-m", &m, "-i", &digit, "-o", "t.json"]);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(d.path().join("t.json")).unwrap()).unwrap();
    let h = json["height"].as_u64().unwrap() as usize;
    assert_eq!(json["tokens"].as_array().unwrap().len(), h);
    ok(d.path(), &["decode", "-m", &m, "--tokens", "t.json", "-o", "r.png"]);
    let a = image::open(&digit).unwrap();
    let b = image::open(d.path().join("r.png")).unwrap();
    assert_eq!((a.width(), a.height()), (b.width(), b.height()));
}

#[test]
fn inpaint_keeps_the_input_pixels_outside_the_mask() {
    let d = tmp();
    let m = model_arg();
    let digit = common::heldout()[1].0.to_string_lossy().into_owned();
    ok(
        d.path(),
        &[
            "inpaint",
            "-m",
            &m,
            "-i",
            &digit,
            "--rect",
            "0,0,16,32",
            "--seed",
            "1",
            "-o",
            "in.png",
        ],
    );
    let a = image::open(&digit).unwrap().to_luma8();
    let b = image::open(d.path().join("in.png")).unwrap().to_luma8();
    for (x, y, p) in a.enumerate_pixels() {
        if x >= 16 {
            assert_eq!(p, b.get_pixel(x, y), "pixel ({x},{y}) outside the mask changed");
        }
    }
    // A mask file works the same way: white regenerates.
    let mut mask = image::GrayImage::new(a.width(), a.height());
    for y in 0..8 {
        for x in 0..8 {
            mask.put_pixel(x, y, image::Luma([255]));
        }
    }
    mask.save(d.path().join("mask.png")).unwrap();
    let o = absorb(
        d.path(),
        &[
            "inpaint", "-m", &m, "-i", &digit, "--mask", "mask.png", "--seed", "1", "-o", "in2.png",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("regenerated"), "{}", stderr(&o));
}

#[test]
fn a_class_is_asked_for_by_name_or_index_recorded_and_reproduced_and_a_wrong_one_is_refused() {
    let d = tmp();
    let m = model_arg();
    let gen = |class: &str, out: &str| {
        ok(
            d.path(),
            &[
                "generate", "-m", &m, "--seed", "5", "--count", "2", "--class", class, "-o", out,
            ],
        );
        fs::read(d.path().join(out)).unwrap()
    };
    // The digits bundle's classes are named "0".."9": the name and the index are the same class.
    let seven = gen("7", "seven.png");
    let three = gen("3", "three.png");
    assert_ne!(seven, three, "another class, other images");
    let info = absorb(d.path(), &["info", "seven.png"]);
    let meta: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(meta["class"], "7", "the class is in the PNG's metadata: {meta}");
    ok(
        d.path(),
        &["generate", "-m", &m, "--from", "seven.png", "-o", "again.png"],
    );
    assert_eq!(
        fs::read(d.path().join("again.png")).unwrap(),
        seven,
        "--from keeps the class"
    );
    // Without --class each image draws its own: no class in the metadata.
    ok(d.path(), &["generate", "-m", &m, "--seed", "5", "-o", "drawn.png"]);
    let info = absorb(d.path(), &["info", "drawn.png"]);
    let meta: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(meta.get("class").is_none(), "{meta}");
    // --from takes the class from the PNG: another one on the command line is refused, not ignored.
    fails(
        d.path(),
        &[
            "generate",
            "-m",
            &m,
            "--from",
            "seven.png",
            "--class",
            "3",
            "-o",
            "x.png",
        ],
        2,
        &["--class", "--from"],
    );
    for bad in ["10", "seven", "-1"] {
        fails(
            d.path(),
            &["generate", "-m", &m, "--class", bad, "-o", "bad.png"],
            2,
            &["invalid --class", "is not a class of this model", "0, 1, 2"],
        );
    }
    assert!(!d.path().join("bad.png").exists());
    let info = absorb(d.path(), &["info", "-m", &m]);
    let report: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        report["bundle"]["classes"].as_array().map(Vec::len),
        Some(10),
        "info lists the classes"
    );
}

#[test]
fn bad_parameters_are_rejected_with_exit_code_2() {
    let d = tmp();
    let m = model_arg();
    let l = {
        let j: serde_json::Value =
            serde_json::from_slice(&fs::read(common::model_dir().join("model.json")).unwrap()).unwrap();
        j["tokens"]["height"].as_u64().unwrap() * j["tokens"]["width"].as_u64().unwrap()
    };
    let above = (l + 1).to_string();
    fails(
        d.path(),
        &["generate", "-m", &m, "--steps", "0"],
        2,
        &["invalid --steps", "0 is out of range"],
    );
    fails(
        d.path(),
        &["generate", "-m", &m, "--steps", &above],
        2,
        &["invalid --steps", &above],
    );
    for t in ["0", "NaN", "-1", "inf"] {
        fails(
            d.path(),
            &["generate", "-m", &m, &format!("--temperature={t}")],
            2,
            &["invalid --temperature"],
        );
    }
    fails(
        d.path(),
        &["generate", "-m", &m, "--count", "0"],
        2,
        &["invalid --count"],
    );
    fails(d.path(), &["generate", "-m", &m, "-o", "x.jpg"], 2, &["invalid --out"]);
    fails(
        d.path(),
        &["generate", "-m", &m, "--threads", "0"],
        2,
        &["--threads", "0", "1..=256"],
    );
    fails(d.path(), &["generate", "--bogus"], 2, &["--bogus"]);
    fails(
        d.path(),
        &["generate", "-m", &m, "-m", &m, "-o", "x.png"],
        2,
        &["invalid --model", "only `absorb serve` takes several"],
    );
    fails(
        d.path(),
        &["serve", "--models", "no-such-dir", "--listen", "127.0.0.1:0"],
        2,
        &["--models", "no-such-dir"],
    );
}

#[test]
fn bad_images_masks_and_token_files_are_rejected_with_exit_code_2() {
    let d = tmp();
    let m = model_arg();
    let p = d.path();
    image::GrayImage::new(20, 20).save(p.join("small.png")).unwrap();
    fs::write(p.join("text.png"), b"not a png at all").unwrap();
    let digit = common::heldout()[0].0.to_string_lossy().into_owned();
    image::GrayImage::new(32, 32).save(p.join("black.png")).unwrap();
    image::GrayImage::new(16, 16).save(p.join("tiny-mask.png")).unwrap();
    fails(
        p,
        &["inpaint", "-m", &m, "-i", "small.png", "--rect", "0,0,4,4"],
        2,
        &["small.png", "20x20", "expected 32x32"],
    );
    fails(
        p,
        &["encode", "-m", &m, "-i", "text.png"],
        2,
        &["text.png", "not a PNG"],
    );
    fails(
        p,
        &["inpaint", "-m", &m, "-i", &digit, "--mask", "black.png"],
        2,
        &["invalid --mask", "empty"],
    );
    fails(
        p,
        &["inpaint", "-m", &m, "-i", &digit, "--mask", "tiny-mask.png"],
        2,
        &["tiny-mask.png", "16x16", "expected 32x32"],
    );
    fails(
        p,
        &["inpaint", "-m", &m, "-i", &digit, "--rect", "30,0,8,8"],
        2,
        &["invalid --rect"],
    );
    fails(
        p,
        &["inpaint", "-m", &m, "-i", "missing.png", "--rect", "0,0,4,4"],
        2,
        &["missing.png"],
    );
    fails(
        p,
        &["generate", "-m", &m, "--from", "black.png", "-o", "x.png"],
        2,
        &["black.png", "no \"absorb\" text chunk"],
    );
    ok(p, &["encode", "-m", &m, "-i", &digit, "-o", "t.json"]);
    let text = fs::read_to_string(p.join("t.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["tokens"][0][0] = 100000.into();
    fs::write(p.join("bad.json"), j.to_string()).unwrap();
    fails(
        p,
        &["decode", "-m", &m, "--tokens", "bad.json"],
        2,
        &["token 100000", "row 0, column 0"],
    );
    j["tokens"][0] = serde_json::json!([1]);
    fs::write(p.join("ragged.json"), j.to_string()).unwrap();
    fails(p, &["decode", "-m", &m, "--tokens", "ragged.json"], 2, &["rows of"]);
}

/// A writable copy of the bundle to break.
fn bundle_copy(dir: &Path) -> PathBuf {
    let out = dir.join("bundle");
    fs::create_dir_all(&out).unwrap();
    for e in fs::read_dir(common::model_dir()).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            fs::copy(e.path(), out.join(e.file_name())).unwrap();
        }
    }
    out
}

fn edit_manifest(bundle: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = bundle.join("model.json");
    let mut j: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    f(&mut j);
    fs::write(&path, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
}

/// `absorb generate -m BUNDLE --steps 8 ARGS EXTRA -o OUT` in `dir`: the PNG's bytes and its metadata
/// (`absorb info`).
fn generate_with_metadata(
    dir: &Path,
    bundle: &str,
    args: &[&str],
    extra: &[&str],
    out: &str,
) -> (Vec<u8>, serde_json::Value) {
    let mut all = vec!["generate", "-m", bundle, "--steps", "8"];
    all.extend_from_slice(args);
    all.extend_from_slice(extra);
    all.extend_from_slice(&["-o", out]);
    ok(dir, &all);
    let info = absorb(dir, &["info", out]);
    (
        fs::read(dir.join(out)).unwrap(),
        serde_json::from_slice(&info.stdout).unwrap(),
    )
}

#[test]
fn the_bundles_default_sampler_and_temperature_schedule_apply_when_a_request_names_none() {
    let d = tmp();
    let b = bundle_copy(d.path());
    let bs = b.to_string_lossy().into_owned();
    edit_manifest(&b, |j| {
        j["sampling"]["sampler"] = "even".into();
        j["sampling"]["temperature"] = 1.1.into();
        j["sampling"]["temperature_end"] = 0.6.into();
    });
    let gen =
        |extra: &[&str], out: &str| generate_with_metadata(d.path(), &bs, &["--seed", "4", "--count", "2"], extra, out);
    let (default, meta) = gen(&[], "default.png");
    assert_eq!(meta["sampler"], "even", "{meta}");
    assert_eq!(
        (meta["temperature"].as_f64(), meta["temperature_end"].as_f64()),
        (Some(1.1), Some(0.6)),
        "{meta}"
    );
    let (explicit, _) = gen(&["--sampler", "even", "-t", "1.1:0.6"], "explicit.png");
    assert_eq!(default, explicit, "the bundle's defaults are the flags' values");
    // A request's own sampler wins; its own temperature replaces the bundle's whole schedule.
    let (absorbing, meta) = gen(&["--sampler", "absorbing"], "absorbing.png");
    assert_eq!(meta["sampler"], "absorbing", "{meta}");
    assert_ne!(absorbing, default);
    let (_, meta) = gen(&["-t", "0.9"], "constant.png");
    assert_eq!(
        (meta["sampler"].as_str(), meta["temperature_end"].as_f64()),
        (Some("even"), None),
        "{meta}"
    );
    // The PNG's metadata names the sampler and schedule, so --from makes the same image.
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "default.png", "-o", "again.png"],
    );
    assert_eq!(fs::read(d.path().join("again.png")).unwrap(), default);
    // A sampler this build lacks is refused at load, naming the key.
    edit_manifest(&b, |j| j["sampling"]["sampler"] = "greedy".into());
    fails(
        d.path(),
        &["generate", "-m", &bs, "-o", "x.png"],
        1,
        &["model.json", "at sampling.sampler", "greedy"],
    );
}

#[test]
fn top_p_truncates_from_the_flag_or_the_bundle_is_recorded_and_one_turns_it_off() {
    let d = tmp();
    let b = bundle_copy(d.path());
    let bs = b.to_string_lossy().into_owned();
    let gen =
        |extra: &[&str], out: &str| generate_with_metadata(d.path(), &bs, &["--seed", "5", "--count", "4"], extra, out);
    edit_manifest(&b, |j| {
        j["sampling"].as_object_mut().unwrap().remove("top_p");
    });
    let (plain, meta) = gen(&[], "plain.png");
    assert!(meta.get("top_p").is_none(), "{meta}");
    let (one, meta) = gen(&["--top-p", "1"], "one.png");
    assert_eq!(
        one, plain,
        "--top-p 1 keeps every code: the same image, recorded as no truncation"
    );
    assert!(meta.get("top_p").is_none(), "{meta}");
    let (nucleus, meta) = gen(&["--top-p", "0.5"], "nucleus.png");
    assert_ne!(
        nucleus, plain,
        "a nucleus of half the probability changes some token of 4 images"
    );
    assert_eq!(meta["top_p"].as_f64(), Some(0.5), "{meta}");
    // As the bundle's default: the same bytes (metadata included: the same bundle hash is not, so
    // compare the tokens through --from instead), and --from reproduces it.
    edit_manifest(&b, |j| j["sampling"]["top_p"] = 0.5.into());
    let (default, meta) = gen(&[], "default.png");
    assert_eq!(meta["top_p"].as_f64(), Some(0.5), "{meta}");
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "default.png", "-o", "again.png"],
    );
    assert_eq!(fs::read(d.path().join("again.png")).unwrap(), default);
    let (off, meta) = gen(&["--top-p", "1"], "off.png");
    assert!(meta.get("top_p").is_none(), "{meta}");
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "off.png", "-o", "off-again.png"],
    );
    assert_eq!(
        fs::read(d.path().join("off-again.png")).unwrap(),
        off,
        "--from of an image made without truncation does not take the bundle's top_p"
    );
    for bad in ["0", "1.5", "-0.1", "nan"] {
        fails(
            d.path(),
            &["generate", "-m", &bs, "--top-p", bad, "-o", "x.png"],
            2,
            &["invalid --top-p:"],
        );
    }
    edit_manifest(&b, |j| j["sampling"]["top_p"] = 1.5.into());
    fails(
        d.path(),
        &["generate", "-m", &bs, "-o", "x.png"],
        1,
        &["model.json", "sampling.top_p is 1.5"],
    );
}

#[test]
fn guidance_is_recorded_reproduced_and_refused_where_it_cannot_steer() {
    let d = tmp();
    let bs = common::model_dir().to_string_lossy().into_owned();
    let gen = |extra: &[&str], out: &str| {
        generate_with_metadata(
            d.path(),
            &bs,
            &["--seed", "5", "--count", "3", "--class", "4"],
            extra,
            out,
        )
    };
    let (plain, meta) = gen(&[], "plain.png");
    assert!(meta.get("guidance").is_none(), "{meta}");
    let (zero, meta) = gen(&["--guidance", "0"], "zero.png");
    assert!(meta.get("guidance").is_none(), "{meta}");
    assert_eq!(zero, plain, "--guidance 0 is no guidance");
    let (g2, meta) = gen(&["--guidance", "2"], "g2.png");
    assert_eq!(meta["guidance"].as_f64(), Some(2.0), "{meta}");
    assert_ne!(g2, plain, "guidance changed nothing");
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "g2.png", "-o", "g2-again.png"],
    );
    assert_eq!(fs::read(d.path().join("g2-again.png")).unwrap(), g2);
    for bad in ["-1", "nan", "101"] {
        fails(
            d.path(),
            &["generate", "-m", &bs, "--guidance", bad, "-o", "x.png"],
            2,
            &["invalid --guidance:"],
        );
    }
    fails(
        d.path(),
        &["generate", "-m", &bs, "--guidance", "2", "--cache", "4", "-o", "x.png"],
        2,
        &["invalid --guidance:", "cache off"],
    );
    let scenes = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/scenes");
    fails(
        d.path(),
        &[
            "generate",
            "-m",
            &scenes.to_string_lossy(),
            "--guidance",
            "2",
            "-o",
            "x.png",
        ],
        2,
        &["invalid --guidance:", "no classes"],
    );
}

#[test]
fn the_threshold_sampler_and_cached_attention_are_recorded_reproduced_and_checked() {
    let d = tmp();
    let b = bundle_copy(d.path());
    let bs = b.to_string_lossy().into_owned();
    let gen =
        |extra: &[&str], out: &str| generate_with_metadata(d.path(), &bs, &["--seed", "5", "--count", "3"], extra, out);
    // threshold: recorded with its threshold (the default one when none is given), --from
    // reproduces it, another threshold changes the images.
    let (t9, meta) = gen(&["--sampler", "threshold"], "t9.png");
    assert_eq!(
        (meta["sampler"].as_str(), meta["threshold"].as_f64()),
        (Some("threshold"), Some(0.9)),
        "{meta}"
    );
    let (t5, meta) = gen(&["--sampler", "threshold", "--threshold", "0.5"], "t5.png");
    assert_eq!(meta["threshold"].as_f64(), Some(0.5), "{meta}");
    assert_ne!(t9, t5);
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "t5.png", "-o", "t5-again.png"],
    );
    assert_eq!(fs::read(d.path().join("t5-again.png")).unwrap(), t5);
    // maskgit-threshold: recorded with its threshold, reproduced by --from.
    let (m5, meta) = gen(&["--sampler", "maskgit-threshold", "--threshold", "0.5"], "m5.png");
    assert_eq!(
        (meta["sampler"].as_str(), meta["threshold"].as_f64()),
        (Some("maskgit-threshold"), Some(0.5)),
        "{meta}"
    );
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "m5.png", "-o", "m5-again.png"],
    );
    assert_eq!(fs::read(d.path().join("m5-again.png")).unwrap(), m5);
    fails(
        d.path(),
        &[
            "generate",
            "-m",
            &bs,
            "--sampler",
            "maskgit",
            "--threshold",
            "0.5",
            "-o",
            "x.png",
        ],
        2,
        &["invalid --threshold:", "only the threshold sampler"],
    );
    for bad in ["0", "1.5", "nan"] {
        fails(
            d.path(),
            &[
                "generate",
                "-m",
                &bs,
                "--sampler",
                "threshold",
                "--threshold",
                bad,
                "-o",
                "x.png",
            ],
            2,
            &["invalid --threshold:"],
        );
    }
    // cache: recorded, reproduced, other than exact mode's images (cheap passes see stale keys),
    // and absent from exact mode's metadata.
    let (exact, meta) = gen(&[], "exact.png");
    assert!(meta.get("cache").is_none(), "{meta}");
    let (off, _) = gen(&["--cache", "off"], "off.png");
    assert_eq!(off, exact, "--cache off is exact mode");
    let (c4, meta) = gen(&["--cache", "4"], "c4.png");
    assert_eq!(meta["cache"].as_u64(), Some(4), "{meta}");
    ok(
        d.path(),
        &["generate", "-m", &bs, "--from", "c4.png", "-o", "c4-again.png"],
    );
    assert_eq!(fs::read(d.path().join("c4-again.png")).unwrap(), c4);
    for (args, code, needles) in [
        (vec!["--cache", "0"], 2, vec!["invalid --cache:", "0 is out of range"]),
        (vec!["--cache", "sometimes"], 2, vec!["--cache", "not a cache mode"]),
        (
            vec!["--cache", "4", "--grid", "8x16"],
            2,
            vec!["invalid --cache:", "own 8x8 token grid"],
        ),
        (
            vec!["--cache", "4", "--variant", "int8"],
            2,
            vec!["invalid --cache:", "not the int8 variant"],
        ),
    ] {
        let mut all = vec!["generate", "-m", &bs, "-o", "x.png"];
        all.extend(args);
        fails(d.path(), &all, code, &needles);
    }
    // A bundle whose cached graph is damaged, stale or missing: exact mode runs, --cache says why.
    fs::write(b.join("transformer.cached.onnx"), b"not a graph").unwrap();
    fails(
        d.path(),
        &["generate", "-m", &bs, "--cache", "4", "-o", "x.png"],
        1,
        &["cache.json records"],
    );
    ok(d.path(), &["generate", "-m", &bs, "-o", "still.png"]);
    fs::write(b.join("cache.json"), b"{").unwrap();
    fails(
        d.path(),
        &["generate", "-m", &bs, "--cache", "4", "-o", "x.png"],
        1,
        &["not a cache manifest"],
    );
    fs::remove_file(b.join("cache.json")).unwrap();
    fails(
        d.path(),
        &["generate", "-m", &bs, "--cache", "4", "-o", "x.png"],
        2,
        &["no cached-attention graph", "python -m export cache"],
    );
}

/// `absorb vary -m BUNDLE --image SOURCE --steps 8 ARGS -o OUT` in `dir`: the PNG's bytes and
/// its metadata.
fn vary_with_metadata(
    dir: &Path,
    bundle: &str,
    source: &str,
    args: &[&str],
    out: &str,
) -> (Vec<u8>, serde_json::Value) {
    let mut all = vec!["vary", "-m", bundle, "--image", source, "--steps", "8"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", out]);
    ok(dir, &all);
    let info = absorb(dir, &["info", out]);
    (
        fs::read(dir.join(out)).unwrap(),
        serde_json::from_slice(&info.stdout).unwrap(),
    )
}

#[test]
fn variations_redo_a_seeded_share_of_the_tokens_are_batch_independent_and_reproduced_by_from() {
    let d = tmp();
    let b = bundle_copy(d.path());
    let bs = b.to_string_lossy().into_owned();
    let (source_path, _) = &common::heldout()[1];
    let source = source_path.to_string_lossy().into_owned();
    let vary = |args: &[&str], out: &str| vary_with_metadata(d.path(), &bs, &source, args, out);
    // The source's tokens, to count what each variation kept.
    let tokens_of = |png: &str, out: &str| -> Vec<i64> {
        ok(d.path(), &["encode", "-m", &bs, "--image", png, "-o", out]);
        let j: serde_json::Value = serde_json::from_slice(&fs::read(d.path().join(out)).unwrap()).unwrap();
        j["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
            .collect()
    };
    let (three, meta) = vary(&["--seed", "9", "--count", "3", "--strength", "0.25"], "three.png");
    assert_eq!(
        (meta["mode"].as_str(), meta["strength"].as_f64(), meta["count"].as_u64()),
        (Some("vary"), Some(0.25), Some(3)),
        "{meta}"
    );
    let sha = common::sha256(&fs::read(source_path).unwrap());
    assert_eq!(meta["source_sha256"].as_str(), Some(sha.as_str()), "{meta}");
    // Each variation is the same made alone (by its index) as in the batch, and they differ.
    let mut alone = Vec::new();
    for i in 0..3u64 {
        let out = format!("v{i}.png");
        let index = i.to_string();
        let (png, meta) = vary(
            &[
                "--seed",
                "9",
                "--first-index",
                &index,
                "--strength",
                "0.25",
                "--max-batch",
                "1",
            ],
            &out,
        );
        assert_eq!(meta["index"].as_u64(), Some(i), "{meta}");
        alone.push((png, out));
    }
    assert_ne!(alone[0].0, alone[1].0, "two indices give two variations");
    let (batched, _) = vary(&["--seed", "9", "--first-index", "1", "--strength", "0.25"], "b1.png");
    assert_eq!(batched, alone[1].0, "the batch size does not change a variation");
    // A variation keeps about 1 - strength of the source's tokens; strength 1 keeps few.
    let src = tokens_of(&source, "src.json");
    let kept = |png: &str, out: &str| {
        let t = tokens_of(png, out);
        t.iter().zip(&src).filter(|(a, b)| a == b).count() as f64 / src.len() as f64
    };
    let k25 = kept("v0.png", "v0.json");
    assert!(k25 >= 0.6, "strength 0.25 kept {k25} of the tokens");
    let (_, _) = vary(&["--seed", "9", "--strength", "1"], "all.png");
    let k100 = kept("all.png", "all.json");
    assert!(k100 < k25, "strength 1 kept {k100}, strength 0.25 {k25}");
    // --from reproduces the sheet from the source, and refuses another source.
    ok(
        d.path(),
        &[
            "vary",
            "-m",
            &bs,
            "--image",
            &source,
            "--from",
            "three.png",
            "-o",
            "again.png",
        ],
    );
    assert_eq!(fs::read(d.path().join("again.png")).unwrap(), three);
    let other = common::heldout()[0].0.to_string_lossy().into_owned();
    fails(
        d.path(),
        &[
            "vary",
            "-m",
            &bs,
            "--image",
            &other,
            "--from",
            "three.png",
            "-o",
            "x.png",
        ],
        2,
        &[
            "three.png",
            "is a variation of an image with sha256",
            "pass the image it was made from",
        ],
    );
    fails(
        d.path(),
        &["generate", "-m", &bs, "--from", "three.png", "-o", "x.png"],
        2,
        &["was made by `absorb vary`", "use `absorb vary --from`"],
    );
    // Bad strengths are refused naming the flag; so is a bundle default out of range.
    for bad in ["0", "1.5", "nan", "-0.2"] {
        fails(
            d.path(),
            &["vary", "-m", &bs, "--image", &source, "--strength", bad, "-o", "x.png"],
            2,
            &["invalid --strength:"],
        );
    }
    edit_manifest(&b, |j| j["sampling"]["strength"] = serde_json::json!(0.3));
    let (_, meta) = vary(&["--seed", "9"], "default.png");
    assert_eq!(
        meta["strength"].as_f64().map(|s| (s * 100.0).round()),
        Some(30.0),
        "{meta}"
    );
    edit_manifest(&b, |j| j["sampling"]["strength"] = serde_json::json!(2.0));
    fails(
        d.path(),
        &["vary", "-m", &bs, "--image", &source, "-o", "x.png"],
        1,
        &["sampling.strength is 2"],
    );
}

#[test]
fn broken_bundles_are_refused_at_load_naming_the_file_and_field() {
    let d = tmp();
    let p = d.path();
    let b = bundle_copy(p);
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];

    edit_manifest(&b, |j| {
        j["tokens"]["mask_id"] = (j["tokens"]["codebook_size"].as_i64().unwrap() - 1).into()
    });
    fails(
        p,
        &gen,
        1,
        &["model.json", "tokens.mask_id", "must equal tokens.codebook_size"],
    );

    let b = bundle_copy(&p.join("2"));
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];
    edit_manifest(&b, |j| j["tokens"]["extra"] = 1.into());
    fails(p, &gen, 1, &["model.json", "unknown field `extra`"]);
    // A value of the wrong type names its key, not only a line and column.
    edit_manifest(&b, |j| {
        j["tokens"].as_object_mut().unwrap().remove("extra");
        j["image"]["height"] = "32".into();
    });
    fails(p, &gen, 1, &["model.json", "at image.height", "invalid type"]);

    let b = bundle_copy(&p.join("3"));
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];
    // The graphs are intact but the manifest claims a smaller codebook: the transformer's
    // output no longer matches and the contract check names it.
    edit_manifest(&b, |j| {
        j["tokens"]["codebook_size"] = 7.into();
        j["tokens"]["mask_id"] = 7.into();
    });
    fails(p, &gen, 1, &["graph \"transformer\"", "\"logits\"", "expected [batch"]);

    // A conditional transformer without the manifest's classes: the contract check says why.
    let b = bundle_copy(&p.join("3c"));
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];
    edit_manifest(&b, |j| {
        j.as_object_mut().unwrap().remove("classes");
    });
    fails(p, &gen, 1, &["graph \"transformer\"", "\"class\"", "classes"]);

    let b = bundle_copy(&p.join("4"));
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];
    fs::remove_file(b.join("decoder.onnx")).unwrap();
    fails(p, &gen, 1, &["graph \"decoder\"", "decoder.onnx", "cannot read"]);

    let b = bundle_copy(&p.join("5"));
    let bs = b.to_string_lossy().into_owned();
    let gen = ["generate", "-m", bs.as_str(), "-o", "x.png"];
    let t = b.join("transformer.onnx");
    let bytes = fs::read(&t).unwrap();
    fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    fails(p, &gen, 1, &["graph \"transformer\"", "sha256 is", "truncated"]);
    // Same corruption with the hash updated to match: ONNX Runtime itself refuses it.
    let sha = absorb::bundle::sha256_hex(&fs::read(&t).unwrap());
    edit_manifest(&b, |j| j["graphs"]["transformer"]["sha256"] = sha.into());
    fails(p, &gen, 1, &["graph \"transformer\"", "ONNX Runtime cannot load it"]);

    fails(
        p,
        &["generate", "-m", "no-such-dir", "-o", "x.png"],
        1,
        &["no-such-dir", "model.json"],
    );
    assert!(!p.join("x.png").exists(), "nothing is written when loading fails");
}

#[test]
fn a_missing_or_wrong_onnx_runtime_library_is_a_clear_error() {
    let d = tmp();
    let p = d.path();
    let m = model_arg();
    fails(
        p,
        &["generate", "-m", &m, "--ort-lib", "/nonexistent/libonnxruntime.so"],
        1,
        &["could not load ONNX Runtime", "/nonexistent/libonnxruntime.so"],
    );
    fs::write(p.join("libfake.so"), b"garbage").unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_absorb"))
        .args(["info", "-m", &m])
        .env("ORT_DYLIB_PATH", p.join("libfake.so"))
        .current_dir(p)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("libfake.so") && !stderr(&o).contains("panicked"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_explicit_gpu_provider_that_cannot_run_fails_instead_of_falling_back() {
    let d = tmp();
    let m = model_arg();
    for (provider, name) in [("cuda", "CUDA"), ("tensorrt", "TensorRT")] {
        let args = ["generate", "-m", &m, "--provider", provider, "-o", "x.png"];
        let err = fails(
            d.path(),
            &args,
            1,
            &[&format!("execution provider {provider} is not usable")],
        );
        // Why, in ONNX Runtime's words: a CPU-only build says the provider is not enabled (1.31),
        // or cannot find the provider library (the 1.17 npm build); without the cargo feature,
        // absorb says so itself.
        let why = if cfg!(feature = "cuda") && cfg!(feature = "tensorrt") {
            err.contains(&format!("{name} execution provider is not enabled in this build"))
                || err.contains(&format!(
                    "Failed to load library libonnxruntime_providers_{provider}.so"
                ))
        } else {
            err.contains(&format!("built without {name} support"))
        };
        assert!(why, "no reason given: {err}");
    }
    assert!(!d.path().join("x.png").exists());
    // auto falls back to CPU and says so in `info`.
    let o = absorb(d.path(), &["info", "-m", &m, "--provider", "auto"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["onnxruntime"]["provider_in_use"], "cpu");
}

#[test]
fn a_gpu_build_of_onnx_runtime_without_cuda_fails_fast_naming_the_missing_library() {
    // `make test` fetches onnxruntime-gpu (CUDA/TensorRT provider libraries, no CUDA on this
    // machine) and points this variable at it.
    let Some(gpu) = std::env::var_os("ABSORB_GPU_ORT") else {
        eprintln!("skipped: ABSORB_GPU_ORT is not set (make test sets it)");
        return;
    };
    if !(cfg!(feature = "cuda") && cfg!(feature = "tensorrt")) {
        eprintln!("skipped: built without the cuda and tensorrt features");
        return;
    }
    let d = tmp();
    let gpu = gpu.to_string_lossy().into_owned();
    let m = model_arg();
    let start = std::time::Instant::now();
    for (provider, lib) in [
        ("cuda", "libonnxruntime_providers_cuda.so"),
        ("tensorrt", "libonnxruntime_providers_tensorrt.so"),
    ] {
        fails(
            d.path(),
            &[
                "generate",
                "-m",
                &m,
                "--provider",
                provider,
                "--ort-lib",
                &gpu,
                "-o",
                "x.png",
            ],
            1,
            &[
                &format!("execution provider {provider} is not usable"),
                "Failed to load library",
                lib,
                "cannot open shared object file",
            ],
        );
    }
    eprintln!("both failures reported in {:.1?}", start.elapsed());
}

#[test]
fn an_onnx_runtime_older_than_1_17_is_refused_naming_both_versions() {
    // `make test` fetches ONNX Runtime 1.16.3 and points this variable at it.
    let Some(old) = std::env::var_os("ABSORB_TOO_OLD_ORT") else {
        eprintln!("skipped: ABSORB_TOO_OLD_ORT is not set (make test sets it)");
        return;
    };
    let d = tmp();
    let old = old.to_string_lossy().into_owned();
    fails(
        d.path(),
        &["info", "-m", &model_arg(), "--ort-lib", &old],
        1,
        &["ONNX Runtime 1.16", "too old", "needs 1.17 or newer"],
    );
}

/// Transformer calls from `-v`'s timing line.
fn calls_logged(err: &str) -> usize {
    let i = err.find(" transformer calls").expect("-v logs the calls");
    err[..i].rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn larger_grids_reproduce_and_previews_have_one_frame_per_step_that_revealed_something() {
    let d = tmp();
    let m = model_arg();
    ok(
        d.path(),
        &["generate", "-m", &m, "--seed", "8", "--grid", "8x16", "-o", "a.png"],
    );
    // --size in pixels (width x height) is the same request, and --from repeats it.
    ok(
        d.path(),
        &["generate", "-m", &m, "--seed", "8", "--size", "64x32", "-o", "b.png"],
    );
    ok(d.path(), &["generate", "-m", &m, "--from", "a.png", "-o", "c.png"]);
    let a = std::fs::read(d.path().join("a.png")).unwrap();
    assert!(
        a == std::fs::read(d.path().join("b.png")).unwrap(),
        "--size 64x32 != --grid 8x16"
    );
    assert!(
        a == std::fs::read(d.path().join("c.png")).unwrap(),
        "--from did not reproduce"
    );
    let meta = absorb::image::read_metadata(&d.path().join("a.png")).unwrap();
    assert_eq!(meta.grid, Some([8, 16]));

    // Four images at 16 steps: one frame per transformer call (= per step that revealed
    // something; all four images share each call).
    let o = absorb(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "1", "-n", "4", "--steps", "16", "--frames", "f.apng", "-o", "g.png", "-v",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let calls = calls_logged(&stderr(&o));
    let file = std::fs::File::open(d.path().join("f.apng")).unwrap();
    let reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    let frames = reader.info().animation_control().unwrap().num_frames as usize;
    assert_eq!(frames, calls);
    assert!((1..=16).contains(&frames), "{frames}");
    // A larger grid, as a GIF: again one frame per step with a call.
    let o = absorb(
        d.path(),
        &[
            "generate", "-m", &m, "--seed", "2", "--grid", "8x16", "--steps", "24", "--frames", "w.gif", "-o", "w.png",
            "-v",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let calls = calls_logged(&stderr(&o));
    use image::AnimationDecoder;
    let gif = std::fs::File::open(d.path().join("w.gif")).unwrap();
    let decoded = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert_eq!(decoded.len(), calls);
    assert_eq!(decoded[0].buffer().dimensions(), (64, 32));
}

#[test]
fn outpainting_keeps_the_input_pixels_and_bad_windows_are_rejected_with_exit_code_2() {
    let d = tmp();
    let m = model_arg();
    let digit = common::heldout()[0].0.to_string_lossy().into_owned();
    ok(
        d.path(),
        &[
            "outpaint",
            "-m",
            &m,
            "--image",
            &digit,
            "--extend",
            "left=8,down=16",
            "--seed",
            "1",
            "-o",
            "o.png",
        ],
    );
    let out = image::open(d.path().join("o.png")).unwrap().to_luma8();
    let input = image::open(&digit).unwrap().to_luma8();
    assert_eq!(out.dimensions(), (40, 48));
    for y in 0..32 {
        for x in 0..32 {
            assert_eq!(out.get_pixel(x + 8, y), input.get_pixel(x, y), "pixel {x},{y}");
        }
    }
    let gen = |extra: &[&str]| {
        let mut v = vec!["generate", "-m", m.as_str(), "--seed", "1", "-o", "x.png"];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(d.path(), &a, 2, needles);
    };
    run(gen(&["--grid", "4x16"]), &["grid", "smaller than the trained grid"]);
    run(gen(&["--grid", "8x16", "--stride", "9"]), &["stride", "out of range"]);
    run(gen(&["--grid", "8x16", "--window-margin", "4"]), &["window-margin"]);
    run(gen(&["--size", "63x32"]), &["size", "multiples of 4x4"]);
    run(gen(&["--frames", "x.jpg"]), &["frames", ".gif"]);
    run(
        gen(&["--grid", "8x16", "-n", "2", "--frames", "x.gif"]),
        &["frames", "one image at a time"],
    );
    let op = |extend: &str| {
        vec![
            "outpaint",
            "-m",
            m.as_str(),
            "--image",
            digit.as_str(),
            "--extend",
            extend,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    run(op("right=6"), &["extend", "multiple of 4"]);
    run(op("sideways=8"), &["sideways", "left, right, up or down"]);
    run(op("right=9000"), &["extend", "9000", "above the limit"]);
    let mut edge = op("right=8");
    edge.extend(["--outpaint-edge".into(), "4".into()]);
    run(edge, &["outpaint-edge", "less than half the trained grid"]);
    assert!(!d.path().join("x.png").exists(), "nothing written on error");
}

/// A writable copy of the bundle with its eval/ directory (the variant probe lives there).
fn bundle_copy_with_eval(dir: &Path) -> PathBuf {
    let out = bundle_copy(dir);
    fs::create_dir_all(out.join("eval")).unwrap();
    let probe = absorb::agreement::PROBE_FILE;
    fs::copy(common::model_dir().join(probe), out.join(probe)).unwrap();
    out
}

fn stdout_json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stderr(o)))
}

#[test]
fn the_int8_variant_holds_the_bundles_bar_on_this_cpu() {
    let d = tmp();
    let m = model_arg();
    let o = absorb(d.path(), &["check-variant", "-m", &m, "--variant", "int8"]);
    assert!(o.status.success(), "check-variant failed: {}", stderr(&o));
    let r = stdout_json(&o);
    let kernel = absorb::cpu::detect().int8_kernel.name();
    assert_eq!(r["cpu"]["int8_kernel"], kernel);
    assert_eq!(r["rows"], 128);
    assert!(r["positions"].as_u64().unwrap() > 4000, "{r}");
    let (agreement, bar) = (r["argmax_agreement"].as_f64().unwrap(), r["bar"].as_f64().unwrap());
    assert!(agreement >= bar && bar >= 0.95, "{r}");
    // What the exporter recorded for this CPU class, if it ran on one, is what runs here.
    if let Some(recorded) = r["recorded_here"].as_f64() {
        assert!((recorded - agreement).abs() < 0.005, "{r}");
    }
    let o = absorb(d.path(), &["info", "-m", &m]);
    assert_eq!(stdout_json(&o)["cpu"]["int8_kernel"], kernel);
}

#[test]
fn a_variant_recorded_below_its_bar_on_this_cpu_warns_and_fails_its_check() {
    let d = tmp();
    let b = bundle_copy_with_eval(d.path());
    let bs = b.to_string_lossy().into_owned();
    use absorb::cpu::Int8Kernel;
    let here = absorb::cpu::detect().int8_kernel;
    let kernel = here.name();
    // Another CPU class; the warning names the CPU feature it would take (amx_int8 for amx).
    let other = if here == Int8Kernel::Avx512Vnni {
        Int8Kernel::Amx
    } else {
        Int8Kernel::Avx512Vnni
    };
    edit_manifest(&b, |j| {
        let v = &mut j["provenance"]["metrics"]["variants"]["int8"];
        v["agreement_by_cpu"] = serde_json::json!({kernel: 0.8, other.name(): 0.99});
    });
    let o = absorb(d.path(), &["generate", "-m", &bs, "--variant", "int8", "-o", "x.png"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("80.0% of tokens") && err.contains("below the bundle's bar of 95.0%"),
        "{err}"
    );
    assert!(
        err.contains(&format!("CPUs with {} (0.990), which this one lacks", other.feature())),
        "{err}"
    );
    // the fp32 transformer says nothing
    let o = absorb(d.path(), &["generate", "-m", &bs, "-o", "y.png"]);
    assert!(!stderr(&o).contains("bar"), "{}", stderr(&o));
    // a bar this variant cannot meet: the check exits 1 and says so
    edit_manifest(&b, |j| {
        j["provenance"]["metrics"]["variants"]["int8"]["bar"] = 0.9999.into()
    });
    fails(
        d.path(),
        &["check-variant", "-m", &bs, "--variant", "int8"],
        1,
        &["below the bundle's bar of 99.99%", kernel],
    );
    fails(
        d.path(),
        &["check-variant", "-m", &bs],
        2,
        &["invalid --variant", "--variant int8"],
    );
    fs::remove_file(b.join(absorb::agreement::PROBE_FILE)).unwrap();
    fails(
        d.path(),
        &["check-variant", "-m", &bs, "--variant", "int8"],
        1,
        &["variant-probe.json"],
    );
}

/// The exact bytes of every kind of output for fixed seeds (tests/golden/): generate, a grid of
/// several, other samplers and schedules, inpaint, outpaint, a wider grid, a preview, a sharded
/// directory and the int8 variant. A change to any of them is a change to the determinism
/// contract.
#[test]
fn golden_bytes_of_every_kind_of_output() {
    let d = tmp();
    let p = d.path();
    let m = model_arg();
    let digit = common::heldout()[0].0.to_string_lossy().into_owned();
    let runs: &[(&str, &[&str])] = &[
        ("generate", &["generate", "--seed", "7", "-o", "generate.png"]),
        ("grid", &["generate", "--seed", "7", "--count", "4", "-o", "grid.png"]),
        (
            "maskgit",
            &[
                "generate",
                "--seed",
                "3",
                "--steps",
                "16",
                "--sampler",
                "maskgit",
                "-t",
                "1.2:0.6",
                "-o",
                "maskgit.png",
            ],
        ),
        (
            "even",
            &[
                "generate",
                "--seed",
                "3",
                "--steps",
                "8",
                "--sampler",
                "even",
                "-o",
                "even.png",
            ],
        ),
        (
            "halton",
            &[
                "generate",
                "--seed",
                "3",
                "--count",
                "2",
                "--steps",
                "6",
                "--sampler",
                "halton",
                "-o",
                "halton.png",
            ],
        ),
        (
            "threshold",
            &[
                "generate",
                "--seed",
                "3",
                "--count",
                "2",
                "--steps",
                "16",
                "--sampler",
                "threshold",
                "--threshold",
                "0.8",
                "-o",
                "threshold.png",
            ],
        ),
        (
            "maskgit-threshold",
            &[
                "generate",
                "--seed",
                "3",
                "--count",
                "2",
                "--steps",
                "8",
                "--sampler",
                "maskgit-threshold",
                "--threshold",
                "0.8",
                "-o",
                "maskgit-threshold.png",
            ],
        ),
        (
            "cache",
            &[
                "generate",
                "--seed",
                "3",
                "--count",
                "2",
                "--steps",
                "16",
                "--sampler",
                "absorbing",
                "--cache",
                "4",
                "-o",
                "cache.png",
            ],
        ),
        (
            "guidance",
            &[
                "generate",
                "--seed",
                "3",
                "--count",
                "2",
                "--steps",
                "8",
                "--class",
                "4",
                "--guidance",
                "2",
                "-o",
                "guidance.png",
            ],
        ),
        (
            "vary",
            &[
                "vary",
                "--image",
                &digit,
                "--strength",
                "0.4",
                "--seed",
                "5",
                "--count",
                "2",
                "--steps",
                "8",
                "-o",
                "vary.png",
            ],
        ),
        (
            "inpaint",
            &[
                "inpaint",
                "--image",
                &digit,
                "--rect",
                "8,8,16,16",
                "--seed",
                "5",
                "-o",
                "inpaint.png",
            ],
        ),
        (
            "inpaint-all",
            &[
                "inpaint",
                "--image",
                &digit,
                "--rect",
                "0,0,16,32",
                "--seed",
                "5",
                "--decode-all",
                "-o",
                "inpaint-all.png",
            ],
        ),
        (
            "outpaint",
            &[
                "outpaint",
                "--image",
                &digit,
                "--extend",
                "right=16,down=8",
                "--seed",
                "2",
                "-o",
                "outpaint.png",
            ],
        ),
        (
            "wide",
            &["generate", "--seed", "11", "--grid", "8x16", "-o", "wide.png"],
        ),
        (
            "preview",
            &[
                "generate",
                "--seed",
                "4",
                "--count",
                "2",
                "--steps",
                "8",
                "--frames",
                "preview.gif",
                "-o",
                "preview.png",
            ],
        ),
        (
            "shard",
            &[
                "generate", "--seed", "9", "--count", "6", "--shard", "1/2", "-o", "shard/",
            ],
        ),
        (
            "int8",
            &["generate", "--seed", "7", "--variant", "int8", "-o", "int8.png"],
        ),
    ];
    for (_, args) in runs {
        let mut args = args.to_vec();
        args.extend(["-m", &m]);
        ok(p, &args);
    }
    let mut got = std::collections::BTreeMap::new();
    let mut files: Vec<PathBuf> = fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
    files.extend(fs::read_dir(p.join("shard")).unwrap().map(|e| e.unwrap().path()));
    files.retain(|f| f.extension().is_some_and(|e| e == "png" || e == "gif"));
    for f in files {
        let name = f.strip_prefix(p).unwrap().to_string_lossy().into_owned();
        got.insert(name, common::sha256(&fs::read(&f).unwrap()));
    }
    assert_eq!(got.len(), runs.len() + 1 + 2, "{got:?}"); // + the preview's gif, 3 shard PNGs
    common::check_golden("cli", &got);
}
