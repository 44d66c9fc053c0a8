//! Pixels and files: image files -> tensors in the bundle's range, tensors -> 8-bit pixels,
//! pixel masks -> token masks, grids, and PNG writing (atomic, with the generation parameters
//! in a text chunk) and reading those parameters back.
//!
//! It does not run any graph and does not sample.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::bundle::ImageSpec;
use crate::error::{Error, Result};
use crate::param::Param;

/// PNG text-chunk keyword under which absorb stores its generation parameters (JSON).
pub const METADATA_KEY: &str = "absorb";

/// An image as a float tensor `(C, H, W)` in the bundle's range.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Channels (1 or 3).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `channels * height * width` values, channel-major.
    pub data: Vec<f32>,
}

/// 8-bit pixels, interleaved (gray or RGB), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    /// 1 (gray) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

/// What size an input image may have, checked from its header before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Exactly `[width, height]` (the bundle's size, a mask matching its image).
    Exactly([usize; 2]),
    /// At most `[width, height]` (outpainting's input; never more than
    /// [`crate::limits::MAX_IMAGE_SIDE`]).
    AtMost([usize; 2]),
}

/// The PNG signature: the only format accepted as input (absorb writes PNGs; a GIF or JPEG
/// is refused rather than half supported).
const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// Decodes a PNG from `open()` (called twice: header, then pixels) within `bound`: the declared
/// size is read from the header and refused before anything is allocated for the pixels, and the
/// decoder runs under the `image` crate's allocation limits for exactly that size. `name` (a
/// file path, or a request field) and `what` (`image`, `mask`) name it in errors.
fn decode_bounded<R, F>(open: F, name: &Path, what: &str, bound: Bound) -> Result<::image::DynamicImage>
where
    R: std::io::BufRead + std::io::Seek,
    F: Fn() -> Result<R>,
{
    let err = |message: String| Error::Image {
        path: name.to_path_buf(),
        message,
    };
    let mut head = [0u8; 8];
    let read = std::io::Read::read_exact(&mut open()?, &mut head);
    if read.is_err() || &head != PNG_SIGNATURE {
        return Err(err(format!(
            "not a PNG: only PNG {what}s are accepted (convert GIF or JPEG files first)"
        )));
    }
    let reader = |limits: ::image::Limits| -> Result<::image::ImageReader<R>> {
        let mut r = ::image::ImageReader::with_format(open()?, ::image::ImageFormat::Png);
        r.limits(limits);
        Ok(r)
    };
    let max_side = crate::limits::MAX_IMAGE_SIDE;
    let mut header_only = ::image::Limits::default();
    header_only.max_image_width = Some(u32::MAX);
    header_only.max_image_height = Some(u32::MAX);
    let (w, h) = reader(header_only)?
        .into_dimensions()
        .map_err(|e| err(format!("not a readable PNG: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    match bound {
        Bound::Exactly([ew, eh]) if (w, h) != (ew, eh) => {
            return Err(err(format!(
                "{what} is {w}x{h} (width x height), expected {ew}x{eh}; resize it first"
            )))
        }
        Bound::AtMost([mw, mh]) if w > mw.min(max_side) || h > mh.min(max_side) => {
            return Err(err(format!(
                "{what} is {w}x{h} (width x height), above the limit of {}x{} pixels",
                mw.min(max_side),
                mh.min(max_side)
            )))
        }
        _ => {}
    }
    if w > max_side || h > max_side {
        return Err(err(format!(
            "{what} is {w}x{h} (width x height), above the limit of {max_side} pixels per side"
        )));
    }
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(w as u32);
    limits.max_image_height = Some(h as u32);
    // 16-bit RGBA is the largest pixel a PNG decodes to; a little room for the decoder's rows.
    limits.max_alloc = Some((w * h * 8 + (1 << 20)) as u64);
    reader(limits)?
        .decode()
        .map_err(|e| err(format!("not a readable PNG: {e}")))
}

/// A file's bytes for [`decode_bounded`].
fn file_reader(path: &Path) -> Result<std::io::BufReader<File>> {
    File::open(path).map(std::io::BufReader::new).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("cannot open: {e}"),
    })
}

