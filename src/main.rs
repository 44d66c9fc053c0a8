//! The `absorb` command line: parse, call the library, map errors to exit codes.
//!
//! Exit codes: 0 success; 1 the model, the ONNX Runtime library or the machine failed; 2 the
//! command line or an input (parameter, image, mask, tokens, PNG metadata) is invalid.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use absorb::image::{self, Metadata};
use absorb::sampler::{SamplerKind, Settings, StepReport};
use absorb::DecodeMode;
use absorb::{Pipeline, Provider, RuntimeOptions, Timings};

/// Generate and edit images with discrete absorbing diffusion on ONNX Runtime.
#[derive(Parser)]
#[command(name = "absorb", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from an all-masked token grid.
    Generate(GenerateArgs),
    /// Regenerate the masked region of an image; tokens outside the mask never change.
    Inpaint(InpaintArgs),
    /// Extend an image beyond its borders; its own tokens never change.
    Outpaint(OutpaintArgs),
    /// Encode an image to its token grid (JSON).
    Encode(EncodeArgs),
    /// Decode a token grid (JSON, as `encode` writes it) to a PNG.
    Decode(DecodeArgs),
    /// Show the bundle, the ONNX Runtime library and its providers; or a PNG's generation metadata.
    Info(InfoArgs),
    /// Time generation on this machine: per image, per transformer call, runner overhead, memory.
    Bench(BenchArgs),
    /// Measure sample quality with the bundle's eval classifier, per sampler and step count.
    Eval(EvalArgs),
    /// Measure a precision variant (--variant int8) against the fp32 transformer on this CPU:
    /// argmax agreement on the bundle's probe rows; exits 1 if below the bundle's bar.
    CheckVariant(CheckVariantArgs),
    /// Build the provider's engines ahead of time (TensorRT: minutes on a Jetson) by running every
    /// graph at batch 1 and at --max-batch; later runs load them from the cache.
    Warmup(WarmupArgs),
    /// Serve the bundle over HTTP as a long-lived service (systemd Type=notify; README "Service").
    Serve(ServeArgs),
}

/// Options every command shares.
#[derive(Args, Clone)]
struct Common {
    /// Bundle directory (model.json + graphs). Default: the bundled models/digits.
    #[arg(long, short = 'm', value_name = "DIR")]
    model: Option<PathBuf>,
    /// ONNX Runtime library to load (default: ORT_DYLIB_PATH, next to the binary, the repo's .ort/,
    /// an installed Python onnxruntime, the system loader).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// Execution provider; an explicit GPU provider that cannot run is an error, `auto` falls back.
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    provider: Provider,
    /// Intra-op threads (default: all cores). Results do not depend on it.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// TensorRT: build fp16 engines.
    #[arg(long)]
    fp16: bool,
    /// TensorRT: engine and timing cache root (default: $XDG_CACHE_HOME/absorb/tensorrt); each
    /// bundle, ONNX Runtime version, GPU and precision gets its own subdirectory.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// CUDA device index.
    #[arg(long, default_value_t = 0)]
    device: i32,
    /// Transformer precision variant from the bundle: int8 (CPUs) or fp16 (GPUs).
    #[arg(long, value_name = "NAME")]
    variant: Option<String>,
    /// More log output (-v: phase timings, -vv: debug).
    #[arg(long, short = 'v', action = clap::ArgAction::Count)]
    verbose: u8,
}

/// Sampling options shared by generate and inpaint.
#[derive(Args, Clone)]
struct SamplingArgs {
    /// Seed; printed and recorded in the PNG. Default: a fresh random seed.
    #[arg(long, short = 's')]
    seed: Option<u64>,
    /// Reverse steps S, 1..=tokens (default: the bundle's).
    #[arg(long)]
    steps: Option<usize>,
    /// Softmax temperature, > 0 (default: the bundle's); `START:END` for a linear schedule over
    /// the steps, e.g. 1.2:0.6.
    #[arg(long, short = 't', value_parser = parse_temperature, allow_hyphen_values = true)]
    temperature: Option<(f32, Option<f32>)>,
    /// Reveal rule: absorbing (the paper's 1/t rule), even (exact counts per step), maskgit
    /// (most confident first, cosine schedule).
    #[arg(long, value_enum, default_value_t = SamplerKind::Absorbing)]
    sampler: SamplerKind,
}

impl SamplingArgs {
    fn settings(&self, p: &Pipeline) -> Result<Settings> {
        self.settings_for(p, p.grid())
    }

    /// Settings for sampling a `grid` (steps up to its token count).
    fn settings_for(&self, p: &Pipeline, grid: [usize; 2]) -> Result<Settings> {
        let (start, end) = self.temperature.map_or((None, None), |(a, b)| (Some(a), b));
        Ok(p.settings_for(grid, self.steps, start)?
            .with_sampler(self.sampler)
            .with_temperature_end(end)?)
    }
}

