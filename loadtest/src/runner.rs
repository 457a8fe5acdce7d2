//! Driving the load: the closed loop (N workers, each sending its next request when the last
//! one finishes) and the open loop (arrivals at gamma-distributed gaps with mean 1/R and shape
//! `burstiness`, as `vllm bench serve` draws them), warm-up, the stop conditions (duration,
//! request count, both bounded), and the progress bar. Owns scheduling only; each request is
//! `client::send`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{self, Call, HttpClient, RequestRecord, Scanner, Target};
use crate::scenario::Workload;

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Mode {
    /// `concurrency` requests always in flight.
    Closed { concurrency: usize },
    /// Arrivals at `rate` per second (infinite: all at once), at most `max_in_flight` at a time.
    Open {
        rate: f64,
        burstiness: f64,
        max_in_flight: usize,
    },
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub mode: Mode,
    /// Stop issuing requests this long after the warm-up ends.
    pub duration: Option<Duration>,
    /// Stop after this many measured (post-warm-up) requests.
    pub num_requests: Option<u64>,
    pub warmup: Duration,
    /// Per-request limit: also bounds how long the final drain can take.
    pub timeout: Duration,
    pub seed: u64,
    pub progress: bool,
    /// Connections opened (with `GET /v1/models`) before the clock starts, so the first
    /// second does not measure TCP handshakes; see `cli::Args::preconnect`.
    pub preconnect: usize,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Every request, warm-up ones included (flagged), in completion order.
    pub records: Vec<RequestRecord>,
    /// Wall time from the end of the warm-up to the last measured response.
    pub duration_s: f64,
    pub max_in_flight: u64,
}

/// Shared, per-run state (not global: one per `run` call).
struct Ctx {
    client: HttpClient,
    uri: Uri,
    auth: Option<HeaderValue>,
    workload: Arc<Workload>,
    scanner: Scanner,
    timeout: Duration,
    run_start: Instant,
    measure_start: Instant,
    /// Requests issued, for the prompt order.
    issued: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

impl Ctx {
    /// Sends the next request. `scheduled` is its arrival time in the open loop: how late it
    /// went out (a full in-flight cap, a busy client) is recorded, so a generator that cannot
    /// keep to its schedule shows it instead of quietly sending less.
    async fn one(&self, warmup: bool, scheduled: Option<Instant>) -> RequestRecord {
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        let (prompt_index, body) = self.workload.request(i);
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::Relaxed);
        let call = Call {
            client: &self.client,
            uri: &self.uri,
            auth: self.auth.as_ref(),
            body: body.clone(),
            stream: self.workload.stream,
            scanner: &self.scanner,
            timeout: self.timeout,
            expected_chunks: self.workload.max_output_tokens as usize,
        };
        let mut rec = client::send(call, self.run_start, prompt_index).await;
        rec.warmup = warmup;
        if let Some(at) = scheduled {
            let at_ms = client::ms(at.saturating_duration_since(self.run_start));
            rec.lag_ms = Some((rec.start_ms - at_ms).max(0.0));
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
        if !rec.success() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        rec
    }
}

/// Runs one load against `target` and returns every record.
pub async fn run(
    client: &HttpClient,
    target: &Target,
    workload: Arc<Workload>,
    plan: &LoadPlan,
) -> Result<RunOutput> {
    if plan.duration.is_none() && plan.num_requests.is_none() {
        bail!("a run needs --duration or --num-requests");
    }
    if let Mode::Open { rate, .. } = plan.mode {
        if rate.is_infinite() && plan.num_requests.is_none() {
            bail!("--request-rate inf needs --num-requests (else it would send without end)");
        }
    }
    let uri = target.uri(workload.endpoint.path())?;
    let auth = target.auth().cloned();
    if plan.preconnect > 0 {
        preconnect(client, target, plan.preconnect).await?;
    }
    let run_start = Instant::now();
    let far = || anyhow::anyhow!("--warmup plus --duration is too long");
    let measure_start = run_start.checked_add(plan.warmup).ok_or_else(far)?;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        uri,
        auth,
        workload,
        scanner: Scanner::default(),
        timeout: plan.timeout,
        run_start,
        measure_start,
        issued: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
    });
    let stop_at = match plan.duration {
        Some(d) => Some(measure_start.checked_add(d).ok_or_else(far)?),
        None => None,
    };
    let progress = plan
        .progress
        .then(|| Progress::start(ctx.clone(), plan, stop_at));
    let window = Window {
        measure_start,
        stop_at,
        num_requests: plan.num_requests,
    };

    let mut records = match plan.mode {
        Mode::Closed { concurrency } => closed_loop(&ctx, concurrency, window).await,
        Mode::Open {
            rate,
            burstiness,
            max_in_flight,
        } => open_loop(&ctx, rate, burstiness, max_in_flight, plan.seed, window).await?,
    };
    if let Some(p) = progress {
        p.finish().await;
    }
    records.sort_unstable_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    let measure_offset = client::ms(plan.warmup);
    let last_end = records
        .iter()
        .filter(|r| !r.warmup)
        .map(|r| r.start_ms + r.e2e_ms)
        .fold(measure_offset, f64::max);
    Ok(RunOutput {
        records,
        duration_s: (last_end - measure_offset) / 1e3,
        max_in_flight: ctx.max_in_flight.load(Ordering::Relaxed),
    })
}