/// Reads a PNG file and converts it to the bundle's tensor layout and range. The size must be
/// the bundle's; colour is converted to the bundle's channel count (RGB -> luma, gray -> RGB),
/// alpha is dropped.
pub fn load_image(path: &Path, spec: &ImageSpec) -> Result<Tensor> {
    let img = decode_bounded(
        || file_reader(path),
        path,
        "image",
        Bound::Exactly([spec.width, spec.height]),
    )?;
    Ok(bundle_tensor(&img, spec))
}

/// Converts a decoded image to the bundle's channel count and tensor range.
fn bundle_tensor(img: &::image::DynamicImage, spec: &ImageSpec) -> Tensor {
    let raw: Vec<u8> = if spec.channels == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    };
    let pixels = Pixels {
        channels: spec.channels,
        height: img.height() as usize,
        width: img.width() as usize,
        data: raw,
    };
    to_tensor(&pixels, spec)
}

/// Reads a PNG file of any size up to `max` `[width, height]` (outpainting's input) as a tensor
/// with the bundle's channels and range.
pub fn load_image_any(path: &Path, spec: &ImageSpec, max: [usize; 2]) -> Result<Tensor> {
    let img = decode_bounded(|| file_reader(path), path, "image", Bound::AtMost(max))?;
    Ok(bundle_tensor(&img, spec))
}

/// Bytes held in memory (the service's request bodies) for [`decode_bounded`].
fn memory_reader<'a>(bytes: &'a [u8]) -> impl Fn() -> Result<std::io::Cursor<&'a [u8]>> + 'a {
    move || Ok(std::io::Cursor::new(bytes))
}

/// Like [`load_image_any`], for a PNG held in memory; `field` names it in errors.
pub fn image_any_from_png(bytes: &[u8], spec: &ImageSpec, field: &str, max: [usize; 2]) -> Result<Tensor> {
    let img = decode_bounded(memory_reader(bytes), Path::new(field), "image", Bound::AtMost(max))?;
    Ok(bundle_tensor(&img, spec))
}

/// Like [`load_image`], for a PNG held in memory; `field` names it in errors (`image`).
pub fn image_from_png(bytes: &[u8], spec: &ImageSpec, field: &str) -> Result<Tensor> {
    let bound = Bound::Exactly([spec.width, spec.height]);
    let img = decode_bounded(memory_reader(bytes), Path::new(field), "image", bound)?;
    Ok(bundle_tensor(&img, spec))
}

/// 8-bit pixels -> tensor in `spec.range` (0 -> low, 255 -> high).
pub fn to_tensor(p: &Pixels, spec: &ImageSpec) -> Tensor {
    let [lo, hi] = spec.range;
    let (c, h, w) = (p.channels, p.height, p.width);
    let mut data = vec![0f32; c * h * w];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let v = p.data[(y * w + x) * c + ch] as f32 / 255.0;
                data[(ch * h + y) * w + x] = lo + v * (hi - lo);
            }
        }
    }
    Tensor {
        channels: c,
        height: h,
        width: w,
        data,
    }
}

/// Tensor -> 8-bit pixels: clamp to the range, scale to 0..255, round half up (torchvision's
/// `save_image` convention: `x * 255 + 0.5`, truncated).
pub fn to_pixels(t: &Tensor, range: [f32; 2]) -> Pixels {
    let [lo, hi] = range;
    let (c, h, w) = (t.channels, t.height, t.width);
    let mut data = vec![0u8; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let v = (t.data[(ch * h + y) * w + x] - lo) / (hi - lo);
                let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
                data[(y * w + x) * c + ch] = (v * 255.0 + 0.5) as u8;
            }
        }
    }
    Pixels {
        channels: c,
        height: h,
        width: w,
        data,
    }
}

/// A pixel mask `(H, W)`, true = regenerate.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Row-major, true where the image is to be regenerated.
    pub data: Vec<bool>,
}

