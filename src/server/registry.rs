//! The bundles one service serves, by name (issue 41): `--model A --model B` and `--models DIR`
//! (every subdirectory of DIR with a model.json) make a [`Catalog`]. Each [`Entry`] has its name
//! (from model.json), its directory, and its bundle read and checked, or the reason it could not
//! be, so a broken bundle answers its own requests with that reason and the others never notice.
//! A request's `model` picks an entry; none picks the first.
//!
//! The worker keeps the loaded pipelines and asks [`to_evict`] which to drop, least recently used
//! first, before it loads another: at most `--max-loaded`, and within `--memory-budget`
//! (estimated from the graph files' sizes, [`Entry::bytes`]). Reloading (SIGHUP,
//! `POST /v1/models/reload`) builds a new catalog; queued and running jobs hold an `Arc` of their
//! entry, so they finish on the bundle they started with, and the worker drops a pipeline whose
//! [`Key`] (directory and model.json sha256) no catalog entry has any more.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bundle::{Bundle, GraphKind};

/// One bundle of the catalog.
#[derive(Debug)]
pub struct Entry {
    /// model.json's name (unique in a catalog), or the directory's name when model.json cannot
    /// be read.
    pub name: String,
    /// The bundle directory.
    pub dir: PathBuf,
    /// The bundle, checked (manifest, every graph file's presence and sha256), or why not.
    pub bundle: std::result::Result<Bundle, String>,
    /// Estimated resident bytes once loaded: the graph files' sizes times [`RESIDENT_FACTOR`].
    pub bytes: u64,
}

impl Entry {
    /// Reads the bundle in `dir` (with the service's transformer variant, if any).
    pub fn read(dir: &Path, variant: Option<&str>) -> Entry {
        let fallback = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        match Bundle::load_variant(dir, variant) {
            Ok(bundle) => {
                let files: u64 = GraphKind::ALL
                    .iter()
                    .filter_map(|&k| std::fs::metadata(bundle.graph_path(k)).ok())
                    .map(|m| m.len())
                    .sum();
                Entry {
                    name: bundle.manifest().name.clone(),
                    dir: dir.to_path_buf(),
                    bytes: (files as f64 * RESIDENT_FACTOR) as u64,
                    bundle: Ok(bundle),
                }
            }
            Err(e) => Entry {
                name: fallback,
                dir: dir.to_path_buf(),
                bundle: Err(format!("{e:#}")),
                bytes: 0,
            },
        }
    }

    /// The key of this entry's pipeline once loaded.
    pub fn key(&self) -> Key {
        Key {
            dir: self.dir.clone(),
            sha256: self
                .bundle
                .as_ref()
                .map_or_else(|_| String::new(), |b| b.sha256().to_string()),
        }
    }
}

/// What names a loaded pipeline: a reload that changed the bundle makes another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The bundle directory.
    pub dir: PathBuf,
    /// Its model.json's sha256 (with the variant).
    pub sha256: String,
}

/// A loaded pipeline as the eviction rule sees it.
#[derive(Debug, Clone)]
pub struct Resident {
    /// Which bundle.
    pub key: Key,
    /// Order of last use (larger: more recent).
    pub last_used: u64,
    /// Its estimated resident bytes.
    pub bytes: u64,
}

/// Which residents to drop (indices into `loaded`, least recently used first) so that one more,
/// of `incoming` bytes, fits: at most `max_loaded` pipelines and, with a budget, at most `budget`
/// bytes in all. A bundle larger than the budget alone still loads once everything else is
/// dropped: the budget bounds what is kept, it does not refuse a request.
pub fn to_evict(loaded: &[Resident], max_loaded: usize, budget: Option<u64>, incoming: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..loaded.len()).collect();
    order.sort_by_key(|&i| loaded[i].last_used);
    let mut count = loaded.len();
    let mut bytes: u64 = loaded.iter().map(|r| r.bytes).sum();
    let mut out = Vec::new();
    for i in order {
        let over_count = count + 1 > max_loaded.max(1);
        let over_budget = budget.is_some_and(|b| bytes.saturating_add(incoming) > b);
        if !over_count && !over_budget {
            break;
        }
        out.push(i);
        count -= 1;
        bytes -= loaded[i].bytes;
    }
    out
}

/// How much more than its graph files a loaded pipeline holds (sessions, arenas, the decoder's
/// activations at the service's batch): the digits bundle's measured RSS over its files.
pub const RESIDENT_FACTOR: f64 = 2.0;

/// Where the bundles come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--model DIR`, in order.
    pub models: Vec<PathBuf>,
    /// `--models DIR`: each one's subdirectories that hold a model.json, sorted by path.
    pub dirs: Vec<PathBuf>,
    /// `--variant`: the transformer variant every bundle loads (one that lacks it is broken).
    pub variant: Option<String>,
}

impl Sources {
    /// Every bundle directory, in order: the `--model`s, then each `--models` directory's
    /// subdirectories. A `--models` directory that cannot be read is an error.
    pub fn bundle_dirs(&self) -> std::result::Result<Vec<PathBuf>, String> {
        let mut out = self.models.clone();
        for d in &self.dirs {
            let read = std::fs::read_dir(d).map_err(|e| format!("--models {}: {e}", d.display()))?;
            let mut found: Vec<PathBuf> = read
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("model.json").is_file())
                .collect();
            found.sort();
            out.extend(found);
        }
        Ok(out)
    }
}

