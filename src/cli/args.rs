//! The command line's flags: one struct per command, and the groups several commands share
//! (`Common`, `SamplingArgs`, `WindowArgs`, `FrameArgs`), each defined once. Parsing only: the
//! values become a [`absorb::Job`] in the command's own file.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use absorb::job::{class_index, CacheMode};
use absorb::parse::{parse_extend, parse_pair, parse_rect, parse_shard, parse_temperature};
use absorb::sampler::SamplerKind;
use absorb::{Bundle, Canvas, DecodeMode, Provider, Sampling};

/// Options every command shares.
#[derive(Args, Clone)]
pub struct Common {
    /// Bundle directory (model.json + graphs). Default: the bundled models/digits. `serve` takes
    /// several (`--model A --model B`); the other commands take one.
    #[arg(long, short = 'm', value_name = "DIR", action = clap::ArgAction::Append)]
    pub model: Vec<PathBuf>,
    /// ONNX Runtime library to load (default: ORT_DYLIB_PATH, next to the binary, the repo's .ort/,
    /// an installed Python onnxruntime, the system loader).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Execution provider; an explicit GPU provider that cannot run is an error, `auto` falls back.
    #[arg(long, default_value_t = Provider::Cpu, value_parser = choice(Provider::ALL, Provider::name, Provider::help))]
    pub provider: Provider,
    /// Intra-op threads (default: all cores). Results do not depend on it.
    #[arg(long, value_name = "N", value_parser = threads, allow_hyphen_values = true)]
    pub threads: Option<usize>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    pub fp16: bool,
    /// TensorRT: engine and timing cache root (default: $XDG_CACHE_HOME/absorb/tensorrt); each
    /// bundle, ONNX Runtime version, GPU and precision gets its own subdirectory.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// CUDA device index.
    #[arg(long, default_value_t = 0, value_parser = device, allow_hyphen_values = true)]
    pub device: i32,
    /// Transformer precision variant from the bundle: int8 (CPUs) or fp16 (GPUs).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// More log output (-v: phase timings, -vv: debug).
    #[arg(long, short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Sampling options shared by generate and inpaint.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Seed; printed and recorded in the PNG. Default: a fresh random seed.
    #[arg(long, short = 's', value_parser = whole_u64, allow_hyphen_values = true)]
    pub seed: Option<u64>,
    /// Reverse steps S, 1..=tokens (default: the bundle's).
    #[arg(long, value_parser = whole_usize, allow_hyphen_values = true)]
    pub steps: Option<usize>,
    /// Softmax temperature, > 0 (default: the bundle's); `START:END` for a linear schedule over
    /// the steps, e.g. 1.2:0.6.
    #[arg(long, short = 't', value_parser = parse_temperature, allow_hyphen_values = true)]
    pub temperature: Option<(f32, Option<f32>)>,
    /// Nucleus (top-p) sampling: draw each token only among the most probable codes that hold
    /// this share of the probability, in (0, 1] (default: the bundle's, else 1 = all codes).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub top_p: Option<f32>,
    /// Reveal rule (the sampler). Default: the bundle's (`absorb info`), else absorbing.
    #[arg(long, value_parser = choice(SamplerKind::ALL, SamplerKind::name, SamplerKind::help))]
    pub sampler: Option<SamplerKind>,
    /// With `--sampler threshold`: reveal every masked position whose drawn token has at least
    /// this probability, in (0, 1] (default: the bundle's, else 0.9); `--steps` caps the calls.
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub threshold: Option<f32>,
    /// Cached attention between steps: `N` = a full transformer pass every N calls of an image and
    /// cheap passes between (the positions a step needs, against cached keys and values; needs the
    /// bundle's cache.json); `off` = exact mode. Default: the bundle's, else off.
    #[arg(long, value_name = "N|off", value_parser = CacheMode::parse)]
    pub cache: Option<CacheMode>,
    /// Classifier-free guidance with a class-conditional model: each transformer call is made
    /// with the class and without, and the logits pushed W times their difference further
    /// towards the class (c + W (c - u)); >= 0, 0 = none (default: the bundle's, else none).
    /// Twice the transformer passes; not with --cache N.
    #[arg(long, value_name = "W", allow_hyphen_values = true)]
    pub guidance: Option<f32>,
    /// The class to make, by name or index, with a class-conditional model (`absorb info` lists
    /// its classes; the digits model's are 0-9). Default: generate takes the classes in turn,
    /// shuffled by the seed; inpaint and outpaint use none.
    #[arg(long, value_name = "NAME", allow_hyphen_values = true)]
    pub class: Option<String>,
}

