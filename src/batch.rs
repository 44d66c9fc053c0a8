//! Batch generation into a directory: the images of one shard of a request, written a chunk at a
//! time, resumable, each listed in a JSONL manifest (README "Scale out").
//!
//! - **Split.** Shard `I` of `M` (0-based, like Kubernetes' `JOB_COMPLETION_INDEX`) makes the
//!   contiguous indices `first + floor(N*I/M) .. first + floor(N*(I+1)/M)` of a request for `N`
//!   images. Image (seed, index) is the same wherever it is made, so `M` workers write exactly the
//!   files one worker writes, byte for byte (on the same execution provider).
//! - **Resume.** Before making an image, its file `{seed}-{index:06}.png` is checked: a complete
//!   PNG (CRCs, zlib checksum and every pixel decoded) whose metadata is this request's is kept;
//!   a file that is not a complete PNG is replaced; a complete PNG of another request (any other
//!   metadata: bundle, variant, seed, index, sampler, steps, temperatures; or none of absorb's) is
//!   moved to `.absorb-foreign/` with a warning, never overwritten. The provider and the absorb
//!   version that made a kept file do not count: they are recorded in its metadata and manifest line.
//! - **Atomic writes.** Each PNG goes to a temporary `.absorb-{seed}-{shard}-*.png.tmp` in the same
//!   directory, is synced and renamed; a run starts by deleting its own shard's leftovers (and
//!   the untagged `.absorb-XXXXXX.png.tmp` of [`image::write_png`]), not another shard's, which
//!   may be running.
//! - **Manifest.** `manifest-{seed}-{IIIII}-of-{MMMMM}.jsonl`, one per shard so that several
//!   pods never append to one file over a network volume. One line per image (an [`Entry`]),
//!   appended with a single `write` on an `O_APPEND` file after the PNG's rename, then synced. A
//!   run starts by dropping a partial last line, lists good files that lack a line (killed between
//!   the rename and the append), and rewrites the file atomically only if it finds lines that are
//!   unreadable, duplicated or no longer true; no file is ever listed twice.
//!
//! It does not sample or decode: the caller hands [`run`] a closure that makes the pixels (the
//! CLI's uses [`crate::Pipeline`]). It knows nothing of Kubernetes beyond the two environment
//! variables an Indexed Job sets.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::{sha256_hex, ImageSpec};
use crate::error::{Error, Result};
use crate::image::{self, Metadata, Pixels};
use crate::param::Param;

/// Set by Kubernetes in each pod of an Indexed Job: the pod's completion index, used as the shard.
pub const JOB_INDEX_VAR: &str = "JOB_COMPLETION_INDEX";

/// The shard count when the shard index comes from [`JOB_INDEX_VAR`] (or `--shards M`).
pub const SHARDS_VAR: &str = "ABSORB_SHARDS";

/// Where foreign files (complete PNGs of another request) are moved, inside the output directory.
pub const FOREIGN_DIR: &str = ".absorb-foreign";

/// Shard `index` of `count`: one worker's part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `I`, in `0..count`.
    pub index: u64,
    /// `M`, 1 or more.
    pub count: u64,
}

impl Shard {
    /// The whole request: what a run without sharding makes.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, checked; errors name `what` (the flag or variable).
    pub fn new(index: u64, count: u64, what: Param) -> Result<Shard> {
        if count == 0 {
            return Err(Error::param(what, "the shard count is 0: use 1 or more"));
        }
        if index >= count {
            return Err(Error::param(
                what,
                format!(
                    "shard {index} of {count} does not exist: shards are numbered 0 to {}",
                    count - 1
                ),
            ));
        }
        Ok(Shard { index, count })
    }