/// The bundles, in order; the first is the default.
#[derive(Debug)]
pub struct Catalog {
    /// The entries, one per bundle directory.
    pub entries: Vec<Arc<Entry>>,
}

impl Catalog {
    /// Reads every bundle of `sources`. Two bundles of one name: the second is an entry of its
    /// own whose error says so (and is reached only by that error's name, its directory's).
    pub fn read(sources: &Sources) -> std::result::Result<Catalog, String> {
        let dirs = sources.bundle_dirs()?;
        if dirs.is_empty() {
            return Err("no bundles: give --model DIR or --models DIR (a directory of bundles)".into());
        }
        let mut entries: Vec<Arc<Entry>> = Vec::new();
        for dir in dirs {
            // One entry per directory, however it was spelled.
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            if entries.iter().any(|o| o.dir == dir) {
                continue;
            }
            let mut e = Entry::read(&dir, sources.variant.as_deref());
            // Only a usable bundle holds its name; a second of the same name is listed under
            // a name of its own (its directory's, numbered if need be) with the reason.
            if let Some(first) = entries.iter().find(|o| o.name == e.name && o.bundle.is_ok()) {
                if e.bundle.is_ok() {
                    e.bundle = Err(format!(
                        "the name \"{}\" is taken by {}: names come from model.json and must differ",
                        e.name,
                        first.dir.display()
                    ));
                }
                let base = dir
                    .file_name()
                    .map_or_else(|| "bundle".to_string(), |n| n.to_string_lossy().into_owned());
                e.name = (1..)
                    .map(|k| if k == 1 { base.clone() } else { format!("{base}-{k}") })
                    .find(|n| !entries.iter().any(|o| &o.name == n))
                    .unwrap_or(base);
            }
            entries.push(Arc::new(e));
        }
        Ok(Catalog { entries })
    }

    /// The entry `name` names (a usable one before a broken one of the same name; none: the
    /// first usable, else the first); else the names there are, for the error.
    pub fn get(&self, name: Option<&str>) -> std::result::Result<&Arc<Entry>, String> {
        let named = |e: &&Arc<Entry>| name.is_none_or(|n| e.name == n);
        let found = self
            .entries
            .iter()
            .filter(named)
            .find(|e| e.bundle.is_ok())
            .or_else(|| self.entries.iter().find(named));
        found.ok_or_else(|| format!("the models are {} (GET /v1/models)", self.names().join(", ")))
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Whether any entry has `key`.
    pub fn has(&self, key: &Key) -> bool {
        self.entries.iter().any(|e| e.key() == *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, last_used: u64, bytes: u64) -> Resident {
        Resident {
            key: Key {
                dir: name.into(),
                sha256: String::new(),
            },
            last_used,
            bytes,
        }
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_count_and_the_budget_hold() {
        let loaded = [r("a", 5, 100), r("b", 2, 100), r("c", 9, 100)];
        assert_eq!(to_evict(&loaded, 4, None, 100), Vec::<usize>::new());
        assert_eq!(to_evict(&loaded, 3, None, 100), vec![1]);
        assert_eq!(to_evict(&loaded, 1, None, 100), vec![1, 0, 2]);
        assert_eq!(to_evict(&loaded, 9, Some(350), 100), vec![1]);
        assert_eq!(
            to_evict(&loaded, 9, Some(50), 100),
            vec![1, 0, 2],
            "too big alone: all go"
        );
        assert_eq!(to_evict(&[], 1, Some(10), 100), Vec::<usize>::new());
    }

    #[test]
    fn a_catalog_names_its_bundles_keeps_broken_ones_and_refuses_a_second_of_one_name() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let tmp = tempfile::tempdir().unwrap();
        let broken = tmp.path().join("broken");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(broken.join("model.json"), b"{").unwrap();
        let sources = Sources {
            models: vec![
                root.join("digits"),
                root.join("digits"),
                broken.clone(),
                root.join("scenes"),
            ],
            dirs: vec![],
            variant: None,
        };
        let c = Catalog::read(&sources).unwrap();
        assert_eq!(c.names(), ["digits", "broken", "scenes"], "one entry per directory");
        assert!(c
            .get(Some("broken"))
            .unwrap()
            .bundle
            .as_ref()
            .is_err_and(|e| e.contains("model.json")));
        assert_eq!(c.get(None).unwrap().name, "digits");
        assert!(c.get(Some("nope")).unwrap_err().contains("digits, broken, scenes"));
        assert!(c.get(Some("digits")).unwrap().bytes > 0);
        // A broken first bundle is not the default; a second bundle of a taken name gets its own.
        let twice = Sources {
            models: vec![broken.clone(), root.join("scenes"), root.join("digits")],
            dirs: vec![root.clone()],
            variant: None,
        };
        let c = Catalog::read(&twice).unwrap();
        assert_eq!(
            c.names()[..3],
            ["broken", "scenes", "digits"],
            "models/ holds the same ones again"
        );
        assert_eq!(c.get(None).unwrap().name, "scenes", "the first usable is the default");
        let empty = Sources::default();
        assert!(Catalog::read(&empty).unwrap_err().contains("no bundles"));
    }
}
