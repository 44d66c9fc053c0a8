//! `absorb generate --out DIR/` as a batch job on the real bundle: shards that add up to one run
//! byte for byte, a SIGKILLed run that a rerun completes, damaged directories repaired as
//! documented (README "Scale out"), and bad shard settings refused with exit code 2.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{absorb, model_arg, stderr};

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = absorb(dir, args);
    let err = stderr(&o);
    assert!(o.status.success(), "absorb {args:?} failed: {err}");
    err
}

/// `generate` of the digits bundle, seed 7, at few steps (the tests are about files, not quality).
fn generate<'a>(out: &'a str, count: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = ["generate", "-m", &model_arg(), "--seed", "7", "--steps", "8"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--count", count, "-o", out].iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(dir: &Path, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(dir, &args)
}

/// File name -> bytes of every file directly in `dir` whose name ends in `suffix`.
fn files(dir: &Path, suffix: &str) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().into_string().unwrap(), e.path()))
        .filter(|(n, _)| n.ends_with(suffix))
        .map(|(n, p)| (n, fs::read(p).unwrap()))
        .collect()
}

/// Every manifest line in `dir`, keyed by file; panics if a file is listed twice or a line's hash
/// and size are not the file's.
fn manifest(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    for (name, text) in files(dir, ".jsonl") {
        assert!(name.starts_with("manifest-7-"), "{name}");
        let text = String::from_utf8(text).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "{name} ends in a whole line");
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let file = v["file"].as_str().unwrap().to_string();
            let bytes = fs::read(dir.join(&file)).unwrap();
            assert_eq!(v["bytes"], bytes.len() as u64, "{file}");
            assert_eq!(v["sha256"], absorb::bundle::sha256_hex(&bytes), "{file}");
            assert!(out.insert(file.clone(), v).is_none(), "{file} is listed twice");
        }
    }
    out
}

