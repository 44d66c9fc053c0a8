//! Shared helpers for the integration tests: the bundled model, one pipeline per test binary,
//! the digits classifier that judges samples, and the absorb binary for CLI tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use absorb::graphs::Auxiliary;
use absorb::image::{self, Tensor};
use absorb::{Pipeline, Provider, RuntimeOptions};

/// The bundle under test: `ABSORB_TEST_MODEL` or the committed `models/digits`.
pub fn model_dir() -> PathBuf {
    std::env::var_os("ABSORB_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits"))
}

pub fn eval_dir() -> PathBuf {
    model_dir().join("eval")
}

/// One pipeline per test binary (ONNX Runtime allows one environment per process).
pub fn pipeline() -> MutexGuard<'static, Pipeline> {
    static P: OnceLock<Mutex<Pipeline>> = OnceLock::new();
    P.get_or_init(|| {
        Mutex::new(Pipeline::load(&model_dir(), &RuntimeOptions::default(), Provider::Cpu).expect("load the bundle"))
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

/// The numbers recorded when the bundle was trained (`eval/quality.json`).
pub fn quality() -> serde_json::Value {
    let text = std::fs::read_to_string(eval_dir().join("quality.json")).expect("eval/quality.json");
    serde_json::from_str(&text).expect("quality.json is JSON")
}

/// The committed held-out real digits: (path, label).
pub fn heldout() -> Vec<(PathBuf, usize)> {
    let mut out: Vec<(PathBuf, usize)> = std::fs::read_dir(eval_dir().join("heldout"))
        .expect("eval/heldout")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let label = stem.rsplit('_').next().unwrap().parse().expect("NNN_L.png");
            (p, label)
        })
        .collect();
    out.sort();
    out
}

/// Digit classes of the classifier; class 10 is "not a digit".
pub const DIGITS: usize = 10;

/// Runs the bundle's classifier; returns (confidence, predicted digit) per image, where
/// confidence = max over digit classes of softmax over all outputs (eval README's definition).
pub fn classify(p: &Pipeline, images: &[Tensor]) -> Vec<(f32, usize)> {
    static C: OnceLock<Mutex<Auxiliary>> = OnceLock::new();
    let mut c = C
        .get_or_init(|| {
            let path = eval_dir().join("classifier.onnx");
            Mutex::new(Auxiliary::load(p.runtime(), &path, "image", "logits").expect("load the classifier"))
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let t = &images[0];
    let data: Vec<f32> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
    let (logits, shape) = c
        .infer(&data, &[images.len(), t.channels, t.height, t.width])
        .expect("classify");
    let classes = shape[1];
    logits
        .chunks(classes)
        .map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let (best, p) = exp[..DIGITS]
                .iter()
                .enumerate()
                .fold((0, 0.0f32), |b, (i, &e)| if e > b.1 { (i, e) } else { b });
            (p / sum, best)
        })
        .collect()
}

/// Mean confidence and class histogram.
pub fn judge(p: &Pipeline, images: &[Tensor]) -> (f32, [usize; DIGITS]) {
    let results = classify(p, images);
    let mut hist = [0usize; DIGITS];
    for &(_, c) in &results {
        hist[c] += 1;
    }
    (results.iter().map(|r| r.0).sum::<f32>() / results.len() as f32, hist)
}

/// Loads the held-out PNGs as tensors.
pub fn heldout_tensors(p: &Pipeline) -> Vec<Tensor> {
    heldout()
        .iter()
        .map(|(path, _)| image::load_image(path, &p.bundle().manifest().image).unwrap())
        .collect()
}

/// The absorb binary as a command. `ABSORB_TEST_RUNNER` (a program and its flags, e.g.
/// `qemu-x86_64 -cpu EPYC-Rome`) runs it under that program, so that this machine can make the
/// bytes of another CPU family (`make goldens-avx2`); unset, the binary runs as it is. Only the
/// tests that go through this function (`absorb`, the service's `Server::start`) honour it.
pub fn absorb_command() -> Command {
    let runner = std::env::var("ABSORB_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_absorb"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_absorb")),
    }
}

