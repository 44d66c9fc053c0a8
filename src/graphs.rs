//! The only file that uses `ort`: finding and loading the ONNX Runtime library, choosing the
//! execution provider, building the three sessions, checking their inputs and outputs against
//! the bundle at load time, and running them.
//!
//! It knows nothing of sampling, PNGs or HTTP. ONNX Runtime allows one environment per process,
//! so the library and the thread pool are set once ([`Runtime::init`]) and shared by every
//! [`Graphs`] in the process; the three sessions share that one global thread pool, with spinning
//! off (measured at paper size: sessions with their own spinning pools slowed each other 30-75%).

use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::environment::{Environment, GlobalThreadPoolOptions};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::bundle::{Bundle, GraphKind};
use crate::error::{Error, Result};

/// Graph I/O names: the contract with `export/export.py` (constants of the same names there).
pub const ENCODER_INPUT: &str = "image";
/// Encoder output: token ids `(B, h, w)`.
pub const ENCODER_OUTPUT: &str = "tokens";
/// Decoder input: token ids `(B, h, w)`.
pub const DECODER_INPUT: &str = "tokens";
/// Decoder output: pixels `(B, C, H, W)`.
pub const DECODER_OUTPUT: &str = "image";
/// Transformer input: token ids `(B, L)`, mask id included.
pub const TRANSFORMER_INPUT: &str = "tokens";
/// Transformer output: logits `(B, L, K)`.
pub const TRANSFORMER_OUTPUT: &str = "logits";

/// The oldest ONNX Runtime this build loads: `ort` without an `api-NN` feature is API level 17.
pub const MIN_ORT_VERSION: (u32, u32) = (1, 17);

/// Library file name the system loader is asked for last.
const LIB_NAME: &str = "libonnxruntime.so";

/// Which execution provider runs the graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
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

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Auto => "auto",
        })
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
    env: Environment,
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
            Some(0) => return Err(Error::param("threads", "0 is not allowed: use 1 or more")),
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

/// Expected dimension of a graph input or output.
#[derive(Debug, Clone, Copy)]
enum Dim {
    /// The batch axis: must be dynamic.
    Batch,
    /// A fixed size: the graph may declare it or leave it dynamic.
    Is(usize),
    /// Anything (dynamic grid axes of the decoder).
    Any,
}

/// Expected element type, name and dims of one input or output.
struct Port {
    name: &'static str,
    ty: TensorElementType,
    dims: Vec<Dim>,
}

impl Port {
    fn new(name: &'static str, ty: TensorElementType, dims: &[Dim]) -> Port {
        Port {
            name,
            ty,
            dims: dims.to_vec(),
        }
    }
}

/// The three sessions of a bundle, checked against its manifest.
pub struct Graphs {
    encoder: Session,
    decoder: Session,
    transformer: Session,
    provider: Provider,
    image: [usize; 3],
    grid: [usize; 2],
    codebook_size: usize,
    /// Transformer calls and their total time, for `-v` timings and `bench`.
    pub transformer_stats: CallStats,
}

/// Count and total time of calls into one graph.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallStats {
    /// Calls made.
    pub calls: usize,
    /// Rows (images) fed over all calls.
    pub rows: usize,
    /// Wall time spent inside ONNX Runtime.
    pub time: Duration,
}

