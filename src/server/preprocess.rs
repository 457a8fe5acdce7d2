//! A small pool of OS threads for chat-template rendering and tokenization, so that long
//! prompts hold up neither the async runtime's workers nor the engine thread. The job queue is
//! bounded: when it is full the request is refused with 503 rather than queued without limit.
//! Small jobs (a short chat) run on the calling task instead: they take less time than the two
//! thread hand-offs would.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::error::ApiError;

type Job = Box<dyn FnOnce() + Send>;

/// Text up to this many bytes is rendered and encoded on the calling task: tens of
/// microseconds, well under what holds up a runtime worker, and cheaper than waking a pool
/// thread and then the task again.
pub const INLINE_BYTES: usize = 2048;

pub struct PreprocessPool {
    jobs: SyncSender<Job>,
}

impl PreprocessPool {
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("distillery-tokenize-{i}"))
                .spawn(move || worker(&rx))?;
        }
        Ok(Self { jobs: tx })
    }

    /// Runs `f` here when `bytes` (the text it works on) is small, else on the pool.
    pub async fn run_sized<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        if bytes > INLINE_BYTES {
            return self.run(f).await;
        }
        // As on the pool, a panicking job (a bug) fails its request, not the worker.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|_| ApiError::overloaded("the tokenization worker stopped"))
    }

    /// Runs `f` on the pool and awaits its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::overloaded(
                    "The server is overloaded: the tokenization queue is full. Retry shortly.",
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::overloaded("the server is shutting down"))
            }
        }
        rx.await
            .map_err(|_| ApiError::overloaded("the tokenization worker stopped"))
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        match job {
            // A panicking job must not take the worker down with it.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}