fn without_shard(m: &BTreeMap<String, serde_json::Value>) -> BTreeMap<String, serde_json::Value> {
    m.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.as_object_mut().unwrap().remove("shard");
            (k.clone(), v)
        })
        .collect()
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn three_shards_make_the_files_and_manifest_lines_of_one_run() {
    let d = tempfile::tempdir().unwrap();
    let err = run(d.path(), &generate("one/", "10", &["--tokens-out", "tokens.json"]));
    assert!(err.contains("made 10, skipped 0, regenerated 0, foreign 0"), "{err}");
    // Three workers at once into one directory, as an Indexed Job runs them: shards 0 and 1 by
    // flag, shard 2 from the environment (JOB_COMPLETION_INDEX and ABSORB_SHARDS).
    let spawn = |extra: &[&str], env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_absorb"))
            .args(generate("three/", "10", extra))
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("ABSORB_SHARDS")
            .envs(env.iter().copied())
            .current_dir(d.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let workers = [
        spawn(&["--shard", "0/3"], &[]),
        spawn(&["--shard", "1/3"], &[]),
        spawn(&[], &[("JOB_COMPLETION_INDEX", "2"), ("ABSORB_SHARDS", "3")]),
    ];
    let expected = ["images 0..3 of 0..10", "images 3..6 of 0..10", "images 6..10 of 0..10"];
    for (w, expected) in workers.into_iter().zip(expected) {
        let o = w.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(o.status.success() && err.contains(expected), "{err}");
    }
    let (one, three) = (d.path().join("one"), d.path().join("three"));
    let pngs = files(&one, ".png");
    assert_eq!(pngs.len(), 10);
    assert_eq!(pngs, files(&three, ".png"), "byte-identical files");
    let (m1, m3) = (manifest(&one), manifest(&three));
    assert_eq!(m1.keys().collect::<Vec<_>>(), pngs.keys().collect::<Vec<_>>());
    assert_eq!(without_shard(&m1), without_shard(&m3), "equivalent manifests");
    assert_eq!(m3["7-000005.png"]["shard"], "1/3");
    assert_eq!(m3["7-000009.png"]["shard"], "2/3");
    assert_eq!(m1["7-000005.png"]["shard"], "0/1");
    assert_eq!(files(&three, ".jsonl").len(), 3, "one manifest per shard");

    // --tokens-out still lists every image of the run, in index order.
    let tokens: serde_json::Value = serde_json::from_slice(&fs::read(d.path().join("tokens.json")).unwrap()).unwrap();
    let indices: Vec<u64> = tokens["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (0..10).collect::<Vec<_>>());
}

#[test]
fn a_run_killed_mid_way_is_completed_by_a_rerun_with_nothing_lost_or_listed_twice() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    // The bundle's 64 steps, two images per chunk: the run takes seconds, a chunk milliseconds.
    let mut args = generate("out/", "24", &["--max-batch", "2"]);
    let steps = args.iter().position(|a| a == "--steps").unwrap();
    args.drain(steps..steps + 2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_absorb"))
        .args(&args)
        .current_dir(d.path())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !out.exists() || files(&out, ".png").is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "no PNG after 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = files(&out, ".png").len();
    assert!(before < 24, "killed mid-way: {before} of 24 written");

    let err = run(d.path(), &args);
    assert!(err.contains(&format!("skipped {before},")), "{err}");
    assert!(temp_files(&out).is_empty(), "{:?}", temp_files(&out));
    let pngs = files(&out, ".png");
    let listed = manifest(&out);
    assert_eq!(listed.keys().collect::<Vec<_>>(), pngs.keys().collect::<Vec<_>>());

    // The same set as an uninterrupted run.
    run(
        d.path(),
        &args.iter().map(|a| a.replace("out/", "whole/")).collect::<Vec<_>>(),
    );
    assert_eq!(pngs, files(&d.path().join("whole"), ".png"));
    assert_eq!(listed, manifest(&d.path().join("whole")));
}

#[test]
fn a_damaged_directory_is_repaired_and_foreign_files_are_moved_aside() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    run(d.path(), &generate("out/", "6", &[]));
    run(d.path(), &generate("other/", "6", &["--temperature", "1.0"]));
    let good = files(&out, ".png");
    let manifest_path = out.join("manifest-7-00000-of-00001.jsonl");
    let lines = fs::read_to_string(&manifest_path).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 6);

    // 1 truncated; 2 replaced by a PNG of another request (same name, other temperature);
    // 3 kept but its line lost (killed between rename and append); a partial line at the end
    // (killed mid-append); temporary files of a killed run, this shard's and an untagged one.
    let name = |i: u64| format!("7-{i:06}.png");
    fs::write(out.join(name(1)), &good[&name(1)][..300]).unwrap();
    let foreign = fs::read(d.path().join("other").join(name(2))).unwrap();
    fs::write(out.join(name(2)), &foreign).unwrap();
    let kept: Vec<&str> = lines.iter().copied().filter(|l| !l.contains(&name(3))).collect();
    fs::write(&manifest_path, kept.join("\n") + "\n" + &lines[3][..40]).unwrap();
    fs::write(out.join(".absorb-7-00000-of-00001-aB3dE9.png.tmp"), b"half a png").unwrap();
    fs::write(out.join(".absorb-Zq81xY.png.tmp"), b"half a png").unwrap();

    let err = run(d.path(), &generate("out/", "6", &[]));
    assert!(
        err.contains("made 0, skipped 4, regenerated 1, foreign 1 (moved to .absorb-foreign/), 1 kept files added to the manifest, 2 temporary files of an interrupted run deleted"),
        "{err}"
    );
    assert!(
        err.contains("7-000001.png: pixel data") || err.contains("7-000001.png: not a readable PNG"),
        "{err}"
    );
    let bundle: serde_json::Value =
        serde_json::from_slice(&fs::read(common::model_dir().join("model.json")).unwrap()).unwrap();
    let default_temperature = bundle["sampling"]["temperature"].as_f64().unwrap();
    assert!(
        err.contains(&format!(
            "a PNG of another request (its temperature is 1.0, this run's {default_temperature:?})"
        )),
        "{err}"
    );
    assert_eq!(files(&out, ".png"), good, "every image is this request's again");
    assert_eq!(
        fs::read(out.join(".absorb-foreign").join(name(2))).unwrap(),
        foreign,
        "never destroyed"
    );
    assert!(temp_files(&out).is_empty());
    assert_eq!(manifest(&out).len(), 6);

    // A rerun of a complete directory only checks.
    let err = run(d.path(), &generate("out/", "6", &[]));
    assert!(
        err.contains("made 0, skipped 6, regenerated 0, foreign 0; manifest"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&manifest_path).unwrap().lines().count(), 6);
}