fn parse_temperature(s: &str) -> Result<(f32, Option<f32>), String> {
    let num = |x: &str| {
        x.trim()
            .parse::<f32>()
            .map_err(|_| format!("\"{s}\" is not a number or START:END"))
    };
    match s.split_once(':') {
        Some((a, b)) => Ok((num(a)?, Some(num(b)?))),
        None => Ok((num(s)?, None)),
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Number of images.
    #[arg(long, short = 'n', default_value_t = 1)]
    count: usize,
    /// Index of the first image (each index has its own random stream under the seed).
    #[arg(long, default_value_t = 0)]
    first_index: u64,
    /// Output: a .png file (a grid when count > 1) or a directory (existing or ending in /) for
    /// one PNG per image; a rerun into a directory keeps the complete images and makes the rest
    /// (README "Scale out").
    #[arg(long, short = 'o', default_value = "absorb.png")]
    out: PathBuf,
    /// Grid columns when writing several images into one PNG (default: near square).
    #[arg(long)]
    columns: Option<usize>,
    /// Images per transformer call.
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Reproduce the PNG made by absorb with these parameters (seed, index, count, steps,
    /// temperature from its metadata).
    #[arg(long, value_name = "PNG", conflicts_with_all = ["seed", "steps", "temperature", "count", "first_index", "columns"])]
    from: Option<PathBuf>,
    /// Also write the generated token grids as JSON (one entry per image, with its index).
    #[arg(long, value_name = "JSON")]
    tokens_out: Option<PathBuf>,
    /// Token grid ROWSxCOLS larger than the bundle's, e.g. 8x16 for two digits side by side:
    /// windows of the trained grid slide over it.
    #[arg(long, value_name = "ROWSxCOLS", value_parser = parse_pair, conflicts_with = "size")]
    grid: Option<[usize; 2]>,
    /// Image size WIDTHxHEIGHT in pixels instead of --grid (a whole number of tokens).
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = parse_pair)]
    size: Option<[usize; 2]>,
    #[command(flatten)]
    windows: WindowArgs,
    #[command(flatten)]
    frames: FrameArgs,
    /// Make only shard I of M (0 <= I < M) into the --out directory: indices
    /// first + floor(count*I/M) up to first + floor(count*(I+1)/M). Needs --seed. README "Scale out".
    #[arg(long, value_name = "I/M", value_parser = parse_shard, conflicts_with = "shards")]
    shard: Option<absorb::batch::Shard>,
    /// Shard count M when the shard index comes from JOB_COMPLETION_INDEX (a Kubernetes Indexed
    /// Job); default: ABSORB_SHARDS.
    #[arg(long, value_name = "M")]
    shards: Option<u64>,
}

fn parse_shard(s: &str) -> Result<absorb::batch::Shard, String> {
    absorb::batch::Shard::parse(s).map_err(|e| e.to_string().trim_start_matches("invalid shard: ").to_string())
}

/// How windows cover a grid larger than the bundle's.
#[derive(Args, Clone)]
struct WindowArgs {
    /// Window stride in tokens, N or ROWSxCOLS (default: half a window).
    #[arg(long, value_name = "N", value_parser = parse_pair)]
    stride: Option<[usize; 2]>,
    /// Tokens along a window's inner edges it does not vote for, N or ROWSxCOLS (default: an
    /// eighth of a window; 0 = the paper's rule, every covering window votes).
    #[arg(long, value_name = "N", value_parser = parse_pair)]
    window_margin: Option<[usize; 2]>,
    /// How a larger grid is decoded: tiles (window by window, overlaps blended) or whole (in one
    /// piece, as the paper does).
    #[arg(long, value_enum, default_value_t = DecodeMode::Tiles)]
    decode: DecodeMode,
}

/// Preview of the reverse process.
#[derive(Args, Clone)]
struct FrameArgs {
    /// Also write the reverse process as an animation (.gif, or .png/.apng for APNG): one frame
    /// per step that revealed something, masked tokens shown as grey tiles.
    #[arg(long, value_name = "FILE")]
    frames: Option<PathBuf>,
    /// Milliseconds per frame (the last one stays 1.5 s).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    frame_ms: u16,
}

#[derive(Args)]
struct OutpaintArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The image to extend: at least the bundle's size, a whole number of tokens.
    #[arg(long, short = 'i')]
    image: PathBuf,
    /// Pixels to add per side, e.g. right=32,down=16 (sides: left, right, up, down; multiples of
    /// the token size).
    #[arg(long, value_parser = parse_extend)]
    extend: [usize; 4],
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "outpainted.png")]
    out: PathBuf,
    /// Images per transformer call (windows of one step).
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Write the decoder's output everywhere instead of keeping the input's own pixels.
    #[arg(long)]
    decode_all: bool,
    #[command(flatten)]
    windows: WindowArgs,
    #[command(flatten)]
    frames: FrameArgs,
}

#[derive(Args)]
struct InpaintArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The image to edit (the bundle's size).
    #[arg(long, short = 'i')]
    image: PathBuf,
    /// Mask image of the same size: white = regenerate, black = keep.
    #[arg(long, required_unless_present = "rect", conflicts_with = "rect")]
    mask: Option<PathBuf>,
    /// Rectangle to regenerate instead of a mask: x,y,w,h in pixels.
    #[arg(long, value_parser = parse_rect)]
    rect: Option<[usize; 4]>,
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "inpainted.png")]
    out: PathBuf,
    /// Write the decoder's output everywhere instead of keeping the input's pixels outside the mask.
    #[arg(long)]
    decode_all: bool,
}