    /// Parses `I/M` (`--shard`).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || {
            Error::param(
                Param::Shard,
                format!("\"{s}\" is not I/M (shard I of M, 0 <= I < M), e.g. 0/3"),
            )
        };
        let (i, m) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<u64>().map_err(|_| bad())?;
        let m = m.trim().parse::<u64>().map_err(|_| bad())?;
        Shard::new(i, m, Param::Shard)
    }

    /// This shard's indices of a request for `count` images from `first` on.
    pub fn indices(&self, first: u64, count: u64) -> Range<u64> {
        // u128: count * index must not overflow for any u64 count. (`run` refuses a request that
        // runs past u64::MAX; saturating keeps this total.)
        let at = |k: u64| first.saturating_add((u128::from(count) * u128::from(k) / u128::from(self.count)) as u64);
        at(self.index)..at(self.index + 1)
    }

    /// `IIIII-of-MMMMM`, as in file names.
    fn tag(&self) -> String {
        format!("{:05}-of-{:05}", self.index, self.count)
    }

    /// The manifest this shard writes for `seed`.
    pub fn manifest_name(&self, seed: u64) -> String {
        format!("manifest-{seed}-{}.jsonl", self.tag())
    }

    /// Prefix of this shard's temporary files.
    fn temp_prefix(&self, seed: u64) -> String {
        format!(".absorb-{seed}-{}-", self.tag())
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The shard a `generate` run makes: `--shard I/M`; else, in a Kubernetes Indexed Job,
/// [`JOB_INDEX_VAR`] of `--shards M` or [`SHARDS_VAR`]; else none (the whole request). Sharding
/// needs a directory output and an explicit seed (`seeded`): every worker must draw from the same
/// streams. The environment is only read for a directory output. `env` looks a variable up.
pub fn resolve_shard(
    shard: Option<Shard>,
    shards: Option<u64>,
    dir_output: bool,
    seeded: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Shard>> {
    if !dir_output {
        if shard.is_some() || shards.is_some() {
            return Err(Error::param(
                Param::Shard,
                "--shard and --shards need a directory output (--out DIR/): a .png file holds one grid",
            ));
        }
        return Ok(None);
    }
    let number = |param: Param| -> Result<Option<u64>> {
        match env(param.key()) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Error::param(param, format!("\"{v}\" is not a non-negative integer"))),
        }
    };
    let resolved = match shard {
        Some(s) => Some(s),
        None => {
            let index = number(Param::JobIndexVar)?;
            let (count, count_name) = match shards {
                Some(m) => (Some(m), Param::Shards),
                None => (number(Param::ShardsVar)?, Param::ShardsVar),
            };
            match (index, count) {
                (None, None) => None,
                (Some(i), Some(m)) => Some(Shard::new(i, m, count_name).map_err(|e| match e {
                    Error::Param { message, .. } => {
                        Error::param(count_name, format!("{message} ({JOB_INDEX_VAR}={i}, shard count {m})"))
                    }
                    e => e,
                })?),
                (Some(i), None) => {
                    return Err(Error::param(
                        Param::JobIndexVar,
                        format!(
                            "set to {i} (a Kubernetes Indexed Job) but the shard count is not: pass \
                             --shards M or set {SHARDS_VAR} to the Job's completions"
                        ),
                    ))
                }
                (None, Some(m)) => {
                    return Err(Error::param(
                        count_name,
                        format!(
                            "{m} shards but no shard index: {JOB_INDEX_VAR} is not set (it is in a Kubernetes \
                             Indexed Job); elsewhere pass --shard I/M"
                        ),
                    ))
                }
            }
        }
    };
    if resolved.is_some() && !seeded {
        return Err(Error::param(
            Param::Seed,
            "a sharded run needs an explicit --seed: each worker would otherwise pick its own random seed \
             and the shards would not fit together",
        ));
    }
    Ok(resolved)
}

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
    /// Execution provider that made the file (from its metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// absorb version that made the file (from its metadata).
    pub absorb: String,
}

