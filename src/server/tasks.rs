//! Asynchronous jobs, called *tasks* in the code (so that "job" keeps one meaning, a
//! [`crate::Job`]: what to make; the API and the metrics say jobs).
//! `POST /v1/jobs?type=generate|inpaint|outpaint` takes the body of the
//! synchronous route and answers 202 with the job's id at once; `GET /v1/jobs/{id}` gives its
//! state and results, `GET /v1/jobs/{id}/events` streams its progress (Server-Sent Events, one
//! per transformer call), `DELETE /v1/jobs/{id}` cancels it, queued or running.
//!
//! A job is the same [`crate::Job`] the synchronous route would queue; what differs is who
//! waits for its answer: a task of this module, which cancels it the way a synchronous client
//! does by hanging up (dropping the reply, so the worker skips it or stops it between
//! transformer calls). Finished jobs are kept for `--job-keep-s` and at most `--max-jobs` are
//! held; after that their id answers 410.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{oneshot, watch, Notify};

use super::requests::Route;
use super::shared::{self, Answer, Shared};
use crate::error::Result;
use crate::sampler::StepReport;

/// Ids of evicted jobs remembered (to answer 410 rather than 404).
const GONE_REMEMBERED: usize = 4096;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for the worker.
    Queued,
    /// Being sampled.
    Running,
    /// Made: its images are in the results.
    Done,
    /// The model or the machine failed, or it was not done within `--timeout-ms`.
    Failed,
    /// Cancelled by `DELETE`.
    Cancelled,
}

impl State {
    /// True once nothing more will happen to the job.
    pub fn finished(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

/// What a job's client can see: its state, its progress, its results.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The job's id.
    pub id: u64,
    /// `generate`, `inpaint` or `outpaint`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Where it is.
    pub state: State,
    /// The seed it runs with.
    pub seed: u64,
    /// Transformer calls made so far.
    pub step: usize,
    /// Reverse steps of the schedule.
    pub steps: usize,
    /// Tokens still masked after the last call (over all images of the job).
    pub masked: usize,
    /// Live previews made so far.
    pub previews: usize,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The latest live preview (sent once on the event stream).
    #[serde(skip)]
    pub preview: Option<Arc<Preview>>,
    /// The PNGs made (served by `GET /v1/jobs/{id}/images/{k}`).
    #[serde(skip)]
    pub answer: Option<Arc<Answer>>,
}

/// A live preview: images `first..` of a running job, still-masked tokens grey.
#[derive(Debug)]
pub struct Preview {
    /// Steps that had called the transformer when it was taken.
    pub step: usize,
    /// The job's index of the first image.
    pub first: usize,
    /// The images, as PNG (without metadata: they are not results).
    pub pngs: Vec<Vec<u8>>,
}

/// One job: its status (watched by event streams) and its cancel switch.
pub struct Entry {
    status: watch::Sender<Status>,
    /// Set by `DELETE`: the worker reads it before every transformer call.
    cancelled: AtomicBool,
    /// Wakes the task waiting for the answer, which then drops the reply.
    cancel: Notify,
}

impl Entry {
    /// The status now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of every change (the event stream).
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// True once `DELETE` has cancelled the job.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The worker took the job.
    pub fn running(&self) {
        self.status.send_modify(|s| s.state = State::Running);
    }

    /// True while an event stream follows the job: previews are made only then.
    pub fn watched(&self) -> bool {
        self.status.receiver_count() > 0
    }

    /// A new live preview.
    pub fn preview(&self, preview: Arc<Preview>) {
        self.status.send_modify(|s| {
            s.previews += 1;
            s.preview = Some(preview);
        });
    }

