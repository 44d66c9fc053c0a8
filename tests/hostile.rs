//! Hostile numbers and files against the `absorb` binary on the real bundle: every numeric flag
//! at 0, 1, its limit, its limit + 1, `u32::MAX` and `u64::MAX`; sizes read from token files and
//! PNG metadata; images that declare a huge canvas. Each must give exit 2 (bad input) and a
//! message naming the flag or field, the value and the limit, or succeed when it is legal; a
//! panic (exit 101) or a crash fails the test.

mod common;

use std::fs;
use std::path::Path;

use common::{absorb, model_arg, stderr};

const U32: &str = "4294967295";
const U64: &str = "18446744073709551615";

/// Runs absorb expecting `code` and, on failure, a message containing every `needles` entry.
fn expect(dir: &Path, args: &[&str], code: i32, needles: &[&str]) {
    let o = absorb(dir, args);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "absorb {args:?} panicked: {err}");
    assert_eq!(
        o.status.code(),
        Some(code),
        "absorb {args:?}: expected exit {code}, stderr: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "absorb {args:?}: stderr lacks {n:?}: {err}");
    }
}

/// Runs absorb like [`expect`] and returns the child's peak resident set in MiB (from
/// `wait4`'s rusage, so it is the child's own, not this test's).
// The child is reaped by `wait4`, which clippy does not know of.
#[allow(clippy::zombie_processes)]
fn expect_rss(dir: &Path, args: &[&str], code: i32, needles: &[&str]) -> f64 {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_absorb"))
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run absorb");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: the pid is our unreaped child; status and usage are valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(
        pid,
        child.id() as libc::pid_t,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    assert!(!err.contains("panicked"), "absorb {args:?} panicked: {err}");
    assert!(libc::WIFEXITED(status), "absorb {args:?} was killed: {err}");
    assert_eq!(libc::WEXITSTATUS(status), code, "absorb {args:?}: stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "absorb {args:?}: stderr lacks {n:?}: {err}");
    }
    usage.ru_maxrss as f64 / 1024.0
}

fn with_model<'a>(m: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(["-m", m]);
    v
}

