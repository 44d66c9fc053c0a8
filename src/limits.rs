//! Every cap on what a user's number may ask for, in one place. Each is checked where the number
//! enters (a flag, a JSON field, a token file, a PNG's metadata, an image header), before any
//! arithmetic or allocation it would drive, and an error names the flag or field, the value and
//! the limit. The README's "Limits" table lists them with their defaults; the service has its own,
//! smaller, per-request limits on top ([`crate::server::Limits`]).

use crate::error::{Error, Result};
use crate::param::Param;

/// Images in one PNG (a sheet): `generate --count` with a `.png` output, a PNG's `count`.
pub const MAX_SHEET_IMAGES: usize = 1024;

/// Images in one run into a directory (`generate --count N -o DIR/`).
pub const MAX_IMAGES: usize = 1_000_000;

/// Tokens per side of a grid (`--grid`, a larger canvas, an outpainted image): keeps memory
/// bounded, 1024 x 1024 codes.
pub const MAX_GRID_SIDE: usize = 1024;

/// Largest temperature accepted. Far above anything useful (softmax is nearly uniform well
/// before), it only keeps nonsense out.
pub const MAX_TEMPERATURE: f32 = 1000.0;

/// Largest classifier-free guidance scale accepted (`--guidance`): useful scales are under 10;
/// far beyond, the logits only grow until one code takes every draw.
pub const MAX_GUIDANCE: f32 = 100.0;

/// Largest codebook a manifest may declare (the transformer's logits are `codebook_size` floats
/// per position; 2^24 keeps every id exact in an f32 and far above any real VQGAN's).
pub const MAX_CODEBOOK: usize = 1 << 24;

/// Most classes a manifest may list.
pub const MAX_CLASSES: usize = 10_000;

/// Pixels per side of any image absorb reads or writes (inputs are refused from their header).
pub const MAX_IMAGE_SIDE: usize = 8192;

/// Pixels per side of a grid decoded in one piece (`--decode whole`, `absorb decode`): the
/// decoder's activations grow with the square of it (measured on the digits bundle: 128 px
/// 54 MB, 256 px 186 MB, 512 px 2.2 GB peak RSS).
pub const MAX_WHOLE_DECODE_SIDE: usize = 256;

/// Sheet width and height in pixels (a PNG of [`MAX_SHEET_IMAGES`] paper-size images fits).
pub const MAX_SHEET_SIDE: usize = 16384;

/// Intra-op threads (`--threads`).
pub const MAX_THREADS: usize = 256;

/// Images (or windows) per transformer call (`--max-batch`): the logits of one call are
/// `batch x tokens x codebook` floats.
pub const MAX_BATCH: usize = 256;

/// Bytes of a token file (`absorb decode --tokens`), checked before it is read: the largest grid
/// that can be decoded in one piece, pretty-printed, is well under 2 MiB.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4 << 20;

/// Jobs waiting in the service's queue (`serve --max-queue`).
pub const MAX_QUEUE: usize = 4096;

/// Client connections the service holds open at once (`serve --max-connections`); each costs a
/// file descriptor and a few KiB.
pub const MAX_CONNECTIONS: usize = 65_536;

/// Asynchronous jobs the service holds (`serve --max-jobs`); a finished one keeps its PNGs in
/// memory until it expires.
pub const MAX_JOBS: usize = 4096;

/// Request body of the service (`serve --max-body`).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// `value` if it is in `1..=max`, else an error naming `name` (the flag or field).
pub fn check_range(name: Param, value: usize, max: usize) -> Result<usize> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Error::param(
            name,
            format!("{value} is out of range: must be 1..={max}"),
        ))
    }
}

/// Most calls between two full passes of a cached run (`--cache N`): a full pass at least this
/// often (a larger N would be a cache that is never refreshed within any run absorb allows).
pub const MAX_CACHE_PERIOD: usize = 1 << 16;

/// `first + count` images must have indices that fit in a u64: the last index is
/// `first + count - 1`.
pub fn check_indices(name: Param, first: u64, count: usize) -> Result<()> {
    let last = (count as u64).checked_sub(1).and_then(|c| first.checked_add(c));
    if last.is_none() {
        return Err(Error::param(
            name,
            format!(
                "{first} with {count} images runs past the largest index {}: use at most {}",
                u64::MAX,
                u64::MAX - (count as u64).saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// `a * b`, or an error naming `name` when it overflows or exceeds `max`.
pub fn checked_product(name: Param, a: usize, b: usize, max: usize, what: &str) -> Result<usize> {
    match a.checked_mul(b) {
        Some(p) if p <= max => Ok(p),
        _ => Err(Error::param(
            name,
            format!("{a} x {b} {what} is above the limit of {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_indices_are_checked_at_every_edge() {
        assert!(check_range(Param::Count, 0, 4).is_err());
        assert_eq!(check_range(Param::Count, 1, 4).unwrap(), 1);
        assert_eq!(check_range(Param::Count, 4, 4).unwrap(), 4);
        assert!(check_range(Param::Count, 5, 4).is_err());
        assert!(check_range(Param::Count, usize::MAX, 4).is_err());
        assert!(check_indices(Param::FirstIndex, u64::MAX, 1).is_ok());
        assert!(check_indices(Param::FirstIndex, u64::MAX, 2).is_err());
        assert!(check_indices(Param::FirstIndex, u64::MAX - 1, 2).is_ok());
        assert!(check_indices(Param::FirstIndex, 0, usize::MAX).is_ok());
        assert!(check_indices(Param::FirstIndex, 1, usize::MAX).is_ok());
        let e = check_indices(Param::FirstIndex, u64::MAX, 3).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid first_index:") && e.contains("18446744073709551613"),
            "{e}"
        );
        assert!(checked_product(Param::Grid, usize::MAX, 2, usize::MAX, "tokens").is_err());
        assert_eq!(checked_product(Param::Grid, 3, 4, 12, "tokens").unwrap(), 12);
        assert!(checked_product(Param::Grid, 3, 4, 11, "tokens").is_err());
    }
}