impl Entry {
    /// The line for a file whose metadata `made` matched the request `expected` (see [`inspect`]).
    /// `expected` comes from [`crate::Job::metadata`], which sets every field read here.
    fn new(file: &str, bytes: &[u8], shard: Shard, expected: &Metadata, made: &Metadata) -> Entry {
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
struct Manifest {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
    /// Lines were unreadable, duplicated or stale: rewrite the file at the end.
    stale: bool,
}

impl Manifest {
    /// Opens (or creates) the manifest, dropping a partial last line left by a killed run.
    fn open(path: &Path) -> Result<Manifest> {
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
    fn record(&mut self, entry: Entry) -> Result<bool> {
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
    fn finish(&mut self, temp_prefix: &str) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        let mut lines: Vec<&Entry> = self.entries.values().collect();
        lines.sort_by_key(|e| (e.seed, e.index));
        let mut text = Vec::new();
        for e in lines {
            text.extend(serde_json::to_vec(e).map_err(|e| Error::io(&self.path, e.into()))?);
            text.push(b'\n');
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        write_atomic(dir, &self.path, &text, temp_prefix, ".jsonl.tmp")?;
        log::warn!(
            "{}: rewritten without its unreadable, duplicated or stale lines",
            self.path.display()
        );
        self.stale = false;
        Ok(())
    }
}

/// Writes `bytes` to `path` through a synced temporary file in `dir`, renamed over it. New files
/// get mode 0644 less the umask (readable by other pods sharing the volume).
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8], prefix: &str, suffix: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e| Error::io(path, e);
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .suffix(suffix)
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    // Through the file itself: the temporary file's own errors would name its random path.
    tmp.as_file().write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Deletes temporary files a killed run left: this shard's (`prefix`) and untagged ones
/// (`.absorb-XXXXXX.png.tmp`, from [`image::write_png`]). Returns how many.
fn remove_leftovers(dir: &Path, prefix: &str) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(middle) = name
            .strip_prefix(".absorb-")
            .and_then(|n| n.strip_suffix(".png.tmp").or_else(|| n.strip_suffix(".jsonl.tmp")))
        else {
            continue;
        };
        let untagged = middle.len() == 6 && middle.chars().all(|c| c.is_ascii_alphanumeric());
        if name.starts_with(prefix) || untagged {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(entry.path(), e)),
            }
        }
    }
    Ok(removed)
}

/// Moves a foreign file into `dir/.absorb-foreign/`, never over another file there. Returns
/// where it went.
fn move_aside(dir: &Path, name: &str) -> Result<PathBuf> {
    let aside = dir.join(FOREIGN_DIR);
    fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    let stem = name.strip_suffix(".png").unwrap_or(name);
    let mut dest = aside.join(name);
    let mut n = 1;
    while dest.exists() {
        dest = aside.join(format!("{stem}~{n}.png"));
        n += 1;
    }
    fs::rename(dir.join(name), &dest).map_err(|e| Error::io(dir.join(name), e))?;
    Ok(dest)
}

/// Why an image is made: it decides the [`Summary`] counter.
#[derive(Clone, Copy)]
enum Remake {
    Missing,
    Corrupt,
    Foreign,
}

/// One shard of a request for a directory.
pub struct Request<'a> {
    /// Output directory (created if missing).
    pub dir: &'a Path,
    /// Seed of the whole request.
    pub seed: u64,
    /// Index of the request's first image.
    pub first: u64,
    /// Images in the whole request (all shards).
    pub count: u64,
    /// The part this run makes.
    pub shard: Shard,
    /// Images per chunk: made, then written, before the next is checked; a kill loses at most one.
    pub chunk: usize,
    /// Size and channels of the images (a file of another size is foreign).
    pub image: &'a ImageSpec,
    /// Also hand kept images to `make` (whose pixels are then not written): for a caller that
    /// needs every image's tokens, like `--tokens-out`.
    pub make_kept: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Images made where there was no file.
    pub made: usize,
    /// Complete files of this request, kept.
    pub skipped: usize,
    /// Files that were not complete PNGs, made again.
    pub regenerated: usize,
    /// Complete PNGs of another request, moved to `.absorb-foreign/` and made.
    pub foreign: usize,
    /// Manifest lines added for kept files that had none.
    pub listed: usize,
    /// Temporary files of killed runs deleted.
    pub leftovers: usize,
    /// The manifest written.
    pub manifest: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "made {}, skipped {}, regenerated {}, foreign {}",
            self.made, self.skipped, self.regenerated, self.foreign
        )?;
        if self.foreign > 0 {
            write!(f, " (moved to {FOREIGN_DIR}/)")?;
        }
        if self.listed > 0 {
            write!(f, ", {} kept files added to the manifest", self.listed)?;
        }
        if self.leftovers > 0 {
            write!(f, ", {} temporary files of an interrupted run deleted", self.leftovers)?;
        }
        write!(f, "; manifest {}", self.manifest.display())
    }
}