#[test]
fn bad_shard_settings_are_refused_with_exit_code_2() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    // (flags, environment, what stderr says)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            &["--shard", "3/3"],
            &[],
            "shard 3 of 3 does not exist: shards are numbered 0 to 2",
        ),
        (&["--shard", "1/0"], &[], "the shard count is 0"),
        (&["--shard", "one/3"], &[], "is not I/M"),
        (&["--shard", "1/3", "--shards", "3"], &[], "cannot be used with"),
        (&["--shards", "3"], &[], "JOB_COMPLETION_INDEX is not set"),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "1")],
            "invalid JOB_COMPLETION_INDEX: set to 1",
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "x")],
            "invalid JOB_COMPLETION_INDEX: \"x\"",
        ),
        (
            &[],
            &[("JOB_COMPLETION_INDEX", "4"), ("ABSORB_SHARDS", "4")],
            "shard 4 of 4 does not exist",
        ),
        (
            &["--shards", "2"],
            &[("JOB_COMPLETION_INDEX", "0"), ("ABSORB_SHARDS", "x")],
            "invalid --seed",
        ),
    ];
    for (extra, env, needle) in cases {
        let mut args = vec!["generate", "-m", &m, "--count", "4", "-o", "out/"];
        if !needle.starts_with("invalid --seed") {
            args.extend(["--seed", "7"]);
        }
        args.extend(extra.iter());
        let o = Command::new(env!("CARGO_BIN_EXE_absorb"))
            .args(&args)
            .env_remove("JOB_COMPLETION_INDEX")
            .env_remove("ABSORB_SHARDS")
            .envs(env.iter().copied())
            .current_dir(d.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(needle), "{args:?} {env:?}: stderr lacks {needle:?}: {err}");
        assert!(!d.path().join("out").exists(), "nothing is written: {args:?}");
    }
    // A .png output holds one grid: no shards.
    let o = absorb(
        d.path(),
        &["generate", "-m", &m, "--seed", "7", "--shard", "0/2", "-o", "g.png"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("need a directory output"), "{}", stderr(&o));
}

