//! The accept loop and the life of each connection: what `axum::serve` does, plus the timers and
//! limits it leaves out, and a drain with a deadline.
//!
//! - **Header-read timeout** (`--header-timeout-ms`): a connection must deliver a whole request
//!   head within it, counted from when the server starts waiting for one (so it is also the idle
//!   timeout of a keep-alive connection); otherwise hyper closes it. A client sending one byte a
//!   second holds a connection for that long, not forever.
//! - **Body-read timeout** (`--body-timeout-ms`, in `routes.rs`): the body must arrive within it
//!   once the handler starts reading; otherwise 408.
//! - **Connection cap** (`--max-connections`): one more is answered 503 at once and closed, so
//!   slow clients cannot take every file descriptor; the head a connection may send is bounded.
//! - **Drain** on SIGTERM: stop accepting; close every connection that has no request being
//!   handled (idle, or still sending its head: nothing was accepted on it) at once; let the
//!   others finish their answer. At the deadline (`--drain-timeout-ms`) requests still waiting
//!   are answered 503 and, a moment later, whatever is still open is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::shared::Shared;

/// Where the service is in its life; the connections and the handlers watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and answering.
    Serving,
    /// SIGTERM: no new connections; accepted requests are being finished.
    Draining,
    /// The drain deadline has passed: requests still waiting are answered 503.
    Expired,
}

/// Bytes a request head (request line and headers) may take; hyper's floor is 8 KiB.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Headers per request.
const MAX_HEADERS: usize = 64;
/// Connections over the cap being answered 503 at once; more are closed without an answer.
const MAX_REFUSING: usize = 64;
/// After the deadline, how long the 503s have to reach their clients before connections drop.
const EXPIRED_GRACE: Duration = Duration::from_millis(500);
/// On SIGTERM, how long a connection with no request being handled may take to flush the last
/// bytes of an answer already given (hyper may still hold them) before it is closed.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Serves `app` on `listener` until `shutdown` resolves, then drains as described above.
pub async fn serve(listener: TcpListener, app: Router, shared: Arc<Shared>, shutdown: impl Future<Output = ()>) {
    let limits = &shared.limits;
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    let mut accept_errors = 0u32;
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => { accept_errors = 0; tcp }
                    Err(e) => {
                        // EMFILE, ENFILE, ECONNABORTED...: the listener is fine; back off a little
                        // so a descriptor shortage does not become a busy loop.
                        accept_errors += 1;
                        if accept_errors == 1 || accept_errors.is_power_of_two() {
                            log::warn!("accept failed ({accept_errors} in a row): {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    log::debug!("TCP_NODELAY not set: {e}");
                }
                if tasks.len() >= limits.max_connections {
                    shared.metrics.connections_refused.inc();
                    // A flood of them gets closed without the courtesy of an answer.
                    if refusing.load(Ordering::Relaxed) < MAX_REFUSING {
                        tokio::spawn(refuse(tcp, limits.max_connections, refusing.clone()));
                    }
                    continue;
                }
                shared.metrics.connections.inc();
                let (app, phase, shared) = (app.clone(), shared.phase.subscribe(), shared.clone());
                tasks.spawn(async move {
                    connection(tcp, app, phase, &shared).await;
                    shared.metrics.connections.dec();
                });
            }
        }
    }
    drop(listener);
    let started = Instant::now();
    let (open, in_flight) = (tasks.len(), shared.metrics.in_flight.get());
    shared.phase.send_replace(Phase::Draining);
    let drained = all_done_within(&mut tasks, Duration::from_millis(limits.drain_timeout_ms)).await;
    let mut expired = String::new();
    if !drained {
        shared.phase.send_replace(Phase::Expired);
        all_done_within(&mut tasks, EXPIRED_GRACE).await;
        expired = format!(
            "; the {} ms deadline passed: requests still waiting were answered 503, {} connections dropped",
            limits.drain_timeout_ms,
            tasks.len()
        );
        tasks.shutdown().await;
    }
    log::info!(
        "drained in {:.2} s: {open} connections were open, {in_flight} requests in flight{expired}",
        started.elapsed().as_secs_f64(),
    );
}

/// Waits until every task has ended or `limit` has passed; true if they all ended.
async fn all_done_within(tasks: &mut JoinSet<()>, limit: Duration) -> bool {
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return true },
            () = &mut timer => return false,
        }
    }
}

/// One connection, HTTP/1.1 with keep-alive, until it closes or the drain ends it.
async fn connection(tcp: TcpStream, app: Router, mut phase: watch::Receiver<Phase>, shared: &Shared) {
    let header_timeout = Duration::from_millis(shared.limits.header_timeout_ms);
    let active = Arc::new(AtomicUsize::new(0));
    let service = Tracked {
        app,
        active: active.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let closed = |r: Result<(), hyper::Error>| {
        if let Err(e) = r {
            if e.is_timeout() {
                shared.metrics.header_timeouts.inc();
                log::debug!("connection closed: no request head within {header_timeout:?}");
            } else {
                log::debug!("connection closed: {e}");
            }
        }
    };
    tokio::select! {
        r = conn.as_mut() => return closed(r),
        _ = phase.wait_for(|p| *p != Phase::Serving) => {}
    }
    // SIGTERM. Idle connections close at once; one with an answer on its way finishes it.
    conn.as_mut().graceful_shutdown();
    if active.load(Ordering::SeqCst) == 0 {
        // Nothing accepted on it: idle (closes now), or still sending a head (closes after the
        // flush grace at most; its request was never accepted).
        tokio::select! {
            r = conn.as_mut() => closed(r),
            () = tokio::time::sleep(FLUSH_GRACE) => {}
        }
        return;
    }
    closed(conn.await);
}

/// Answers a connection over the cap with 503 and closes it, without reading its request
/// (`refusing` counts these answers under way).
async fn refuse(mut tcp: TcpStream, cap: usize, refusing: Arc<AtomicUsize>) {
    let _counted = Counted::new(refusing);
    let body = format!(
        "{{\"error\": \"too many connections: this service holds at most {cap} (--max-connections); retry later\"}}"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// The router as a hyper service that counts the requests of its connection being handled,
/// from the parsed head until the answer's body has been handed to hyper.
#[derive(Clone)]
struct Tracked {
    app: Router,
    active: Arc<AtomicUsize>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = Counted::new(self.active.clone());
        let mut app = self.app.clone();
        Box::pin(async move {
            let res = tower_service::Service::call(&mut app, req).await?;
            Ok(res.map(|body| Body::new(Guarded { body, _guard: guard })))
        })
    }
}

/// Counts itself in a shared counter while it lives (a request being handled, a refusal under
/// way).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::SeqCst);
        Counted(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body that keeps its request counted as active until hyper has taken all of it.
struct Guarded {
    body: Body,
    _guard: Counted,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