/// Reads a mask PNG: white (luma >= 128) marks pixels to regenerate, black keeps them. Its
/// size must match the image's.
pub fn load_mask(path: &Path, width: usize, height: usize) -> Result<Mask> {
    let img = decode_bounded(|| file_reader(path), path, "mask", Bound::Exactly([width, height]))?;
    Ok(white_mask(&img))
}

/// White (luma >= 128) = regenerate.
fn white_mask(img: &::image::DynamicImage) -> Mask {
    let data = img.to_luma8().into_raw().into_iter().map(|v| v >= 128).collect();
    Mask {
        height: img.height() as usize,
        width: img.width() as usize,
        data,
    }
}

/// Like [`load_mask`], for a PNG held in memory; `field` names it in errors (`mask`).
pub fn mask_from_png(bytes: &[u8], width: usize, height: usize, field: &str) -> Result<Mask> {
    Ok(white_mask(&decode_mask(bytes, width, height, field)?))
}

/// A mask PNG held in memory, decoded only if its header says `width` x `height`.
fn decode_mask(bytes: &[u8], width: usize, height: usize, field: &str) -> Result<::image::DynamicImage> {
    decode_bounded(
        memory_reader(bytes),
        Path::new(field),
        "mask",
        Bound::Exactly([width, height]),
    )
}

/// The OpenAI images API's mask convention: the fully transparent pixels (alpha 0) of a PNG of
/// `width` x `height` are the ones to regenerate. `field` names it in errors (`mask`, or `image`
/// when the image's own alpha is the mask). A PNG without an alpha channel marks nothing: an
/// error that says so.
pub fn mask_from_alpha(bytes: &[u8], width: usize, height: usize, field: &str) -> Result<Mask> {
    let img = decode_mask(bytes, width, height, field)?;
    if !img.color().has_alpha() {
        return Err(Error::Image {
            path: field.into(),
            message: "has no alpha channel: mark the pixels to regenerate fully transparent (alpha 0)".into(),
        });
    }
    let data = img.to_rgba8().pixels().map(|p| p.0[3] == 0).collect();
    Ok(Mask { height, width, data })
}

/// A rectangular mask `x,y,w,h` in pixels, clipped to nothing: it must lie inside the image.
pub fn rect_mask(rect: [usize; 4], width: usize, height: usize) -> Result<Mask> {
    let [x, y, w, h] = rect;
    // Checked sums: x + w must not wrap past the image.
    let inside = |at: usize, len: usize, side: usize| at.checked_add(len).is_some_and(|end| end <= side);
    if w == 0 || h == 0 || !inside(x, w, width) || !inside(y, h, height) {
        return Err(Error::param(
            Param::Rect,
            format!("{x},{y},{w},{h} (x,y,w,h) must be non-empty and inside the {width}x{height} image"),
        ));
    }
    let mut data = vec![false; width * height];
    for row in y..y + h {
        data[row * width + x..row * width + x + w].fill(true);
    }
    Ok(Mask { height, width, data })
}

/// Pools a pixel mask to the token grid: a token is regenerated if any pixel of its patch is
/// (the reference prototype's rule: any touched patch is regenerated).
pub fn pool_mask(mask: &Mask, grid: [usize; 2]) -> Vec<bool> {
    let [gh, gw] = grid;
    let (ph, pw) = (mask.height / gh, mask.width / gw);
    let mut out = vec![false; gh * gw];
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.data[y * mask.width + x] {
                out[(y / ph).min(gh - 1) * gw + (x / pw).min(gw - 1)] = true;
            }
        }
    }
    out
}

/// Keeps the original pixels outside the mask: `out = mask ? generated : original`.
pub fn composite(generated: &mut Pixels, original: &Pixels, mask: &Mask) {
    let c = generated.channels;
    for (i, &m) in mask.data.iter().enumerate() {
        if !m {
            generated.data[i * c..(i + 1) * c].copy_from_slice(&original.data[i * c..(i + 1) * c]);
        }
    }
}