impl SamplingArgs {
    /// The flags as the library takes them (absent = the bundle's defaults); the class is looked
    /// up in `bundle`.
    pub fn sampling(&self, bundle: &Bundle) -> absorb::Result<Sampling> {
        let (temperature, temperature_end) = self.temperature.map_or((None, None), |(a, b)| (Some(a), b));
        Ok(Sampling {
            steps: self.steps,
            temperature,
            temperature_end,
            top_p: self.top_p,
            sampler: self.sampler,
            threshold: self.threshold,
            cache: self.cache,
            guidance: self.guidance,
            class: self.class.as_deref().map(|c| class_index(bundle, c)).transpose()?,
        })
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Number of images.
    #[arg(long, short = 'n', default_value_t = 1, value_parser = whole_usize, allow_hyphen_values = true)]
    pub count: usize,
    /// Index of the first image (each index has its own random stream under the seed).
    #[arg(long, default_value_t = 0, value_parser = whole_u64, allow_hyphen_values = true)]
    pub first_index: u64,
    /// Output: a .png file (a grid when count > 1) or a directory (existing or ending in /) for
    /// one PNG per image; a rerun into a directory keeps the complete images and makes the rest
    /// (README "Scale out").
    #[arg(long, short = 'o', default_value = "absorb.png")]
    pub out: PathBuf,
    /// Grid columns when writing several images into one PNG (default: near square).
    #[arg(long, value_parser = whole_usize, allow_hyphen_values = true)]
    pub columns: Option<usize>,
    /// Images per transformer call.
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Reproduce the PNG made by absorb with these parameters (seed, index, count, steps,
    /// temperature from its metadata).
    #[arg(long, value_name = "PNG", conflicts_with_all = ["seed", "steps", "temperature", "top_p", "sampler", "threshold", "cache", "guidance", "class", "count", "first_index", "columns"])]
    pub from: Option<PathBuf>,
    /// Also write the generated token grids as JSON (one entry per image, with its index).
    #[arg(long, value_name = "JSON")]
    pub tokens_out: Option<PathBuf>,
    /// Token grid ROWSxCOLS larger than the bundle's, e.g. 8x16 for two digits side by side:
    /// windows of the trained grid slide over it.
    #[arg(long, value_name = "ROWSxCOLS", value_parser = parse_pair, conflicts_with = "size")]
    pub grid: Option<[usize; 2]>,
    /// Image size WIDTHxHEIGHT in pixels instead of --grid (a whole number of tokens).
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = parse_pair)]
    pub size: Option<[usize; 2]>,
    #[command(flatten)]
    pub windows: WindowArgs,
    #[command(flatten)]
    pub frames: FrameArgs,
    /// Make only shard I of M (0 <= I < M) into the --out directory: indices
    /// first + floor(count*I/M) up to first + floor(count*(I+1)/M). Needs --seed. README "Scale out".
    #[arg(long, value_name = "I/M", value_parser = parse_shard, conflicts_with = "shards")]
    pub shard: Option<absorb::batch::Shard>,
    /// Shard count M when the shard index comes from JOB_COMPLETION_INDEX (a Kubernetes Indexed
    /// Job); default: ABSORB_SHARDS.
    #[arg(long, value_name = "M", value_parser = whole_u64, allow_hyphen_values = true)]
    pub shards: Option<u64>,
}

