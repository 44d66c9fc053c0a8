//! The state the routes and the worker share: the queue between them and what travels on it (a
//! job, its reply channel, its answer), the bundle, the limits, metrics, request ids and the
//! asynchronous jobs. Routes put work in ([`Shared::submit`]); the worker (`worker.rs`) takes it
//! out. Neither knows the other's file.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::registry::{Catalog, Sources};
use super::Limits;
use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::image::AnimationFormat;
use crate::job::{Job, Start};
use crate::Pipeline;

/// What a job's client gets: one PNG per image, then the animation when asked for.
#[derive(Debug)]
pub struct Answer {
    /// PNG bytes per image, each with its own metadata.
    pub pngs: Vec<Vec<u8>>,
    /// The animation of the reverse process, encoded.
    pub animation: Option<Vec<u8>>,
}

/// Where a job's answer (or its error) goes.
pub type Reply = oneshot::Sender<Result<Answer>>;

/// A job and how to answer it.
pub struct Work {
    /// The request's id (logs, `x-request-id`).
    pub id: u64,
    /// What to make.
    pub job: Job,
    /// The animation's format when the job records frames.
    pub animation: Option<AnimationFormat>,
    /// Where the answer goes.
    pub reply: Reply,
    /// An asynchronous job's entry, told when the job starts and after every transformer call.
    pub progress: Option<Arc<super::tasks::Entry>>,
    /// The bundle the job is for (held: a reload meanwhile does not change it).
    pub model: Arc<Model>,
}

impl Work {
    /// Runs with others of equal settings: images from all-masked grids of the bundle's size,
    /// no preview, nobody watching its progress (merged jobs share their transformer calls).
    pub(super) fn batchable(&self) -> bool {
        matches!(self.job.start(), Start::Masked)
            && self.job.tiling().is_none()
            && !self.job.records_frames()
            && self.progress.is_none()
    }
}

/// What the queue carries: work, or the signal to stop once the work before it is done.
pub(super) enum Item {
    Work(Box<Work>),
    Stop,
}

/// An item and when it was queued.
pub(super) struct Queued {
    pub(super) item: Item,
    pub(super) accepted: Instant,
}

/// State shared by the handlers and the worker.
pub struct Shared {
    pub(super) queue: SyncSender<Queued>,
    /// Request and queue limits.
    pub limits: Limits,
    /// The bundles (their manifests validate requests without the pipelines); replaced whole
    /// by a reload.
    catalog: std::sync::RwLock<Arc<Catalog>>,
    /// Where the bundles come from, read again by a reload.
    pub sources: Sources,
    /// The bundles the worker has loaded now (directory and model.json sha256).
    pub(super) loaded: std::sync::Mutex<Vec<super::registry::Key>>,
    /// Held while the bundle list is read again: one reload at a time.
    reloading: std::sync::Mutex<()>,
    /// The provider the graphs run on, as recorded in PNG metadata.
    pub provider: String,
    /// What `/v1/model` says besides the bundle: provider, ONNX Runtime, CPU, samplers.
    runtime_info: serde_json::Value,
    /// False once the worker thread has ended.
    pub worker_alive: AtomicBool,
    /// Serving, draining after SIGTERM, or past the drain deadline (see `connections.rs`).
    pub phase: tokio::sync::watch::Sender<super::connections::Phase>,
    /// `/metrics`.
    pub metrics: Metrics,
    /// Request ids handed out so far.
    requests: AtomicU64,
    /// Decoding of request images: at most this many at once, off the async threads.
    pub decode_slots: tokio::sync::Semaphore,
    /// Test-only fault injection (`ABSORB_TEST_PANIC`, see [`TestPanic`]).
    pub test_panic: TestPanic,
    /// Asynchronous jobs (`/v1/jobs`).
    pub tasks: super::tasks::Tasks,
}

/// Requests to fail on purpose, for the tests of panic handling: `ABSORB_TEST_PANIC=worker:S`
/// makes the worker panic on a job of seed S, `handler:S` makes the generate handler panic on a
/// request of seed S (both may be given, comma-separated). Unset in production: nothing panics.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestPanic {
    /// Seed whose job panics in the worker.
    pub worker: Option<u64>,
    /// Seed whose request panics in its handler.
    pub handler: Option<u64>,
}

impl TestPanic {
    fn from_env() -> TestPanic {
        let mut t = TestPanic::default();
        let Ok(spec) = std::env::var("ABSORB_TEST_PANIC") else {
            return t;
        };
        for part in spec.split(',') {
            match part.split_once(':').map(|(k, v)| (k.trim(), v.trim().parse::<u64>())) {
                Some(("worker", Ok(seed))) => t.worker = Some(seed),
                Some(("handler", Ok(seed))) => t.handler = Some(seed),
                _ => log::warn!("ABSORB_TEST_PANIC: ignoring {part:?} (worker:SEED or handler:SEED)"),
            }
        }
        log::warn!("fault injection on: {t:?}");
        t
    }
}

/// A bundle of the catalog.
pub type Model = super::registry::Entry;