impl Graphs {
    /// Builds the three sessions on the requested provider and checks each one's inputs and
    /// outputs against the manifest.
    pub fn load(bundle: &Bundle, runtime: &Runtime, config: &ProviderConfig) -> Result<Graphs> {
        // `auto` decides on the first graph; the others follow that choice.
        let mut provider = config.provider;
        if config.max_batch == 0 {
            return Err(Error::param("max-batch", "0 is not allowed: use 1 or more"));
        }
        let m = bundle.manifest();
        let (c, h, w) = (m.image.channels, m.image.height, m.image.width);
        let (th, tw, k) = (m.tokens.height, m.tokens.width, m.tokens.codebook_size);
        let l = th * tw;
        let mut load_one = |kind: GraphKind| -> Result<Session> {
            let path = bundle.graph_path(kind);
            // TensorRT shape profile: batch 1..=max_batch at the bundle's grid.
            let n = config.max_batch;
            let (name, dims) = match kind {
                GraphKind::Encoder => (ENCODER_INPUT, format!("{c}x{h}x{w}")),
                GraphKind::Decoder => (DECODER_INPUT, format!("{th}x{tw}")),
                GraphKind::Transformer => (TRANSFORMER_INPUT, format!("{l}")),
            };
            let max_dims = match (kind, config.max_grid) {
                (GraphKind::Decoder, Some([gh, gw])) => format!("{}x{}", gh.max(th), gw.max(tw)),
                _ => dims.clone(),
            };
            let gpu = GpuPlan {
                config,
                cache: config.engine_cache(bundle, runtime.library()),
                profile: [
                    format!("{name}:1x{dims}"),
                    format!("{name}:{n}x{dims}"),
                    format!("{name}:{n}x{max_dims}"),
                ],
            };
            let (session, used) = build_session(runtime, &path, kind, provider, &gpu)?;
            provider = used;
            let (input, output) = match kind {
                GraphKind::Encoder => (
                    Port::new(
                        ENCODER_INPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(c), Dim::Is(h), Dim::Is(w)],
                    ),
                    Port::new(
                        ENCODER_OUTPUT,
                        TensorElementType::Int64,
                        &[Dim::Batch, Dim::Is(th), Dim::Is(tw)],
                    ),
                ),
                GraphKind::Decoder => (
                    Port::new(
                        DECODER_INPUT,
                        TensorElementType::Int64,
                        &[Dim::Batch, Dim::Any, Dim::Any],
                    ),
                    Port::new(
                        DECODER_OUTPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(c), Dim::Any, Dim::Any],
                    ),
                ),
                GraphKind::Transformer => (
                    Port::new(TRANSFORMER_INPUT, TensorElementType::Int64, &[Dim::Batch, Dim::Is(l)]),
                    Port::new(
                        TRANSFORMER_OUTPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(l), Dim::Is(k)],
                    ),
                ),
            };
            check_port(&session, kind, &path, "input", &input)?;
            check_port(&session, kind, &path, "output", &output)?;
            Ok(session)
        };
        let encoder = load_one(GraphKind::Encoder)?;
        let decoder = load_one(GraphKind::Decoder)?;
        let transformer = load_one(GraphKind::Transformer)?;
        Ok(Graphs {
            encoder,
            decoder,
            transformer,
            provider,
            image: [c, h, w],
            grid: [th, tw],
            codebook_size: k,
            transformer_stats: CallStats::default(),
        })
    }

    /// The provider the sessions were built on (never `Auto`).
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Transformer: `tokens` `(rows, L)` -> `logits` `(rows, L, K)`, written into `logits`.
    pub fn transformer(&mut self, tokens: &[i64], rows: usize, logits: &mut Vec<f32>) -> Result<()> {
        let l = self.grid[0] * self.grid[1];
        let start = Instant::now();
        let input =
            TensorRef::from_array_view(([rows, l], tokens)).map_err(Error::ort("preparing the transformer input"))?;
        let outputs = self
            .transformer
            .run(ort::inputs![TRANSFORMER_INPUT => input])
            .map_err(Error::ort("running the transformer"))?;
        let (shape, data) = outputs[TRANSFORMER_OUTPUT]
            .try_extract_tensor::<f32>()
            .map_err(Error::ort("reading the transformer output"))?;
        expect_shape("transformer", TRANSFORMER_OUTPUT, shape, &[rows, l, self.codebook_size])?;
        logits.clear();
        logits.extend_from_slice(data);
        self.transformer_stats.calls += 1;
        self.transformer_stats.rows += rows;
        self.transformer_stats.time += start.elapsed();
        Ok(())
    }

    /// Encoder: images `(B, C, H, W)` -> token ids `(B, h, w)`.
    pub fn encode(&mut self, pixels: &[f32], batch: usize) -> Result<Vec<i64>> {
        let [c, h, w] = self.image;
        let input = TensorRef::from_array_view(([batch, c, h, w], pixels))
            .map_err(Error::ort("preparing the encoder input"))?;
        let outputs = self
            .encoder
            .run(ort::inputs![ENCODER_INPUT => input])
            .map_err(Error::ort("running the encoder"))?;
        let (shape, data) = outputs[ENCODER_OUTPUT]
            .try_extract_tensor::<i64>()
            .map_err(Error::ort("reading the encoder output"))?;
        expect_shape("encoder", ENCODER_OUTPUT, shape, &[batch, self.grid[0], self.grid[1]])?;
        Ok(data.to_vec())
    }

    /// Decoder: token ids `(B, gh, gw)` -> images `(B, C, H', W')`; returns the pixels and
    /// `[H', W']`. Any grid size works (the decoder is fully convolutional).
    pub fn decode(&mut self, tokens: &[i64], batch: usize, grid: [usize; 2]) -> Result<(Vec<f32>, [usize; 2])> {
        let input = TensorRef::from_array_view(([batch, grid[0], grid[1]], tokens))
            .map_err(Error::ort("preparing the decoder input"))?;
        let outputs = self
            .decoder
            .run(ort::inputs![DECODER_INPUT => input])
            .map_err(Error::ort("running the decoder"))?;
        let (shape, data) = outputs[DECODER_OUTPUT]
            .try_extract_tensor::<f32>()
            .map_err(Error::ort("reading the decoder output"))?;
        let c = self.image[0];
        if shape.len() != 4 || shape[0] as usize != batch || shape[1] as usize != c {
            return Err(Error::Tokens(format!(
                "decoder returned shape {shape:?}, expected [{batch}, {c}, H, W]"
            )));
        }
        Ok((data.to_vec(), [shape[2] as usize, shape[3] as usize]))
    }
}