/// How windows cover a grid larger than the bundle's.
#[derive(Args, Clone)]
pub struct WindowArgs {
    /// Window stride in tokens, N or ROWSxCOLS (default: half a window).
    #[arg(long, value_name = "N", value_parser = parse_pair)]
    pub stride: Option<[usize; 2]>,
    /// Tokens along a window's inner edges it does not vote for, N or ROWSxCOLS (default: an
    /// eighth of a window; 0 = the paper's rule, every covering window votes).
    #[arg(long, value_name = "N", value_parser = parse_pair)]
    pub window_margin: Option<[usize; 2]>,
    /// How a larger grid is decoded: tiles (window by window, overlaps blended) or whole (in one
    /// piece, as the paper does).
    #[arg(long, default_value_t = DecodeMode::Tiles, value_parser = choice(DecodeMode::ALL, DecodeMode::name, DecodeMode::help))]
    pub decode: DecodeMode,
}

impl WindowArgs {
    /// The canvas of a `grid` (absent = the bundle's) with these windows.
    pub fn canvas(&self, grid: Option<[usize; 2]>) -> Canvas {
        Canvas {
            grid,
            stride: self.stride,
            window_margin: self.window_margin,
            decode: self.decode,
        }
    }
}

/// Preview of the reverse process.
#[derive(Args, Clone)]
pub struct FrameArgs {
    /// Also write the reverse process as an animation (.gif, or .png/.apng for APNG): one frame
    /// per step that revealed something, masked tokens shown as grey tiles.
    #[arg(long, value_name = "FILE")]
    pub frames: Option<PathBuf>,
    /// Milliseconds per frame (the last one stays 1.5 s).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub frame_ms: u16,
}

#[derive(Args)]
pub struct OutpaintArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The image to extend: at least the bundle's size, a whole number of tokens.
    #[arg(long, short = 'i')]
    pub image: PathBuf,
    /// Pixels to add per side, e.g. right=32,down=16 (sides: left, right, up, down; multiples of
    /// the token size).
    #[arg(long, value_parser = parse_extend)]
    pub extend: [usize; 4],
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "outpainted.png")]
    pub out: PathBuf,
    /// Images per transformer call (windows of one step).
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Write the decoder's output everywhere instead of keeping the input's own pixels.
    #[arg(long)]
    pub decode_all: bool,
    /// Token rows of the input, along each extended side, regenerated with the new area (the
    /// encoder saw nothing beyond the border). Default: the bundle's `sampling.outpaint_edge`, else 0.
    #[arg(long, value_name = "N")]
    pub outpaint_edge: Option<usize>,
    #[command(flatten)]
    pub windows: WindowArgs,
    #[command(flatten)]
    pub frames: FrameArgs,
}

#[derive(Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The image to edit (the bundle's size).
    #[arg(long, short = 'i')]
    pub image: PathBuf,
    /// Mask image of the same size: white = regenerate, black = keep.
    #[arg(long, required_unless_present = "rect", conflicts_with = "rect")]
    pub mask: Option<PathBuf>,
    /// Rectangle to regenerate instead of a mask: x,y,w,h in pixels.
    #[arg(long, value_parser = parse_rect)]
    pub rect: Option<[usize; 4]>,
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "inpainted.png")]
    pub out: PathBuf,
    /// Write the decoder's output everywhere instead of keeping the input's pixels outside the mask.
    #[arg(long)]
    pub decode_all: bool,
}

