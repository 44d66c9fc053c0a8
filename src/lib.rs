//! absorb: discrete absorbing diffusion ("Unleashing Transformers", Bond-Taylor et al. 2021)
//! on ONNX Runtime.
//!
//! A bundle holds three exported graphs (VQGAN encoder, decoder, bidirectional transformer) and
//! a `model.json`. [`Pipeline`] loads them; generation starts from an all-masked token grid,
//! reveals positions over a few steps, draws each revealed token from the transformer's logits,
//! and decodes the grid to pixels.
//!
//! Every request is a [`Job`] (what to make: generate, inpaint, outpaint, decode, larger grids,
//! previews), built from a request's parameters and run by [`Pipeline::run`], which returns what
//! it [`Made`]; `docs/design.md` follows one request through the files.
//!
//! The reverse process itself is pure and needs no model: [`sampler::sample`] takes the denoiser
//! as a closure. With a fake denoiser that always prefers code 3:
//!
//! ```
//! use absorb::sampler::{self, Chain, Settings, TokenSpace};
//!
//! let space = TokenSpace { len: 16, width: 4, codebook_size: 8, mask_id: 8 };
//! let settings = Settings::new(4, 1.0, &space)?;
//! let mut chains = vec![Chain::masked(&space, &settings, 42, 0)?];
//! // one class per row (a class-conditional bundle's; `sampler::NO_CLASS` here)
//! let mut denoise = |tokens: &[i64], classes: &[i64], logits: &mut Vec<f32>| {
//!     logits.clear();
//!     for _ in 0..classes.len() * 16 {
//!         logits.extend((0..8).map(|k| if k == 3 { 30.0 } else { 0.0 }));
//!     }
//!     assert_eq!(tokens.len(), classes.len() * 16);
//!     Ok(())
//! };
//! let stats = sampler::sample(&mut chains, &space, &settings, &mut denoise, &mut |_| {})?;
//! assert!(chains[0].tokens().iter().all(|&t| t == 3));
//! assert!(stats.calls <= 4);
//! # Ok::<(), absorb::Error>(())
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod agreement;
pub mod atomic;
pub mod batch;
pub mod bench;
pub mod bundle;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod graphs;
pub mod image;
pub mod job;
pub mod limits;
pub mod param;
pub mod parse;
pub mod pipeline;
pub mod preview;
pub mod sampler;
pub mod server;
pub mod spec;
pub mod tokens;

pub use crate::bundle::Bundle;
pub use crate::error::{Error, Result};
pub use crate::graphs::{Provider, ProviderConfig, Runtime, RuntimeOptions};
pub use crate::job::{CacheMode, Canvas, ImageId, Job, Made, Sampling, Start, DEFAULT_MAX_BATCH};
pub use crate::param::Param;
pub use crate::pipeline::{Pipeline, Progress, Timings};
pub use crate::preview::PreviewSink;
pub use crate::spec::{Caps, FillSpec, GenerateSpec, InpaintSpec, OutpaintSpec, VarySpec};

/// This crate's version, recorded in PNG metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How a grid larger than the bundle's is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Window by window in the decoder's trained shape, overlaps blended (one batched run).
    #[default]
    Tiles,
    /// The whole grid in one piece (the paper's way; the decoder is convolutional, but its
    /// attention and normalisation then see a shape they were not trained on).
    Whole,
}

impl DecodeMode {
    /// Every mode, in the order help texts list them.
    pub const ALL: &'static [DecodeMode] = &[DecodeMode::Tiles, DecodeMode::Whole];

    /// One line for help texts.
    pub fn help(self) -> &'static str {
        match self {
            DecodeMode::Tiles => "window by window in the decoder's trained shape, overlaps blended",
            DecodeMode::Whole => "the whole grid in one piece (the paper's way)",
        }
    }

    /// The name used on the command line, in JSON and in PNG metadata.
    pub fn name(self) -> &'static str {
        match self {
            DecodeMode::Tiles => "tiles",
            DecodeMode::Whole => "whole",
        }
    }

    /// Parses a name written by [`DecodeMode::name`].
    pub fn from_name(name: &str) -> Option<DecodeMode> {
        DecodeMode::ALL.iter().copied().find(|m| m.name() == name)
    }
}

impl std::fmt::Display for DecodeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A fresh seed from the clock and process id, for requests that give none (it is printed and
/// recorded, so the image can still be reproduced).
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    // splitmix64 finaliser, so nearby clocks give unrelated seeds
    let mut z = mixed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
