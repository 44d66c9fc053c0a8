//! Shard `I` of `M`: one worker's contiguous part of a request for a directory, and the names
//! of the files that part writes.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::param::Param;

/// Shard `index` of `count`: one worker's part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// `I`, in `0..count`.
    pub index: u64,
    /// `M`, 1 or more.
    pub count: u64,
}

impl Shard {
    /// The whole request: what a run without sharding makes.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`, checked; errors name `what` (the flag or variable).
    pub fn new(index: u64, count: u64, what: Param) -> Result<Shard> {
        if count == 0 {
            return Err(Error::param(what, "the shard count is 0: use 1 or more"));
        }
        if index >= count {
            return Err(Error::param(
                what,
                format!(
                    "shard {index} of {count} does not exist: shards are numbered 0 to {}",
                    count - 1
                ),
            ));
        }
        Ok(Shard { index, count })
    }

    /// Parses `I/M` (`--shard`).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = || {
            Error::param(
                Param::Shard,
                format!("\"{s}\" is not I/M (shard I of M, 0 <= I < M), e.g. 0/3"),
            )
        };
        let (i, m) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse::<u64>().map_err(|_| bad())?;
        let m = m.trim().parse::<u64>().map_err(|_| bad())?;
        Shard::new(i, m, Param::Shard)
    }

    /// This shard's indices of a request for `count` images from `first` on.
    pub fn indices(&self, first: u64, count: u64) -> Range<u64> {
        // u128: count * index must not overflow for any u64 count. (`run` refuses a request that
        // runs past u64::MAX; saturating keeps this total.)
        let at = |k: u64| first.saturating_add((u128::from(count) * u128::from(k) / u128::from(self.count)) as u64);
        at(self.index)..at(self.index + 1)
    }

    /// `IIIII-of-MMMMM`, as in file names.
    fn tag(&self) -> String {
        format!("{:05}-of-{:05}", self.index, self.count)
    }

    /// The manifest this shard writes for `seed`.
    pub fn manifest_name(&self, seed: u64) -> String {
        format!("manifest-{seed}-{}.jsonl", self.tag())
    }

    /// Prefix of this shard's temporary files.
    pub(super) fn temp_prefix(&self, seed: u64) -> String {
        format!(".absorb-{seed}-{}-", self.tag())
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_indices_in_contiguous_blocks() {
        for count in [0u64, 1, 2, 5, 24, 100, 1001] {
            for m in [1u64, 2, 3, 7, 64] {
                let mut next = 10;
                for i in 0..m {
                    let r = Shard::new(i, m, Param::Shard).unwrap().indices(10, count);
                    assert_eq!(r.start, next, "shard {i}/{m} of {count} starts where the last ended");
                    let len = r.end - r.start;
                    assert!(len == count / m || len == count / m + 1, "balanced: {i}/{m} of {count}");
                    next = r.end;
                }
                assert_eq!(next, 10 + count, "{m} shards cover all {count} images");
            }
        }
        assert_eq!(Shard::WHOLE.indices(3, 5), 3..8);
        assert_eq!(Shard::new(1, 3, Param::Shard).unwrap().indices(0, 24), 8..16);
    }

    #[test]
    fn a_huge_count_does_not_overflow_the_split() {
        let r = Shard::new(2, 3, Param::Shard).unwrap().indices(0, u64::MAX);
        assert_eq!(r.end, u64::MAX);
    }

    #[test]
    fn shard_flags_parse_or_say_what_is_wrong() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        assert_eq!(Shard::parse(" 0 / 1 ").unwrap(), Shard::WHOLE);
        for (bad, needle) in [
            ("3/3", "shard 3 of 3 does not exist: shards are numbered 0 to 2"),
            ("0/0", "the shard count is 0"),
            ("1", "is not I/M"),
            ("a/3", "is not I/M"),
            ("-1/3", "is not I/M"),
            ("1/3/4", "is not I/M"),
        ] {
            let e = Shard::parse(bad).unwrap_err();
            assert!(e.is_input_error());
            let e = e.to_string();
            assert!(e.starts_with("invalid shard: ") && e.contains(needle), "{bad}: {e}");
        }
    }
}
