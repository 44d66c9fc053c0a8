//! ONNX Runtime itself: finding and loading the shared library (once per process, with its
//! one environment and thread pool), the execution provider to use and its settings. It builds
//! no sessions (`graphs/mod.rs` does).

use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::{Environment, GlobalThreadPoolOptions};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::param::Param;

/// The oldest ONNX Runtime this build loads: `ort` without an `api-NN` feature is API level 17.
pub const MIN_ORT_VERSION: (u32, u32) = (1, 17);

/// Library file name the system loader is asked for last.
const LIB_NAME: &str = "libonnxruntime.so";

/// Which execution provider runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// NVIDIA CUDA (needs the `cuda` cargo feature and a CUDA build of ONNX Runtime).
    Cuda,
    /// NVIDIA TensorRT, with CUDA then CPU for nodes TensorRT rejects (cargo feature `tensorrt`).
    Tensorrt,
    /// TensorRT, then CUDA, then CPU: the first that registers; logs what it chose and why.
    Auto,
}

impl Provider {
    /// Every provider, in the order help texts list them.
    pub const ALL: &'static [Provider] = &[Provider::Cpu, Provider::Cuda, Provider::Tensorrt, Provider::Auto];

    /// The name on the command line, in JSON and in PNG metadata.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Auto => "auto",
        }
    }

    /// One line for help texts.
    pub fn help(self) -> &'static str {
        match self {
            Provider::Cpu => "ONNX Runtime's CPU provider",
            Provider::Cuda => "NVIDIA CUDA (needs a CUDA build of ONNX Runtime)",
            Provider::Tensorrt => "NVIDIA TensorRT, with CUDA then CPU for nodes TensorRT rejects",
            Provider::Auto => "TensorRT, then CUDA, then CPU: the first that registers",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Images fed to the transformer together at most, by default (TensorRT profiles cover it).
pub const DEFAULT_MAX_BATCH: usize = 16;

/// How to set up ONNX Runtime for this process.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Explicit library path (`--ort-lib`); otherwise `ORT_DYLIB_PATH`, then the search.
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads of the shared pool; `None` = all cores.
    pub threads: Option<usize>,
}

/// Execution provider and its settings for one bundle's sessions.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Which provider.
    pub provider: Provider,
    /// TensorRT: build fp16 engines (faster on Jetson; logits differ from fp32 in the last bits).
    pub fp16: bool,
    /// TensorRT: root of the engine and timing caches; `None` = `$XDG_CACHE_HOME/absorb/tensorrt`
    /// (or `~/.cache/absorb/tensorrt`). Each bundle, ONNX Runtime version, GPU and precision gets
    /// its own subdirectory, so a stale engine is never reused.
    pub cache_dir: Option<PathBuf>,
    /// Largest batch the shape profiles cover (TensorRT builds one engine for 1..=max_batch).
    pub max_batch: usize,
    /// CUDA device index.
    pub device_id: i32,
    /// Transformer precision variant from the bundle (`int8` for CPUs, `fp16` for GPUs);
    /// `None` = the fp32 graph.
    pub variant: Option<String>,
    /// TensorRT: largest token grid the decoder's shape profile covers (`--grid`); `None` = the
    /// bundle's grid.
    pub max_grid: Option<[usize; 2]>,
}

impl ProviderConfig {
    /// Defaults for `provider`: fp32, default cache, profiles up to [`DEFAULT_MAX_BATCH`], device 0.
    pub fn new(provider: Provider) -> ProviderConfig {
        ProviderConfig {
            provider,
            fp16: false,
            cache_dir: None,
            max_batch: DEFAULT_MAX_BATCH,
            device_id: 0,
            variant: None,
            max_grid: None,
        }
    }

    /// The engine cache directory for `bundle` on this library and GPU.
    pub fn engine_cache(&self, bundle: &Bundle, library: &Library) -> PathBuf {
        let root = self.cache_dir.clone().unwrap_or_else(default_cache_root);
        let sha = bundle.sha256();
        root.join(format!("{}-{}", bundle.manifest().name, &sha[..16.min(sha.len())]))
            .join(format!("ort-{}", library.version))
            .join(gpu_identity(self.device_id))
            .join(if self.fp16 { "fp16" } else { "fp32" })
    }
}

fn default_cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("absorb").join("tensorrt")
}

