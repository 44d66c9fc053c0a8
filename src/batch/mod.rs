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
//! It does not sample or decode: the caller hands [`write`] a closure that makes the pixels (the
//! CLI's uses [`crate::Pipeline`]). It knows nothing of Kubernetes: which shard a run makes is the
//! caller's to say (the CLI reads an Indexed Job's environment, `src/cli/shard.rs`).

mod manifest;
mod shard;

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use manifest::Manifest;
pub use manifest::{file_name, inspect, Entry, Found};
pub use shard::Shard;

use crate::atomic::{self, Temp};
use crate::bundle::ImageSpec;
use crate::error::{Error, Result};
use crate::image::{self, Metadata, Pixels};
use crate::param::Param;

/// Where foreign files (complete PNGs of another request) are moved, inside the output directory.
pub const FOREIGN_DIR: &str = ".absorb-foreign";

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
pub fn write(
    req: &Request,
    metadata: &dyn Fn(u64) -> Metadata,
    make: &mut dyn FnMut(&[u64]) -> Result<Vec<Pixels>>,
    summary: &mut Summary,
) -> Result<()> {
    if req.chunk == 0 {
        // The job's own batch size, checked when the job was built.
        return Err(Error::Internal("a batch written in chunks of 0 images".into()));
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
            atomic::write(
                &dir.join(&name),
                &bytes,
                Temp {
                    prefix: &prefix,
                    suffix: ".png.tmp",
                },
            )?;
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
    use std::collections::BTreeMap;

    use super::manifest::tests::{lines, meta, SPEC};
    use super::*;

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
        let result = write(req, &|i| meta(7, i), &mut fake(&mut asked, fail_after), &mut summary);
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