#[derive(Args)]
struct EncodeArgs {
    #[command(flatten)]
    common: Common,
    /// The image to encode (the bundle's size).
    #[arg(long, short = 'i')]
    image: PathBuf,
    /// Output JSON file (default: stdout).
    #[arg(long, short = 'o')]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct DecodeArgs {
    #[command(flatten)]
    common: Common,
    /// Token grid JSON as written by `absorb encode`.
    #[arg(long)]
    tokens: PathBuf,
    /// Output PNG.
    #[arg(long, short = 'o', default_value = "decoded.png")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Reverse steps (default: the bundle's).
    #[arg(long)]
    steps: Option<usize>,
    /// Temperature (default: the bundle's).
    #[arg(long, short = 't')]
    temperature: Option<f32>,
    /// Images per timed run.
    #[arg(long, short = 'n', default_value_t = 16)]
    count: usize,
    /// Images per transformer call.
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seed of the first run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report as JSON to this file (`-` for stdout instead of the table).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// Samplers to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "absorbing")]
    samplers: Vec<SamplerKind>,
    /// Step counts to compare, comma-separated (default: the bundle's).
    #[arg(long, value_delimiter = ',')]
    steps: Vec<usize>,
    /// Temperature or START:END schedule (default: the bundle's).
    #[arg(long, short = 't', value_parser = parse_temperature, allow_hyphen_values = true)]
    temperature: Option<(f32, Option<f32>)>,
    /// Images per row of the table.
    #[arg(long, short = 'n', default_value_t = 256)]
    count: usize,
    /// Seed (the same images indices for every row).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per transformer call.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct CheckVariantArgs {
    #[command(flatten)]
    common: Common,
    /// Measure on this many of the probe's rows, evenly spaced over its masking rates (default:
    /// all; fewer for slow machines and emulators).
    #[arg(long, value_name = "N")]
    rows: Option<usize>,
}

#[derive(Args)]
struct WarmupArgs {
    #[command(flatten)]
    common: Common,
    /// Largest batch to build engines for (use the same value when generating or serving).
    #[arg(long, default_value_t = absorb::DEFAULT_MAX_BATCH)]
    max_batch: usize,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    common: Common,
    /// A PNG written by absorb: print its generation metadata instead.
    png: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on; port 0 picks a free one (printed as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Jobs that may wait for the worker; one more is answered 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_queue)]
    max_queue: usize,
    /// Images per transformer call.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_batch)]
    max_batch: usize,
    /// Images per generate request.
    #[arg(long, value_name = "N", default_value_t = absorb::server::Limits::default().max_count)]
    max_count: usize,
    /// Reverse steps per request (default: up to the bundle's token count).
    #[arg(long, value_name = "N")]
    max_steps: Option<usize>,
    /// Request body limit in bytes (base64 images included).
    #[arg(long, value_name = "BYTES", default_value_t = absorb::server::Limits::default().max_body_bytes)]
    max_body: usize,
    /// Milliseconds before a request still waiting or running is answered 503.
    #[arg(long, value_name = "MS", default_value_t = absorb::server::Limits::default().timeout_ms)]
    timeout_ms: u64,
    /// Largest token grid side a request may ask for (`grid`, outpainting).
    #[arg(long, value_name = "TOKENS", default_value_t = absorb::server::Limits::default().max_grid)]
    max_grid: usize,
}

/// A token grid as `encode` writes and `decode` reads it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    bundle: String,
    bundle_sha256: String,
    height: usize,
    width: usize,
    tokens: Vec<Vec<i64>>,
}

/// Makes glibc return freed memory to the system at once. ONNX Runtime frees large buffers while
/// loading a graph (the parsed file, initializers before optimisation); glibc would keep them
/// and RSS would stay that much higher. Measured at paper size: peak RSS 835 instead of 987 MiB,
/// at the same speed (runs allocate from ONNX Runtime's arena, not malloc).
fn trim_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 0);
    }
}

fn main() -> ExitCode {
    trim_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let verbose = match &cli.command {
        Command::Generate(a) => a.common.verbose,
        Command::Inpaint(a) => a.common.verbose,
        Command::Outpaint(a) => a.common.verbose,
        Command::Encode(a) => a.common.verbose,
        Command::Decode(a) => a.common.verbose,
        Command::Info(a) => a.common.verbose,
        Command::Warmup(a) => a.common.verbose.max(1),
        Command::Bench(a) => a.common.verbose,
        Command::Eval(a) => a.common.verbose,
        Command::CheckVariant(a) => a.common.verbose,
        // A service logs its requests and lifecycle by default (to stderr, i.e. journald).
        Command::Serve(a) => a.common.verbose.max(1),
    };
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let input = e
                .chain()
                .any(|c| c.downcast_ref::<absorb::Error>().is_some_and(|e| e.is_input_error()));
            ExitCode::from(if input { 2 } else { 1 })
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Inpaint(a) => inpaint(a),
        Command::Outpaint(a) => outpaint(a),
        Command::Encode(a) => encode(a),
        Command::Decode(a) => decode(a),
        Command::Info(a) => info(a),
        Command::Warmup(a) => warmup(a),
        Command::Bench(a) => bench(a),
        Command::Eval(a) => eval(a),
        Command::CheckVariant(a) => check_variant(a),
        Command::Serve(a) => serve(a),
    }
}

/// `N` (both axes) or `AxB`.
fn parse_pair(s: &str) -> Result<[usize; 2], String> {
    let num = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("\"{s}\" is not N or AxB (integers)"))
    };
    match s.split_once(['x', 'X']) {
        Some((a, b)) => Ok([num(a)?, num(b)?]),
        None => num(s).map(|n| [n, n]),
    }
}

/// `left=A,right=B,up=C,down=D` (any subset) -> `[left, right, up, down]` in pixels.
fn parse_extend(s: &str) -> Result<[usize; 4], String> {
    let mut out = [0usize; 4];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (side, n) = part
            .split_once('=')
            .ok_or_else(|| format!("\"{part}\" is not SIDE=PIXELS (sides: left, right, up, down)"))?;
        let i = ["left", "right", "up", "down"]
            .iter()
            .position(|&k| k == side.trim())
            .ok_or_else(|| format!("\"{side}\" is not a side: use left, right, up or down"))?;
        out[i] = n
            .trim()
            .parse()
            .map_err(|_| format!("\"{n}\" is not a number of pixels"))?;
    }
    if out == [0; 4] {
        return Err("nothing to extend: give e.g. right=32".into());
    }
    Ok(out)
}

