//! systemd integration: readiness, status lines, start-timeout extensions and watchdog pings,
//! sent with the `sd-notify` crate (the notify protocol: one datagram per message to
//! `$NOTIFY_SOCKET`).
//!
//! `sd_notify::notify` sends on a blocking socket. A manager that stops reading must never
//! stall a request or the drain, so messages go through a bounded queue to one sender thread;
//! when the queue is full a message is dropped (the next ping or status line follows soon).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use super::Shared;

/// Each extension of the start timeout while loading (EXTEND_TIMEOUT_USEC), sent every third
/// of it so one lost datagram does not matter.
const START_EXTENSION: Duration = Duration::from_secs(60);

/// Loading is never extended past this: a TensorRT engine build on a Jetson Orin takes
/// minutes; an hour means something hangs, and systemd's timeout should fire.
const MAX_START_EXTENSION: Duration = Duration::from_secs(3600);

/// Messages waiting for the sender thread at most.
const QUEUE: usize = 16;

/// One notification: the states of one datagram.
enum Message {
    Ready(String),
    Status(String),
    Stopping(String),
    Watchdog,
    ExtendTimeout(String),
}

/// Where notifications go, if systemd listens (`NOTIFY_SOCKET` set). Sending never fails or
/// blocks the service: errors are logged.
#[derive(Clone)]
pub struct Notifier {
    queue: Option<SyncSender<Message>>,
}

impl Notifier {
    /// A notifier for this process's `NOTIFY_SOCKET`, or one that sends nothing.
    pub fn from_env() -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier { queue: None };
        }
        let (tx, rx) = mpsc::sync_channel::<Message>(QUEUE);
        let spawned = std::thread::Builder::new().name("absorb-notify".into()).spawn(move || {
            for m in rx {
                let result = match &m {
                    Message::Ready(s) => sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(s)]),
                    Message::Status(s) => sd_notify::notify(&[NotifyState::Status(s)]),
                    Message::Stopping(s) => sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(s)]),
                    Message::Watchdog => sd_notify::notify(&[NotifyState::Watchdog]),
                    Message::ExtendTimeout(s) => sd_notify::notify(&[
                        NotifyState::ExtendTimeoutUsec(START_EXTENSION.as_micros() as u32),
                        NotifyState::Status(s),
                    ]),
                };
                if let Err(e) = result {
                    log::warn!("notifying systemd failed: {e}");
                }
            }
        });
        match spawned {
            Ok(_) => Notifier { queue: Some(tx) },
            Err(e) => {
                log::warn!("cannot start the notify thread: {e}; not notifying systemd");
                Notifier { queue: None }
            }
        }
    }

    fn send(&self, m: Message) {
        if let Some(q) = &self.queue {
            if let Err(TrySendError::Full(_)) = q.try_send(m) {
                log::warn!("systemd is not reading its notify socket; a notification was dropped");
            }
        }
    }

    /// READY=1 with a status line.
    pub fn ready(&self, status: &str) {
        self.send(Message::Ready(status.into()));
    }

    /// A status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(Message::Status(status.into()));
    }

    /// STOPPING=1 with a status line.
    pub fn stopping(&self, status: &str) {
        self.send(Message::Stopping(status.into()));
    }

    fn enabled(&self) -> bool {
        self.queue.is_some()
    }
}

/// The watchdog period if systemd asked for pings for this process (`WATCHDOG_USEC`, and
/// `WATCHDOG_PID` when set must be ours).
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Pings systemd's watchdog at half its period while the worker thread is alive; a dead worker
/// stops the pings and systemd restarts the service.
pub async fn watchdog(notify: Notifier, shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        if shared.worker_alive.load(Ordering::Relaxed) {
            notify.send(Message::Watchdog);
        } else {
            if *shared.phase.borrow() == super::connections::Phase::Serving {
                log::error!("the sampling worker has stopped; no more watchdog pings");
            }
            return;
        }
    }
}

/// While the returned flag stays true, keeps extending systemd's start timeout (a TensorRT
/// engine build can take minutes), up to [`MAX_START_EXTENSION`] in total.
pub fn extend_start_timeout(notify: Notifier) -> Arc<AtomicBool> {
    let starting = Arc::new(AtomicBool::new(true));
    if !notify.enabled() {
        return starting;
    }
    let flag = starting.clone();
    let spawned = std::thread::Builder::new()
        .name("absorb-start-timeout".into())
        .spawn(move || {
            let begin = Instant::now();
            let mut next = Instant::now();
            while flag.load(Ordering::Relaxed) && begin.elapsed() < MAX_START_EXTENSION {
                if Instant::now() >= next {
                    let elapsed = begin.elapsed().as_secs();
                    notify.send(Message::ExtendTimeout(format!(
                        "loading the bundle and warming up ({elapsed} s)"
                    )));
                    next += START_EXTENSION / 3;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the start-timeout thread: {e}");
    }
    starting
}