/// A file-name-safe name of the GPU, from the NVIDIA driver (`/proc/driver/nvidia/gpus`) or, on
/// Jetson boards, the device tree model; `unknown-gpu` when neither says.
pub fn gpu_identity(device_id: i32) -> String {
    let from_driver = std::fs::read_dir("/proc/driver/nvidia/gpus").ok().and_then(|rd| {
        let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        dirs.sort();
        let dir = dirs.get(device_id.max(0) as usize)?.clone();
        let info = std::fs::read_to_string(dir.join("information")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
    });
    let name = from_driver
        .or_else(|| {
            std::fs::read_to_string("/proc/device-tree/model")
                .ok()
                .map(|m| m.trim_matches(char::from(0)).trim().to_string())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unknown-gpu".to_string());
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The loaded ONNX Runtime library.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Library {
    /// The file that was loaded.
    pub path: PathBuf,
    /// Its version string, e.g. `1.31.1`.
    pub version: String,
    /// How it was found (flag, environment, next to the binary, ...).
    pub found_by: String,
}

/// The process-wide ONNX Runtime: library, environment, thread pool.
pub struct Runtime {
    library: Library,
    threads: usize,
    pub(super) env: Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

impl Runtime {
    /// Finds and loads ONNX Runtime and creates the process's environment, once. Later calls
    /// return the same runtime if their options agree, an error if they do not.
    pub fn init(options: &RuntimeOptions) -> Result<&'static Runtime> {
        // A poisoned lock only means another thread panicked mid-init; the OnceLock is still sound.
        let _guard = RUNTIME_INIT.lock().unwrap_or_else(|p| p.into_inner());
        let threads = match options.threads {
            Some(0) => return Err(Error::param(Param::Threads, "0 is not allowed: use 1 or more")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        if let Some(rt) = RUNTIME.get() {
            let same_lib = options.ort_lib.as_ref().is_none_or(|p| same_file(p, &rt.library.path));
            if !same_lib || threads != rt.threads {
                return Err(Error::OrtReinit {
                    existing: format!("{} and {} threads", rt.library.path.display(), rt.threads),
                    requested: format!(
                        "{} and {threads} threads",
                        options.ort_lib.as_deref().unwrap_or(Path::new("(search)")).display()
                    ),
                });
            }
            return Ok(rt);
        }
        let library = find_library(options.ort_lib.as_deref())?;
        let builder = ort::init_from(&library.path).map_err(|e| Error::OrtLoad {
            path: library.path.clone(),
            reason: error_chain(&e),
        })?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(threads)
            .and_then(|p| p.with_inter_threads(1))
            // Spinning off. Measured on 2 cores: paper size no gain from spinning (225-318 ms per
            // call either way), digits 10-15% faster with it; off stays fair to other processes.
            .and_then(|p| p.with_spin_control(false))
            .map_err(Error::ort("configuring the ONNX Runtime thread pool"))?;
        let env = builder
            .with_name("absorb")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(Error::ort("creating the ONNX Runtime environment"))?;
        log::info!(
            "ONNX Runtime {} from {} ({}), {threads} threads",
            library.version,
            library.path.display(),
            library.found_by
        );
        Ok(RUNTIME.get_or_init(|| Runtime { library, threads, env }))
    }

    /// The loaded library.
    pub fn library(&self) -> &Library {
        &self.library
    }

    /// Intra-op threads of the shared pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Execution providers compiled into the loaded library (not a promise that they work here:
    /// a CUDA build lists CUDA even without a GPU).
    pub fn available_providers(&self) -> Vec<String> {
        let api = ort::api();
        let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
        let mut n: std::ffi::c_int = 0;
        // SAFETY: documented C API: fills an array of `n` C strings that we release below.
        unsafe {
            let status = (api.GetAvailableProviders)(&mut list, &mut n);
            if !status.0.is_null() {
                (api.ReleaseStatus)(status.0);
                return Vec::new();
            }
            let names = (0..n.max(0) as usize)
                .map(|i| CStr::from_ptr(*list.add(i)).to_string_lossy().into_owned())
                .collect();
            let status = (api.ReleaseAvailableProviders)(list, n);
            if !status.0.is_null() {
                (api.ReleaseStatus)(status.0);
            }
            names
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The full `source()` chain of an error: ort's Display of a dlopen failure says only
/// "dlopen failed"; the reason is below it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Looks for the library in the documented order (design section 6) and checks its version.
/// An explicit path (flag or `ORT_DYLIB_PATH`) is used or fails on its own; no search after it.
pub fn find_library(explicit: Option<&Path>) -> Result<Library> {
    if let Some(p) = explicit {
        return probe(p, "--ort-lib");
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return probe(Path::new(&p), "ORT_DYLIB_PATH");
    }
    let mut searched = Vec::new();
    for (dir, found_by) in search_dirs() {
        match lib_in_dir(&dir) {
            Some(file) => return probe(&file, &found_by),
            None => searched.push(format!("{} ({found_by}): no libonnxruntime.so*", dir.display())),
        }
    }
    // Last: the system loader (LD_LIBRARY_PATH, ld.so.cache).
    match probe(Path::new(LIB_NAME), "system loader") {
        Ok(lib) => Ok(lib),
        Err(Error::OrtLoad { reason, .. }) => {
            searched.push(format!("{LIB_NAME} via the system loader: {reason}"));
            Err(Error::OrtNotFound { searched })
        }
        Err(e) => Err(e),
    }
}

/// Directories searched, in order, with how each is described.
fn search_dirs() -> Vec<(PathBuf, String)> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push((exe_dir, "next to the absorb binary".to_string()));
    }
    // The repository's fetched copy (`make ort`), from the working directory and from the
    // source tree this binary was built in.
    let roots = [
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    for root in roots.into_iter().flatten() {
        if let Some(dir) = newest_subdir(&root.join(".ort")) {
            dirs.push((dir, "the repository's copy from `make ort`".to_string()));
        }
    }
    // An installed Python onnxruntime / onnxruntime-gpu package.
    let mut lib_roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        lib_roots.push(PathBuf::from(venv).join("lib"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        lib_roots.push(PathBuf::from(home).join(".local/lib"));
    }
    lib_roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    for root in lib_roots {
        for py in python_dirs(&root) {
            for site in ["site-packages", "dist-packages"] {
                let capi = py.join(site).join("onnxruntime/capi");
                if capi.is_dir() {
                    dirs.push((capi, "an installed Python onnxruntime package".to_string()));
                }
            }
        }
    }
    dirs
}

fn python_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.reverse();
    out
}

/// The subdirectory with the highest version-like name, e.g. `.ort/1.31.1`.
fn newest_subdir(dir: &Path) -> Option<PathBuf> {
    let mut subdirs: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((parse_version(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    subdirs.sort();
    subdirs.pop().map(|(_, p)| p)
}

/// `libonnxruntime.so` if present, else the highest `libonnxruntime.so.X.Y.Z`.
fn lib_in_dir(dir: &Path) -> Option<PathBuf> {
    let plain = dir.join(LIB_NAME);
    if plain.is_file() {
        return Some(plain);
    }
    let prefix = format!("{LIB_NAME}.");
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let v = parse_version(name.strip_prefix(&prefix)?)?;
            Some((v, e.path()))
        })
        .collect();
    versioned.sort();
    versioned.pop().map(|(_, p)| p)
}

fn parse_version(s: &str) -> Option<Vec<u32>> {
    let v: Option<Vec<u32>> = s.split('.').map(|p| p.parse().ok()).collect();
    v.filter(|v| !v.is_empty())
}

/// Opens the library just long enough to read its version, so an old build is refused with a
/// message naming both versions before ort ever binds to it.
fn probe(path: &Path, found_by: &str) -> Result<Library> {
    // SAFETY: loading ONNX Runtime runs its static initialisers, which is what we want; the
    // symbol is the C API's documented entry point with this signature.
    let version = unsafe {
        let lib = libloading::Library::new(path).map_err(|e| Error::OrtLoad {
            path: path.to_path_buf(),
            reason: error_chain(&e),
        })?;
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase").map_err(|_| Error::OrtLoad {
                path: path.to_path_buf(),
                reason: "not an ONNX Runtime library (no OrtGetApiBase symbol)".into(),
            })?;
        let base = get_base();
        if base.is_null() {
            return Err(Error::OrtLoad {
                path: path.to_path_buf(),
                reason: "OrtGetApiBase returned null".into(),
            });
        }
        let v = ((*base).GetVersionString)();
        if v.is_null() {
            String::new()
        } else {
            CStr::from_ptr(v).to_string_lossy().into_owned()
        }
    };
    let parsed = parse_version(&version).unwrap_or_default();
    let (maj, min) = (
        parsed.first().copied().unwrap_or(0),
        parsed.get(1).copied().unwrap_or(0),
    );
    if (maj, min) < MIN_ORT_VERSION {
        return Err(Error::OrtTooOld {
            path: path.to_path_buf(),
            found: if version.is_empty() {
                "(unknown version)".into()
            } else {
                version
            },
            required: format!("{}.{}", MIN_ORT_VERSION.0, MIN_ORT_VERSION.1),
        });
    }
    // A bare name resolved by the system loader: report it as given.
    Ok(Library {
        path: path.to_path_buf(),
        version,
        found_by: found_by.to_string(),
    })
}