fn expect_shape(graph: &str, name: &str, found: &[i64], expected: &[usize]) -> Result<()> {
    if found.len() == expected.len() && found.iter().zip(expected).all(|(&f, &e)| f as usize == e) {
        Ok(())
    } else {
        Err(Error::Tokens(format!(
            "{graph} output \"{name}\" has shape {found:?}, expected {expected:?}"
        )))
    }
}

/// What a GPU provider needs to know for one session.
struct GpuPlan<'a> {
    #[cfg_attr(not(any(feature = "cuda", feature = "tensorrt")), allow(dead_code))]
    config: &'a ProviderConfig,
    /// Engine/timing cache directory (TensorRT).
    cache: PathBuf,
    /// TensorRT profile: min, opt, max shapes, e.g. `tokens:1x64`.
    #[cfg_attr(not(feature = "tensorrt"), allow(dead_code))]
    profile: [String; 3],
}

fn build_session(
    runtime: &Runtime,
    path: &Path,
    kind: GraphKind,
    provider: Provider,
    gpu: &GpuPlan,
) -> Result<(Session, Provider)> {
    let ctx = |what: &str| format!("graph \"{}\" ({}): {what}", kind.name(), path.display());
    let base = || -> Result<SessionBuilder> {
        let builder = Session::builder(&runtime.env).map_err(Error::ort(ctx("configuring the session")))?;
        // Optional settings: a build that lacks one (minimal builds) still runs, with a warning.
        let builder = builder
            .with_optimization_level(GraphOptimizationLevel::All)
            .unwrap_or_else(|e| {
                log::warn!("{}: graph optimizations unavailable: {e}", kind.name());
                e.recover()
            });
        Ok(builder.with_deterministic_compute(true).unwrap_or_else(|e| {
            log::warn!("{}: deterministic compute unavailable: {e}", kind.name());
            e.recover()
        }))
    };
    let commit = |mut b: SessionBuilder| -> Result<Session> {
        b.commit_from_file(path).map_err(|e| Error::GraphFile {
            graph: kind.name(),
            path: path.to_path_buf(),
            message: format!(
                "ONNX Runtime cannot load it: {e}; the file is corrupt or not an ONNX graph, re-export the bundle"
            ),
        })
    };
    let on_gpu = |candidate: Provider| -> Result<Session> {
        let mut b = base()?;
        register(&mut b, candidate, gpu)?;
        if candidate == Provider::Tensorrt {
            log::info!(
                "{}: TensorRT may build an engine now (minutes on a Jetson; cached in {})",
                kind.name(),
                gpu.cache.display()
            );
        }
        b.commit_from_file(path).map_err(|e| Error::Provider {
            provider: candidate.to_string(),
            reason: format!("building the {} session failed: {e}", kind.name()),
            fix: "check the CUDA/TensorRT installation, or use --provider cpu".into(),
        })
    };
    match provider {
        Provider::Cpu => Ok((commit(base()?)?, Provider::Cpu)),
        Provider::Cuda | Provider::Tensorrt => Ok((on_gpu(provider)?, provider)),
        Provider::Auto => {
            for candidate in [Provider::Tensorrt, Provider::Cuda] {
                match on_gpu(candidate) {
                    Ok(session) => {
                        log::info!("{}: running on {candidate}", kind.name());
                        return Ok((session, candidate));
                    }
                    Err(e) => log::info!("{}: {candidate} not used: {e}", kind.name()),
                }
            }
            log::info!("{}: running on cpu", kind.name());
            Ok((commit(base()?)?, Provider::Cpu))
        }
    }
}