#[test]
fn every_numeric_generate_flag_at_its_edges_is_refused_or_works_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    let cases: &[(&[&str], i32, &[&str])] = &[
        // --count: 1 works, the single-PNG limit works (checked below), one more is refused.
        (&["generate", "--count", "0"], 2, &["count", "0"]),
        (
            &["generate", "--count", "1025", "--steps", "1"],
            2,
            &["count", "1025", "1024"],
        ),
        (&["generate", "--count", U32], 2, &["count", U32]),
        (&["generate", "--count", U64], 2, &["count", U64]),
        (
            &["generate", "--count", "2000000", "-o", "dir/"],
            2,
            &["count", "2000000", "1000000"],
        ),
        // --first-index + --count must stay within u64.
        (
            &["generate", "--first-index", U64, "--count", "2"],
            2,
            &["first-index", U64],
        ),
        (
            &["generate", "--first-index", U64, "--steps", "1", "-o", "last.png"],
            0,
            &[],
        ),
        // --columns: 1..=count.
        (&["generate", "--count", "2", "--columns", "0"], 2, &["columns", "0"]),
        (
            &["generate", "--count", "2", "--columns", "3"],
            2,
            &["columns", "3", "1..=2"],
        ),
        (&["generate", "--count", "2", "--columns", U64], 2, &["columns", U64]),
        // --steps: 1..=64 tokens; negative numbers name the flag and the range.
        (&["generate", "--steps", "0"], 2, &["steps", "0", "1..=64"]),
        (&["generate", "--steps", "65"], 2, &["steps", "65", "1..=64"]),
        (&["generate", "--steps", U32], 2, &["steps", U32]),
        (&["generate", "--steps", U64], 2, &["steps", U64]),
        (&["generate", "--steps", "-1"], 2, &["--steps", "-1", "0.."]),
        (&["generate", "--seed", "-1"], 2, &["--seed", "-1", U64]),
        (&["generate", "--seed", U64, "--steps", "1", "-o", "s.png"], 0, &[]),
        // --threads: 1..=256.
        (&["generate", "--threads", "0"], 2, &["threads", "0"]),
        (&["generate", "--threads", "257"], 2, &["threads", "257", "256"]),
        (&["generate", "--threads", U64], 2, &["threads", U64, "256"]),
        // --max-batch: 1..=256.
        (&["generate", "--max-batch", "0"], 2, &["max-batch", "0"]),
        (&["generate", "--max-batch", "257"], 2, &["max-batch", "257", "256"]),
        (&["generate", "--max-batch", U64], 2, &["max-batch", U64]),
        // --grid and --size: at most 1024 tokens and 8192 pixels a side; errors speak of the flag given.
        (&["generate", "--grid", "1025x8"], 2, &["grid", "1025", "1024"]),
        (&["generate", "--grid", &format!("{U64}x8")], 2, &["grid", U64]),
        (&["generate", "--grid", U32], 2, &["grid", U32]),
        (&["generate", "--size", &format!("32x{U64}")], 2, &["size", U64]),
        (&["generate", "--size", "4100x32"], 2, &["size", "4100", "4096"]),
        (&["generate", "--size", "8x32"], 2, &["size", "8x32"]),
        // --stride and --window-margin at huge values (2 x margin wraps without checks).
        (&["generate", "--grid", "8x16", "--stride", U64], 2, &["stride", U64]),
        (
            &["generate", "--grid", "8x16", "--window-margin", "9223372036854775808"],
            2,
            &["window-margin"],
        ),
        (
            &["generate", "--grid", "8x16", "--window-margin", U64],
            2,
            &["window-margin", U64],
        ),
        // Shards.
        (
            &[
                "generate",
                "--seed",
                "1",
                "-o",
                "sh/",
                "--shard",
                &format!("{U64}/{U64}"),
            ],
            2,
            &["shard"],
        ),
        (
            &["generate", "--seed", "1", "-o", "sh/", "--shards", "0"],
            2,
            &["shard"],
        ),
        // --frame-ms is a u16.
        (&["generate", "--frame-ms", "65536"], 2, &["--frame-ms", "65536"]),
        // --device: a CUDA index is >= 0.
        (&["generate", "--device", "-1"], 2, &["--device", "-1"]),
        // A missing output directory is a usage error.
        (
            &["generate", "--steps", "1", "-o", "no/such/dir/x.png"],
            2,
            &["no/such/dir"],
        ),
    ];
    for (args, code, needles) in cases {
        expect(d.path(), &with_model(&m, args), *code, needles);
    }
    // The single-PNG limit itself works (cheap: one step each).
    expect(
        d.path(),
        &with_model(&m, &["generate", "--count", "1024", "--steps", "1", "-o", "sheet.png"]),
        0,
        &[],
    );
    let meta = absorb::image::read_metadata(&d.path().join("last.png")).unwrap();
    assert_eq!(meta.index, Some(u64::MAX));
}

#[test]
fn inpaint_rects_and_outpaint_extents_at_huge_values_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    let img = common::heldout()[0].0.to_string_lossy().into_owned();
    let rect = |r: String| vec!["inpaint".to_string(), "-i".into(), img.clone(), "--rect".into(), r];
    for (r, needles) in [
        (format!("{U64},0,4,4"), vec!["rect", U64]),
        (format!("0,{U64},4,4"), vec!["rect", U64, "inside"]),
        (format!("0,0,{U64},4"), vec!["rect", U64]),
        (format!("0,0,4,{U64}"), vec!["rect", U64]),
        (format!("{U32},0,1,1"), vec!["rect", U32]),
        ("31,0,2,1".to_string(), vec!["rect", "inside the 32x32"]),
        ("0,0,0,1".to_string(), vec!["rect", "non-empty"]),
    ] {
        let args: Vec<String> = rect(r);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect(d.path(), &with_model(&m, &args), 2, &needles);
    }
    expect(
        d.path(),
        &with_model(&m, &["inpaint", "-i", &img, "--rect", "31,31,1,1", "--steps", "1"]),
        0,
        &[],
    );
    for (e, needles) in [
        (
            "up=18446744073709551612,down=4".to_string(),
            vec!["extend", "18446744073709551612"],
        ),
        (format!("right={U64}"), vec!["extend", U64]),
        (format!("left={U32}"), vec!["extend", U32]),
        ("right=4068".to_string(), vec!["extend", "1024"]),
        ("right=0".to_string(), vec!["extend", "nothing to extend"]),
        ("right=3".to_string(), vec!["extend", "whole number of tokens"]),
    ] {
        expect(
            d.path(),
            &with_model(&m, &["outpaint", "-i", &img, "--extend", &e]),
            2,
            &needles,
        );
    }
}

