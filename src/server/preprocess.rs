//! A small pool of OS threads for chat-template rendering and tokenization, so that long
//! prompts hold up neither the async runtime's workers nor the engine thread.
//!
//! Three rules keep it fair under abuse: the queue is bounded (full: 503, not unbounded
//! latency); a job whose client has gone is dropped before it runs and does not hold a place
//! in the queue; and long jobs never take every thread, so a short prompt does not wait behind
//! a row of megabyte ones. Small jobs (a short chat) run on the calling task instead: they take
//! less time than the two thread hand-offs would.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::error::ApiError;

/// Text up to this many bytes is rendered and encoded on the calling task: tens of
/// microseconds, well under what holds up a runtime worker, and cheaper than waking a pool
/// thread and then the task again.
pub const INLINE_BYTES: usize = 2048;

/// Jobs over this many bytes are long (~15 ms of tokenization and up): they go to their own
/// lane, which may use every thread but one.
pub const LONG_BYTES: usize = 64 << 10;

trait Job: Send {
    /// The client stopped waiting (its request was dropped).
    fn abandoned(&self) -> bool;
    fn run(self: Box<Self>);
}

struct Task<T, F> {
    reply: oneshot::Sender<T>,
    work: F,
}

impl<T: Send, F: FnOnce() -> T + Send> Job for Task<T, F> {
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
    fn run(self: Box<Self>) {
        let Task { reply, work } = *self;
        let _ = reply.send(work());
    }
}

#[derive(Default)]
struct Queues {
    short: VecDeque<Box<dyn Job>>,
    long: VecDeque<Box<dyn Job>>,
    /// Threads running a long job now.
    long_running: usize,
    closed: bool,
}

impl Queues {
    fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Drops the jobs whose clients have gone; returns how many.
    fn forget_abandoned(&mut self) -> usize {
        let before = self.len();
        self.short.retain(|j| !j.abandoned());
        self.long.retain(|j| !j.abandoned());
        before - self.len()
    }
}

struct Shared {
    queues: Mutex<Queues>,
    work: Condvar,
    threads: usize,
    capacity: usize,
    /// Jobs dropped unrun because their client had gone.
    abandoned: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn count_abandoned(&self, n: usize) {
        self.abandoned
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A job runs outside the lock, so a poisoned lock only means a panic while queueing.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct PreprocessPool {
    shared: Arc<Shared>,
}

impl PreprocessPool {
    /// `threads` workers; at most `queue` jobs waiting.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            threads,
            capacity: queue.max(1),
            abandoned: Default::default(),
        });
        for i in 0..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("distillery-tokenize-{i}"))
                .spawn(move || worker(&s))?;
        }
        Ok(Self { shared })
    }

    /// Runs `f` here when `bytes` (the text it works on) is small, else on the pool.
    pub async fn run_sized<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        if bytes > INLINE_BYTES {
            return self.run(bytes, f).await;
        }
        // As on the pool, a panicking job (a bug) fails its request, not the worker.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|_| ApiError::overloaded("the tokenization worker stopped"))
    }

    /// Runs `f` (working on `bytes` of text) on the pool and awaits its result. Dropping the
    /// returned future before the job starts takes the job out of the queue.
    pub async fn run<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Task { reply, work: f });
        {
            let mut q = self.shared.lock();
            if q.closed {
                return Err(ApiError::overloaded("the server is shutting down"));
            }
            if q.len() >= self.shared.capacity {
                let gone = q.forget_abandoned();
                self.shared.count_abandoned(gone);
            }
            if q.len() >= self.shared.capacity {
                return Err(ApiError::overloaded(
                    "The server is overloaded: the tokenization queue is full. Retry shortly.",
                ));
            }
            if bytes > LONG_BYTES {
                q.long.push_back(job);
            } else {
                q.short.push_back(job);
            }
        }
        // Any waiting thread can take what was pushed (a long job only when the lane has room,
        // which holds for every thread alike): waking one is enough.
        self.shared.work.notify_one();
        rx.await
            .map_err(|_| ApiError::overloaded("the tokenization worker stopped"))
    }

    /// Jobs waiting, abandoned ones included until a worker or a full queue clears them.
    pub fn queued(&self) -> usize {
        self.shared.lock().len()
    }

    /// Jobs dropped unrun since start because their clients had gone.
    pub fn abandoned(&self) -> u64 {
        self.shared
            .abandoned
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for PreprocessPool {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
    }
}