fn parse_rect(s: &str) -> Result<[usize; 4], String> {
    let parts: Vec<&str> = s.split(',').collect();
    let nums: Result<Vec<usize>, _> = parts.iter().map(|p| p.trim().parse::<usize>()).collect();
    match nums {
        Ok(v) if v.len() == 4 => Ok([v[0], v[1], v[2], v[3]]),
        _ => Err(format!("\"{s}\" is not x,y,w,h (four non-negative integers)")),
    }
}

/// The bundled default model: `models/digits` under the working directory, else under the
/// source tree this binary was built from.
fn model_dir(common: &Common) -> PathBuf {
    if let Some(m) = &common.model {
        return m.clone();
    }
    let local = PathBuf::from("models/digits");
    if local.join("model.json").exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/digits")
}

fn load(common: &Common) -> Result<Pipeline> {
    load_batch(common, absorb::DEFAULT_MAX_BATCH)
}

/// Loads the bundle with shape profiles (TensorRT) covering batches up to `max_batch`.
fn load_batch(common: &Common, max_batch: usize) -> Result<Pipeline> {
    load_grid(common, max_batch, None)
}

/// [`load_batch`] with the decoder's TensorRT profile also covering token grids up to `max_grid`.
fn load_grid(common: &Common, max_batch: usize, max_grid: Option<[usize; 2]>) -> Result<Pipeline> {
    let dir = model_dir(common);
    let options = RuntimeOptions {
        ort_lib: common.ort_lib.clone(),
        threads: common.threads,
    };
    let config = absorb::ProviderConfig {
        provider: common.provider,
        fp16: common.fp16,
        cache_dir: common.cache_dir.clone(),
        max_batch,
        device_id: common.device,
        variant: common.variant.clone(),
        max_grid,
    };
    Pipeline::load_with(&dir, &options, &config).with_context(|| format!("loading the model from {}", dir.display()))
}

fn seed_or_fresh(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(absorb::fresh_seed)
}

/// A progress bar in tokens revealed, on stderr only when it is a terminal.
fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} tokens {elapsed}") {
        bar.set_style(style);
    }
    bar
}

enum OutKind {
    File,
    Dir,
}

fn out_kind(out: &Path) -> Result<OutKind> {
    let s = out.to_string_lossy();
    if out.is_dir() || s.ends_with('/') {
        Ok(OutKind::Dir)
    } else if out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        Ok(OutKind::File)
    } else {
        Err(absorb::Error::param(
            "out",
            format!("{s} must end in .png or name a directory (end it with /)"),
        )
        .into())
    }
}

/// The token grid a request asks for: `--grid`, `--size` in pixels, or `None` for the bundle's.
fn requested_grid(p: &Pipeline, grid: Option<[usize; 2]>, size: Option<[usize; 2]>) -> Result<Option<[usize; 2]>> {
    let Some([w, h]) = size else {
        return Ok(grid);
    };
    let spec = &p.bundle().manifest().image;
    let g = p.grid();
    let f = [spec.height / g[0], spec.width / g[1]];
    if h % f[0] != 0 || w % f[1] != 0 || h == 0 || w == 0 {
        bail!(absorb::Error::param(
            "size",
            format!(
                "{w}x{h} is not a whole number of tokens: width and height must be multiples of {}x{} pixels",
                f[1], f[0]
            )
        ));
    }
    Ok(Some([h / f[0], w / f[1]]))
}

/// Writes `--frames` when the request made them.
fn write_frames(args: &FrameArgs, made: &absorb::Made) -> Result<()> {
    let (Some(path), Some(frames)) = (&args.frames, &made.frames) else {
        return Ok(());
    };
    let format = image::AnimationFormat::from_path(path, "frames")?;
    let bytes = image::animation_bytes(frames, format, args.frame_ms, 1500)?;
    image::write_atomic(path, &bytes)?;
    eprintln!("wrote {} ({} frames)", path.display(), frames.len());
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    if let Some(path) = &a.frames.frames {
        image::AnimationFormat::from_path(path, "frames")?;
    }
    let dir_output = matches!(out_kind(&a.out)?, OutKind::Dir);
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let seeded = a.sampling.seed.is_some() || a.from.is_some();
    let shard = absorb::batch::resolve_shard(a.shard, a.shards, dir_output, seeded, &env)?;
    let max_grid = a.grid.or(a.size.map(|[w, h]| [h, w]));
    let mut p = load_grid(&a.common, a.max_batch, max_grid)?;
    let mut decode = a.windows.decode;
    let (seed, first, count, columns, settings, tiling) = match &a.from {
        Some(png) => {
            let m = image::read_metadata(png)?;
            let (seed, first, count, columns, settings) = from_metadata(&p, png, &m)?;
            let tiling = match m.grid {
                Some(g) => Some(p.tiling(g, m.stride, m.window_margin)?),
                None => None,
            };
            if let Some(name) = &m.decode {
                decode = DecodeMode::from_name(name).ok_or_else(|| absorb::Error::Metadata {
                    path: png.clone(),
                    message: format!("decode \"{name}\" is not a mode this build has"),
                })?;
            }
            (seed, first, count, columns, settings, tiling)
        }
        None => {
            if a.count == 0 {
                return Err(absorb::Error::param("count", "0 images requested: use 1 or more").into());
            }
            let grid = requested_grid(&p, a.grid, a.size)?;
            let tiling = match grid {
                Some(g) if g != p.grid() => Some(p.tiling(g, a.windows.stride, a.windows.window_margin)?),
                _ => None,
            };
            let grid = tiling.as_ref().map_or(p.grid(), |t| t.grid());
            let settings = a.sampling.settings_for(&p, grid)?;
            (
                seed_or_fresh(a.sampling.seed),
                a.first_index,
                a.count,
                a.columns,
                settings,
                tiling,
            )
        }
    };
    eprintln!("seed {seed}");
    if dir_output {
        return generate_dir(
            &mut p,
            &a,
            seed,
            first,
            count,
            shard,
            &settings,
            tiling.as_ref(),
            decode,
        );
    }
    let grid = tiling.as_ref().map_or(p.grid(), |t| t.grid());
    let bar = progress(count as u64 * (grid[0] * grid[1]) as u64);
    let mut timings = Timings::default();
    let start = Instant::now();
    let columns = columns.unwrap_or_else(|| image::grid_columns(count));
    let plan = absorb::Plan {
        tiling: tiling.as_ref(),
        decode,
        frames: a.frames.frames.is_some(),
        columns,
        max_batch: a.max_batch,
    };
    let made = p.make(
        seed,
        first..first + count as u64,
        &settings,
        &plan,
        &mut |r: &StepReport| bar.inc(r.revealed as u64),
        &mut timings,
    )?;
    bar.finish_and_clear();
    let sampled = start.elapsed();
    if let Some(path) = &a.tokens_out {
        let images: Vec<serde_json::Value> = made
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| serde_json::json!({"index": first + i as u64, "tokens": t.chunks(grid[1]).collect::<Vec<_>>()}))
            .collect();
        let json = serde_json::json!({
            "bundle": p.bundle().manifest().name, "bundle_sha256": p.bundle().sha256(), "seed": seed,
            "height": grid[0], "width": grid[1], "images": images,
        });
        write_atomic(path, serde_json::to_string(&json)?.as_bytes())?;
    }
    write_frames(&a.frames, &made)?;
    let pixels = made.pixels;
    // A directory output returned above: this is one PNG (a grid when count > 1).
    let mut meta = p.generate_metadata(seed, &settings, first, count, Some(columns));
    if let Some(t) = &tiling {
        absorb::record_tiling(&mut meta, t, p.grid(), decode);
    }
    let img = if count == 1 {
        pixels[0].clone()
    } else {
        image::grid(&pixels, columns)
    };
    image::write_png(&a.out, &img, Some(&meta))?;
    eprintln!("wrote {}", a.out.display());
    log_timings(&p, &timings, sampled, count);
    Ok(())
}

