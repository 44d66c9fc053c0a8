//! What a directory holds: each image's file checked against the request ([`inspect`]), and a
//! shard's JSONL manifest listing the good ones ([`Manifest`]).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Shard;
use crate::atomic::{self, Temp};
use crate::bundle::{sha256_hex, ImageSpec};
use crate::error::{Error, Result};
use crate::image::{self, Metadata};

/// The file name of image `index` under `seed`.
pub fn file_name(seed: u64, index: u64) -> String {
    format!("{seed}-{index:06}.png")
}

/// One manifest line: a file this request made, its hash and what made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Image index (its own stream under the seed).
    pub index: u64,
    /// Seed of the request.
    pub seed: u64,
    /// File name inside the output directory.
    pub file: String,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// `I/M`: the shard whose manifest lists the file.
    pub shard: String,
    /// Bundle name.
    pub bundle: String,
    /// sha256 of the bundle (as in PNG metadata).
    pub bundle_sha256: String,
    /// Transformer precision variant, if not fp32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Sampler name.
    pub sampler: String,
    /// Reverse steps.
    pub steps: usize,
    /// Temperature (of the first step, with a schedule).
    pub temperature: f32,
    /// Temperature of the last step of a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_end: Option<f32>,
    /// Nucleus (top-p) truncation, when below 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The `threshold` sampler's threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Cached attention's period (absent: exact mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<usize>,
    /// Classifier-free guidance scale (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// Execution provider that made the file (from its metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// absorb version that made the file (from its metadata).
    pub absorb: String,
}

impl Entry {
    /// The line for a file whose metadata `made` matched the request `expected` (see [`inspect`]).
    /// `expected` comes from [`crate::Job::metadata`], which sets every field read here.
    pub(super) fn new(file: &str, bytes: &[u8], shard: Shard, expected: &Metadata, made: &Metadata) -> Entry {
        Entry {
            index: expected.index.unwrap_or_default(),
            seed: expected.seed.unwrap_or_default(),
            file: file.to_string(),
            sha256: sha256_hex(bytes),
            bytes: bytes.len() as u64,
            shard: shard.to_string(),
            bundle: expected.bundle.clone(),
            bundle_sha256: expected.bundle_sha256.clone(),
            variant: expected.variant.clone(),
            sampler: expected.sampler.clone().unwrap_or_default(),
            steps: expected.steps.unwrap_or_default(),
            temperature: expected.temperature.unwrap_or_default(),
            temperature_end: expected.temperature_end,
            top_p: expected.top_p,
            threshold: expected.threshold,
            cache: expected.cache,
            guidance: expected.guidance,
            provider: made.provider.clone(),
            absorb: made.absorb.clone(),
        }
    }
}

/// What a run finds at an image's path.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// No file: make it.
    Missing,
    /// A complete PNG of this request: kept; its manifest line.
    Good(Box<Entry>),
    /// Not a complete PNG (truncated, a bad checksum, undecodable), and why: replaced.
    Corrupt(String),
    /// A complete PNG of another request, and how it differs: moved aside, then made.
    Foreign(String),
}

/// Checks the file at `path` against the metadata this request writes for it (`expected`, from
/// [`crate::Job::metadata`]) and the image size.
pub fn inspect(path: &Path, expected: &Metadata, spec: &ImageSpec, shard: Shard) -> Result<Found> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(Error::io(path, e)),
    };
    let (text, size) = match decode_complete(&bytes) {
        Ok(d) => (d.text, (d.width, d.height, d.channels)),
        Err(why) => return Ok(Found::Corrupt(why)),
    };
    let wanted = (spec.width, spec.height, spec.channels);
    if size != wanted {
        return Ok(Found::Foreign(format!(
            "it is {}x{} with {} channel(s), this run makes {}x{} with {}",
            size.0, size.1, size.2, wanted.0, wanted.1, wanted.2
        )));
    }
    let Some(text) = text else {
        return Ok(Found::Foreign(format!(
            "it has no \"{}\" metadata: absorb did not make it",
            image::METADATA_KEY
        )));
    };
    let made: Metadata = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => return Ok(Found::Foreign(format!("its absorb metadata is unreadable: {e}"))),
    };
    if let Some(field) = request_difference(&made, expected) {
        return Ok(Found::Foreign(field));
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Found::Good(Box::new(Entry::new(&file, &bytes, shard, expected, &made))))
}

