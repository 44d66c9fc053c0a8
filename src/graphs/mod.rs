//! The only file that uses `ort`: finding and loading the ONNX Runtime library, choosing the
//! execution provider, building the three sessions, checking their inputs and outputs against
//! the bundle at load time, and running them.
//!
//! It knows nothing of sampling, PNGs or HTTP. ONNX Runtime allows one environment per process,
//! so the library and the thread pool are set once ([`Runtime::init`]) and shared by every
//! [`Graphs`] in the process; the three sessions share that one global thread pool, with spinning
//! off (measured at paper size: sessions with their own spinning pools slowed each other 30-75%).

//!
//! `runtime.rs` finds and loads the library and holds the provider settings; this file builds
//! and runs the sessions.

mod runtime;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::bundle::{Bundle, GraphKind};
use crate::error::{Error, Result};
use crate::limits;
use crate::param::Param;

pub use runtime::{
    find_library, gpu_identity, Library, Provider, ProviderConfig, Runtime, RuntimeOptions, DEFAULT_MAX_BATCH,
    MIN_ORT_VERSION,
};

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
/// Second transformer input of a class-conditional bundle (one with `classes` in model.json):
/// the class of each row `(B,)`, -1 for none.
pub const CLASS_INPUT: &str = "class";
/// Transformer output: logits `(B, L, K)`.
pub const TRANSFORMER_OUTPUT: &str = "logits";
/// The cached graph's extra inputs and outputs (export/cache.py; its `tokens`, `class` and
/// `logits` are the transformer's names).
pub const CACHED_POSITIONS: &str = "positions";
/// Input: `(N, B, L, D)` cached keys.
pub const CACHED_KEYS: &str = "keys";
/// Input: `(N, B, L, D)` cached values.
pub const CACHED_VALUES: &str = "values";
/// Output: `(N, B, Q, D)` the query positions' keys.
pub const CACHED_NEW_KEYS: &str = "new_keys";
/// Output: `(N, B, Q, D)` the query positions' values.
pub const CACHED_NEW_VALUES: &str = "new_values";

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
    /// The cached-attention graph, loaded on first use (`--cache N`).
    cached: Option<Session>,
    runtime: &'static Runtime,
    config: ProviderConfig,
    provider: Provider,
    image: [usize; 3],
    grid: [usize; 2],
    codebook_size: usize,
    /// Classes of a conditional transformer (0: unconditional, no class input).
    classes: usize,
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
    pub fn load(bundle: &Bundle, runtime: &'static Runtime, config: &ProviderConfig) -> Result<Graphs> {
        // `auto` decides on the first graph; the others follow that choice.
        let mut provider = config.provider;
        limits::check_range(Param::MaxBatch, config.max_batch, limits::MAX_BATCH)?;
        let m = bundle.manifest();
        let (c, h, w) = (m.image.channels, m.image.height, m.image.width);
        let (th, tw, k) = (m.tokens.height, m.tokens.width, m.tokens.codebook_size);
        let l = th * tw;
        let classes = m.classes.as_ref().map_or(0, Vec::len);
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
            // A conditional transformer's class input has the batch axis alone.
            let class = |b: usize| match kind {
                GraphKind::Transformer if classes > 0 => format!(",{CLASS_INPUT}:{b}"),
                _ => String::new(),
            };
            let gpu = GpuPlan {
                config,
                cache: config.engine_cache(bundle, runtime.library()),
                profile: [
                    format!("{name}:1x{dims}{}", class(1)),
                    format!("{name}:{n}x{dims}{}", class(n)),
                    format!("{name}:{n}x{max_dims}{}", class(n)),
                ],
            };
            let (session, used) = build_session(runtime, &path, kind, provider, &gpu)?;
            provider = used;
            let (input, output) = match kind {
                GraphKind::Encoder => (
                    vec![Port::new(
                        ENCODER_INPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(c), Dim::Is(h), Dim::Is(w)],
                    )],
                    Port::new(
                        ENCODER_OUTPUT,
                        TensorElementType::Int64,
                        &[Dim::Batch, Dim::Is(th), Dim::Is(tw)],
                    ),
                ),
                GraphKind::Decoder => (
                    vec![Port::new(
                        DECODER_INPUT,
                        TensorElementType::Int64,
                        &[Dim::Batch, Dim::Any, Dim::Any],
                    )],
                    Port::new(
                        DECODER_OUTPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(c), Dim::Any, Dim::Any],
                    ),
                ),
                GraphKind::Transformer => (
                    {
                        let mut ports = vec![Port::new(
                            TRANSFORMER_INPUT,
                            TensorElementType::Int64,
                            &[Dim::Batch, Dim::Is(l)],
                        )];
                        if classes > 0 {
                            ports.push(Port::new(CLASS_INPUT, TensorElementType::Int64, &[Dim::Batch]));
                        }
                        ports
                    },
                    Port::new(
                        TRANSFORMER_OUTPUT,
                        TensorElementType::Float32,
                        &[Dim::Batch, Dim::Is(l), Dim::Is(k)],
                    ),
                ),
            };
            check_ports(&session, kind, &path, "input", &input)?;
            check_ports(&session, kind, &path, "output", &[output])?;
            Ok(session)
        };
        let encoder = load_one(GraphKind::Encoder)?;
        let decoder = load_one(GraphKind::Decoder)?;
        let transformer = load_one(GraphKind::Transformer)?;
        Ok(Graphs {
            encoder,
            decoder,
            transformer,
            cached: None,
            runtime,
            config: config.clone(),
            provider,
            image: [c, h, w],
            grid: [th, tw],
            codebook_size: k,
            classes,
            transformer_stats: CallStats::default(),
        })
    }

    /// The provider the sessions were built on (never `Auto`).
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// How many classes the transformer is conditioned on (0: none, no class input).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Transformer: `tokens` `(rows, L)` and each row's class (`rows` of them, -1 = none) ->
    /// `logits` `(rows, L, K)`, written into `logits`. An unconditional transformer takes only
    /// -1 classes.
    pub fn transformer(&mut self, tokens: &[i64], classes: &[i64], logits: &mut Vec<f32>) -> Result<()> {
        let l = self.grid[0] * self.grid[1];
        let rows = classes.len();
        if let Some(&c) = classes.iter().find(|&&c| !(-1..self.classes as i64).contains(&c)) {
            return Err(Error::Internal(format!(
                "class {c} given to a transformer of {} classes",
                self.classes
            )));
        }
        let start = Instant::now();
        let input =
            TensorRef::from_array_view(([rows, l], tokens)).map_err(Error::ort("preparing the transformer input"))?;
        let outputs = if self.classes > 0 {
            let class =
                TensorRef::from_array_view(([rows], classes)).map_err(Error::ort("preparing the class input"))?;
            self.transformer
                .run(ort::inputs![TRANSFORMER_INPUT => input, CLASS_INPUT => class])
        } else {
            self.transformer.run(ort::inputs![TRANSFORMER_INPUT => input])
        }
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

    /// The cached-attention graph ([`crate::sampler::CachedCall`]): loads and checks it on the
    /// first call (`bundle.cache_graph()`: present, made from this transformer, intact). It runs on
    /// the CPU or CUDA (TensorRT would need a shape profile per query count: on TensorRT it runs on
    /// CUDA).
    pub fn cached(
        &mut self,
        bundle: &Bundle,
        call: &crate::sampler::CachedCall<'_>,
        out: &mut crate::sampler::CachedOut,
    ) -> Result<()> {
        let (cache, path) = bundle.cache_graph()?;
        let session = match self.cached.take() {
            Some(session) => session,
            None => {
                let provider = match self.provider {
                    Provider::Tensorrt => Provider::Cuda,
                    p => p,
                };
                let gpu = GpuPlan {
                    config: &self.config,
                    cache: self.config.engine_cache(bundle, self.runtime.library()),
                    profile: Default::default(),
                };
                let (session, _) = build_session(self.runtime, &path, GraphKind::Transformer, provider, &gpu)?;
                let (l, k) = (self.grid[0] * self.grid[1], self.codebook_size);
                let (n, d) = (cache.layers, cache.width);
                let i64s = |name, dims: &[Dim]| Port::new(name, TensorElementType::Int64, dims);
                let f32s = |name, dims: &[Dim]| Port::new(name, TensorElementType::Float32, dims);
                let mut inputs = vec![
                    i64s(TRANSFORMER_INPUT, &[Dim::Batch, Dim::Any]),
                    i64s(CACHED_POSITIONS, &[Dim::Batch, Dim::Any]),
                ];
                if self.classes > 0 {
                    inputs.push(i64s(CLASS_INPUT, &[Dim::Batch]));
                }
                inputs.push(f32s(CACHED_KEYS, &[Dim::Is(n), Dim::Batch, Dim::Is(l), Dim::Is(d)]));
                inputs.push(f32s(CACHED_VALUES, &[Dim::Is(n), Dim::Batch, Dim::Is(l), Dim::Is(d)]));
                let outputs = [
                    f32s(TRANSFORMER_OUTPUT, &[Dim::Batch, Dim::Any, Dim::Is(k)]),
                    f32s(CACHED_NEW_KEYS, &[Dim::Is(n), Dim::Batch, Dim::Any, Dim::Is(d)]),
                    f32s(CACHED_NEW_VALUES, &[Dim::Is(n), Dim::Batch, Dim::Any, Dim::Is(d)]),
                ];
                check_ports(&session, GraphKind::Transformer, &path, "input", &inputs)?;
                check_ports(&session, GraphKind::Transformer, &path, "output", &outputs)?;
                session
            }
        };
        let session = self.cached.insert(session);
        let (rows, q, l, n, d) = (
            call.rows,
            call.query,
            self.grid[0] * self.grid[1],
            cache.layers,
            cache.width,
        );
        let start = Instant::now();
        let tokens =
            TensorRef::from_array_view(([rows, q], call.tokens)).map_err(Error::ort("preparing the cached tokens"))?;
        let positions = TensorRef::from_array_view(([rows, q], call.positions))
            .map_err(Error::ort("preparing the cached positions"))?;
        let keys = TensorRef::from_array_view(([n, rows, l, d], call.keys))
            .map_err(Error::ort("preparing the cached keys"))?;
        let values = TensorRef::from_array_view(([n, rows, l, d], call.values))
            .map_err(Error::ort("preparing the cached values"))?;
        let outputs = if self.classes > 0 {
            let class =
                TensorRef::from_array_view(([rows], call.classes)).map_err(Error::ort("preparing the class input"))?;
            session.run(
                ort::inputs![TRANSFORMER_INPUT => tokens, CACHED_POSITIONS => positions, CLASS_INPUT => class,
                CACHED_KEYS => keys, CACHED_VALUES => values],
            )
        } else {
            session.run(ort::inputs![TRANSFORMER_INPUT => tokens, CACHED_POSITIONS => positions,
                CACHED_KEYS => keys, CACHED_VALUES => values])
        }
        .map_err(Error::ort("running the cached transformer"))?;
        let read = |name: &str, want: &[usize], into: &mut Vec<f32>| -> Result<()> {
            let (shape, data) = outputs[name]
                .try_extract_tensor::<f32>()
                .map_err(Error::ort("reading the cached transformer's output"))?;
            expect_shape("cached transformer", name, shape, want)?;
            into.clear();
            into.extend_from_slice(data);
            Ok(())
        };
        read(TRANSFORMER_OUTPUT, &[rows, q, self.codebook_size], &mut out.logits)?;
        read(CACHED_NEW_KEYS, &[n, rows, q, d], &mut out.keys)?;
        read(CACHED_NEW_VALUES, &[n, rows, q, d], &mut out.values)?;
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
            return Err(Error::Internal(format!(
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
        Err(Error::Internal(format!(
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

fn check_ports(session: &Session, kind: GraphKind, path: &Path, side: &str, wanted: &[Port]) -> Result<()> {
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
    let want_names: Vec<&str> = wanted.iter().map(|p| p.name).collect();
    if names != want_names {
        let hint = match (kind, side) {
            (GraphKind::Transformer, "input") if names.contains(&CLASS_INPUT) != want_names.contains(&CLASS_INPUT) => {
                "; a class-conditional transformer (input \"class\") goes with a `classes` list in model.json, and only then"
            }
            _ => "",
        };
        return Err(err(format!(
            "expected the {side}s {want_names:?}, found {names:?}{hint}; re-export the bundle with export/"
        )));
    }
    for (port, want) in ports.iter().zip(wanted) {
        check_port(port.dtype(), &err, side, want)?;
    }
    Ok(())
}

fn check_port(dtype: &ValueType, err: &dyn Fn(String) -> Error, side: &str, want: &Port) -> Result<()> {
    let ValueType::Tensor { ty, shape, .. } = dtype else {
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

    /// Whether the graph has an output of this name.
    pub fn has_output(&self, name: &str) -> bool {
        self.session.outputs().iter().any(|p| p.name() == name)
    }

    /// Runs the graph on `data` of `shape`; returns the values and shape of each output in `names`.
    pub fn infer_outputs(
        &mut self,
        data: &[f32],
        shape: &[usize],
        names: &[&str],
    ) -> Result<Vec<(Vec<f32>, Vec<usize>)>> {
        let input = TensorRef::from_array_view((shape.to_vec(), data)).map_err(Error::ort("preparing the input"))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(Error::ort("running the auxiliary graph"))?;
        names
            .iter()
            .map(|&name| {
                let (shape, values) = outputs[name]
                    .try_extract_tensor::<f32>()
                    .map_err(Error::ort("reading the output"))?;
                Ok((values.to_vec(), shape.iter().map(|&d| d.max(0) as usize).collect()))
            })
            .collect()
    }

    /// Runs the graph on `data` of `shape`; returns the output values and shape.
    pub fn infer(&mut self, data: &[f32], shape: &[usize]) -> Result<(Vec<f32>, Vec<usize>)> {
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