#[derive(Args)]
pub struct VaryArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The source image (the bundle's size).
    #[arg(long, short = 'i')]
    pub image: PathBuf,
    /// The share of the image's tokens masked and redone, in (0, 1]: near 0 keeps the image,
    /// 1 is a fresh sample (default: the bundle's, else 0.5). At least one token is redone.
    #[arg(long, value_name = "S", allow_hyphen_values = true)]
    pub strength: Option<f32>,
    /// Number of variations, each from its own stream (its own masked tokens).
    #[arg(long, short = 'n', default_value_t = 1, value_parser = whole_usize, allow_hyphen_values = true)]
    pub count: usize,
    /// Index of the first variation.
    #[arg(long, default_value_t = 0, value_parser = whole_u64, allow_hyphen_values = true)]
    pub first_index: u64,
    /// Output PNG (a sheet when count > 1).
    #[arg(long, short = 'o', default_value = "varied.png")]
    pub out: PathBuf,
    /// Sheet columns when count > 1 (default: near square).
    #[arg(long, value_parser = whole_usize, allow_hyphen_values = true)]
    pub columns: Option<usize>,
    /// Images per transformer call.
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Reproduce the variation PNG made by absorb (strength, seed, index, count and sampling from
    /// its metadata); --image must be its source (checked by sha256).
    #[arg(long, value_name = "PNG", conflicts_with_all = ["seed", "steps", "temperature", "top_p", "sampler", "threshold", "cache", "guidance", "class", "count", "first_index", "columns", "strength"])]
    pub from: Option<PathBuf>,
}

#[derive(Args)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub common: Common,
    /// The image to encode (the bundle's size).
    #[arg(long, short = 'i')]
    pub image: PathBuf,
    /// Output JSON file (default: stdout).
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Token grid JSON as written by `absorb encode`.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "decoded.png")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Reverse steps (default: the bundle's).
    #[arg(long, value_parser = whole_usize, allow_hyphen_values = true)]
    pub steps: Option<usize>,
    /// Temperature (default: the bundle's).
    #[arg(long, short = 't')]
    pub temperature: Option<f32>,
    /// Reveal rule (default: the bundle's).
    #[arg(long, value_parser = choice(SamplerKind::ALL, SamplerKind::name, SamplerKind::help))]
    pub sampler: Option<SamplerKind>,
    /// Cached attention: `N` or `off` (default: the bundle's, else off).
    #[arg(long, value_name = "N|off", value_parser = CacheMode::parse)]
    pub cache: Option<CacheMode>,
    /// Images per timed run.
    #[arg(long, short = 'n', default_value_t = 16, value_parser = images, allow_hyphen_values = true)]
    pub count: usize,
    /// Images per transformer call.
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3, value_parser = whole_usize, allow_hyphen_values = true)]
    pub runs: usize,
    /// Seed of the first run.
    #[arg(long, default_value_t = 0, value_parser = whole_u64, allow_hyphen_values = true)]
    pub seed: u64,
    /// Also write the report as JSON to this file (`-` for stdout instead of the table).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    /// Samplers to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "absorbing",
          value_parser = choice(SamplerKind::ALL, SamplerKind::name, SamplerKind::help))]
    pub samplers: Vec<SamplerKind>,
    /// Step counts to compare, comma-separated (default: the bundle's).
    #[arg(long, value_delimiter = ',', value_parser = whole_usize, allow_hyphen_values = true)]
    pub steps: Vec<usize>,
    /// Temperature or START:END schedule (default: the bundle's).
    #[arg(long, short = 't', value_parser = parse_temperature, allow_hyphen_values = true)]
    pub temperature: Option<(f32, Option<f32>)>,
    /// Nucleus (top-p) share in (0, 1] (default: the bundle's).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub top_p: Option<f32>,
    /// The threshold sampler's threshold in (0, 1] (its rows only; default: the bundle's, else 0.9).
    #[arg(long, value_name = "P", allow_hyphen_values = true)]
    pub threshold: Option<f32>,
    /// Cache modes to compare, comma-separated (`off` and periods N, e.g. off,4,8): each cached row
    /// also reports its tokens' agreement with exact mode at the same seed.
    #[arg(long = "cache", value_delimiter = ',', default_value = "off", value_parser = CacheMode::parse)]
    pub caches: Vec<CacheMode>,
    /// Classifier-free guidance scale for every row, >= 0 (a class-conditional model; --cache off
    /// only; default: the bundle's, else none).
    #[arg(long, value_name = "W", allow_hyphen_values = true)]
    pub guidance: Option<f32>,
    /// Images per row of the table.
    #[arg(long, short = 'n', default_value_t = 256, value_parser = images, allow_hyphen_values = true)]
    pub count: usize,
    /// Seed (the same images indices for every row).
    #[arg(long, default_value_t = 0, value_parser = whole_u64, allow_hyphen_values = true)]
    pub seed: u64,
    /// Images per transformer call.
    #[arg(long, default_value_t = 64, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct CheckVariantArgs {
    #[command(flatten)]
    pub common: Common,
    /// Measure on this many of the probe's rows, evenly spaced over its masking rates (default:
    /// all; fewer for slow machines and emulators).
    #[arg(long, value_name = "N", value_parser = whole_usize, allow_hyphen_values = true)]
    pub rows: Option<usize>,
}