/// Tiles equal-size images into a grid with `columns` columns and a 2-pixel black gutter.
pub fn grid(images: &[Pixels], columns: usize) -> Pixels {
    const GAP: usize = 2;
    let first = &images[0];
    let (c, h, w) = (first.channels, first.height, first.width);
    let columns = columns.clamp(1, images.len());
    let rows = images.len().div_ceil(columns);
    let (gw, gh) = (columns * w + (columns - 1) * GAP, rows * h + (rows - 1) * GAP);
    let mut data = vec![0u8; gw * gh * c];
    for (i, img) in images.iter().enumerate() {
        let (ox, oy) = ((i % columns) * (w + GAP), (i / columns) * (h + GAP));
        for y in 0..h {
            let src = &img.data[y * w * c..(y + 1) * w * c];
            let dst = ((oy + y) * gw + ox) * c;
            data[dst..dst + w * c].copy_from_slice(src);
        }
    }
    Pixels {
        channels: c,
        height: gh,
        width: gw,
        data,
    }
}

/// Default number of grid columns for `n` images: close to square.
pub fn grid_columns(n: usize) -> usize {
    (n as f64).sqrt().ceil().max(1.0) as usize
}

/// What made an image: enough to make it again with `absorb generate --from`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// absorb version that wrote the file.
    pub absorb: String,
    /// `generate`, `inpaint` or `decode`.
    pub mode: String,
    /// Bundle name.
    pub bundle: String,
    /// sha256 of the bundle's model.json.
    pub bundle_sha256: String,
    /// Sampler name (`absorbing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// Seed of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Index of the first image in the file (its own stream under the seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// Number of images in the file (more than 1 for a grid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Grid columns when `count > 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<usize>,
    /// Reverse steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Temperature (of the first step, with a schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Temperature of the last step of a linear schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_end: Option<f32>,
    /// Nucleus (top-p) truncation, when below 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// The `threshold` sampler's threshold (that sampler only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Cached attention: a full pass every this many calls of the image (absent: exact mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<usize>,
    /// Classifier-free guidance scale (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// A variation's strength: the share of the source's tokens masked and redone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// sha256 of the source image file a variation was made from (`--from` checks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// Execution provider that ran the graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Transformer precision variant, if not fp32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Token grid `[rows, cols]` when larger than the bundle's (windowed generation, outpainting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<[usize; 2]>,
    /// Window stride `[rows, cols]` of a larger grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<[usize; 2]>,
    /// Window margin `[rows, cols]` of a larger grid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_margin: Option<[usize; 2]>,
    /// How a larger grid was decoded: `tiles` or `whole`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<String>,
    /// The class asked for (a class-conditional bundle's, by name); absent when none was given
    /// (generation spread the classes over the images by seed and index, `sampler::spread_class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

/// Writes a PNG with `meta` as JSON in a text chunk, atomically ([`crate::atomic::write`]): an
/// interrupted run never leaves a truncated PNG, and an existing file is replaced only by a
/// complete one.
pub fn write_png(path: &Path, pixels: &Pixels, meta: Option<&Metadata>) -> Result<()> {
    atomic::write(path, &png_bytes(pixels, meta)?, atomic::Temp::PNG)
}

/// Copies `src` into `dst` with its top-left corner at (`x`, `y`) (outpainting keeps the input's
/// own pixels); parts outside `dst` are cut off.
pub fn paste(dst: &mut Pixels, src: &Pixels, x: usize, y: usize) {
    let c = dst.channels.min(src.channels);
    for sy in 0..src.height.min(dst.height.saturating_sub(y)) {
        for sx in 0..src.width.min(dst.width.saturating_sub(x)) {
            let d = ((y + sy) * dst.width + x + sx) * dst.channels;
            let s = (sy * src.width + sx) * src.channels;
            dst.data[d..d + c].copy_from_slice(&src.data[s..s + c]);
        }
    }
}

/// Grey level of a still-masked token's tile in preview frames.
pub const MASKED_GREY: u8 = 128;

