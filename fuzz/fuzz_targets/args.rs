//! The CLI's textual arguments (`--grid`, `--stride`, `--extend` with `--outpaint-edge`, `--rect`, `--temperature`,
//! `--shard`), each then used as the CLI uses it: the first byte picks the flag.
#![no_main]

use absorb::image::{rect_mask, Tensor};
use absorb::parse::{parse_extend, parse_pair, parse_rect, parse_shard, parse_temperature};
use absorb::{Canvas, Caps, GenerateSpec, InpaintSpec, OutpaintSpec, Sampling};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let bundle = common::digits();
    let spec = &bundle.manifest().image;
    let blank = || Tensor {
        channels: spec.channels,
        height: spec.height,
        width: spec.width,
        data: vec![0.0; spec.channels * spec.height * spec.width],
    };
    match pick % 6 {
        0 => {
            if let Ok(grid) = parse_pair(text) {
                let canvas = Canvas {
                    grid: Some(grid),
                    ..Canvas::default()
                };
                let caps = Caps {
                    max_grid: Some(32),
                    ..Caps::NONE
                };
                let _ = GenerateSpec {
                    canvas,
                    caps,
                    ..GenerateSpec::default()
                }
                .job(bundle);
            }
        }
        1 => {
            // --stride and --window-margin on a 2x1 grid of windows
            if let Ok(pair) = parse_pair(text) {
                for canvas in [
                    Canvas {
                        grid: Some([8, 16]),
                        stride: Some(pair),
                        ..Canvas::default()
                    },
                    Canvas {
                        grid: Some([8, 16]),
                        window_margin: Some(pair),
                        ..Canvas::default()
                    },
                ] {
                    let _ = GenerateSpec {
                        first_index: u64::MAX,
                        canvas,
                        ..GenerateSpec::default()
                    }
                    .job(bundle);
                }
            }
        }
        2 => {
            if let Ok(extend) = parse_extend(text) {
                // --outpaint-edge: the bundle's, a fuzzed (maybe huge) one, and a small one
                for edge in [None, Some(extend[0]), Some(text.len() % 5)] {
                    let _ = OutpaintSpec {
                        edge,
                        ..OutpaintSpec::new(blank(), extend)
                    }
                    .job(bundle);
                }
            }
        }
        3 => {
            if let Ok(rect) = parse_rect(text) {
                if let Ok(mask) = rect_mask(rect, spec.width, spec.height) {
                    let _ = InpaintSpec {
                        keep_input: false,
                        ..InpaintSpec::new(blank(), mask)
                    }
                    .job(bundle);
                }
            }
        }
        4 => {
            if let Ok((start, end)) = parse_temperature(text) {
                let sampling = Sampling {
                    temperature: Some(start),
                    temperature_end: end,
                    ..Sampling::default()
                };
                let _ = sampling.settings(bundle, [8, 8]);
            }
        }
        _ => {
            if let Ok(shard) = parse_shard(text) {
                let range = shard.indices(u64::MAX - 7, 8);
                let _ = shard.manifest_name(range.start);
            }
        }
    }
});
