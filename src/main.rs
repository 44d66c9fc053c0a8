//! The `absorb` command line: parse the flags, hand them to the command's function in
//! `cli/`, map errors to exit codes. Each command builds an [`absorb::Job`], runs it with
//! [`absorb::Pipeline::run`] and writes what it made (see docs/design.md, "The path of a request").
//!
//! Exit codes: 0 success; 1 the model, the ONNX Runtime library or the machine failed; 2 the
//! command line or an input (parameter, image, mask, tokens, PNG metadata) is invalid.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cli::args::*;

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
    /// Extend an image beyond its borders; its tokens are kept (but a bundle's `outpaint_edge` on new sides).
    Outpaint(OutpaintArgs),
    /// Variations of an image: mask a seeded random share of its tokens (--strength) and let the
    /// reverse process redo them.
    Vary(VaryArgs),
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

impl Command {
    fn common(&self) -> &Common {
        match self {
            Command::Generate(a) => &a.common,
            Command::Inpaint(a) => &a.common,
            Command::Outpaint(a) => &a.common,
            Command::Vary(a) => &a.common,
            Command::Encode(a) => &a.common,
            Command::Decode(a) => &a.common,
            Command::Info(a) => &a.common,
            Command::Bench(a) => &a.common,
            Command::Eval(a) => &a.common,
            Command::CheckVariant(a) => &a.common,
            Command::Warmup(a) => &a.common,
            Command::Serve(a) => &a.common,
        }
    }
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
        // A service and an engine build log their progress by default (stderr, i.e. journald).
        Command::Serve(_) | Command::Warmup(_) => cli.command.common().verbose.max(1),
        c => c.common().verbose,
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
            eprintln!("error: {}", describe(&e));
            let input = e
                .chain()
                .any(|c| c.downcast_ref::<absorb::Error>().is_some_and(|e| e.is_input_error()));
            ExitCode::from(if input { 2 } else { 1 })
        }
    }
}

/// The error chain as `{:#}` prints it, each parameter spelled as its flag (`--window-margin`):
/// the way the caller wrote it.
fn describe(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| match c.downcast_ref::<absorb::Error>() {
            Some(absorb::Error::Param { param, message }) => format!("invalid {}: {message}", param.flag()),
            _ => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> Result<()> {
    let models = cli.command.common().model.len();
    if models > 1 && !matches!(cli.command, Command::Serve(_)) {
        anyhow::bail!(absorb::Error::param(
            absorb::Param::Model,
            format!("given {models} times: only `absorb serve` takes several bundles"),
        ));
    }
    match cli.command {
        Command::Generate(a) => cli::generate::generate(a),
        Command::Inpaint(a) => cli::edit::inpaint(a),
        Command::Outpaint(a) => cli::edit::outpaint(a),
        Command::Vary(a) => cli::edit::vary(a),
        Command::Encode(a) => cli::tokens::encode(a),
        Command::Decode(a) => cli::tokens::decode(a),
        Command::Info(a) => cli::tools::info(a),
        Command::Warmup(a) => cli::tools::warmup(a),
        Command::Bench(a) => cli::tools::bench(a),
        Command::Eval(a) => cli::tools::eval(a),
        Command::CheckVariant(a) => cli::tools::check_variant(a),
        Command::Serve(a) => cli::serve::serve(a),
    }
}