#[derive(Args)]
pub struct WarmupArgs {
    #[command(flatten)]
    pub common: Common,
    /// Largest batch to build engines for (use the same value when generating or serving).
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub common: Common,
    /// A PNG written by absorb: print its generation metadata instead.
    pub png: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    /// A directory of bundles: every subdirectory with a model.json is served, by its name
    /// (repeatable; with --model, the --model bundles come first). Default, with neither: the
    /// bundled models/digits.
    #[arg(long, value_name = "DIR", action = clap::ArgAction::Append)]
    pub models: Vec<PathBuf>,
    /// Bundles loaded at once at most; a request for another unloads the least recently used.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = max_loaded, allow_hyphen_values = true)]
    pub max_loaded: usize,
    /// Memory the loaded bundles may hold, in MiB (estimated from their graph files); the least
    /// recently used are unloaded to stay within it. Default: no budget but --max-loaded.
    #[arg(long, value_name = "MIB", value_parser = memory_budget, allow_hyphen_values = true)]
    pub memory_budget: Option<u64>,
    /// Address to listen on; port 0 picks a free one (printed as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Jobs that may wait for the worker; one more is answered 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_queue, value_parser = queue, allow_hyphen_values = true)]
    pub max_queue: usize,
    /// Images per transformer call.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_batch, value_parser = batch, allow_hyphen_values = true)]
    pub max_batch: usize,
    /// Images per generate request.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_count, value_parser = max_count, allow_hyphen_values = true)]
    pub max_count: usize,
    /// Reverse steps per request (also capped by the grid's token count).
    #[arg(long, value_name = "N", default_value_t = absorb::server::DEFAULT_MAX_STEPS, value_parser = steps_cap, allow_hyphen_values = true)]
    pub max_steps: usize,
    /// Request body limit in bytes (base64 images included).
    #[arg(long, value_name = "BYTES", default_value_t = absorb::server::Limits::default().max_body_bytes, value_parser = body, allow_hyphen_values = true)]
    pub max_body: usize,
    /// Milliseconds before a request still waiting or running is answered 503.
    #[arg(long, value_name = "MS", default_value_t = absorb::server::Limits::default().timeout_ms, value_parser = timeout_ms, allow_hyphen_values = true)]
    pub timeout_ms: u64,
    /// Largest token grid side a request may ask for (`grid`, outpainting).
    #[arg(long, value_name = "TOKENS", default_value_t = absorb::server::Limits::default().max_grid, value_parser = grid_side, allow_hyphen_values = true)]
    pub max_grid: usize,
    /// Milliseconds a connection has to send a whole request head (also the idle time of a
    /// keep-alive connection); a slower one is closed.
    #[arg(long, value_name = "MS", default_value_t = absorb::server::Limits::default().header_timeout_ms, value_parser = timeout_ms, allow_hyphen_values = true)]
    pub header_timeout_ms: u64,
    /// Milliseconds a request body has to arrive once its handler reads it; a slower one gets 408.
    #[arg(long, value_name = "MS", default_value_t = absorb::server::Limits::default().body_timeout_ms, value_parser = timeout_ms, allow_hyphen_values = true)]
    pub body_timeout_ms: u64,
    /// Client connections open at once; one more is answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_connections, value_parser = connections, allow_hyphen_values = true)]
    pub max_connections: usize,
    /// After SIGTERM, milliseconds accepted requests have to finish; those still waiting are then
    /// answered 503, open connections dropped, and the process exits 0. Keep it below the
    /// supervisor's stop timeout (the unit's TimeoutStopSec, the pod's grace period).
    #[arg(long, value_name = "MS", default_value_t = absorb::server::Limits::default().drain_timeout_ms, value_parser = drain_ms, allow_hyphen_values = true)]
    pub drain_timeout_ms: u64,
    /// Asynchronous jobs (`POST /v1/jobs`) held at once, unfinished and finished; a new one
    /// evicts the oldest finished one, or is answered 429 when all are unfinished.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_jobs, value_parser = max_jobs, allow_hyphen_values = true)]
    pub max_jobs: usize,
    /// Seconds a finished asynchronous job's results are kept; then its id answers 410.
    #[arg(long, value_name = "S", default_value_t = absorb::server::Limits::default().job_keep_s, value_parser = job_keep_s, allow_hyphen_values = true)]
    pub job_keep_s: u64,
}