/// Paints the pixels of every masked token of `grid` (`token_masked`, row-major) in `p` as a flat
/// neutral tile (preview frames of the reverse process).
pub fn paint_masked(p: &mut Pixels, token_masked: &[bool], grid: [usize; 2]) {
    let (fy, fx) = (p.height / grid[0], p.width / grid[1]);
    for (i, _) in token_masked.iter().enumerate().filter(|(_, &m)| m) {
        let (r, c) = (i / grid[1], i % grid[1]);
        for y in r * fy..(r + 1) * fy {
            let row = (y * p.width + c * fx) * p.channels;
            p.data[row..row + fx * p.channels].fill(MASKED_GREY);
        }
    }
}

/// Animation container of a preview, from the file name (CLI) or its name (service: `gif`,
/// `apng`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnimationFormat {
    /// Animated GIF (palette; small, plays everywhere).
    Gif,
    /// Animated PNG (lossless; `.png` or `.apng`).
    Apng,
}

impl AnimationFormat {
    /// The name used in the service's JSON.
    pub fn name(self) -> &'static str {
        match self {
            AnimationFormat::Gif => "gif",
            AnimationFormat::Apng => "apng",
        }
    }

    /// The format `path` asks for, or an error naming `param`.
    pub fn from_path(path: &Path, param: Param) -> Result<AnimationFormat> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("gif") => Ok(AnimationFormat::Gif),
            Some("png" | "apng") => Ok(AnimationFormat::Apng),
            _ => Err(Error::param(
                param,
                format!("{} must end in .gif, .png or .apng", path.display()),
            )),
        }
    }
}

/// Encodes `frames` (all the same size) as an endlessly looping animation, `delay_ms` per frame
/// and `last_ms` on the last one.
pub fn animation_bytes(frames: &[Pixels], format: AnimationFormat, delay_ms: u16, last_ms: u16) -> Result<Vec<u8>> {
    let Some(first) = frames.first() else {
        return Err(Error::param(
            Param::Frames,
            "no step revealed anything: nothing to animate",
        ));
    };
    if frames
        .iter()
        .any(|f| (f.channels, f.height, f.width) != (first.channels, first.height, first.width))
    {
        return Err(Error::param(Param::Frames, "frames differ in size"));
    }
    let delay = |i: usize| if i + 1 == frames.len() { last_ms } else { delay_ms };
    // Encoding into memory fails only on a frame the checks above let through: a bug.
    let fail = |e: String| Error::Internal(format!("encoding the animation: {e}"));
    let mut out = Vec::new();
    match format {
        AnimationFormat::Apng => {
            let mut enc = png::Encoder::new(&mut out, first.width as u32, first.height as u32);
            enc.set_color(if first.channels == 1 {
                png::ColorType::Grayscale
            } else {
                png::ColorType::Rgb
            });
            enc.set_depth(png::BitDepth::Eight);
            enc.set_compression(png::Compression::Balanced);
            enc.set_animated(frames.len() as u32, 0)
                .map_err(|e| fail(e.to_string()))?;
            let mut w = enc.write_header().map_err(|e| fail(e.to_string()))?;
            for (i, f) in frames.iter().enumerate() {
                w.set_frame_delay(delay(i), 1000).map_err(|e| fail(e.to_string()))?;
                w.write_image_data(&f.data).map_err(|e| fail(e.to_string()))?;
            }
            w.finish().map_err(|e| fail(e.to_string()))?;
        }
        AnimationFormat::Gif => {
            use ::image::codecs::gif::{GifEncoder, Repeat};
            use ::image::{Delay, Frame, Rgba, RgbaImage};
            let mut enc = GifEncoder::new_with_speed(&mut out, 10);
            enc.set_repeat(Repeat::Infinite).map_err(|e| fail(e.to_string()))?;
            for (i, f) in frames.iter().enumerate() {
                let rgba = RgbaImage::from_fn(f.width as u32, f.height as u32, |x, y| {
                    let o = (y as usize * f.width + x as usize) * f.channels;
                    if f.channels == 1 {
                        Rgba([f.data[o], f.data[o], f.data[o], 255])
                    } else {
                        Rgba([f.data[o], f.data[o + 1], f.data[o + 2], 255])
                    }
                });
                let frame = Frame::from_parts(rgba, 0, 0, Delay::from_numer_denom_ms(delay(i) as u32, 1));
                enc.encode_frame(frame).map_err(|e| fail(e.to_string()))?;
            }
        }
    }
    Ok(out)
}