/// `generate --out DIR/`: one shard (or all) of the request, resumable, with a manifest
/// (`absorb::batch`); on the bundle's grid or, with `tiling`, a larger one.
#[allow(clippy::too_many_arguments)]
fn generate_dir(
    p: &mut Pipeline,
    a: &GenerateArgs,
    seed: u64,
    first: u64,
    count: usize,
    shard: Option<absorb::batch::Shard>,
    settings: &Settings,
    tiling: Option<&absorb::sampler::Tiling>,
    decode: DecodeMode,
) -> Result<()> {
    if a.frames.frames.is_some() {
        // A resumed run samples only the images it lacks: a preview of those would be partial.
        bail!(absorb::Error::param(
            "frames",
            "previews go with a .png output, not a directory: make the preview in a run of its own"
        ));
    }
    let shard = shard.unwrap_or(absorb::batch::Shard::WHOLE);
    let indices = shard.indices(first, count as u64);
    if shard != absorb::batch::Shard::WHOLE {
        eprintln!(
            "shard {shard}: images {}..{} of {first}..{}",
            indices.start,
            indices.end,
            first + count as u64
        );
    }
    let trained = p.grid();
    let grid = tiling.map_or(trained, |t| t.grid());
    let mut image = p.bundle().manifest().image.clone();
    image.height = image.height / trained[0] * grid[0];
    image.width = image.width / trained[1] * grid[1];
    let req = absorb::batch::Request {
        dir: &a.out,
        seed,
        first,
        count: count as u64,
        shard,
        chunk: a.max_batch,
        image: &image,
        make_kept: a.tokens_out.is_some(),
    };
    // What every PNG of the request carries but for its index; built once, so that `make` alone
    // borrows the pipeline.
    let mut template = p.generate_metadata(seed, settings, first, 1, None);
    if let Some(t) = tiling {
        absorb::record_tiling(&mut template, t, trained, decode);
    }
    let metadata = |index: u64| Metadata {
        index: Some(index),
        ..template.clone()
    };
    let plan = absorb::Plan {
        tiling,
        decode,
        frames: false,
        columns: 1,
        max_batch: a.max_batch,
    };
    let bar = progress((indices.end - indices.start) * (grid[0] * grid[1]) as u64);
    let mut timings = Timings::default();
    let mut tokens = Vec::new();
    let mut make = |indices: &[u64]| -> absorb::Result<Vec<image::Pixels>> {
        let mut pixels = Vec::with_capacity(indices.len());
        // Pipeline::make takes a range: one call per run of consecutive indices (a resumed chunk
        // may have gaps). Each image is the same whatever the range.
        let mut rest = indices;
        while let Some(&start) = rest.first() {
            let run = rest
                .iter()
                .enumerate()
                .take_while(|&(k, &i)| i == start + k as u64)
                .count();
            let on_step = &mut |r: &StepReport| bar.inc(r.revealed as u64);
            let made = p.make(seed, start..start + run as u64, settings, &plan, on_step, &mut timings)?;
            pixels.extend(made.pixels);
            if a.tokens_out.is_some() {
                tokens.extend(made.tokens);
            }
            rest = &rest[run..];
        }
        Ok(pixels)
    };
    let mut summary = absorb::batch::Summary::default();
    let start = Instant::now();
    let result = absorb::batch::run(&req, &metadata, &mut make, &mut summary);
    bar.finish_and_clear();
    eprintln!("{}: {summary}", a.out.display());
    result.with_context(|| format!("writing shard {shard} into {}", a.out.display()))?;
    if let Some(path) = &a.tokens_out {
        write_tokens(p, path, seed, indices.start, grid, &tokens)?;
    }
    log_timings(
        p,
        &timings,
        start.elapsed(),
        summary.made + summary.regenerated + summary.foreign,
    );
    Ok(())
}