    /// After each transformer call.
    pub fn step(&self, r: &StepReport) {
        let masked = r.chains.iter().map(|c| c.still_masked()).sum();
        self.status.send_modify(|s| {
            s.step += 1;
            s.masked = masked;
        });
    }
}

/// The jobs the service holds.
pub struct Tasks {
    store: Mutex<Store>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Store {
    entries: HashMap<u64, Arc<Entry>>,
    /// Finished jobs and when they finished, oldest first.
    finished: VecDeque<(u64, Instant)>,
    gone: VecDeque<u64>,
}

/// Why a job id has no job.
pub enum Missing {
    /// Never was (404).
    Unknown,
    /// Was, and has been dropped from the store (410).
    Gone,
}

impl Tasks {
    /// An empty store.
    pub fn new() -> Tasks {
        Tasks {
            store: Mutex::new(Store::default()),
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding it cannot leave the map half-changed: every change is one call.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new job's entry, or `None` when `--max-jobs` unfinished jobs are already held.
    pub fn create(&self, shared: &Shared, route: Route, seed: u64, steps: usize) -> Option<(u64, Arc<Entry>)> {
        let mut store = self.lock();
        self.expire(&mut store, shared);
        let limits = &shared.limits;
        while store.entries.len() >= limits.max_jobs {
            let (oldest, _) = store.finished.pop_front()?;
            evict(&mut store, oldest);
            shared.metrics.jobs_expired.inc();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            status: watch::Sender::new(Status {
                id,
                kind: match route {
                    Route::Generate => "generate",
                    Route::Inpaint => "inpaint",
                    Route::Outpaint => "outpaint",
                    Route::Vary => "vary",
                },
                state: State::Queued,
                seed,
                step: 0,
                steps,
                masked: 0,
                previews: 0,
                error: None,
                preview: None,
                answer: None,
            }),
            cancelled: AtomicBool::new(false),
            cancel: Notify::new(),
        });
        store.entries.insert(id, entry.clone());
        Some((id, entry))
    }

    /// The job `id`.
    pub fn get(&self, shared: &Shared, id: u64) -> std::result::Result<Arc<Entry>, Missing> {
        let mut store = self.lock();
        self.expire(&mut store, shared);
        match store.entries.get(&id) {
            Some(e) => Ok(e.clone()),
            None if store.gone.contains(&id) => Err(Missing::Gone),
            None => Err(Missing::Unknown),
        }
    }

    /// `DELETE`: cancels a queued or running job (its state becomes cancelled once the wait
    /// ends, at once), or drops a finished one from the store. Returns its status.
    pub fn delete(&self, shared: &Shared, id: u64) -> std::result::Result<Status, Missing> {
        let entry = self.get(shared, id)?;
        if !entry.status.borrow().state.finished() {
            // Before the status is read: no transformer call starts after what it reports.
            entry.cancelled.store(true, Ordering::SeqCst);
        }
        let status = entry.status();
        if status.state.finished() {
            let mut store = self.lock();
            store.finished.retain(|&(f, _)| f != id);
            evict(&mut store, id);
        } else {
            entry.cancel.notify_one();
        }
        Ok(status)
    }

    /// Forgets a job that could not be queued.
    pub fn discard(&self, id: u64) {
        self.lock().entries.remove(&id);
    }

    /// Jobs queued and running.
    pub fn unfinished(&self) -> (usize, usize) {
        let store = self.lock();
        let count = |want: State| {
            store
                .entries
                .values()
                .filter(|e| e.status.borrow().state == want)
                .count()
        };
        (count(State::Queued), count(State::Running))
    }

    /// Drops finished jobs older than `--job-keep-s`.
    fn expire(&self, store: &mut Store, shared: &Shared) {
        let keep = Duration::from_secs(shared.limits.job_keep_s);
        while let Some(&(id, at)) = store.finished.front() {
            if at.elapsed() < keep {
                break;
            }
            store.finished.pop_front();
            evict(store, id);
            shared.metrics.jobs_expired.inc();
        }
    }

    fn finish(&self, id: u64) {
        self.lock().finished.push_back((id, Instant::now()));
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

fn evict(store: &mut Store, id: u64) {
    if store.entries.remove(&id).is_some() {
        if store.gone.len() >= GONE_REMEMBERED {
            store.gone.pop_front();
        }
        store.gone.push_back(id);
    }
}

/// Waits for job `id`'s answer on a task of its own, at most `--timeout-ms`, and records it;
/// a `DELETE` ends the wait at once, which drops `rx`: the worker then skips the job, or stops
/// it before its next transformer call.
pub fn wait(shared: Arc<Shared>, id: u64, entry: Arc<Entry>, rx: oneshot::Receiver<Result<Answer>>) {
    let m = &shared.metrics;
    m.jobs_submitted.inc();
    tokio::spawn(async move {
        let m = &shared.metrics;
        let outcome = tokio::select! {
            r = tokio::time::timeout(shared::timeout(&shared.limits), rx) => match r {
                Ok(Ok(Ok(answer))) => Ok(answer),
                Ok(Ok(Err(e))) => {
                    log::error!("job {id} failed: {e:#}");
                    Err((State::Failed, "internal error (details in the service log)".to_string()))
                }
                Ok(Err(_)) => Err((State::Failed, "the sampling worker has stopped".to_string())),
                Err(_) => Err((State::Failed, format!("not done within {} ms (--timeout-ms)", shared.limits.timeout_ms))),
            },
            _ = entry.cancel.notified() => Err((State::Cancelled, "cancelled by DELETE".to_string())),
        };
        match &outcome {
            Err((State::Cancelled, _)) => m.jobs_cancelled.inc(),
            Err(_) => m.jobs_failed.inc(),
            Ok(_) => 0,
        };
        entry.status.send_modify(|s| match outcome {
            Ok(answer) => {
                s.state = State::Done;
                s.masked = 0;
                s.preview = None;
                s.answer = Some(Arc::new(answer));
            }
            Err((state, why)) => {
                s.state = state;
                s.error = Some(why);
            }
        });
        shared.tasks.finish(id);
    });
}