/// Encodes a PNG into memory (the service returns these bytes; same encoder as files).
pub fn png_bytes(pixels: &Pixels, meta: Option<&Metadata>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    // Into memory: no I/O can fail, so an error is a bug (pixels and metadata are checked).
    encode_png(&mut out, pixels, meta).map_err(|e| Error::Internal(format!("encoding a PNG: {e}")))?;
    Ok(out)
}

fn encode_png<W: Write>(w: W, p: &Pixels, meta: Option<&Metadata>) -> std::result::Result<(), png::EncodingError> {
    let mut enc = png::Encoder::new(w, p.width as u32, p.height as u32);
    enc.set_color(if p.channels == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    });
    enc.set_depth(png::BitDepth::Eight);
    // Fixed settings so the same pixels always give the same bytes.
    enc.set_compression(png::Compression::Balanced);
    enc.set_filter(png::Filter::Adaptive);
    if let Some(m) = meta {
        // Serialising plain strings and numbers cannot fail; an empty chunk would be caught on read.
        let json = serde_json::to_string(m).unwrap_or_default();
        enc.add_itxt_chunk(METADATA_KEY.to_string(), json)?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(&p.data)?;
    writer.finish()
}

/// Reads absorb's metadata back from a PNG.
pub fn read_metadata(path: &Path) -> Result<Metadata> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    metadata_from(std::io::BufReader::new(file), path)
}

/// [`read_metadata`] on a PNG's bytes (`path` names it in errors).
pub fn metadata_from_png(bytes: &[u8], path: &Path) -> Result<Metadata> {
    metadata_from(std::io::Cursor::new(bytes), path)
}

