//! The accept loop and each connection's patience: how long a client may take to send its
//! headers, how long an idle keep-alive connection stays open, how many connections the daemon
//! holds at once, and which connections a drain closes at once.
//!
//! Owns sockets and their timing; knows nothing of routes or bodies (the body deadline and the
//! size limit are [`super::body`]'s). A request counts as *in flight* from the moment its body
//! has been received ([`ConnHandle::admit`]) until its response body is done: only such
//! requests hold a connection open through a drain or past a deadline.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tower::ServiceExt;

/// Descriptors kept free of connections: the model files, the tokenizer, log and metric
/// reads, and the listener itself.
const RESERVED_FDS: u64 = 256;

/// No connection's task looks at its deadlines more often than this, whatever the settings.
const MIN_RECHECK: Duration = Duration::from_millis(100);

/// The connection layer's settings, resolved from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// From a connection's first byte of a request (or its accept) to the end of the headers.
    pub header_read_timeout: Duration,
    /// How long a connection with nothing in flight waits for its next request; zero closes it
    /// after each response.
    pub keep_alive_timeout: Duration,
    /// Connections held at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// How often a connection's task looks at its state: often enough that no deadline, which
    /// begins without waking it, is missed.
    fn recheck_every(&self) -> Duration {
        self.header_read_timeout
            .min(self.idle_wait())
            .max(MIN_RECHECK)
    }

    /// How long a connection with nothing in flight waits for its next request. Without
    /// keep-alive hyper closes after each response itself; the header timeout then only
    /// bounds a client that never reads its response's end.
    fn idle_wait(&self) -> Duration {
        if self.keep_alive_timeout.is_zero() {
            self.header_read_timeout
        } else {
            self.keep_alive_timeout
        }
    }
}

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicU64,
    timed_out: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections closed because they sent no complete headers, or stayed idle, in time.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
}

/// What one connection is doing, shared between its task, its socket and its requests.
#[derive(Debug)]
pub struct ConnState {
    opened: Instant,
    /// Requests whose headers are in and whose response has not begun.
    receiving: AtomicUsize,
    /// Requests admitted (body received) whose response body is not done.
    active: AtomicUsize,
    /// Milliseconds after `opened` when the current wait for headers began; `NONE` when no
    /// header bytes are pending (idle, or a request in progress).
    headers_since: AtomicU64,
    /// Milliseconds after `opened` when the last response ended.
    idle_since: AtomicU64,
    /// The socket refused the last write: a response is still going out even if its body is
    /// done (hyper drops a body once its last bytes are buffered, before they are sent).
    writing: AtomicBool,
    /// HTTP/2: bytes on an idle connection are as likely PINGs and WINDOW_UPDATEs as a new
    /// request, so they do not start a header deadline.
    h2: AtomicBool,
}

const NONE: u64 = u64::MAX;

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            receiving: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            // A fresh connection owes its first request's headers from the start: a socket that
            // never sends a byte is closed at the header deadline too.
            headers_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            writing: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn busy(&self) -> bool {
        self.in_flight() || self.receiving.load(Ordering::Acquire) > 0
    }

    /// A request admitted and not done, or a response still leaving the socket.
    fn in_flight(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0 || self.writing.load(Ordering::Relaxed)
    }

    /// Bytes arrived: if nothing was in progress they begin the next request's headers.
    fn bytes_read(&self) {
        if !self.h2.load(Ordering::Relaxed)
            && !self.busy()
            && self.headers_since.load(Ordering::Relaxed) == NONE
        {
            self.headers_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    fn wrote(&self, refused: bool) {
        // Most writes succeed: store only on a change, so the line stays in cache.
        if self.writing.load(Ordering::Relaxed) != refused {
            self.writing.store(refused, Ordering::Relaxed);
        }
    }

    /// When the connection must be closed if nothing changes before; `None`: no deadline.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        let since = self.headers_since.load(Ordering::Relaxed);
        let (from, wait) = if since != NONE {
            (since, limits.header_read_timeout)
        } else {
            (self.idle_since.load(Ordering::Relaxed), limits.idle_wait())
        };
        Some(self.opened + Duration::from_millis(from) + wait)
    }
}

/// A connection's state as its requests see it (a request extension).
#[derive(Clone, Debug)]
pub struct ConnHandle(Arc<ConnState>);