/// Opens `n` pooled connections by sending `n` concurrent `GET /v1/models` (any answer will
/// do: the connection is what is wanted). A pool that starts empty makes an open loop open a
/// connection per arrival in its first moments, and at high rates that handshake storm, not the
/// server, sets the latency — and can feed on itself.
async fn preconnect(client: &HttpClient, target: &Target, n: usize) -> Result<()> {
    let uri = target.uri("/v1/models")?;
    let mut set = JoinSet::new();
    for _ in 0..n {
        let mut req = Request::get(uri.clone());
        if let Some(a) = target.auth() {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let req = req.body(Full::new(bytes::Bytes::new()))?;
        let client = client.clone();
        set.spawn(async move {
            if let Ok(resp) = client.request(req).await {
                // Read to the end so the connection goes back to the pool.
                let _ = resp.into_body().collect().await;
            }
        });
    }
    let all = async { while set.join_next().await.is_some() {} };
    // Bounded: a server that does not answer is reported by the run itself.
    let _ = tokio::time::timeout(Duration::from_secs(10), all).await;
    Ok(())
}

/// When one request is sent and what it counts as.
#[derive(Clone, Copy)]
struct Window {
    measure_start: Instant,
    stop_at: Option<Instant>,
    num_requests: Option<u64>,
}

impl Window {
    /// Decides, just before a request is sent, whether it is sent at all and whether it is a
    /// warm-up request. `at` is the request's moment: its scheduled arrival in an open loop
    /// (a sender running late still sends what was due inside the window, and in the part it
    /// was due in), now in a closed loop. `measured` counts post-warm-up requests against
    /// `--num-requests`.
    fn admit(&self, at: Instant, measured: &AtomicU64) -> Option<bool> {
        if self.stop_at.is_some_and(|s| at >= s) {
            return None;
        }
        let warmup = at < self.measure_start;
        if !warmup {
            let n = measured.fetch_add(1, Ordering::Relaxed);
            if self.num_requests.is_some_and(|limit| n >= limit) {
                return None;
            }
        }
        Some(warmup)
    }
}

async fn closed_loop(ctx: &Arc<Ctx>, concurrency: usize, window: Window) -> Vec<RequestRecord> {
    let measured = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let ctx = ctx.clone();
        let measured = measured.clone();
        workers.spawn(async move {
            // Each worker keeps its own records: no lock is shared on the hot path.
            let mut mine = Vec::new();
            while let Some(warmup) = window.admit(Instant::now(), &measured) {
                mine.push(ctx.one(warmup, None).await);
            }
            mine
        });
    }
    let mut records = Vec::new();
    while let Some(done) = workers.join_next().await {
        // A worker only ends by returning; a panic would be a bug in this crate, and its
        // requests are then missing from the figures, which the counts in the report show.
        if let Ok(mine) = done {
            records.extend(mine);
        }
    }
    records
}