/// What [`decode_complete`] found in a complete PNG.
struct Decoded {
    /// absorb's metadata (JSON), if the file has it.
    text: Option<String>,
    width: usize,
    height: usize,
    channels: usize,
}

/// Decodes a whole PNG with every checksum verified, or says why it is not a complete PNG.
fn decode_complete(bytes: &[u8]) -> Result<Decoded, String> {
    // Every checksum counts, the ancillary chunks' too: png skips those by default, and the
    // metadata is one.
    let mut options = png::DecodeOptions::default();
    options.set_ignore_checksums(false);
    options.set_skip_ancillary_crc_failures(false);
    let decoder = png::Decoder::new_with_options(std::io::Cursor::new(bytes), options);
    let mut reader = decoder.read_info().map_err(|e| format!("not a readable PNG: {e}"))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("the PNG's size overflows")?];
    let frame = reader.next_frame(&mut buf).map_err(|e| format!("pixel data: {e}"))?;
    reader.finish().map_err(|e| format!("after the pixel data: {e}"))?;
    if frame.bit_depth != png::BitDepth::Eight {
        return Err(format!("bit depth {:?}, absorb writes 8", frame.bit_depth));
    }
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb => 3,
        other => return Err(format!("colour type {other:?}, absorb writes gray or RGB")),
    };
    let info = reader.info();
    let text = match info.utf8_text.iter().find(|c| c.keyword == image::METADATA_KEY) {
        Some(chunk) => Some(chunk.get_text().map_err(|e| format!("metadata chunk: {e}"))?),
        None => None,
    };
    Ok(Decoded {
        text,
        width: frame.width as usize,
        height: frame.height as usize,
        channels,
    })
}

/// The first field in which `made` is not the request `expected`, described; `None` if it is the
/// same request. Every metadata field counts (a field added later too) but the provider and the
/// absorb version.
fn request_difference(made: &Metadata, expected: &Metadata) -> Option<String> {
    // Through JSON text, so that temperatures compare and print as written (f32, shortest form).
    let fields = |m: &Metadata| {
        let text = serde_json::to_string(m).ok()?;
        let mut map: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).ok()?;
        map.remove("absorb");
        map.remove("provider");
        Some(map)
    };
    let (Some(a), Some(b)) = (fields(made), fields(expected)) else {
        return Some("its metadata cannot be compared with this run's".into());
    };
    let show = |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.to_string());
    a.keys()
        .chain(b.keys())
        .find(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("its {k} is {}, this run's {}", show(a.get(k)), show(b.get(k))))
}

/// A shard's manifest, open for appending, with the lines it holds.
pub(super) struct Manifest {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
    /// Lines were unreadable, duplicated or stale: rewrite the file at the end.
    stale: bool,
}