/// What [`Shared::reload`] says when another reload is running.
pub const RELOAD_BUSY: &str = "the bundle list is being read again already";

impl Shared {
    pub(super) fn new(
        p: &Pipeline,
        catalog: Catalog,
        sources: Sources,
        queue: SyncSender<Queued>,
        limits: Limits,
    ) -> Shared {
        let rt = p.runtime();
        let runtime_info = serde_json::json!({
            "provider": p.provider(),
            "onnxruntime": {
                "library": rt.library(),
                "version": rt.library().version,
                "threads": rt.threads(),
            },
            "cpu": crate::cpu::detect(),
            "absorb": crate::VERSION,
            "samplers": crate::sampler::SamplerKind::ALL
                .iter()
                .map(|k| serde_json::json!({"name": k.name(), "help": k.help()}))
                .collect::<Vec<_>>(),
        });
        Shared {
            queue,
            metrics: Metrics::new(limits.max_queue),
            limits,
            catalog: std::sync::RwLock::new(Arc::new(catalog)),
            sources,
            loaded: std::sync::Mutex::new(Vec::new()),
            reloading: std::sync::Mutex::new(()),
            provider: p.provider().to_string(),
            runtime_info,
            worker_alive: AtomicBool::new(true),
            phase: tokio::sync::watch::Sender::new(super::connections::Phase::Serving),
            requests: AtomicU64::new(0),
            decode_slots: tokio::sync::Semaphore::new(DECODE_SLOTS),
            test_panic: TestPanic::from_env(),
            tasks: super::tasks::Tasks::new(),
        }
    }

    /// The bundles now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The bundle `name` names (none: the first), if it is one of the catalog's.
    pub fn model(&self, name: Option<&str>) -> std::result::Result<Arc<Model>, (String, String)> {
        let catalog = self.catalog();
        catalog
            .get(name)
            .cloned()
            .map_err(|known| (name.unwrap_or_default().to_string(), known))
    }

    /// Reads the bundles again (SIGHUP, `POST /v1/models/reload`). Queued and running jobs keep
    /// the bundle they hold; a bundle that changed or left is unloaded by the worker when it next
    /// loads one. An unreadable `--models` directory keeps the catalog as it was.
    pub fn reload(&self) -> std::result::Result<Arc<Catalog>, String> {
        // A second reload while one runs is refused, not queued: each hashes every graph file.
        let _one = match self.reloading.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(RELOAD_BUSY.into());
            }
        };
        let catalog = Arc::new(Catalog::read(&self.sources)?);
        log::info!("reloaded the bundle list: {}", catalog.names().join(", "));
        *self.catalog.write().unwrap_or_else(std::sync::PoisonError::into_inner) = catalog.clone();
        Ok(catalog)
    }

    /// Whether the worker has `model`'s pipeline loaded now.
    pub fn is_loaded(&self, model: &Model) -> bool {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&model.key())
    }

    /// `/v1/model`'s answer for `model`.
    pub fn model_info(&self, model: &Model) -> serde_json::Value {
        let mut info = self.runtime_info.clone();
        let loaded = self.is_loaded(model);
        info["name"] = model.name.clone().into();
        info["loaded"] = loaded.into();
        info["bundle"] = match &model.bundle {
            Ok(b) => serde_json::json!({"dir": b.dir(), "sha256": b.sha256(), "manifest": b.manifest()}),
            Err(e) => serde_json::json!({"dir": model.dir, "error": e}),
        };
        info
    }

    /// A new request id.
    pub fn next_request_id(&self) -> u64 {
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Queues `work`, or says why not: the queue is full (429) or the worker has gone (503).
    pub fn submit(&self, work: Work) -> std::result::Result<(), Refused> {
        self.metrics.queue_depth.inc();
        match self.queue.try_send(Queued {
            item: Item::Work(Box::new(work)),
            accepted: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.dec();
                Err(match e {
                    TrySendError::Full(_) => Refused::Busy {
                        retry_after_s: self.metrics.retry_after_s(),
                    },
                    TrySendError::Disconnected(_) => Refused::WorkerGone,
                })
            }
        }
    }
}

/// Request images decoded at once: each is bounded by its declared size, and two keep both
/// cores busy without letting a burst of uploads hold more memory.
const DECODE_SLOTS: usize = 2;

/// Why [`Shared::submit`] did not queue a job.
pub enum Refused {
    /// The queue is full.
    Busy {
        /// Seconds to wait.
        retry_after_s: u64,
    },
    /// The worker thread has ended.
    WorkerGone,
}

/// How long a reply may take: see [`Limits::timeout_ms`].
pub fn timeout(limits: &Limits) -> Duration {
    Duration::from_millis(limits.timeout_ms)
}

impl Model {
    /// The bundle, or the error its requests get.
    pub fn usable(&self) -> Result<&Bundle> {
        self.bundle.as_ref().map_err(|message| Error::ModelUnavailable {
            name: self.name.clone(),
            message: message.clone(),
        })
    }
}
