//! An image and a mask PNG (`inpaint`, `outpaint`, the service's base64 fields): bounded decoding,
//! then the inpainting job built from both. The first byte picks the input: two raw PNGs (even;
//! the image's length in the next two bytes), or two valid PNGs built from fuzzed sizes, colour
//! types and pixels (odd).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let Some((image_png, mask_png)) = common::split2(data) else {
        return;
    };
    let built;
    let (image_png, mask_png) = if pick & 1 == 1 {
        let (Some(i), Some(m)) = (common::png_from(image_png, None), common::png_from(mask_png, None)) else {
            return;
        };
        built = (i, m);
        (&built.0[..], &built.1[..])
    } else {
        (image_png, mask_png)
    };
    let bundle = common::digits();
    let spec = &bundle.manifest().image;
    let _ = absorb::image::image_any_from_png(image_png, spec, "image", [256, 256]);
    let image = absorb::image::image_from_png(image_png, spec, "image");
    let mask = absorb::image::mask_from_png(mask_png, spec.width, spec.height, "mask");
    if let (Ok(image), Ok(mask)) = (image, mask) {
        let _ = absorb::InpaintSpec::new(image, mask).job(bundle);
    }
});