impl Manifest {
    /// Opens (or creates) the manifest, dropping a partial last line left by a killed run.
    pub(super) fn open(path: &Path) -> Result<Manifest> {
        let io = |e| Error::io(path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if complete < text.len() {
            log::warn!(
                "{}: dropping a partial last line ({} bytes) left by an interrupted run",
                path.display(),
                text.len() - complete
            );
            file.set_len(complete as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let mut entries = BTreeMap::new();
        let mut stale = false;
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Entry>(line) {
                Ok(e) => {
                    if let Some(old) = entries.insert(e.file.clone(), e) {
                        log::warn!("{}: {} is listed twice; keeping one line", path.display(), old.file);
                        stale = true;
                    }
                }
                Err(e) => {
                    log::warn!("{}: line {} is unreadable ({e}); dropping it", path.display(), n + 1);
                    stale = true;
                }
            }
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            file,
            entries,
            stale,
        })
    }

    /// Lists a file: appends its line unless an identical one is there; a different one is
    /// replaced when the manifest is rewritten by [`Manifest::finish`]. True if a line was appended.
    pub(super) fn record(&mut self, entry: Entry) -> Result<bool> {
        match self.entries.get(&entry.file) {
            Some(old) if *old == entry => Ok(false),
            Some(_) => {
                self.entries.insert(entry.file.clone(), entry);
                self.stale = true;
                Ok(false)
            }
            None => {
                let mut line = serde_json::to_vec(&entry).map_err(|e| Error::io(&self.path, e.into()))?;
                line.push(b'\n');
                // One write(2) on an O_APPEND file: the line lands whole at the end, or (killed
                // mid-write) as a partial last line that the next run drops.
                let io = |e| Error::io(&self.path, e);
                let written = self.file.write(&line).map_err(io)?;
                if written != line.len() {
                    return Err(Error::io(
                        &self.path,
                        std::io::Error::other(format!("short write: {written} of {} bytes", line.len())),
                    ));
                }
                self.file.sync_data().map_err(io)?;
                self.entries.insert(entry.file.clone(), entry);
                Ok(true)
            }
        }
    }

    /// Rewrites the manifest atomically if it held unreadable, duplicated or stale lines.
    pub(super) fn finish(&mut self, temp_prefix: &str) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        let mut lines: Vec<&Entry> = self.entries.values().collect();
        lines.sort_by_key(|e| (e.seed, e.index));
        let mut text = Vec::new();
        for e in lines {
            text.extend(serde_json::to_vec(e).map_err(|e| Error::Internal(format!("a manifest line: {e}")))?);
            text.push(b'\n');
        }
        atomic::write(
            &self.path,
            &text,
            Temp {
                prefix: temp_prefix,
                suffix: ".jsonl.tmp",
            },
        )?;
        log::warn!(
            "{}: rewritten without its unreadable, duplicated or stale lines",
            self.path.display()
        );
        self.stale = false;
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::image::Pixels;
    use crate::param::Param;

    /// Through JSON, so that fields added to `Metadata` later (all optional) need no change here.
    pub(in crate::batch) fn meta(seed: u64, index: u64) -> Metadata {
        serde_json::from_value(serde_json::json!({
            "absorb": "0.1.0", "mode": "generate", "bundle": "b", "bundle_sha256": "ab",
            "sampler": "absorbing", "seed": seed, "index": index, "count": 1, "steps": 8,
            "temperature": 0.9, "provider": "cpu",
        }))
        .unwrap()
    }

    pub(in crate::batch) const SPEC: ImageSpec = ImageSpec {
        channels: 1,
        height: 4,
        width: 4,
        range: [0.0, 1.0],
    };

    fn png(m: Option<&Metadata>) -> Vec<u8> {
        let px = Pixels {
            channels: 1,
            height: 4,
            width: 4,
            data: (0..16).map(|i| i * 16).collect(),
        };
        image::png_bytes(&px, m).unwrap()
    }

    fn found(bytes: &[u8], expected: &Metadata) -> Found {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("7-000003.png");
        fs::write(&path, bytes).unwrap();
        inspect(&path, expected, &SPEC, Shard::WHOLE).unwrap()
    }

    #[test]
    fn a_complete_png_of_the_request_is_kept_and_listed_with_its_hash() {
        let m = meta(7, 3);
        let bytes = png(Some(&m));
        let Found::Good(e) = found(&bytes, &m) else {
            panic!("kept")
        };
        assert_eq!((e.file.as_str(), e.index, e.seed, e.steps), ("7-000003.png", 3, 7, 8));
        assert_eq!((e.sha256.clone(), e.bytes), (sha256_hex(&bytes), bytes.len() as u64));
        assert_eq!(e.shard, "0/1");
        // Another provider or absorb version made the same request: still this request's file.
        let mut other = m.clone();
        other.provider = Some("cuda".into());
        other.absorb = "0.0.9".into();
        let Found::Good(e) = found(&png(Some(&other)), &m) else {
            panic!("kept")
        };
        assert_eq!((e.provider.as_deref(), e.absorb.as_str()), (Some("cuda"), "0.0.9"));
    }

    #[test]
    fn truncated_or_damaged_pngs_are_corrupt() {
        let m = meta(7, 3);
        let bytes = png(Some(&m));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            inspect(&dir.path().join("none.png"), &m, &SPEC, Shard::WHOLE).unwrap(),
            Found::Missing
        );
        for cut in [0, 8, 40, bytes.len() / 2, bytes.len() - 12, bytes.len() - 1] {
            assert!(
                matches!(found(&bytes[..cut], &m), Found::Corrupt(_)),
                "truncated to {cut} bytes"
            );
        }
        // Flip one bit in every byte in turn: each is caught by a chunk CRC (the metadata's too),
        // the zlib checksum or the decoder.
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            assert!(matches!(found(&b, &m), Found::Corrupt(_)), "bit flip at byte {at}");
        }
        assert!(matches!(found(b"not a png", &m), Found::Corrupt(_)));
    }

    #[test]
    fn complete_pngs_of_another_request_are_foreign_naming_the_difference() {
        let m = meta(7, 3);
        let mut steps = m.clone();
        steps.steps = Some(16);
        let Found::Foreign(why) = found(&png(Some(&steps)), &m) else {
            panic!("foreign")
        };
        assert_eq!(why, "its steps is 16, this run's 8");
        let Found::Foreign(why) = found(&png(Some(&meta(8, 3))), &m) else {
            panic!("foreign")
        };
        assert!(why.starts_with("its seed"), "{why}");
        let Found::Foreign(why) = found(&png(None), &m) else {
            panic!("foreign")
        };
        assert!(why.contains("no \"absorb\" metadata"), "{why}");
        let mut t = m.clone();
        t.temperature_end = Some(0.5);
        let Found::Foreign(why) = found(&png(Some(&t)), &m) else {
            panic!("foreign")
        };
        assert_eq!(why, "its temperature_end is 0.5, this run's unset");
        let mut v = m.clone();
        v.variant = Some("int8".into());
        let Found::Foreign(why) = found(&png(Some(&v)), &m) else {
            panic!("foreign")
        };
        assert_eq!(why, "its variant is \"int8\", this run's unset");
        let mut b = m.clone();
        b.bundle_sha256 = "cd".into();
        assert!(matches!(found(&png(Some(&b)), &m), Found::Foreign(_)));
    }

    fn entry(index: u64) -> Entry {
        let m = meta(7, index);
        Entry::new(&file_name(7, index), &png(Some(&m)), Shard::WHOLE, &m, &m)
    }

    pub(in crate::batch) fn lines(path: &Path) -> Vec<Entry> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_manifest_appends_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let mut m = Manifest::open(&path).unwrap();
        assert!(m.record(entry(0)).unwrap());
        assert!(m.record(entry(1)).unwrap());
        assert!(!m.record(entry(1)).unwrap(), "an identical line is not appended again");
        m.finish("x").unwrap();
        let mut m = Manifest::open(&path).unwrap();
        assert!(!m.record(entry(0)).unwrap(), "reopened: still listed");
        assert!(m.record(entry(2)).unwrap());
        assert_eq!(lines(&path), vec![entry(0), entry(1), entry(2)]);
    }

    #[test]
    fn a_partial_last_line_is_dropped_and_bad_lines_rewritten_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let full = |e: &Entry| serde_json::to_string(e).unwrap() + "\n";
        let partial = &full(&entry(1))[..30];
        fs::write(&path, full(&entry(0)) + partial).unwrap();
        let mut m = Manifest::open(&path).unwrap();
        assert!(!m.stale, "a partial last line is truncated, not rewritten");
        assert!(m.record(entry(1)).unwrap());
        assert_eq!(lines(&path), vec![entry(0), entry(1)]);

        // A duplicated line, an unreadable one and a stale hash: rewritten once, in index order.
        let mut changed = entry(1);
        changed.sha256 = "00".into();
        fs::write(
            &path,
            full(&entry(2)) + &full(&entry(0)) + "{oops}\n" + &full(&entry(0)) + &full(&changed),
        )
        .unwrap();
        let mut m = Manifest::open(&path).unwrap();
        assert!(m.stale);
        assert!(
            !m.record(entry(1)).unwrap(),
            "a changed file is fixed by the rewrite, not appended"
        );
        m.finish(".absorb-7-00000-of-00001-").unwrap();
        assert_eq!(lines(&path), vec![entry(0), entry(1), entry(2)]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["m.jsonl"], "no temporary file is left");
    }

    #[test]
    fn manifest_names_sort_by_seed_then_shard() {
        let s = Shard::new(1, 3, Param::Shard).unwrap();
        assert_eq!(s.manifest_name(7), "manifest-7-00001-of-00003.jsonl");
        assert_eq!(s.to_string(), "1/3");
        assert_eq!(file_name(7, 12), "7-000012.png");
    }
}
