//! Every parameter a user can give absorb, with its one spelling per edge: the flag on the
//! command line (`--window-margin`), the key in the service's JSON and in PNG metadata
//! (`window_margin`). The library names a parameter only through [`Param`]; each edge spells it
//! the way its caller wrote it (the CLI in `src/cli/`, the service in `src/server/routes.rs`,
//! `--from` in [`crate::job`]). A new parameter is one line in [`PARAMS`].

use std::fmt;

/// A user-facing parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each is documented by its flag's help and the README's tables
pub enum Param {
    Seed,
    Count,
    FirstIndex,
    Columns,
    Steps,
    Temperature,
    TemperatureEnd,
    TopP,
    Threshold,
    Guidance,
    Cache,
    Strength,
    Sampler,
    Class,
    Grid,
    Size,
    Stride,
    WindowMargin,
    Decode,
    DecodeAll,
    Frames,
    Extend,
    OutpaintEdge,
    Image,
    Mask,
    Rect,
    Tokens,
    MaxBatch,
    Threads,
    Shard,
    Shards,
    JobIndexVar,
    ShardsVar,
    Out,
    Variant,
    Rows,
    MaxQueue,
    MaxCount,
    MaxSteps,
    MaxBody,
    MaxConnections,
    HeaderTimeoutMs,
    BodyTimeoutMs,
    MaxJobs,
    Model,
    Models,
    MaxLoaded,
    MemoryBudget,
    JobType,
}

/// `(param, JSON and metadata key, command-line flag)`; the flag is `None` where the command line
/// has no such flag (the service's own fields).
const PARAMS: &[(Param, &str, Option<&str>)] = &[
    (Param::Seed, "seed", Some("--seed")),
    (Param::Count, "count", Some("--count")),
    (Param::FirstIndex, "first_index", Some("--first-index")),
    (Param::Columns, "columns", Some("--columns")),
    (Param::Steps, "steps", Some("--steps")),
    (Param::Temperature, "temperature", Some("--temperature")),
    // The command line gives both ends in one flag: `-t START:END`.
    (Param::TemperatureEnd, "temperature_end", Some("--temperature")),
    (Param::TopP, "top_p", Some("--top-p")),
    (Param::Threshold, "threshold", Some("--threshold")),
    (Param::Guidance, "guidance", Some("--guidance")),
    (Param::Cache, "cache", Some("--cache")),
    (Param::Strength, "strength", Some("--strength")),
    (Param::Sampler, "sampler", Some("--sampler")),
    (Param::Class, "class", Some("--class")),
    (Param::Grid, "grid", Some("--grid")),
    (Param::Size, "size", Some("--size")),
    (Param::Stride, "stride", Some("--stride")),
    (Param::WindowMargin, "window_margin", Some("--window-margin")),
    (Param::Decode, "decode", Some("--decode")),
    (Param::DecodeAll, "decode_all", Some("--decode-all")),
    (Param::Frames, "frames", Some("--frames")),
    (Param::Extend, "extend", Some("--extend")),
    (Param::OutpaintEdge, "outpaint_edge", Some("--outpaint-edge")),
    (Param::Image, "image", Some("--image")),
    (Param::Mask, "mask", Some("--mask")),
    (Param::Rect, "rect", Some("--rect")),
    (Param::Tokens, "tokens", Some("--tokens")),
    (Param::MaxBatch, "max_batch", Some("--max-batch")),
    (Param::Threads, "threads", Some("--threads")),
    (Param::Shard, "shard", Some("--shard")),
    (Param::Shards, "shards", Some("--shards")),
    // Environment variables (a Kubernetes Indexed Job), spelled the same everywhere.
    (Param::JobIndexVar, "JOB_COMPLETION_INDEX", None),
    (Param::ShardsVar, "ABSORB_SHARDS", None),
    (Param::Out, "out", Some("--out")),
    (Param::Variant, "variant", Some("--variant")),
    (Param::Rows, "rows", Some("--rows")),
    (Param::MaxQueue, "max_queue", Some("--max-queue")),
    (Param::MaxCount, "max_count", Some("--max-count")),
    (Param::MaxSteps, "max_steps", Some("--max-steps")),
    (Param::MaxBody, "max_body", Some("--max-body")),
    (Param::MaxConnections, "max_connections", Some("--max-connections")),
    (Param::HeaderTimeoutMs, "header_timeout_ms", Some("--header-timeout-ms")),
    (Param::BodyTimeoutMs, "body_timeout_ms", Some("--body-timeout-ms")),
    (Param::MaxJobs, "max_jobs", Some("--max-jobs")),
    (Param::Model, "model", Some("--model")),
    (Param::Models, "models", Some("--models")),
    (Param::MaxLoaded, "max_loaded", Some("--max-loaded")),
    (Param::MemoryBudget, "memory_budget", Some("--memory-budget")),
    (Param::JobType, "type", None),
];

impl Param {
    fn entry(self) -> &'static (Param, &'static str, Option<&'static str>) {
        // The table is in declaration order, one row per variant (tested below).
        &PARAMS[self as usize]
    }

    /// The key in the service's JSON and in PNG metadata: `window_margin`. Also the library's
    /// own name for it, in messages no edge has spelled yet.
    pub fn key(self) -> &'static str {
        self.entry().1
    }

    /// The command line's flag, `--window-margin`; the key for the service's own fields.
    pub fn flag(self) -> &'static str {
        self.entry().2.unwrap_or(self.key())
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_param_has_one_row_and_distinct_spellings() {
        let mut keys = std::collections::BTreeSet::new();
        for (i, (p, key, flag)) in PARAMS.iter().enumerate() {
            assert_eq!(*p as usize, i, "{p:?}: the table is in declaration order");
            assert!(keys.insert(*key), "key {key} twice");
            assert!(!key.contains('-'), "{key}: JSON keys use _");
            if let Some(f) = flag {
                assert!(f.starts_with("--") && !f.contains('_'), "{f}");
            }
        }
        assert_eq!(PARAMS.len(), Param::JobType as usize + 1);
        assert_eq!(Param::WindowMargin.flag(), "--window-margin");
        assert_eq!(Param::WindowMargin.key(), "window_margin");
        assert_eq!(Param::JobType.flag(), "type");
    }
}
