//! The worker: the one thread that owns the [`Pipeline`]s (their sessions need `&mut`), one per
//! loaded bundle, and takes jobs from the bounded queue (`shared.rs` holds the queue and the state
//! the routes share). A job for a bundle not loaded loads it first, unloading the least recently
//! used ones beyond `--max-loaded` or the memory budget (`registry.rs`); a bundle that fails to
//! load answers that job with its error, and the worker goes on.
//!
//! Jobs of one batch's worth of images from all-masked grids with equal settings are run
//! together (one [`Job`] of several seeds: shared transformer calls); everything else runs
//! alone. A job whose client has gone is skipped, and a running one stops between transformer
//! calls once every client merged into it has gone.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Instant;

use super::metrics::Metrics;
use super::registry::{to_evict, Catalog, Key, Resident};
use super::shared::{Answer, Item, Model, Queued, Shared, Work};
use super::ServeOptions;
use crate::error::{Error, Result};
use crate::image::{self, Pixels};
use crate::job::Job;
use crate::spec::GenerateSpec;
use crate::{Pipeline, PreviewSink, Progress};

/// A loaded, warmed-up pipeline on its worker thread, and the state the routes share.
pub struct Service {
    shared: Arc<Shared>,
    worker: std::thread::JoinHandle<()>,
}

impl Service {
    /// Loads the bundle and warms it up on a new thread, which then serves the queue. Returns
    /// once it is ready, or with the load error.
    pub fn start(options: &ServeOptions) -> Result<Service> {
        let (sender, queue) = mpsc::sync_channel::<Queued>(options.limits.max_queue);
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Shared>>>();
        let options = options.clone();
        let handle = std::thread::Builder::new()
            .name("absorb-worker".into())
            .spawn(move || {
                let mut config = options.provider.clone();
                if config.cache_dir.is_none() {
                    // Several directories come colon-separated; the first is ours.
                    config.cache_dir = std::env::var("CACHE_DIRECTORY")
                        .ok()
                        .and_then(|d| d.split(':').next().filter(|d| !d.is_empty()).map(PathBuf::from))
                        .map(|d| d.join("tensorrt"));
                }
                let catalog = match Catalog::read(&options.sources) {
                    Ok(c) => c,
                    Err(message) => {
                        // An unreadable --models directory names that flag; no bundle at all, --model.
                        let param = match message.strip_prefix("--models ") {
                            Some(_) => crate::param::Param::Models,
                            None => crate::param::Param::Model,
                        };
                        let message = message.strip_prefix("--models ").unwrap_or(&message).to_string();
                        let _ = ready_tx.send(Err(Error::Param { param, message }));
                        return;
                    }
                };
                // The first bundle that reads is loaded and warmed up before READY=1; the others
                // load on first use. None reads: the service cannot start, and says why.
                let readable = catalog
                    .entries
                    .iter()
                    .find_map(|e| e.bundle.as_ref().ok().map(|b| (e.clone(), b.clone())));
                let Some((first, bundle)) = readable else {
                    let why: Vec<String> = catalog
                        .entries
                        .iter()
                        .map(|e| format!("{}: {}", e.dir.display(), e.bundle.as_ref().err().map_or("", |s| s)))
                        .collect();
                    let _ = ready_tx.send(Err(Error::ModelUnavailable {
                        name: catalog.names().join(", "),
                        message: format!("no bundle can be read: {}", why.join("; ")),
                    }));
                    return;
                };
                let loaded = Pipeline::load_bundle(bundle, &options.runtime, &config)
                    .and_then(|mut p| warm_up(&mut p).map(|()| p));
                let p = match loaded {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let shared = Arc::new(Shared::new(
                    &p,
                    catalog,
                    options.sources.clone(),
                    sender,
                    options.limits.clone(),
                ));
                let _alive = AliveGuard(shared.clone());
                let _ = ready_tx.send(Ok(shared.clone()));
                let mut residents = Residents {
                    loaded: Vec::new(),
                    failed: Default::default(),
                    catalog_seen: shared.catalog(),
                    clock: 0,
                    options: &options,
                    config: &config,
                };
                residents.push(&first, p, &shared);
                work(&mut residents, &queue, &shared);
            })
            .map_err(Error::os("starting the worker thread"))?;
        match ready_rx.recv() {
            Ok(Ok(shared)) => Ok(Service { shared, worker: handle }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Internal(
                "the worker thread ended while loading without saying why (see the log)".into(),
            )),
        }
    }

    /// The state the routes share.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Lets the worker finish the jobs already queued, then joins it. Call after the server has
    /// stopped accepting (graceful shutdown has answered every accepted request by then).
    pub fn stop(self) {
        let _ = self.shared.queue.send(Queued {
            item: Item::Stop,
            accepted: Instant::now(),
        });
        let _ = self.worker.join();
    }
}

/// Marks the worker dead when its thread ends, even by a panic: `/healthz` then fails and the
/// watchdog stops, so systemd restarts the service.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.worker_alive.store(false, Ordering::Relaxed);
    }
}