/// Whether the binary runs under `ABSORB_TEST_RUNNER` (an emulator: every call is 10-50x slower).
pub fn under_runner() -> bool {
    std::env::var("ABSORB_TEST_RUNNER").is_ok_and(|r| !r.trim().is_empty())
}

/// The absorb binary, run in `dir`, with stdin closed.
pub fn absorb(dir: &Path, args: &[&str]) -> Output {
    absorb_command()
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run absorb")
}

/// `--model <bundle>` for CLI calls.
pub fn model_arg() -> String {
    model_dir().to_string_lossy().into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// sha256 of bytes, lowercase hex.
pub fn sha256(bytes: &[u8]) -> String {
    absorb::bundle::sha256_hex(bytes)
}

/// `{arch}-{int8 kernel}` of the CPU the absorb binary sees: this machine's, or under
/// `ABSORB_TEST_RUNNER` the emulated one's (as `absorb info` reports it), which must then equal
/// `ABSORB_TEST_GOLDEN_KEY`: an emulator that drops a feature (qemu before 7.2 has no AVX2) or a
/// host flag read from /proc/cpuinfo (AMX) would otherwise file the bytes under another family.
pub fn golden_key() -> String {
    if under_runner() {
        let o = absorb_command()
            .args(["info", "-m", &model_arg()])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run absorb info under ABSORB_TEST_RUNNER");
        assert!(
            o.status.success(),
            "absorb info under ABSORB_TEST_RUNNER: {}",
            stderr(&o)
        );
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("absorb info prints JSON");
        let cpu = &info["cpu"];
        let key = format!(
            "{}-{}",
            cpu["arch"].as_str().unwrap(),
            cpu["int8_kernel"].as_str().unwrap()
        );
        let want = std::env::var("ABSORB_TEST_GOLDEN_KEY").expect("ABSORB_TEST_RUNNER needs ABSORB_TEST_GOLDEN_KEY");
        assert_eq!(
            key, want,
            "the binary under ABSORB_TEST_RUNNER sees CPU family {key}, not {want}"
        );
        return key;
    }
    let cpu = absorb::cpu::detect();
    format!("{}-{}", cpu.arch, cpu.int8_kernel.name())
}

/// Compares `got` (case -> sha256 of the bytes made) with `tests/golden/SUITE-KEY.json`, where
/// KEY is `golden_key()`, the CPU family the binary ran on: PNG bytes are promised only for the same build,
/// provider and CPU family (ONNX Runtime's float kernels differ in the last bits between AVX2,
/// AVX-512 and NEON, and a decoder value near a rounding boundary moves). No file for this CPU
/// family: the hashes are written under target/ to be committed, and nothing is compared.
/// `ABSORB_GOLDEN_WRITE=1` rewrites the committed file (only for a change that is meant to
/// alter bytes: say so in the changelog).
pub fn check_golden(suite: &str, got: &std::collections::BTreeMap<String, String>) {
    let key = golden_key();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("tests/golden").join(format!("{suite}-{key}.json"));
    let text = serde_json::to_string_pretty(got).unwrap() + "\n";
    if std::env::var_os("ABSORB_GOLDEN_WRITE").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        eprintln!("wrote {}", path.display());
        return;
    }
    let Ok(want) = std::fs::read_to_string(&path) else {
        let out = root.join("target").join(format!("golden-{suite}-{key}.json"));
        std::fs::write(&out, text).unwrap();
        eprintln!(
            "no golden hashes for CPU family {key}: wrote {}; commit it as {}",
            out.display(),
            path.display()
        );
        return;
    };
    let want: std::collections::BTreeMap<String, String> = serde_json::from_str(&want).unwrap();
    let differ: Vec<&String> = want.keys().filter(|k| got.get(*k) != want.get(*k)).collect();
    assert!(
        differ.is_empty() && want.len() == got.len(),
        "{}: bytes changed for {differ:?} (cases made: {:?})",
        path.display(),
        got.keys().collect::<Vec<_>>()
    );
}