/// `--tokens-out` for a directory: the token grids of images `first..` as JSON, in the format
/// `generate` writes for a .png output.
fn write_tokens(p: &Pipeline, path: &Path, seed: u64, first: u64, grid: [usize; 2], tokens: &[Vec<i64>]) -> Result<()> {
    let images: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"index": first + i as u64, "tokens": t.chunks(grid[1]).collect::<Vec<_>>()}))
        .collect();
    let json = serde_json::json!({
        "bundle": p.bundle().manifest().name, "bundle_sha256": p.bundle().sha256(), "seed": seed,
        "height": grid[0], "width": grid[1], "images": images,
    });
    write_atomic(path, serde_json::to_string(&json)?.as_bytes())
}

/// Parameters to reproduce a generated PNG, checked against the loaded bundle.
fn from_metadata(p: &Pipeline, png: &Path, m: &Metadata) -> Result<(u64, u64, usize, Option<usize>, Settings)> {
    let bad = |message: String| absorb::Error::Metadata {
        path: png.to_path_buf(),
        message,
    };
    if m.mode != "generate" {
        bail!(bad(format!(
            "was made by `absorb {}`; only generated images can be reproduced with --from",
            m.mode
        )));
    }
    if m.bundle_sha256 != p.bundle().sha256() {
        bail!(bad(format!(
            "was made with bundle \"{}\" ({}), but --model loads \"{}\" ({}); pass the bundle it was made with",
            m.bundle,
            m.bundle_sha256,
            p.bundle().manifest().name,
            p.bundle().sha256()
        )));
    }
    let (Some(seed), Some(index), Some(count), Some(_), Some(_)) = (m.seed, m.index, m.count, m.steps, m.temperature)
    else {
        bail!(bad("metadata lacks seed, index, count, steps or temperature".into()));
    };
    if m.provider
        .as_deref()
        .is_some_and(|prov| prov != p.provider().to_string())
    {
        log::warn!(
            "the PNG was made on provider {:?}, this run uses {}: pixels may differ",
            m.provider,
            p.provider()
        );
    }
    let settings = p.settings_from_metadata(m)?;
    Ok((seed, index, count, m.columns, settings))
}

fn log_timings(p: &Pipeline, t: &Timings, sampled: std::time::Duration, count: usize) {
    log::info!(
        "load {:.1?}; sampling {:.1?} for {count} images: {} transformer calls {:.1?} ({:.2?}/call), sampler {:.1?}; decode {:.1?}",
        p.load_time(),
        sampled,
        t.transformer_calls,
        t.transformer,
        t.transformer.checked_div(t.transformer_calls.max(1) as u32).unwrap_or_default(),
        t.sampler,
        t.decode
    );
}

fn inpaint(a: InpaintArgs) -> Result<()> {
    let mut p = load(&a.common)?;
    let spec = p.bundle().manifest().image.clone();
    let input = image::load_image(&a.image, &spec)?;
    let mask = match (&a.mask, a.rect) {
        (Some(path), _) => image::load_mask(path, spec.width, spec.height)?,
        (None, Some(rect)) => image::rect_mask(rect, spec.width, spec.height)?,
        (None, None) => bail!(absorb::Error::param("mask", "give --mask FILE or --rect x,y,w,h")),
    };
    let token_mask = image::pool_mask(&mask, p.grid());
    let settings = a.sampling.settings(&p)?;
    let seed = seed_or_fresh(a.sampling.seed);
    eprintln!("seed {seed}");
    let masked = token_mask.iter().filter(|&&m| m).count();
    let bar = progress(masked as u64);
    let mut timings = Timings::default();
    let start = Instant::now();
    let tokens = p.inpaint(
        &input,
        &token_mask,
        seed,
        &settings,
        &mut |r: &StepReport| bar.inc(r.revealed as u64),
        &mut timings,
    )?;
    let sampled = start.elapsed();
    let out = p.decode(&[tokens], p.grid(), 1, &mut timings)?;
    bar.finish_and_clear();
    let mut pixels = image::to_pixels(&out[0], spec.range);
    if !a.decode_all {
        image::composite(&mut pixels, &image::to_pixels(&input, spec.range), &mask);
    }
    let mut meta = p.metadata("inpaint");
    absorb::record_settings(&mut meta, &settings);
    meta.seed = Some(seed);
    meta.index = Some(0);
    meta.count = Some(1);
    image::write_png(&a.out, &pixels, Some(&meta))?;
    eprintln!(
        "regenerated {masked} of {} tokens; wrote {}",
        token_mask.len(),
        a.out.display()
    );
    log_timings(&p, &timings, sampled, 1);
    Ok(())
}