/// One generation with the bundle's defaults before READY=1, so the first request does not pay
/// for lazy initialisation (and a TensorRT engine build happens while systemd still waits).
fn warm_up(p: &mut Pipeline) -> Result<()> {
    let start = Instant::now();
    let job = GenerateSpec {
        max_batch: 1,
        ..GenerateSpec::default()
    }
    .job(p.bundle())?;
    p.run(&job, &mut Progress::steps(&mut |_| {}))?;
    log::info!("warm-up generation took {:.0?}", start.elapsed());
    Ok(())
}

/// The loaded pipelines, one per bundle, and when each was last used.
struct Residents<'a> {
    loaded: Vec<Loaded>,
    /// Bundles that failed to load since the catalog was last read, and why.
    failed: std::collections::HashMap<Key, String>,
    /// The catalog `failed` is about.
    catalog_seen: Arc<Catalog>,
    clock: u64,
    options: &'a ServeOptions,
    config: &'a crate::ProviderConfig,
}

struct Loaded {
    key: Key,
    name: String,
    pipeline: Pipeline,
    last_used: u64,
    bytes: u64,
}

impl Residents<'_> {
    /// The pipeline of `model`, loaded if it is not (unloading others first as the limits say).
    fn get(&mut self, model: &Model, shared: &Shared) -> Result<&mut Pipeline> {
        self.clock += 1;
        let key = model.key();
        if let Some(i) = self.loaded.iter().position(|l| l.key == key) {
            self.loaded[i].last_used = self.clock;
            self.publish(shared);
            return Ok(&mut self.loaded[i].pipeline);
        }
        let bundle = model.usable()?.clone();
        let m = &shared.metrics;
        let catalog = shared.catalog();
        let unavailable = |message: String| Error::ModelUnavailable {
            name: model.name.clone(),
            message,
        };
        // A bundle a reload changed or removed after this job was accepted: its files are no
        // longer the ones its metadata would record.
        if !catalog.has(&key) {
            return Err(unavailable(
                "it was changed or removed by a reload after this request was accepted: send it again".into(),
            ));
        }
        // A bundle that failed to load fails again at once until the next reload, and unloads
        // nothing for it.
        if !Arc::ptr_eq(&catalog, &self.catalog_seen) {
            self.failed.clear();
            self.catalog_seen = catalog.clone();
        }
        if let Some(message) = self.failed.get(&key) {
            return Err(unavailable(message.clone()));
        }
        // Bundles a reload changed or removed go first; then the least recently used, as needed.
        let before = self.loaded.len();
        self.loaded.retain(|l| catalog.has(&l.key));
        let residents: Vec<Resident> = self
            .loaded
            .iter()
            .map(|l| Resident {
                key: l.key.clone(),
                last_used: l.last_used,
                bytes: l.bytes,
            })
            .collect();
        let mut unload = to_evict(
            &residents,
            self.options.max_loaded,
            self.options.memory_budget,
            model.bytes,
        );
        unload.sort_unstable_by(|a, b| b.cmp(a));
        for i in unload {
            let gone = self.loaded.remove(i);
            log::info!("unloaded bundle \"{}\" to make room for \"{}\"", gone.name, model.name);
        }
        m.model_unloads.inc_by((before - self.loaded.len()) as u64);
        self.publish(shared);
        m.model_loads.inc();
        m.waiting_for_model.inc();
        let (runtime, config) = (&self.options.runtime, self.config);
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Pipeline::load_bundle(bundle, runtime, config)
        }));
        m.waiting_for_model.dec();
        let message = match loaded {
            Ok(Ok(pipeline)) => {
                self.push(model, pipeline, shared);
                let last = self.loaded.len() - 1;
                return Ok(&mut self.loaded[last].pipeline);
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(panic) => {
                m.panics.inc();
                format!("loading it panicked: {}", crate::error::panic_message(panic.as_ref()))
            }
        };
        m.model_load_failures.inc();
        self.failed.insert(key, message.clone());
        Err(unavailable(message))
    }

    fn push(&mut self, model: &Model, pipeline: Pipeline, shared: &Shared) {
        self.clock += 1;
        self.loaded.push(Loaded {
            key: model.key(),
            name: model.name.clone(),
            pipeline,
            last_used: self.clock,
            bytes: model.bytes,
        });
        self.publish(shared);
    }

    /// Tells /metrics and /v1/model which bundles are loaded.
    fn publish(&self, shared: &Shared) {
        shared.metrics.models_loaded.set(self.loaded.len() as i64);
        *shared.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            self.loaded.iter().map(|l| l.key.clone()).collect();
    }
}

