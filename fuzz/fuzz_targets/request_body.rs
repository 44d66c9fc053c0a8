//! Every service request body: the first byte picks the route (generate, inpaint, outpaint), the
//! rest is the body, parsed and checked with the service's default limits, then made into a job
//! (images decoded) exactly as a handler does.
#![no_main]

use absorb::server::requests::{self, Route};
use absorb::server::Limits;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = match pick % 4 {
        0 => Route::Generate,
        1 => Route::Inpaint,
        2 => Route::Outpaint,
        _ => Route::Vary,
    };
    let bundle = common::digits();
    if let Ok(parsed) = requests::parse(route, bundle, &Limits::default(), body) {
        let _ = parsed.into_job(bundle);
    }
});
