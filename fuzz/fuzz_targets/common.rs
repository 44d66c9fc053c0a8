//! What every target shares: the bundled digits model, loaded once (its manifest and graph
//! hashes are checked; no graph is run).

use std::sync::OnceLock;

use absorb::Bundle;

pub fn digits() -> &'static Bundle {
    static BUNDLE: OnceLock<Bundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits");
        Bundle::load(std::path::Path::new(dir)).expect("models/digits loads")
    })
}

/// Splits `data` at a length read from its first two bytes (little-endian), for targets that
/// take two inputs.
#[allow(dead_code)] // not every target takes two inputs
pub fn split2(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len());
    Some(rest.split_at(n))
}

/// A PNG with valid checksums built from fuzzed bytes, so that mutations reach what is behind
/// the chunk CRCs: width and height (1..=64 from the first two bytes, or a declared size up to
/// 2^16 when the third byte's top bit is set: a bomb the decoder must refuse), colour type and
/// bit depth (third byte), an optional `absorb` text chunk, then pixels cycled from the rest.
#[allow(dead_code)] // not every target builds PNGs
pub fn png_from(data: &[u8], text: Option<&str>) -> Option<Vec<u8>> {
    let (&[w, h, kind], rest) = data.split_first_chunk::<3>()?;
    let (w, h) = if kind & 0x80 != 0 {
        (u32::from(w) << 8 | 0xff, u32::from(h) << 8 | 0xff)
    } else {
        (u32::from(w % 64) + 1, u32::from(h % 64) + 1)
    };
    use png::{BitDepth, ColorType};
    let (color, depth) = match (kind & 0x7f) % 9 {
        0 => (ColorType::Grayscale, BitDepth::Eight),
        1 => (ColorType::Grayscale, BitDepth::One),
        2 => (ColorType::Grayscale, BitDepth::Four),
        3 => (ColorType::Grayscale, BitDepth::Sixteen),
        4 => (ColorType::GrayscaleAlpha, BitDepth::Eight),
        5 => (ColorType::Rgb, BitDepth::Eight),
        6 => (ColorType::Rgb, BitDepth::Sixteen),
        7 => (ColorType::Rgba, BitDepth::Eight),
        _ => (ColorType::Indexed, BitDepth::Eight),
    };
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(color);
    enc.set_depth(depth);
    if color == ColorType::Indexed {
        enc.set_palette((0..=255u8).flat_map(|v| [v, v, v]).collect::<Vec<u8>>());
    }
    if let Some(t) = text {
        enc.add_itxt_chunk("absorb".into(), t.into()).ok()?;
    }
    let mut writer = enc.write_header().ok()?;
    if kind & 0x80 != 0 {
        // Declared huge, no pixels: the header alone must be refused.
        drop(writer);
        return Some(out);
    }
    let bits = color.samples() * depth as usize;
    let len = (w as usize * bits).div_ceil(8) * h as usize;
    let pixels: Vec<u8> = if rest.is_empty() {
        vec![0; len]
    } else {
        rest.iter().copied().cycle().take(len).collect()
    };
    writer.write_image_data(&pixels).ok()?;
    writer.finish().ok()?;
    Some(out)
}