/// Registers a GPU provider so that failure is an error, never a silent CPU fallback.
fn register(builder: &mut SessionBuilder, provider: Provider, gpu: &GpuPlan) -> Result<()> {
    let fail = |reason: String, fix: &str| Error::Provider {
        provider: provider.to_string(),
        reason,
        fix: fix.to_string(),
    };
    match provider {
        Provider::Cuda => {
            #[cfg(feature = "cuda")]
            {
                use ort::ep::ExecutionProvider;
                ort::ep::CUDA::default()
                    .with_device_id(gpu.config.device_id)
                    .register(builder)
                    .map_err(|e| {
                        fail(
                            e.to_string(),
                            "install CUDA and cuDNN matching the ONNX Runtime build, point --ort-lib at a CUDA build \
                         (onnxruntime-gpu, or jetson-containers' onnxruntime on Jetson), or use --provider cpu",
                        )
                    })
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (builder, gpu);
                Err(fail(
                    "this absorb binary was built without CUDA support".into(),
                    "rebuild with `cargo build --release --features cuda`",
                ))
            }
        }
        Provider::Tensorrt => {
            #[cfg(feature = "tensorrt")]
            {
                use ort::ep::ExecutionProvider;
                std::fs::create_dir_all(&gpu.cache).map_err(|e| {
                    fail(
                        format!("cannot create the engine cache {}: {e}", gpu.cache.display()),
                        "pass a writable --cache-dir",
                    )
                })?;
                let cache = gpu.cache.to_string_lossy().into_owned();
                let [min, opt, max] = &gpu.profile;
                ort::ep::TensorRT::default()
                    .with_device_id(gpu.config.device_id)
                    .with_fp16(gpu.config.fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(&cache)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&cache)
                    .with_profile_min_shapes(min)
                    .with_profile_opt_shapes(opt)
                    .with_profile_max_shapes(max)
                    .register(builder)
                    .map_err(|e| {
                        fail(
                            e.to_string(),
                            "install TensorRT matching the ONNX Runtime build, point --ort-lib at a TensorRT-enabled \
                             build, or use --provider cuda/cpu",
                        )
                    })?;
                // Nodes TensorRT rejects go to CUDA (when built in), then CPU.
                #[cfg(feature = "cuda")]
                {
                    if let Err(e) = ort::ep::CUDA::default()
                        .with_device_id(gpu.config.device_id)
                        .register(builder)
                    {
                        log::warn!("TensorRT without CUDA fallback for unsupported nodes: {e}");
                    }
                }
                Ok(())
            }
            #[cfg(not(feature = "tensorrt"))]
            {
                let _ = (builder, gpu);
                Err(fail(
                    "this absorb binary was built without TensorRT support".into(),
                    "rebuild with `cargo build --release --features tensorrt`",
                ))
            }
        }
        Provider::Cpu | Provider::Auto => Ok(()),
    }
}

