//! `absorb serve`: the flags become the service's options (`absorb::server`).

use anyhow::{Context, Result};

use super::args::ServeArgs;
use super::{model_dir, provider_config, runtime_options};

pub fn serve(a: ServeArgs) -> Result<()> {
    // Neither --model nor --models: the bundled default.
    let models = if a.common.model.is_empty() && a.models.is_empty() {
        vec![model_dir(&a.common)]
    } else {
        a.common.model.clone()
    };
    let shown: Vec<String> = models
        .iter()
        .chain(&a.models)
        .map(|d| d.display().to_string())
        .collect();
    let options = absorb::server::ServeOptions {
        sources: absorb::server::registry::Sources {
            models,
            dirs: a.models.clone(),
            variant: a.common.variant.clone(),
        },
        max_loaded: a.max_loaded,
        memory_budget: a.memory_budget.map(|mib| mib << 20),
        runtime: runtime_options(&a.common),
        // The same provider settings as every command; TensorRT profiles cover the service's batches.
        provider: provider_config(&a.common, a.max_batch, Some([a.max_grid, a.max_grid])),
        listen: a.listen,
        limits: absorb::server::Limits {
            max_queue: a.max_queue,
            max_batch: a.max_batch,
            max_count: a.max_count,
            max_steps: Some(a.max_steps),
            max_body_bytes: a.max_body,
            timeout_ms: a.timeout_ms,
            max_grid: a.max_grid,
            header_timeout_ms: a.header_timeout_ms,
            body_timeout_ms: a.body_timeout_ms,
            max_connections: a.max_connections,
            drain_timeout_ms: a.drain_timeout_ms,
            max_jobs: a.max_jobs,
            job_keep_s: a.job_keep_s,
        },
    };
    absorb::server::serve(options).with_context(|| format!("serving the models of {}", shown.join(", ")))
}