fn outpaint(a: OutpaintArgs) -> Result<()> {
    if let Some(path) = &a.frames.frames {
        image::AnimationFormat::from_path(path, "frames")?;
    }
    // The manifest first: the grid (and TensorRT's decoder profile) depends on the image size.
    let (manifest, _) = absorb::bundle::read_manifest(&model_dir(&a.common))?;
    let spec = manifest.image.clone();
    let token_px = [spec.height / manifest.tokens.height, spec.width / manifest.tokens.width];
    let input = image::load_image_any(&a.image, &spec)?;
    let (grid, _) = absorb::outpaint_grid(
        [input.height, input.width],
        token_px,
        a.extend,
        absorb::sampler::MAX_GRID_SIDE,
    )?;
    let mut p = load_grid(&a.common, a.max_batch, Some(grid))?;
    let tiling = p.tiling(grid, a.windows.stride, a.windows.window_margin)?;
    let settings = a.sampling.settings_for(&p, grid)?;
    let seed = seed_or_fresh(a.sampling.seed);
    eprintln!("seed {seed}");
    let masked = grid[0] * grid[1] - (input.height / token_px[0]) * (input.width / token_px[1]);
    let bar = progress(masked as u64);
    let mut timings = Timings::default();
    let start = Instant::now();
    let plan = absorb::Plan {
        tiling: Some(&tiling),
        decode: a.windows.decode,
        frames: a.frames.frames.is_some(),
        columns: 1,
        max_batch: a.max_batch,
    };
    let made = p.outpaint(
        &input,
        a.extend,
        !a.decode_all,
        seed,
        &settings,
        &plan,
        &mut |r: &StepReport| bar.inc(r.revealed as u64),
        &mut timings,
    )?;
    bar.finish_and_clear();
    let sampled = start.elapsed();
    write_frames(&a.frames, &made)?;
    let pixels = made.pixels.into_iter().next().context("outpainting made no image")?;
    let mut meta = p.metadata("outpaint");
    absorb::record_settings(&mut meta, &settings);
    absorb::record_tiling(&mut meta, &tiling, p.grid(), a.windows.decode);
    meta.seed = Some(seed);
    meta.index = Some(0);
    meta.count = Some(1);
    image::write_png(&a.out, &pixels, Some(&meta))?;
    eprintln!(
        "extended {}x{} to {}x{} ({masked} new tokens, {} windows); wrote {}",
        input.width,
        input.height,
        pixels.width,
        pixels.height,
        tiling.windows(),
        a.out.display()
    );
    log_timings(&p, &timings, sampled, 1);
    Ok(())
}

