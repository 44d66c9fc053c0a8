//! A PNG's absorb metadata, then the job `generate --from PNG` would build from it. The first
//! byte picks the input: raw PNG bytes (even) or fuzzed metadata text inside a valid PNG (odd).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("input.png");
    let png = match data.split_first() {
        Some((k, text)) if k & 1 == 1 => match common::png_from(&[1, 1, 0], Some(&String::from_utf8_lossy(text))) {
            Some(png) => png,
            None => return,
        },
        _ => data.to_vec(),
    };
    let Ok(meta) = absorb::image::metadata_from_png(&png, path) else {
        return;
    };
    let bundle = common::digits();
    if let Ok(spec) = absorb::GenerateSpec::from_metadata(bundle, "cpu", path, &meta) {
        if let Ok(job) = spec.job(bundle) {
            let _ = job.metadata(bundle, "cpu", 0, 1);
        }
    }
});
