//! Which shard a `generate` run into a directory makes: `--shard I/M`, else a Kubernetes
//! Indexed Job's environment, else the whole request.

use absorb::batch::Shard;
use absorb::{Error, Param, Result};

/// Set by Kubernetes in each pod of an Indexed Job: the pod's completion index, used as the shard.
pub const JOB_INDEX_VAR: &str = "JOB_COMPLETION_INDEX";

/// The shard count when the shard index comes from [`JOB_INDEX_VAR`] (or `--shards M`).
pub const SHARDS_VAR: &str = "ABSORB_SHARDS";

/// The shard a `generate` run makes: `--shard I/M`; else, in a Kubernetes Indexed Job,
/// [`JOB_INDEX_VAR`] of `--shards M` or [`SHARDS_VAR`]; else none (the whole request). Sharding
/// needs a directory output and an explicit seed (`seeded`): every worker must draw from the same
/// streams. The environment is only read for a directory output. `env` looks a variable up.
pub fn resolve_shard(
    shard: Option<Shard>,
    shards: Option<u64>,
    dir_output: bool,
    seeded: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Shard>> {
    if !dir_output {
        if shard.is_some() || shards.is_some() {
            return Err(Error::param(
                Param::Shard,
                "--shard and --shards need a directory output (--out DIR/): a .png file holds one grid",
            ));
        }
        return Ok(None);
    }
    let number = |param: Param| -> Result<Option<u64>> {
        match env(param.key()) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Error::param(param, format!("\"{v}\" is not a non-negative integer"))),
        }
    };
    let resolved = match shard {
        Some(s) => Some(s),
        None => {
            let index = number(Param::JobIndexVar)?;
            let (count, count_name) = match shards {
                Some(m) => (Some(m), Param::Shards),
                None => (number(Param::ShardsVar)?, Param::ShardsVar),
            };
            match (index, count) {
                (None, None) => None,
                (Some(i), Some(m)) => Some(Shard::new(i, m, count_name).map_err(|e| match e {
                    Error::Param { message, .. } => {
                        Error::param(count_name, format!("{message} ({JOB_INDEX_VAR}={i}, shard count {m})"))
                    }
                    e => e,
                })?),
                (Some(i), None) => {
                    return Err(Error::param(
                        Param::JobIndexVar,
                        format!(
                            "set to {i} (a Kubernetes Indexed Job) but the shard count is not: pass \
                             --shards M or set {SHARDS_VAR} to the Job's completions"
                        ),
                    ))
                }
                (None, Some(m)) => {
                    return Err(Error::param(
                        count_name,
                        format!(
                            "{m} shards but no shard index: {JOB_INDEX_VAR} is not set (it is in a Kubernetes \
                             Indexed Job); elsewhere pass --shard I/M"
                        ),
                    ))
                }
            }
        }
    };
    if resolved.is_some() && !seeded {
        return Err(Error::param(
            Param::Seed,
            "a sharded run needs an explicit --seed: each worker would otherwise pick its own random seed \
             and the shards would not fit together",
        ));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_shard_comes_from_the_flag_then_the_indexed_job() {
        let s = |i, m| Some(Shard { index: i, count: m });
        let job = |name: &str| match name {
            JOB_INDEX_VAR => Some("2".to_string()),
            SHARDS_VAR => Some("5".to_string()),
            _ => None,
        };
        assert_eq!(resolve_shard(None, None, true, false, &no_env).unwrap(), None);
        assert_eq!(resolve_shard(s(1, 3), None, true, true, &no_env).unwrap(), s(1, 3));
        assert_eq!(
            resolve_shard(s(1, 3), None, true, true, &job).unwrap(),
            s(1, 3),
            "the flag wins"
        );
        assert_eq!(resolve_shard(None, None, true, true, &job).unwrap(), s(2, 5));
        assert_eq!(
            resolve_shard(None, Some(4), true, true, &job).unwrap(),
            s(2, 4),
            "--shards wins"
        );
        // A .png output ignores the environment but refuses the flags.
        assert_eq!(resolve_shard(None, None, false, false, &job).unwrap(), None);
        let e = resolve_shard(s(0, 2), None, false, true, &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a directory output"), "{e}");
    }

    #[test]
    fn bad_shard_settings_are_errors_naming_the_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let err = |shards, pairs, seeded| {
            let e = resolve_shard(None, shards, true, seeded, &env(pairs)).unwrap_err();
            assert!(e.is_input_error());
            e.to_string()
        };
        let e = err(None, &[(JOB_INDEX_VAR, "1")], true);
        assert!(
            e.starts_with("invalid JOB_COMPLETION_INDEX: set to 1") && e.contains("--shards M"),
            "{e}"
        );
        let e = err(None, &[(JOB_INDEX_VAR, "x1")], true);
        assert!(e.starts_with("invalid JOB_COMPLETION_INDEX: \"x1\""), "{e}");
        let e = err(None, &[(JOB_INDEX_VAR, "1"), (SHARDS_VAR, "many")], true);
        assert!(e.starts_with("invalid ABSORB_SHARDS: \"many\""), "{e}");
        let e = err(None, &[(JOB_INDEX_VAR, "3"), (SHARDS_VAR, "3")], true);
        assert!(
            e.contains("shard 3 of 3 does not exist") && e.contains("JOB_COMPLETION_INDEX=3"),
            "{e}"
        );
        let e = err(Some(0), &[(JOB_INDEX_VAR, "0")], true);
        assert!(e.starts_with("invalid shards: the shard count is 0"), "{e}");
        let e = err(Some(3), &[], true);
        assert!(
            e.contains("JOB_COMPLETION_INDEX is not set") && e.contains("--shard I/M"),
            "{e}"
        );
        let e = err(None, &[(SHARDS_VAR, "3")], true);
        assert!(
            e.starts_with("invalid ABSORB_SHARDS: 3 shards but no shard index"),
            "{e}"
        );
        let e = err(None, &[(JOB_INDEX_VAR, "0"), (SHARDS_VAR, "3")], false);
        assert!(
            e.starts_with("invalid seed: a sharded run needs an explicit --seed"),
            "{e}"
        );
    }
}