/// What a free worker takes next: a short job first; a long one only while another thread is
/// left for short ones (or there is just one thread).
fn next_job(s: &Shared, q: &mut Queues) -> Option<(Box<dyn Job>, bool)> {
    while let Some(j) = q.short.pop_front() {
        if !j.abandoned() {
            return Some((j, false));
        }
        s.count_abandoned(1);
    }
    if s.threads == 1 || q.long_running + 1 < s.threads {
        while let Some(j) = q.long.pop_front() {
            if !j.abandoned() {
                return Some((j, true));
            }
            s.count_abandoned(1);
        }
    }
    None
}

fn worker(s: &Shared) {
    let mut q = s.lock();
    loop {
        if q.closed {
            return;
        }
        let Some((job, long)) = next_job(s, &mut q) else {
            q = s.work.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        if long {
            q.long_running += 1;
        }
        drop(q);
        // A panicking job must not take the worker down with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()));
        q = s.lock();
        if long {
            q.long_running -= 1;
            // Another thread may be waiting for the long lane to open.
            s.work.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// A job that says when it starts and then waits until the test lets it finish, so the
    /// pool's state can be looked at while it runs.
    struct Gate {
        release: mpsc::Sender<()>,
        started: mpsc::Receiver<()>,
    }

    fn gate() -> (Gate, impl FnOnce() + Send + 'static) {
        let (release, wait) = mpsc::channel::<()>();
        let (start, started) = mpsc::channel::<()>();
        let job = move || {
            let _ = start.send(());
            let _ = wait.recv_timeout(Duration::from_secs(30));
        };
        (Gate { release, started }, job)
    }

    impl Gate {
        fn wait_started(&self) {
            self.started
                .recv_timeout(Duration::from_secs(30))
                .expect("the gated job never started");
        }
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn short_jobs_pass_running_long_ones() {
        let pool = Arc::new(PreprocessPool::new(2, 16).unwrap());
        let (gate_a, a) = gate();
        let (gate_b, b) = gate();
        let p = pool.clone();
        let long_a = tokio::spawn(async move { p.run(LONG_BYTES + 1, a).await });
        gate_a.wait_started();
        let p = pool.clone();
        let long_b = tokio::spawn(async move { p.run(LONG_BYTES + 1, b).await });
        until("the second long job is queued", || pool.queued() == 1).await;
        // One thread runs a long job, the other must not take the second: a short job runs.
        let short = tokio::time::timeout(Duration::from_secs(20), pool.run(INLINE_BYTES + 1, || 7))
            .await
            .expect("a short job waited behind long ones");
        assert_eq!(short.unwrap(), 7);
        assert_eq!(
            pool.queued(),
            1,
            "the second long job started beside the first"
        );
        gate_a.release.send(()).unwrap();
        gate_b.wait_started();
        gate_b.release.send(()).unwrap();
        long_a.await.unwrap().unwrap();
        long_b.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn jobs_of_departed_clients_are_dropped_and_free_their_place() {
        let pool = Arc::new(PreprocessPool::new(1, 2).unwrap());
        let (gate, blocker) = gate();
        let p = pool.clone();
        let running = tokio::spawn(async move { p.run(INLINE_BYTES + 1, blocker).await });
        gate.wait_started();
        // Two more fill the queue, then their clients leave.
        let ran = Arc::new(AtomicUsize::new(0));
        for i in 0..2 {
            let p = pool.clone();
            let r = ran.clone();
            let waiter = tokio::spawn(async move {
                p.run(INLINE_BYTES + 1, move || {
                    r.fetch_add(1, Ordering::SeqCst);
                })
                .await
            });
            until("the job is queued", || pool.queued() == i + 1).await;
            waiter.abort();
            let _ = waiter.await;
        }
        // The queue is full of abandoned jobs; a new client still gets a place.
        let p = pool.clone();
        let next = tokio::spawn(async move { p.run(INLINE_BYTES + 1, || 5).await });
        until("the new job is queued", || pool.queued() == 1).await;
        gate.release.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(next.await.unwrap().unwrap(), 5);
        assert_eq!(ran.load(Ordering::SeqCst), 0, "an abandoned job ran");
        assert_eq!(pool.abandoned(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_full_queue_is_503() {
        let pool = Arc::new(PreprocessPool::new(1, 1).unwrap());
        let (gate, blocker) = gate();
        let p = pool.clone();
        let running = tokio::spawn(async move { p.run(INLINE_BYTES + 1, blocker).await });
        gate.wait_started();
        let p = pool.clone();
        let queued = tokio::spawn(async move { p.run(INLINE_BYTES + 1, || 1).await });
        until("the second job is queued", || pool.queued() == 1).await;
        let err = pool.run(INLINE_BYTES + 1, || 2).await.unwrap_err();
        assert_eq!(err.status.as_u16(), 503);
        gate.release.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap().unwrap(), 1);
    }
}
