//! The token JSON `absorb decode` reads, then the decode job built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let bundle = common::digits();
    if let Ok((grid, tokens)) = absorb::tokens::TokenFile::parse(data, bundle) {
        let _ = absorb::Job::decode(bundle, grid, vec![tokens]);
    }
});
