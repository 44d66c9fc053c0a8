//! `model.json`: parse and validate (`Bundle::load` does this before touching any graph).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = absorb::bundle::parse_manifest(data, std::path::Path::new("model.json"));
});