fn work(residents: &mut Residents, queue: &Receiver<Queued>, shared: &Shared) {
    let m = &shared.metrics;
    let max_batch = shared.limits.max_batch;
    // A job taken from the queue while gathering a batch that it could not join: it runs next,
    // before anything newer, so the order stays first come, first served.
    let mut held: Option<Queued> = None;
    loop {
        let Some(q) = held.take().or_else(|| queue.recv().ok()) else {
            break;
        };
        m.queue_depth.dec();
        let Item::Work(first) = q.item else {
            break;
        };
        if first.reply.is_closed() {
            m.skipped.inc();
            continue;
        }
        let start = Instant::now();
        let waited = start.duration_since(q.accepted);
        let mut batch = vec![*first];
        if batch[0].batchable() && batch[0].job.images().len() <= max_batch {
            held = gather(&mut batch, queue, max_batch, m);
        }
        let answered = batch.len();
        let model = batch[0].model.clone();
        let images = match residents.get(&model, shared) {
            Ok(p) => execute(p, batch, shared),
            Err(e) => {
                // Only this bundle's requests hear of it.
                log::error!("{e:#}");
                let (name, message) = match e {
                    Error::ModelUnavailable { name, message } => (name, message),
                    e => (model.name.clone(), format!("{e:#}")),
                };
                for w in batch {
                    let _ = w.reply.send(Err(Error::ModelUnavailable {
                        name: name.clone(),
                        message: message.clone(),
                    }));
                }
                0
            }
        };
        let busy = start.elapsed();
        m.worked(answered, busy);
        log::debug!("{answered} jobs: first waited {waited:.1?}, ran {busy:.1?}, {images} images");
    }
}

/// Moves queued batchable jobs with the same settings into `batch` while all their images fit
/// in one transformer batch. Returns the first job that cannot join, which must run next.
fn gather(batch: &mut Vec<Work>, queue: &Receiver<Queued>, max_batch: usize, m: &Metrics) -> Option<Queued> {
    let (settings, class, model) = (*batch[0].job.settings(), batch[0].job.class(), batch[0].model.clone());
    let mut images: usize = batch[0].job.images().len();
    while images < max_batch {
        let q = queue.try_recv().ok()?;
        match q.item {
            Item::Work(w)
                if w.batchable()
                    && Arc::ptr_eq(&w.model, &model)
                    && *w.job.settings() == settings
                    && w.job.class() == class
                    && images + w.job.images().len() <= max_batch =>
            {
                m.queue_depth.dec();
                if w.reply.is_closed() {
                    m.skipped.inc();
                    continue;
                }
                images += w.job.images().len();
                batch.push(*w);
            }
            item => {
                return Some(Queued {
                    item,
                    accepted: q.accepted,
                })
            }
        }
    }
    None
}