impl ConnHandle {
    /// The request's body is in: from now on it is in flight until the returned guard (held by
    /// the response body) is dropped.
    pub fn admit(&self) -> InFlight {
        self.0.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.0.clone())
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Headers received, response not yet begun.
struct Receiving(Arc<ConnState>);

impl Receiving {
    fn start(s: &Arc<ConnState>) -> Self {
        s.receiving.fetch_add(1, Ordering::AcqRel);
        s.headers_since.store(NONE, Ordering::Relaxed);
        Self(s.clone())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now_ms(), Ordering::Relaxed);
        s.receiving.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket, telling its connection's state when bytes arrive.
struct Watched {
    tcp: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.state.wrote(r.is_pending());
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.state.wrote(r.is_pending());
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// The number of connections `wanted` fits in the descriptors this process may open, after
/// raising its soft limit to the hard one; logged when it had to be lowered.
pub fn fit_to_descriptors(wanted: usize) -> usize {
    let Some(limit) = raise_fd_limit() else {
        return wanted;
    };
    let fit = limit.saturating_sub(RESERVED_FDS).max(1) as usize;
    if fit < wanted {
        tracing::warn!(
            max_connections = wanted,
            open_files_limit = limit,
            using = fit,
            "--max-connections is more than the open-files limit allows; raise `ulimit -n` to \
             hold that many"
        );
        return fit;
    }
    wanted
}

#[cfg(unix)]
fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call; getrlimit only writes
    // it and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit for the call's duration; raising the soft limit up
        // to the hard one is always permitted and touches only this process.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    // rlim_t is u64 on 64-bit Linux, not on every unix.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
fn raise_fd_limit() -> Option<u64> {
    None
}

/// Accepts connections until `drain` turns true, then closes every connection with nothing in
/// flight at once and lets the others finish their requests. Resolves when the last
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    stats: Arc<ConnectionStats>,
    mut drain: watch::Receiver<bool>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    // Keep-alive off closes after each response; otherwise our own idle deadline applies.
    builder
        .http1()
        .keep_alive(!limits.keep_alive_timeout.is_zero());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection task holds a sender; the channel closes when the last one ends.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = drain.wait_for(|d| *d) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.wait_for(|d| *d) => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: neither stops the
                // server; a short pause lets descriptors come back.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Without it a keep-alive response can stall ~40 ms on delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let task = Connection {
            builder: builder.clone(),
            app: app.clone(),
            limits,
            drain: drain.clone(),
        };
        let alive = alive.clone();
        let open = OpenConnection::new(stats.clone());
        tokio::spawn(async move {
            if task.run(tcp).await == Ended::TimedOut {
                open.0.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            drop(open);
            drop(permit);
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    let _ = all_closed.recv().await;
}

/// One open connection in the gauge, given back however its task ends (a panic in a handler
/// unwinds it too).
struct OpenConnection(Arc<ConnectionStats>);

impl OpenConnection {
    fn new(stats: Arc<ConnectionStats>) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// By the client, an error, or after its last response.
    Closed,
    /// At its header or idle deadline.
    TimedOut,
    /// By the drain, with nothing in flight.
    Drained,
}

struct Connection {
    builder: Arc<Builder<TokioExecutor>>,
    app: Router,
    limits: ConnectionLimits,
    drain: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream) -> Ended {
        let state = ConnState::new();
        let io = TokioIo::new(Watched {
            tcp,
            state: state.clone(),
        });
        let app = self.app.clone();
        let st = state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            if req.version() == axum::http::Version::HTTP_2 {
                st.h2.store(true, Ordering::Relaxed);
            }
            let receiving = Receiving::start(&st);
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnHandle(st.clone()));
            let app = app.clone();
            async move {
                let res = app.oneshot(req).await;
                drop(receiving);
                res
            }
        });
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        // Already set when the connection came in just as the drain began: the branch below
        // then fires at once.
        let mut draining = false;
        loop {
            // Header bytes may begin, or the last response end, without waking this task:
            // looking again within the shorter of the two timeouts catches either in time.
            let look_again = Instant::now() + self.limits.recheck_every();
            let wake = state
                .deadline(&self.limits)
                .map_or(look_again, |d| d.min(look_again));
            let sleep = tokio::time::sleep_until(wake.into());
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return Ended::Closed;
                }
                _ = sleep => {
                    if state.deadline(&self.limits).is_some_and(|d| d <= Instant::now()) {
                        tracing::debug!("closing a connection past its header or idle deadline");
                        return Ended::TimedOut;
                    }
                }
                _ = self.drain.wait_for(|d| *d), if !draining => {
                    draining = true;
                    if !state.in_flight() {
                        // Idle, half-sent headers or a half-received body: nothing admitted
                        // to wait for. Dropping the connection closes the socket.
                        return Ended::Drained;
                    }
                    // hyper finishes what is in flight (and flushes it), then closes: HTTP/1
                    // after the response, HTTP/2 after GOAWAY once its streams are done.
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