fn check_port(session: &Session, kind: GraphKind, path: &Path, side: &str, want: &Port) -> Result<()> {
    let ports = if side == "input" {
        session.inputs()
    } else {
        session.outputs()
    };
    let err = |message: String| Error::Contract {
        graph: kind.name(),
        path: path.to_path_buf(),
        message,
    };
    let names: Vec<&str> = ports.iter().map(|p| p.name()).collect();
    if ports.len() != 1 || names[0] != want.name {
        return Err(err(format!(
            "expected exactly one {side} named \"{}\", found {names:?}; re-export the bundle with export/",
            want.name
        )));
    }
    let ValueType::Tensor { ty, shape, .. } = ports[0].dtype() else {
        return Err(err(format!("{side} \"{}\" is not a tensor", want.name)));
    };
    if *ty != want.ty {
        return Err(err(format!(
            "{side} \"{}\" has element type {ty:?}, expected {:?}",
            want.name, want.ty
        )));
    }
    let expected: Vec<String> = want
        .dims
        .iter()
        .map(|d| match d {
            Dim::Batch => "batch".to_string(),
            Dim::Is(n) => n.to_string(),
            Dim::Any => "?".to_string(),
        })
        .collect();
    let mismatch = shape.len() != want.dims.len()
        || shape.iter().zip(&want.dims).any(|(&found, d)| match d {
            Dim::Batch => found >= 0,
            Dim::Is(n) => found >= 0 && found as usize != *n,
            Dim::Any => false,
        });
    if mismatch {
        return Err(err(format!(
            "{side} \"{}\" has shape {:?}, expected [{}] (model.json; batch must be dynamic)",
            want.name,
            shape
                .iter()
                .map(|&d| if d < 0 { "dynamic".to_string() } else { d.to_string() })
                .collect::<Vec<_>>(),
            expected.join(", ")
        )));
    }
    Ok(())
}

/// An auxiliary single-input, single-output float graph run on the shared runtime, such as the
/// digits bundle's `eval/classifier.onnx` that judges samples. Not part of the bundle contract.
pub struct Auxiliary {
    session: Session,
    input: String,
    output: String,
}

impl Auxiliary {
    /// Loads `path` on the CPU provider and checks that it has the named input and output.
    pub fn load(runtime: &Runtime, path: &Path, input: &str, output: &str) -> Result<Auxiliary> {
        let mut builder = Session::builder(&runtime.env).map_err(Error::ort(format!("loading {}", path.display())))?;
        let session = builder.commit_from_file(path).map_err(|e| Error::GraphFile {
            graph: "auxiliary",
            path: path.to_path_buf(),
            message: format!("ONNX Runtime cannot load it: {e}"),
        })?;
        let has_input = session.inputs().iter().any(|p| p.name() == input);
        let has_output = session.outputs().iter().any(|p| p.name() == output);
        if !has_input || !has_output {
            return Err(Error::Contract {
                graph: "auxiliary",
                path: path.to_path_buf(),
                message: format!("expected input \"{input}\" and output \"{output}\""),
            });
        }
        Ok(Auxiliary {
            session,
            input: input.to_string(),
            output: output.to_string(),
        })
    }

    /// Runs the graph on `data` of `shape`; returns the output values and shape.
    pub fn run(&mut self, data: &[f32], shape: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
        let input = TensorRef::from_array_view((shape.to_vec(), data)).map_err(Error::ort("preparing the input"))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(Error::ort("running the auxiliary graph"))?;
        let (shape, values) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(Error::ort("reading the output"))?;
        Ok((values.to_vec(), shape.iter().map(|&d| d.max(0) as usize).collect()))
    }
}