/// A token file as `absorb encode` writes it, with `height`, `width` and `rows` of `ids`.
fn token_file(dir: &Path, name: &str, height: &str, width: &str, rows: usize, cols: usize) -> String {
    let (manifest, bytes) = absorb::bundle::read_manifest(&common::model_dir()).unwrap();
    let row = vec!["1"; cols].join(",");
    let tokens = vec![format!("[{row}]"); rows].join(",");
    let json = format!(
        "{{\"bundle\": \"{}\", \"bundle_sha256\": \"{}\", \"height\": {height}, \"width\": {width}, \"tokens\": [{tokens}]}}",
        manifest.name,
        absorb::bundle::sha256_hex(&bytes)
    );
    let path = dir.join(name);
    fs::write(&path, json).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn token_files_are_bounded_before_they_are_read_or_decoded() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    let decode = |file: &str, code: i32, needles: &[&str]| {
        expect(
            d.path(),
            &with_model(&m, &["decode", "--tokens", file, "-o", "out.png"]),
            code,
            needles,
        )
    };
    // A 200x200 grid from a small file is refused by the declared size (today: 3 GB).
    let big = token_file(d.path(), "big.json", "200", "200", 200, 200);
    decode(&big, 2, &["200x200", "grid"]);
    decode(&token_file(d.path(), "huge.json", U64, "8", 1, 8), 2, &["height", U64]);
    decode(&token_file(d.path(), "zero.json", "0", "8", 0, 8), 2, &["0x8"]);
    decode(&token_file(d.path(), "small.json", "4", "4", 4, 4), 2, &["4x4", "8x8"]);
    decode(&token_file(d.path(), "rows.json", "8", "8", 7, 8), 2, &["8 rows of 8"]);
    decode(&token_file(d.path(), "ok.json", "8", "8", 8, 8), 0, &[]);
    // A value of the wrong type names its key.
    decode(
        &token_file(d.path(), "str.json", "\"8\"", "8", 8, 8),
        2,
        &["str.json", "(at height)"],
    );
    // A file over the byte limit is refused before reading it (a sparse file: costs no disk).
    let sparse = d.path().join("sparse.json");
    fs::File::create(&sparse).unwrap().set_len(200 << 20).unwrap();
    decode(&sparse.to_string_lossy(), 2, &["209715200 bytes", "4194304"]);
    // Missing or not UTF-8: usage errors, naming the file.
    decode("no-such.json", 2, &["no-such.json"]);
    let latin = d.path().join("latin1.json");
    fs::write(&latin, b"{\"bundle\": \"\xe9\"}").unwrap();
    decode(&latin.to_string_lossy(), 2, &["latin1.json", "UTF-8"]);
}