fn metadata_from<R: std::io::BufRead + std::io::Seek>(png: R, path: &Path) -> Result<Metadata> {
    let err = |message: String| Error::Metadata {
        path: path.to_path_buf(),
        message,
    };
    let reader = png::Decoder::new(png)
        .read_info()
        .map_err(|e| err(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    let text = info
        .utf8_text
        .iter()
        .find(|c| c.keyword == METADATA_KEY)
        .map(|c| {
            c.get_text()
                .map_err(|e| err(format!("unreadable \"{METADATA_KEY}\" text chunk: {e}")))
        })
        .or_else(|| {
            info.uncompressed_latin1_text
                .iter()
                .find(|c| c.keyword == METADATA_KEY)
                .map(|c| Ok(c.text.clone()))
        })
        .ok_or_else(|| {
            err(format!(
                "no \"{METADATA_KEY}\" text chunk: not written by absorb, or stripped by an editor"
            ))
        })??;
    serde_json::from_str(&text).map_err(|e| err(format!("malformed absorb metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec {
            channels: 1,
            height: 4,
            width: 4,
            range: [0.0, 1.0],
        }
    }

    #[test]
    fn pixels_survive_a_tensor_round_trip() {
        let p = Pixels {
            channels: 1,
            height: 4,
            width: 4,
            data: (0..16).map(|i| (i * 17) as u8).collect(),
        };
        assert_eq!(to_pixels(&to_tensor(&p, &spec()), [0.0, 1.0]), p);
    }

    #[test]
    fn out_of_range_and_nan_values_are_clamped() {
        let t = Tensor {
            channels: 1,
            height: 1,
            width: 3,
            data: vec![-0.5, 1.7, f32::NAN],
        };
        assert_eq!(to_pixels(&t, [0.0, 1.0]).data, vec![0, 255, 0]);
    }

    #[test]
    fn any_touched_patch_is_masked() {
        let mut m = Mask {
            height: 8,
            width: 8,
            data: vec![false; 64],
        };
        m.data[3 * 8 + 5] = true; // pixel (x 5, y 3) -> token (row 0, col 1) in a 2x2 grid of 4x4 patches
        assert_eq!(pool_mask(&m, [2, 2]), vec![false, true, false, false]);
    }

    #[test]
    fn rect_masks_must_lie_inside_the_image() {
        assert!(rect_mask([0, 0, 4, 4], 4, 4).is_ok());
        let e = rect_mask([2, 0, 3, 1], 4, 4).unwrap_err().to_string();
        assert!(e.starts_with("invalid rect"), "{e}");
        assert!(rect_mask([0, 0, 0, 1], 4, 4).is_err());
    }

    #[test]
    fn metadata_round_trips_through_a_png_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.png");
        let p = Pixels {
            channels: 1,
            height: 2,
            width: 2,
            data: vec![0, 64, 128, 255],
        };
        let meta = Metadata {
            absorb: "0".into(),
            mode: "generate".into(),
            bundle: "b".into(),
            bundle_sha256: "ab".into(),
            sampler: Some("absorbing".into()),
            seed: Some(u64::MAX),
            index: Some(3),
            count: Some(1),
            columns: None,
            steps: Some(5),
            temperature: Some(0.9),
            temperature_end: None,
            top_p: None,
            threshold: None,
            cache: None,
            guidance: Some(2.5),
            strength: Some(0.25),
            source_sha256: Some("cd".into()),
            provider: Some("cpu".into()),
            variant: None,
            grid: Some([8, 16]),
            stride: Some([4, 4]),
            window_margin: Some([1, 1]),
            decode: Some("tiles".into()),
            class: Some("7".into()),
        };
        write_png(&path, &p, Some(&meta)).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "output is readable by others: {mode:o}");
    }

    #[test]
    fn a_png_without_metadata_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.png");
        write_png(
            &path,
            &Pixels {
                channels: 1,
                height: 1,
                width: 1,
                data: vec![9],
            },
            None,
        )
        .unwrap();
        let e = read_metadata(&path).unwrap_err().to_string();
        assert!(e.contains("no \"absorb\" text chunk"), "{e}");
    }

    #[test]
    fn masked_tokens_are_painted_grey_and_paste_copies_a_region() {
        let mut p = Pixels {
            channels: 1,
            height: 4,
            width: 4,
            data: vec![7; 16],
        };
        // 2x2 tokens of 2x2 pixels; token 1 (top right) masked.
        paint_masked(&mut p, &[false, true, false, false], [2, 2]);
        assert_eq!(
            p.data[..8],
            [7, 7, MASKED_GREY, MASKED_GREY, 7, 7, MASKED_GREY, MASKED_GREY]
        );
        assert!(p.data[8..].iter().all(|&v| v == 7));
        let src = Pixels {
            channels: 1,
            height: 2,
            width: 2,
            data: vec![1, 2, 3, 4],
        };
        paste(&mut p, &src, 3, 3);
        assert_eq!(p.data[15], 1, "cut off at the edge");
        assert_eq!(p.data[14], 7);
    }

    #[test]
    fn animations_hold_one_frame_per_image_in_both_formats() {
        let frames: Vec<Pixels> = (0..5u8)
            .map(|i| Pixels {
                channels: 1,
                height: 3,
                width: 4,
                data: vec![i * 40; 12],
            })
            .collect();
        let apng = animation_bytes(&frames, AnimationFormat::Apng, 100, 1500).unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(&apng)).read_info().unwrap();
        assert_eq!(reader.info().animation_control().map(|a| a.num_frames), Some(5));
        let gif = animation_bytes(&frames, AnimationFormat::Gif, 100, 1500).unwrap();
        use ::image::AnimationDecoder;
        let decoded = ::image::codecs::gif::GifDecoder::new(std::io::Cursor::new(gif))
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap();
        assert_eq!(decoded.len(), 5);
        assert_eq!(decoded[2].buffer().get_pixel(1, 1).0[0], 80);
        let e = animation_bytes(&[], AnimationFormat::Gif, 100, 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to animate"), "{e}");
        let e = AnimationFormat::from_path(Path::new("x.jpg"), Param::Frames)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".gif"), "{e}");
    }
}