// Numeric flags: every one names its range when a value is refused (clap prefixes the flag), and
// takes a leading `-` as a value so that `--seed -1` says what is wrong with -1.

/// A whole number in `0..=T::MAX`.
fn whole<T: std::str::FromStr + std::fmt::Display>(s: &str, max: T) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| format!("must be a whole number in 0..={max}"))
}

fn whole_u64(s: &str) -> Result<u64, String> {
    whole(s, u64::MAX)
}

fn whole_usize(s: &str) -> Result<usize, String> {
    whole(s, usize::MAX)
}

/// A whole number in `1..=max`.
fn in_range(s: &str, max: usize) -> Result<usize, String> {
    let v = whole_usize(s).map_err(|_| format!("must be a whole number in 1..={max}"))?;
    if (1..=max).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: must be 1..={max}"))
    }
}

fn threads(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_THREADS)
}

fn batch(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_BATCH)
}

/// Images held in memory at once (`bench`, `eval`).
fn images(s: &str) -> Result<usize, String> {
    in_range(s, 65536)
}

fn queue(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_QUEUE)
}

fn max_count(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_SHEET_IMAGES)
}

fn body(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_BODY_BYTES)
}

fn steps_cap(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_GRID_SIDE * absorb::limits::MAX_GRID_SIDE)
}

fn grid_side(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_GRID_SIDE)
}

/// At most a day.
fn timeout_ms(s: &str) -> Result<u64, String> {
    in_range(s, 86_400_000).map(|v| v as u64)
}

/// 0 (drop at once) to a day.
fn drain_ms(s: &str) -> Result<u64, String> {
    let max = 86_400_000u64;
    match whole(s, max)? {
        v if v <= max => Ok(v),
        v => Err(format!("{v} is out of range: must be 0..={max}")),
    }
}

fn max_jobs(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_JOBS)
}

/// At most 64 bundles loaded at once.
fn max_loaded(s: &str) -> Result<usize, String> {
    in_range(s, 64)
}

/// At most 1 TiB, in MiB.
fn memory_budget(s: &str) -> Result<u64, String> {
    in_range(s, 1 << 20).map(|v| v as u64)
}

/// At most a day.
fn job_keep_s(s: &str) -> Result<u64, String> {
    in_range(s, 86_400).map(|v| v as u64)
}

fn connections(s: &str) -> Result<usize, String> {
    in_range(s, absorb::limits::MAX_CONNECTIONS)
}

/// A CUDA device index, `0..=i32::MAX`.
fn device(s: &str) -> Result<i32, String> {
    whole(s, i32::MAX).and_then(|v| {
        if v >= 0 {
            Ok(v)
        } else {
            Err(format!("must be a whole number in 0..={}", i32::MAX))
        }
    })
}

/// A flag whose value is one of `all`, by name, each listed in `--help` with its one line: the
/// library's enums (sampler, provider, decode mode) know their names; clap stays here.
fn choice<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
    help: fn(T) -> &'static str,
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(all.iter().map(move |&v| PossibleValue::new(name(v)).help(help(v)))).try_map(
        move |s: String| {
            all.iter()
                .copied()
                .find(|&v| name(v) == s)
                .ok_or_else(|| format!("unknown value {s}"))
        },
    )
}
