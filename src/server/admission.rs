//! Admission control: a bound on requests waiting for their first token, by count and by
//! prompt tokens. Past it a request gets 503 at once (which load balancers retry elsewhere)
//! instead of piling up latency in the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;

#[derive(Debug)]
pub struct Admission {
    max_requests: usize,
    max_prompt_tokens: usize,
    requests: AtomicUsize,
    prompt_tokens: AtomicUsize,
}

/// A place in the queue; given back when the request's first token arrives or it ends.
#[derive(Debug)]
pub struct QueuePermit {
    admission: Arc<Admission>,
    prompt_tokens: usize,
    admitted: Instant,
}

impl QueuePermit {
    /// When the request entered the queue (its queue time counts from here).
    pub fn admitted(&self) -> Instant {
        self.admitted
    }
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        self.admission.requests.fetch_sub(1, Ordering::Relaxed);
        self.admission
            .prompt_tokens
            .fetch_sub(self.prompt_tokens, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(max_requests: usize, max_prompt_tokens: usize) -> Arc<Self> {
        Arc::new(Self {
            max_requests,
            max_prompt_tokens,
            requests: AtomicUsize::new(0),
            prompt_tokens: AtomicUsize::new(0),
        })
    }

    /// Prompt tokens of admitted requests still waiting for their first token (for the
    /// metrics; a refused request may be counted for an instant while it is turned away).
    pub fn queued_prompt_tokens(&self) -> usize {
        self.prompt_tokens.load(Ordering::Relaxed)
    }

    pub fn try_admit(self: &Arc<Self>, prompt_tokens: usize) -> Result<QueuePermit, ApiError> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let t = self
            .prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        let permit = QueuePermit {
            admission: self.clone(),
            prompt_tokens,
            admitted: Instant::now(),
        };
        // The first request is always let in, however long, so a lone large prompt can run.
        if n >= self.max_requests || (n > 0 && t + prompt_tokens > self.max_prompt_tokens) {
            drop(permit);
            return Err(ApiError::overloaded(format!(
                "The server is overloaded: {n} requests ({t} prompt tokens) are already waiting. \
                 Retry shortly."
            )));
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_either_bound_and_frees_on_drop() {
        let a = Admission::new(2, 100);
        let p1 = a.try_admit(60).unwrap();
        assert!(a.try_admit(60).is_err(), "token bound");
        let p2 = a.try_admit(10).unwrap();
        assert_eq!(a.try_admit(1).unwrap_err().status.as_u16(), 503);
        drop(p1);
        drop(p2);
        assert_eq!(a.requests.load(Ordering::Relaxed), 0);
        assert_eq!(a.prompt_tokens.load(Ordering::Relaxed), 0);
        assert!(a.try_admit(1000).is_ok(), "a lone large prompt is admitted");
    }
}