fn encode(a: EncodeArgs) -> Result<()> {
    let mut p = load(&a.common)?;
    let spec = p.bundle().manifest().image.clone();
    let input = image::load_image(&a.image, &spec)?;
    let tokens = p.encode(&input)?;
    let [h, w] = p.grid();
    let file = TokenFile {
        bundle: p.bundle().manifest().name.clone(),
        bundle_sha256: p.bundle().sha256().to_string(),
        height: h,
        width: w,
        tokens: tokens.chunks(w).map(<[i64]>::to_vec).collect(),
    };
    let json = serde_json::to_string_pretty(&file)?;
    match a.out {
        Some(path) => write_atomic(&path, json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(image::write_atomic(path, bytes)?)
}

fn decode(a: DecodeArgs) -> Result<()> {
    let mut p = load(&a.common)?;
    let bad = |m: String| absorb::Error::Tokens(format!("{}: {m}", a.tokens.display()));
    let text = std::fs::read_to_string(&a.tokens).map_err(|e| absorb::Error::Io {
        path: a.tokens.clone(),
        source: e,
    })?;
    let file: TokenFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a token file from `absorb encode`: {e}")))?;
    if file.tokens.len() != file.height
        || file.tokens.iter().any(|r| r.len() != file.width)
        || file.height == 0
        || file.width == 0
    {
        bail!(bad(format!(
            "tokens must be {} rows of {} ids",
            file.height, file.width
        )));
    }
    let flat: Vec<i64> = file.tokens.concat();
    let mut timings = Timings::default();
    let out = p.decode(&[flat], [file.height, file.width], 1, &mut timings)?;
    let pixels = image::to_pixels(&out[0], p.bundle().manifest().image.range);
    image::write_png(&a.out, &pixels, Some(&p.metadata("decode")))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    if let Some(png) = &a.png {
        let m = image::read_metadata(png)?;
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let p = load(&a.common)?;
    let rt = p.runtime();
    let m = p.bundle().manifest();
    let report = serde_json::json!({
        "bundle": {
            "dir": p.bundle().dir(),
            "name": m.name,
            "sha256": p.bundle().sha256(),
            "image": m.image,
            "tokens": m.tokens,
            "sampling": m.sampling,
            "provenance": m.provenance,
        },
        "onnxruntime": {
            "library": rt.library(),
            "threads": rt.threads(),
            "providers_in_library": rt.available_providers(),
            "provider_in_use": p.provider(),
        },
        "cpu": absorb::cpu::detect(),
        "absorb": absorb::VERSION,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn check_variant(a: CheckVariantArgs) -> Result<()> {
    if a.common.variant.is_none() {
        bail!(absorb::Error::param(
            "variant",
            "name the variant to measure, e.g. --variant int8"
        ));
    }
    if a.rows == Some(0) {
        bail!(absorb::Error::param("rows", "0 rows: use 1 or more"));
    }
    let mut variant = load(&a.common)?;
    let mut fp32 = load(&Common {
        variant: None,
        ..a.common
    })?;
    let report = absorb::agreement::measure(&mut fp32, &mut variant, a.rows)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.holds() {
        bail!(
            "the {} transformer agrees with fp32 on {:.2}% of the probe's masked positions on this CPU \
             (int8 kernel {}), below the bundle's bar of {:.2}%: use the fp32 transformer here",
            report.variant,
            report.argmax_agreement * 100.0,
            report.cpu.int8_kernel.name(),
            report.bar.unwrap_or(0.0) * 100.0
        );
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let dir = model_dir(&a.common);
    let options = absorb::server::ServeOptions {
        model: dir.clone(),
        runtime: RuntimeOptions {
            ort_lib: a.common.ort_lib.clone(),
            threads: a.common.threads,
        },
        // The same provider settings as every command; TensorRT profiles cover the service's batches.
        provider: absorb::ProviderConfig {
            provider: a.common.provider,
            fp16: a.common.fp16,
            cache_dir: a.common.cache_dir.clone(),
            max_batch: a.max_batch,
            device_id: a.common.device,
            variant: a.common.variant.clone(),
            max_grid: Some([a.max_grid, a.max_grid]),
        },
        listen: a.listen,
        limits: absorb::server::Limits {
            max_queue: a.max_queue,
            max_batch: a.max_batch,
            max_count: a.max_count,
            max_steps: a.max_steps,
            max_body_bytes: a.max_body,
            timeout_ms: a.timeout_ms,
            max_grid: a.max_grid,
        },
    };
    absorb::server::serve(options).with_context(|| format!("serving the model from {}", dir.display()))
}

fn warmup(a: WarmupArgs) -> Result<()> {
    let start = Instant::now();
    // A heartbeat, so a long engine build is never mistaken for a hang.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let heartbeat = std::thread::spawn(move || {
        while done_rx.recv_timeout(std::time::Duration::from_secs(15)).is_err() {
            log::info!(
                "warming up: {:.0?} so far (TensorRT engine builds can take minutes)",
                start.elapsed()
            );
        }
    });
    let result = (|| -> Result<()> {
        let mut p = load_batch(&a.common, a.max_batch)?;
        log::info!("sessions built on {} in {:.1?}", p.provider(), start.elapsed());
        let settings = p.settings(Some(1), None)?;
        let mut timings = Timings::default();
        for batch in [1, a.max_batch] {
            let t = Instant::now();
            let pixels = p.generate_pixels(0, 0..batch as u64, &settings, batch, &mut |_| {}, &mut timings)?;
            let spec = p.bundle().manifest().image.clone();
            let tensors: Vec<_> = pixels.iter().take(1).map(|px| image::to_tensor(px, &spec)).collect();
            p.encode(&tensors[0])?;
            log::info!(
                "batch {batch}: transformer, decoder and encoder ran in {:.1?}",
                t.elapsed()
            );
        }
        eprintln!(
            "warm: {} on {} in {:.1?}",
            p.bundle().manifest().name,
            p.provider(),
            start.elapsed()
        );
        Ok(())
    })();
    let _ = done_tx.send(());
    let _ = heartbeat.join();
    result
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.count == 0 || a.runs == 0 {
        bail!(absorb::Error::param("count", "--count and --runs must be 1 or more"));
    }
    let start = Instant::now();
    let mut p = load_batch(&a.common, a.max_batch)?;
    let load = start.elapsed();
    let settings = p.settings(a.steps, a.temperature)?;
    let b = absorb::bench::BenchSettings {
        settings,
        count: a.count,
        max_batch: a.max_batch,
        runs: a.runs,
        seed: a.seed,
    };
    let report = absorb::bench::run(&mut p, &b, load)?;
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(path) if path == Path::new("-") => println!("{json}"),
        Some(path) => {
            write_atomic(path, json.as_bytes())?;
            print!("{}", report.table());
        }
        None => print!("{}", report.table()),
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    if a.count == 0 {
        bail!(absorb::Error::param("count", "0 images requested: use 1 or more"));
    }
    let mut p = load_batch(&a.common, a.max_batch)?;
    let mut judge = absorb::eval::Judge::for_bundle(&p)?;
    let real = judge.judge(&absorb::eval::heldout_images(&p)?)?;
    let steps = if a.steps.is_empty() {
        vec![p.bundle().manifest().sampling.steps]
    } else {
        a.steps.clone()
    };
    let (t0, t1) = a.temperature.map_or((None, None), |(x, y)| (Some(x), y));
    println!(
        "real held-out images: mean confidence {:.3} over {} images\n",
        real.mean_confidence, real.count
    );
    println!(
        "| sampler | steps | transformer calls per batch | mean confidence | vs real | classes | max class share | bar |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &kind in &a.samplers {
        for &s in &steps {
            let settings = p.settings(Some(s), t0)?.with_sampler(kind).with_temperature_end(t1)?;
            let mut timings = Timings::default();
            let pixels = p.generate_pixels(
                a.seed,
                0..a.count as u64,
                &settings,
                a.max_batch,
                &mut |_| {},
                &mut timings,
            )?;
            let spec = p.bundle().manifest().image.clone();
            let tensors: Vec<_> = pixels.iter().map(|px| image::to_tensor(px, &spec)).collect();
            let v = judge.judge(&tensors)?;
            let ratio = v.mean_confidence / real.mean_confidence;
            let meets = ratio >= 0.85 && v.all_classes_present() && v.max_class_fraction() <= 0.25;
            // Calls per batch of max_batch images (each call feeds the whole batch).
            let calls = timings.transformer_calls as f64 * a.max_batch.min(a.count) as f64 / a.count as f64;
            println!(
                "| {} | {s} | {calls:.1} | {:.3} | {:.2} | {}/{} | {:.2} | {} |",
                kind.name(),
                v.mean_confidence,
                ratio,
                v.histogram.iter().filter(|&&h| h > 0).count(),
                v.histogram.len(),
                v.max_class_fraction(),
                if meets { "meets" } else { "below" }
            );
            rows.push(serde_json::json!({
                "sampler": kind.name(), "steps": s, "temperature": settings.temperature,
                "temperature_end": settings.temperature_end, "count": v.count,
                "mean_confidence": v.mean_confidence, "ratio_to_real": ratio, "histogram": v.histogram,
                "meets_bar": meets,
            }));
        }
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({"real_mean_confidence": real.mean_confidence, "rows": rows});
        write_atomic(path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    }
    Ok(())
}