#[test]
fn a_larger_grid_shards_and_resumes_like_the_bundles_own() {
    let d = tempfile::tempdir().unwrap();
    let wide = ["--grid", "8x16", "--max-batch", "2"];
    run(d.path(), &generate("whole/", "3", &wide));
    for shard in ["0/2", "1/2"] {
        let mut extra = wide.to_vec();
        extra.extend(["--shard", shard]);
        run(d.path(), &generate("parts/", "3", &extra));
    }
    let (whole, parts) = (d.path().join("whole"), d.path().join("parts"));
    let pngs = files(&whole, ".png");
    assert_eq!(pngs, files(&parts, ".png"));
    assert_eq!(without_shard(&manifest(&whole)), without_shard(&manifest(&parts)));
    // Each file is the image a single .png run makes for its index, tiling metadata included.
    run(
        d.path(),
        &generate("two.png", "1", &["--grid", "8x16", "--first-index", "2"]),
    );
    assert_eq!(pngs["7-000002.png"], fs::read(d.path().join("two.png")).unwrap());

    // Gaps around a kept file in one chunk: only those images are made again.
    fs::remove_file(parts.join("7-000000.png")).unwrap();
    fs::remove_file(parts.join("7-000002.png")).unwrap();
    let err = run(
        d.path(),
        &generate("parts/", "3", &["--grid", "8x16", "--max-batch", "3"]),
    );
    assert!(err.contains("made 2, skipped 1,"), "{err}");
    assert_eq!(pngs, files(&parts, ".png"));
    // The bundle's own grid is another request: those files are moved aside, never overwritten.
    let err = run(d.path(), &generate("parts/", "3", &[]));
    assert!(err.contains("made 0, skipped 0, regenerated 0, foreign 3"), "{err}");
    assert_eq!(files(&parts.join(".absorb-foreign"), ".png"), pngs);

    let o = absorb(
        d.path(),
        &[
            "generate",
            "-m",
            &model_arg(),
            "--seed",
            "7",
            "-o",
            "p/",
            "--frames",
            "f.gif",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("previews go with a .png output"), "{}", stderr(&o));
}

/// Runs `script` (sh) with `dir` as a fresh tmpfs of `size` mounted over it, in a private mount
/// namespace (unprivileged: a user namespace; or as root). `None` if this machine allows neither.
fn on_small_tmpfs(dir: &Path, size: &str, script: &str) -> Option<std::process::Output> {
    let body = format!(
        "mount -t tmpfs -o size={size} absorb-test {} || exit 97\n{script}",
        dir.display()
    );
    let attempts: [&[&str]; 2] = [&["--user", "--map-root-user", "--mount"], &["--mount"]];
    for flags in attempts {
        let o = Command::new("unshare")
            .args(flags)
            .args(["sh", "-c", &body])
            .stdin(Stdio::null())
            .output();
        match o {
            Ok(o) if o.status.code() == Some(97) || (!o.status.success() && o.stdout.is_empty()) => continue,
            Ok(o) => return Some(o),
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn a_full_disk_leaves_only_complete_pngs_and_a_rerun_after_freeing_space_completes_the_set() {
    let d = tempfile::tempdir().unwrap();
    let (disk, first, second) = (d.path().join("disk"), d.path().join("first"), d.path().join("second"));
    for p in [&disk, &first, &second] {
        fs::create_dir(p).unwrap();
    }
    let args = generate("out/", "120", &[]).join(" ");
    let bin = env!("CARGO_BIN_EXE_absorb");
    // 120 PNGs of a few KiB each do not fit in 96 KiB: the run stops on ENOSPC. Its files are
    // copied out, then the tmpfs grows (space freed) and the same command runs again.
    let script = format!(
        "cd {disk}\n\
         {bin} {args} 2>run1.err; echo $? >run1.code\n\
         cp -a out run1.err run1.code {first}/ 2>/dev/null; cp run1.err run1.code {first}/\n\
         mount -o remount,size=4m {disk} || exit 98\n\
         {bin} {args} 2>run2.err; echo $? >run2.code\n\
         cp -a out run2.err run2.code {second}/\n",
        disk = disk.display(),
        first = first.display(),
        second = second.display(),
    );
    let Some(o) = on_small_tmpfs(&disk, "96k", &script) else {
        eprintln!("SKIPPED: this machine allows no private tmpfs mount (no user namespaces, not root)");
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &Path| fs::read_to_string(p).unwrap();

    // The full disk: a non-zero exit naming the cause, a summary that says what was made.
    let (code, err) = (read(&first.join("run1.code")), read(&first.join("run1.err")));
    assert_ne!(code.trim(), "0", "a full disk must fail the run: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("free space and run the same command again"), "{err}");
    assert!(
        !err.contains(".absorb-"),
        "the error names the file, not its temporary: {err}"
    );
    let out = first.join("out");
    let pngs = files(&out, ".png");
    assert!(!pngs.is_empty() && pngs.len() < 120, "{} PNGs fit: {err}", pngs.len());
    assert!(
        err.contains(&format!("made {},", pngs.len())),
        "the summary counts the PNGs written: {err}"
    );
    assert!(
        temp_files(&out).is_empty(),
        "temporary files left: {:?}",
        temp_files(&out)
    );
    for (name, bytes) in &pngs {
        let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png);
        assert!(img.is_ok(), "{name} is not a complete PNG");
    }

    // After freeing space the rerun keeps those and completes the set: the files of a run that
    // never ran out of space.
    let (code, err) = (read(&second.join("run2.code")), read(&second.join("run2.err")));
    assert_eq!(code.trim(), "0", "{err}");
    assert!(err.contains(&format!("skipped {}", pngs.len())), "{err}");
    let all = files(&second.join("out"), ".png");
    assert_eq!(all.len(), 120);
    for (name, bytes) in &pngs {
        assert_eq!(all.get(name), Some(bytes), "{name} was kept as it was");
    }
    let whole = d.path().join("whole");
    fs::create_dir(&whole).unwrap();
    run(&whole, &generate("out/", "120", &[]));
    assert_eq!(all, files(&whole.join("out"), ".png"));
    assert_eq!(manifest(&second.join("out")), manifest(&whole.join("out")));
}