async fn open_loop(
    ctx: &Arc<Ctx>,
    rate: f64,
    burstiness: f64,
    max_in_flight: usize,
    seed: u64,
    window: Window,
) -> Result<Vec<RequestRecord>> {
    // Gamma(shape k, scale θ) has mean kθ: θ = 1/(R·k) gives mean gap 1/R; k = 1 is Poisson.
    let gaps = if rate.is_finite() {
        Some(Gamma::new(burstiness, 1.0 / (rate * burstiness))?)
    } else {
        None
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let measured = AtomicU64::new(0);
    let mut tasks = JoinSet::new();
    let mut records = Vec::new();
    // Arrival times are absolute, from the start of the run, so timer lateness does not
    // accumulate into a lower rate.
    let mut next = ctx.run_start;
    let mut last_arrival = false;
    while !last_arrival {
        let scheduled = next;
        if let Some(g) = &gaps {
            // Never sleep past the end of the run: at a low rate the next arrival may be far off.
            let wake = window.stop_at.map_or(next, |s| next.min(s));
            if wake > Instant::now() {
                tokio::time::sleep_until(wake.into()).await;
            }
            // A gap too long to represent (an absurdly low rate) means no further arrival.
            let gap = Duration::try_from_secs_f64(g.sample(&mut rng)).ok();
            match gap.and_then(|d| next.checked_add(d)) {
                Some(t) => next = t,
                None => last_arrival = true,
            }
        }
        let permit = match permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => break, // never closed; nothing left to send if it were
        };
        // With all-at-once arrivals every request is due at the start: judge those by now.
        let at = if gaps.is_some() {
            scheduled
        } else {
            Instant::now()
        };
        let Some(warmup) = window.admit(at, &measured) else {
            break;
        };
        let ctx = ctx.clone();
        tasks.spawn(async move {
            let rec = ctx.one(warmup, Some(scheduled)).await;
            drop(permit);
            rec
        });
        // Collect finished requests as we go so that a long run holds records, not tasks.
        while let Some(done) = tasks.try_join_next() {
            if let Ok(rec) = done {
                records.push(rec);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(rec) = done {
            records.push(rec);
        }
    }
    Ok(records)
}

/// The progress bar on stderr, redrawn from counters by its own task so requests never touch
/// it.
struct Progress {
    bar: ProgressBar,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(ctx: Arc<Ctx>, plan: &LoadPlan, stop_at: Option<Instant>) -> Progress {
        let by_count = plan.num_requests.filter(|_| plan.duration.is_none());
        let (len, template) = match by_count {
            Some(n) => (
                n,
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} requests  {msg}",
            ),
            None => (
                1000,
                "{spinner} [{elapsed_precise}] {bar:40} {percent}% of the time  {msg}",
            ),
        };
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(5));
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let b = bar.clone();
        let total = plan.warmup + plan.duration.unwrap_or_default();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = &mut stopped => break,
                }
                let done = ctx.completed.load(Ordering::Relaxed);
                let failed = ctx.failed.load(Ordering::Relaxed);
                let in_flight = ctx.in_flight.load(Ordering::Relaxed);
                let elapsed = ctx.run_start.elapsed();
                let secs = elapsed.as_secs_f64().max(1e-9);
                if by_count.is_some() {
                    // Warm-up requests also count here; the bar only shows that work moves.
                    b.set_position(done.min(len));
                } else if stop_at.is_some() && !total.is_zero() {
                    b.set_position(
                        (1000.0 * (elapsed.as_secs_f64() / total.as_secs_f64()).min(1.0)) as u64,
                    );
                }
                let phase = if Instant::now() < ctx.measure_start {
                    "warm-up "
                } else {
                    ""
                };
                b.set_message(format!(
                    "{phase}{done} done, {failed} failed, {in_flight} in flight, {:.0} req/s",
                    done as f64 / secs
                ));
            }
        });
        Progress { bar, stop, task }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(num_requests: Option<u64>) -> (Instant, Window) {
        let start = Instant::now();
        let w = Window {
            measure_start: start + Duration::from_secs(1),
            stop_at: Some(start + Duration::from_secs(3)),
            num_requests,
        };
        (start, w)
    }

    #[test]
    fn a_request_counts_in_the_part_of_the_run_it_was_due_in() {
        let (start, w) = window(None);
        let measured = AtomicU64::new(0);
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(w.admit(at(999), &measured), Some(true));
        assert_eq!(w.admit(at(1000), &measured), Some(false));
        // Due just before the end: sent even if the sender is only now getting to it.
        assert_eq!(w.admit(at(2999), &measured), Some(false));
        assert_eq!(w.admit(at(3000), &measured), None);
        assert_eq!(measured.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn num_requests_bounds_the_measured_requests_only() {
        let (start, w) = window(Some(2));
        let measured = AtomicU64::new(0);
        let warm = start + Duration::from_millis(10);
        let due = start + Duration::from_millis(1500);
        for _ in 0..5 {
            assert_eq!(w.admit(warm, &measured), Some(true));
        }
        assert_eq!(w.admit(due, &measured), Some(false));
        assert_eq!(w.admit(due, &measured), Some(false));
        assert_eq!(w.admit(due, &measured), None);
    }
}