/// Runs `batch` (one job, or batchable jobs with equal settings merged into one) and answers
/// each. Returns the images made. A panic while making them is caught: every job of the batch
/// is answered with an error (500), logged with their request ids, and the worker goes on.
fn execute(p: &mut Pipeline, batch: Vec<Work>, shared: &Shared) -> usize {
    let m = &shared.metrics;
    let steps = batch[0].job.settings().steps;
    let images = batch.iter().flat_map(|w| w.job.images().iter().copied()).collect();
    let merged = || make(p, &batch[0].job.with_images(images)?, &batch, shared);
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(merged)).unwrap_or_else(|panic| {
        let what = crate::error::panic_message(panic.as_ref());
        let ids: Vec<u64> = batch.iter().map(|w| w.id).collect();
        log::error!("requests {ids:?}: the worker panicked ({what}); answering 500 and going on");
        m.panics.inc();
        Err(Error::Panicked {
            during: format!("the worker ran requests {ids:?}"),
            message: what,
        })
    });
    match made {
        Ok((pngs, animation)) => {
            let images = pngs.len();
            m.images.inc_by(images as u64);
            m.steps.inc_by((images * steps) as u64);
            let mut pngs = pngs.into_iter();
            let mut animation = animation;
            // Metrics first, so a client that reads /metrics after its answer sees its images. A
            // client that has gone meanwhile just does not get it.
            for w in batch {
                let answer = Answer {
                    pngs: pngs.by_ref().take(w.job.images().len()).collect(),
                    animation: animation.take(),
                };
                let _ = w.reply.send(Ok(answer));
            }
            images
        }
        Err(Error::Cancelled) => {
            m.skipped.inc();
            0
        }
        Err(e) => {
            // Error is not Clone: the first job gets the original, the others its text. Inputs
            // were validated before queueing, so this is the model or the machine: a 500.
            let text = format!("{e:#}");
            let mut first = Some(e);
            for w in batch {
                let e = first.take().unwrap_or_else(|| Error::SharedRun(text.clone()));
                let _ = w.reply.send(Err(e));
            }
            0
        }
    }
}

/// What [`make`] answers: one PNG per image, and the animation when one was asked for.
type Pngs = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// PNG bytes of `job`'s images (`batch` merged into it) and its animation.
fn make(p: &mut Pipeline, job: &Job, batch: &[Work], shared: &Shared) -> Result<Pngs> {
    if shared.test_panic.worker.is_some_and(|s| s == job.seed()) {
        panic!("injected by ABSORB_TEST_PANIC (worker:{})", job.seed());
    }
    // The job stops between transformer calls once every client merged into it has gone (one
    // who still waits keeps it running: its images need the whole batch) or cancelled it.
    let cancelled = || {
        batch
            .iter()
            .all(|w| w.reply.is_closed() || w.progress.as_ref().is_some_and(|e| e.is_cancelled()))
    };
    let watched: Vec<&super::tasks::Entry> = batch.iter().filter_map(|w| w.progress.as_deref()).collect();
    watched.iter().for_each(|e| e.running());
    let mut previews = Previews {
        watched: &watched,
        shared,
    };
    let made = p.run(
        job,
        &mut Progress {
            on_step: &mut |r| watched.iter().for_each(|e| e.step(r)),
            cancelled: &cancelled,
            preview: (!watched.is_empty()).then_some(&mut previews as &mut dyn PreviewSink),
        },
    )?;
    let pngs = made
        .pixels
        .iter()
        .enumerate()
        .map(|(k, px)| image::png_bytes(px, Some(&job.metadata(p.bundle(), &shared.provider, k, 1))))
        .collect::<Result<Vec<_>>>()?;
    let animation = match (&made.frames, batch[0].animation) {
        (Some(frames), Some(format)) => Some(image::animation_bytes(frames, format, 100, 1500)?),
        _ => None,
    };
    let m = &shared.metrics;
    m.transformer_calls.inc_by(made.timings.transformer_calls as u64);
    m.preview_s.inc_by(made.timings.preview.as_secs_f64());
    Ok((pngs, animation))
}

/// Live previews of asynchronous jobs, while an event stream follows one of them.
struct Previews<'a> {
    watched: &'a [&'a super::tasks::Entry],
    shared: &'a Shared,
}

impl PreviewSink for Previews<'_> {
    fn wanted(&self) -> bool {
        self.watched.iter().any(|e| e.watched())
    }

    fn preview(&mut self, first: usize, step: usize, pixels: Vec<Pixels>) {
        let pngs = match pixels
            .iter()
            .map(|px| image::png_bytes(px, None))
            .collect::<Result<Vec<_>>>()
        {
            Ok(pngs) => pngs,
            Err(e) => return log::warn!("a preview could not be encoded: {e:#}"),
        };
        let preview = Arc::new(super::tasks::Preview { step, first, pngs });
        self.watched.iter().for_each(|e| e.preview(preview.clone()));
        self.shared.metrics.previews.inc();
    }
}