/// Makes the images of `req.shard` that `req.dir` lacks, a chunk at a time, and lists every good
/// one in the shard's manifest. `metadata(index)` is what image `index`'s PNG carries (its
/// request, compared with what a file holds); `make(indices)` returns their pixels, in order
/// (with [`crate::Pipeline::run`] on a [`crate::Job`] of those images). `summary` is filled as the run
/// goes, so a caller can report what was done before an error.
pub fn run(
    req: &Request,
    metadata: &dyn Fn(u64) -> Metadata,
    make: &mut dyn FnMut(&[u64]) -> Result<Vec<Pixels>>,
    summary: &mut Summary,
) -> Result<()> {
    if req.chunk == 0 {
        return Err(Error::param(Param::MaxBatch, "0 is not allowed: use 1 or more"));
    }
    if req.first.checked_add(req.count).is_none() {
        return Err(Error::param(
            Param::FirstIndex,
            format!(
                "{} + {} images runs past the last index, {}",
                req.first,
                req.count,
                u64::MAX
            ),
        ));
    }
    let dir = req.dir;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let prefix = req.shard.temp_prefix(req.seed);
    summary.leftovers = remove_leftovers(dir, &prefix)?;
    summary.manifest = dir.join(req.shard.manifest_name(req.seed));
    let mut manifest = Manifest::open(&summary.manifest)?;
    let range = req.shard.indices(req.first, req.count);
    let mut start = range.start;
    while start < range.end {
        let chunk = start..range.end.min(start.saturating_add(req.chunk as u64));
        start = chunk.end;
        let mut todo: Vec<(u64, Remake)> = Vec::new();
        for index in chunk.clone() {
            let name = file_name(req.seed, index);
            let path = dir.join(&name);
            match inspect(&path, &metadata(index), req.image, req.shard)? {
                Found::Missing => todo.push((index, Remake::Missing)),
                Found::Good(entry) => {
                    summary.skipped += 1;
                    if manifest.record(*entry)? {
                        summary.listed += 1;
                    }
                }
                Found::Corrupt(why) => {
                    log::warn!("{}: {why}; making it again", path.display());
                    todo.push((index, Remake::Corrupt));
                }
                Found::Foreign(why) => {
                    let dest = move_aside(dir, &name)?;
                    log::warn!(
                        "{}: a PNG of another request ({why}); moved to {} and making this request's",
                        path.display(),
                        dest.display()
                    );
                    todo.push((index, Remake::Foreign));
                }
            }
        }
        let asked: Vec<u64> = if req.make_kept {
            chunk.collect()
        } else {
            todo.iter().map(|t| t.0).collect()
        };
        if asked.is_empty() {
            continue;
        }
        let pixels = make(&asked)?;
        if pixels.len() != asked.len() {
            return Err(Error::Internal(format!(
                "{} images asked for, {} made",
                asked.len(),
                pixels.len()
            )));
        }
        for (&index, px) in asked.iter().zip(&pixels) {
            let Some(&(_, why)) = todo.iter().find(|t| t.0 == index) else {
                continue;
            };
            let name = file_name(req.seed, index);
            let meta = metadata(index);
            let bytes = image::png_bytes(px, Some(&meta))?;
            write_atomic(dir, &dir.join(&name), &bytes, &prefix, ".png.tmp")?;
            manifest.record(Entry::new(&name, &bytes, req.shard, &meta, &meta))?;
            match why {
                Remake::Missing => summary.made += 1,
                Remake::Corrupt => summary.regenerated += 1,
                Remake::Foreign => summary.foreign += 1,
            }
        }
        // The renames are durable before the next chunk starts. Some network and FUSE file
        // systems refuse fsync on a directory; their renames are as durable as they get.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            log::debug!("{}: fsync of the directory: {e}", dir.display());
        }
    }
    manifest.finish(&prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn shards_partition_the_indices_in_contiguous_blocks() {
        for count in [0u64, 1, 2, 5, 24, 100, 1001] {
            for m in [1u64, 2, 3, 7, 64] {
                let mut next = 10;
                for i in 0..m {
                    let r = Shard::new(i, m, Param::Shard).unwrap().indices(10, count);
                    assert_eq!(r.start, next, "shard {i}/{m} of {count} starts where the last ended");
                    let len = r.end - r.start;
                    assert!(len == count / m || len == count / m + 1, "balanced: {i}/{m} of {count}");
                    next = r.end;
                }
                assert_eq!(next, 10 + count, "{m} shards cover all {count} images");
            }
        }
        assert_eq!(Shard::WHOLE.indices(3, 5), 3..8);
        assert_eq!(Shard::new(1, 3, Param::Shard).unwrap().indices(0, 24), 8..16);
    }

    #[test]
    fn a_huge_count_does_not_overflow_the_split() {
        let r = Shard::new(2, 3, Param::Shard).unwrap().indices(0, u64::MAX);
        assert_eq!(r.end, u64::MAX);
    }

    #[test]
    fn shard_flags_parse_or_say_what_is_wrong() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        assert_eq!(Shard::parse(" 0 / 1 ").unwrap(), Shard::WHOLE);
        for (bad, needle) in [
            ("3/3", "shard 3 of 3 does not exist: shards are numbered 0 to 2"),
            ("0/0", "the shard count is 0"),
            ("1", "is not I/M"),
            ("a/3", "is not I/M"),
            ("-1/3", "is not I/M"),
            ("1/3/4", "is not I/M"),
        ] {
            let e = Shard::parse(bad).unwrap_err();
            assert!(e.is_input_error());
            let e = e.to_string();
            assert!(e.starts_with("invalid shard: ") && e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn the_shard_comes_from_the_flag_then_the_indexed_job() {
        let s = |i, m| Some(Shard { index: i, count: m });
        let job = |name: &str| match name {
            JOB_INDEX_VAR => Some("2".to_string()),
            SHARDS_VAR => Some("5".to_string()),
            _ => None,
        };
        assert_eq!(resolve_shard(None, None, true, false, &no_env).unwrap(), None);
        assert_eq!(resolve_shard(s(1, 3), None, true, true, &no_env).unwrap(), s(1, 3));
        assert_eq!(
            resolve_shard(s(1, 3), None, true, true, &job).unwrap(),
            s(1, 3),
            "the flag wins"
        );
        assert_eq!(resolve_shard(None, None, true, true, &job).unwrap(), s(2, 5));
        assert_eq!(
            resolve_shard(None, Some(4), true, true, &job).unwrap(),
            s(2, 4),
            "--shards wins"
        );
        // A .png output ignores the environment but refuses the flags.
        assert_eq!(resolve_shard(None, None, false, false, &job).unwrap(), None);
        let e = resolve_shard(s(0, 2), None, false, true, &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a directory output"), "{e}");
    }

    #[test]
    fn bad_shard_settings_are_errors_naming_the_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let err = |shards, pairs, seeded| {
            let e = resolve_shard(None, shards, true, seeded, &env(pairs)).unwrap_err();
            assert!(e.is_input_error());
            e.to_string()
        };
        let e = err(None, &[(JOB_INDEX_VAR, "1")], true);
        assert!(
            e.starts_with("invalid JOB_COMPLETION_INDEX: set to 1") && e.contains("--shards M"),
            "{e}"
        );
        let e = err(None, &[(JOB_INDEX_VAR, "x1")], true);
        assert!(e.starts_with("invalid JOB_COMPLETION_INDEX: \"x1\""), "{e}");
        let e = err(None, &[(JOB_INDEX_VAR, "1"), (SHARDS_VAR, "many")], true);
        assert!(e.starts_with("invalid ABSORB_SHARDS: \"many\""), "{e}");
        let e = err(None, &[(JOB_INDEX_VAR, "3"), (SHARDS_VAR, "3")], true);
        assert!(
            e.contains("shard 3 of 3 does not exist") && e.contains("JOB_COMPLETION_INDEX=3"),
            "{e}"
        );
        let e = err(Some(0), &[(JOB_INDEX_VAR, "0")], true);
        assert!(e.starts_with("invalid shards: the shard count is 0"), "{e}");
        let e = err(Some(3), &[], true);
        assert!(
            e.contains("JOB_COMPLETION_INDEX is not set") && e.contains("--shard I/M"),
            "{e}"
        );
        let e = err(None, &[(SHARDS_VAR, "3")], true);
        assert!(
            e.starts_with("invalid ABSORB_SHARDS: 3 shards but no shard index"),
            "{e}"
        );
        let e = err(None, &[(JOB_INDEX_VAR, "0"), (SHARDS_VAR, "3")], false);
        assert!(
            e.starts_with("invalid seed: a sharded run needs an explicit --seed"),
            "{e}"
        );
    }

    /// Through JSON, so that fields added to `Metadata` later (all optional) need no change here.
    fn meta(seed: u64, index: u64) -> Metadata {
        serde_json::from_value(serde_json::json!({
            "absorb": "0.1.0", "mode": "generate", "bundle": "b", "bundle_sha256": "ab",
            "sampler": "absorbing", "seed": seed, "index": index, "count": 1, "steps": 8,
            "temperature": 0.9, "provider": "cpu",
        }))
        .unwrap()
    }

    const SPEC: ImageSpec = ImageSpec {
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

    fn lines(path: &Path) -> Vec<Entry> {
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
    fn leftovers_of_this_shard_and_untagged_ones_are_deleted_not_other_shards() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Shard::new(1, 3, Param::Shard).unwrap().temp_prefix(7);
        let theirs = Shard::new(2, 3, Param::Shard).unwrap().temp_prefix(7);
        for name in [
            format!("{mine}a1B2c3.png.tmp"),
            format!("{mine}zzzzzz.jsonl.tmp"),
            ".absorb-Ab12Cd.png.tmp".to_string(),
            format!("{theirs}a1B2c3.png.tmp"),
            "7-000001.png".to_string(),
            "notes.tmp".to_string(),
        ] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_leftovers(dir.path(), &mine).unwrap(), 3);
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!("{theirs}a1B2c3.png.tmp"),
                "7-000001.png".into(),
                "notes.tmp".into()
            ]
        );
    }

    #[test]
    fn foreign_files_are_moved_aside_never_over_another() {
        let dir = tempfile::tempdir().unwrap();
        for content in [b"one", b"two"] {
            fs::write(dir.path().join("7-000001.png"), content).unwrap();
            move_aside(dir.path(), "7-000001.png").unwrap();
        }
        let aside = dir.path().join(FOREIGN_DIR);
        assert_eq!(fs::read(aside.join("7-000001.png")).unwrap(), b"one");
        assert_eq!(fs::read(aside.join("7-000001~1.png")).unwrap(), b"two");
        assert!(!dir.path().join("7-000001.png").exists());
    }

    #[test]
    fn manifest_names_sort_by_seed_then_shard() {
        let s = Shard::new(1, 3, Param::Shard).unwrap();
        assert_eq!(s.manifest_name(7), "manifest-7-00001-of-00003.jsonl");
        assert_eq!(s.to_string(), "1/3");
        assert_eq!(file_name(7, 12), "7-000012.png");
    }

    /// A fake model: image `i` is 16 pixels of value `i`; records what it was asked for.
    fn fake(asked: &mut Vec<u64>, fail_after: usize) -> impl FnMut(&[u64]) -> Result<Vec<Pixels>> + '_ {
        move |indices: &[u64]| {
            if asked.len() >= fail_after {
                return Err(Error::param(Param::Steps, "the fake model fails"));
            }
            asked.extend(indices);
            Ok(indices
                .iter()
                .map(|&i| Pixels {
                    channels: 1,
                    height: 4,
                    width: 4,
                    data: vec![i as u8; 16],
                })
                .collect())
        }
    }

    fn request(dir: &Path, count: u64, shard: Shard) -> Request<'_> {
        Request {
            dir,
            seed: 7,
            first: 0,
            count,
            shard,
            chunk: 2,
            image: &SPEC,
            make_kept: false,
        }
    }

    fn run_fake(req: &Request, fail_after: usize) -> (Result<()>, Summary, Vec<u64>) {
        let mut asked = Vec::new();
        let mut summary = Summary::default();
        let result = run(req, &|i| meta(7, i), &mut fake(&mut asked, fail_after), &mut summary);
        (result, summary, asked)
    }

    fn dir_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap()))
            .collect()
    }

    #[test]
    fn a_rerun_makes_nothing_and_shards_add_up_to_the_whole() {
        let whole = tempfile::tempdir().unwrap();
        let (r, s, asked) = run_fake(&request(whole.path(), 5, Shard::WHOLE), usize::MAX);
        r.unwrap();
        assert_eq!((s.made, s.skipped, asked), (5, 0, vec![0, 1, 2, 3, 4]));
        let (r, s, asked) = run_fake(&request(whole.path(), 5, Shard::WHOLE), usize::MAX);
        r.unwrap();
        assert_eq!(
            (s.made, s.skipped, asked.len()),
            (0, 5, 0),
            "a complete directory is only checked"
        );

        let parts = tempfile::tempdir().unwrap();
        for i in 0..3 {
            let shard = Shard::new(i, 3, Param::Shard).unwrap();
            run_fake(&request(parts.path(), 5, shard), usize::MAX).0.unwrap();
        }
        let (w, p) = (dir_files(whole.path()), dir_files(parts.path()));
        let pngs = |m: &BTreeMap<String, Vec<u8>>| {
            m.iter()
                .filter(|(k, _)| k.ends_with(".png"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(pngs(&w), pngs(&p));
        let listed: Vec<Entry> = (0..3)
            .flat_map(|i| {
                lines(
                    &parts
                        .path()
                        .join(Shard::new(i, 3, Param::Shard).unwrap().manifest_name(7)),
                )
            })
            .map(|mut e| {
                e.shard = "0/1".into();
                e
            })
            .collect();
        assert_eq!(listed, lines(&whole.path().join(Shard::WHOLE.manifest_name(7))));
    }

    #[test]
    fn a_failure_keeps_the_chunks_written_and_a_rerun_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        // The fake fails on its third chunk: two chunks of two are written and listed.
        let (r, s, _) = run_fake(&request(dir.path(), 7, Shard::WHOLE), 4);
        assert!(r.is_err());
        assert_eq!(s.made, 4, "the summary counts what was written before the error");
        let manifest = dir.path().join(Shard::WHOLE.manifest_name(7));
        assert_eq!(lines(&manifest).len(), 4);
        let (r, s, asked) = run_fake(&request(dir.path(), 7, Shard::WHOLE), usize::MAX);
        r.unwrap();
        assert_eq!((s.made, s.skipped, asked), (3, 4, vec![4, 5, 6]));
        let indices: Vec<u64> = lines(&manifest).iter().map(|e| e.index).collect();
        assert_eq!(indices, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn kept_images_go_to_make_only_when_asked_and_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        run_fake(&request(dir.path(), 3, Shard::WHOLE), usize::MAX).0.unwrap();
        let before = fs::metadata(dir.path().join(file_name(7, 0)))
            .unwrap()
            .modified()
            .unwrap();
        fs::remove_file(dir.path().join(file_name(7, 2))).unwrap();
        let mut req = request(dir.path(), 3, Shard::WHOLE);
        req.make_kept = true;
        let (r, s, asked) = run_fake(&req, usize::MAX);
        r.unwrap();
        assert_eq!((s.made, s.skipped, asked), (1, 2, vec![0, 1, 2]));
        let after = fs::metadata(dir.path().join(file_name(7, 0)))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "a kept file is never rewritten");
    }
}