/// A PNG made by `generate` whose absorb metadata has `edit` applied.
fn png_with_metadata(dir: &Path, name: &str, edit: impl Fn(&mut absorb::image::Metadata)) -> String {
    let src = dir.join("src.png");
    if !src.exists() {
        let o = absorb(
            dir,
            &[
                "generate",
                "--seed",
                "3",
                "--steps",
                "2",
                "-o",
                "src.png",
                "-m",
                &model_arg(),
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let mut meta = absorb::image::read_metadata(&src).unwrap();
    edit(&mut meta);
    let pixels = absorb::image::Pixels {
        channels: 1,
        height: 32,
        width: 32,
        data: vec![0; 32 * 32],
    };
    let path = dir.join(name);
    absorb::image::write_png(&path, &pixels, Some(&meta)).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn values_read_from_png_metadata_are_checked_like_the_flags_and_name_the_png() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    let from = |png: &str, needles: &[&str]| {
        expect(
            d.path(),
            &with_model(&m, &["generate", "--from", png, "-o", "again.png"]),
            2,
            needles,
        )
    };
    from(
        &png_with_metadata(d.path(), "count0.png", |m| m.count = Some(0)),
        &["count0.png", "count", "0"],
    );
    from(
        &png_with_metadata(d.path(), "count1e9.png", |m| m.count = Some(1_000_000_000)),
        &["count1e9.png", "count", "1000000000", "1024"],
    );
    from(
        &png_with_metadata(d.path(), "index.png", |m| {
            m.index = Some(u64::MAX);
            m.count = Some(2);
        }),
        &["index.png", "index", U64],
    );
    from(
        &png_with_metadata(d.path(), "columns.png", |m| {
            m.count = Some(2);
            m.columns = Some(0);
        }),
        &["columns.png", "columns", "0"],
    );
    from(
        &png_with_metadata(d.path(), "steps.png", |m| m.steps = Some(usize::MAX)),
        &["steps.png", "steps", U64],
    );
    from(
        &png_with_metadata(d.path(), "grid.png", |m| m.grid = Some([usize::MAX, 8])),
        &["grid.png", "grid", U64],
    );
    from(
        &png_with_metadata(d.path(), "margin.png", |m| {
            m.grid = Some([8, 16]);
            m.stride = Some([4, 4]);
            m.window_margin = Some([usize::MAX / 2 + 1, 0]);
        }),
        &["margin.png", "window_margin"],
    );
}

/// A real decompression bomb: a 1-bit PNG of `side` x `side` zeros (a few hundred KB on disk,
/// `side`^2 bytes once decoded to 8-bit gray).
fn png_bomb(path: &Path, side: u32) {
    let file = fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), side, side);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::One);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().unwrap().into_stream_writer().unwrap();
    let row = vec![0u8; side.div_ceil(8) as usize + 1];
    use std::io::Write;
    for _ in 0..side {
        w.write_all(&row[1..]).unwrap();
    }
    w.finish().unwrap();
}

/// A GIF of 35 bytes whose logical screen is `w` x `h`.
fn gif_bomb(path: &Path, w: u16, h: u16) {
    let mut b = b"GIF89a".to_vec();
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&[0x00, 0, 0]); // no colour table
    b.extend_from_slice(&[0x2c, 0, 0, 0, 0]); // image descriptor at 0,0
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&[0x00, 0x02, 0x02, 0x4c, 0x01, 0x00, 0x3b]);
    fs::write(path, b).unwrap();
}

#[test]
fn images_declaring_a_huge_canvas_are_refused_from_their_header() {
    let d = tempfile::tempdir().unwrap();
    let m = model_arg();
    let bomb = d.path().join("bomb.png");
    png_bomb(&bomb, 23000);
    assert!(
        fs::metadata(&bomb).unwrap().len() < 1 << 20,
        "the bomb is small on disk"
    );
    let gif = d.path().join("bomb.gif");
    gif_bomb(&gif, 11500, 11500);
    let (bomb, gif) = (bomb.to_string_lossy().into_owned(), gif.to_string_lossy().into_owned());
    let img = common::heldout()[0].0.to_string_lossy().into_owned();
    for args in [
        vec!["inpaint", "-i", &bomb, "--rect", "0,0,4,4"],
        vec!["encode", "-i", &bomb],
        vec!["outpaint", "-i", &bomb, "--extend", "right=4"],
        vec!["inpaint", "-i", &img, "--mask", &bomb],
    ] {
        let rss = expect_rss(d.path(), &with_model(&m, &args), 2, &["bomb.png", "23000x23000"]);
        println!("absorb {args:?}: peak RSS {rss:.1} MiB");
        // Decoded, the bomb is 504 MiB; refused from its header absorb stays near its idle size.
        assert!(rss < 100.0, "absorb {args:?} peaked at {rss:.1} MiB");
    }
    for args in [
        vec!["inpaint", "-i", &gif, "--rect", "0,0,4,4"],
        vec!["outpaint", "-i", &gif, "--extend", "right=4"],
        vec!["inpaint", "-i", &img, "--mask", &gif],
    ] {
        let rss = expect_rss(d.path(), &with_model(&m, &args), 2, &["bomb.gif", "not a PNG"]);
        assert!(rss < 100.0, "absorb {args:?} peaked at {rss:.1} MiB");
    }
}
