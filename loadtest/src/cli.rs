//! The command line: every flag, the parsing of durations (`60s`, `500ms`, `2m`) and rates
//! (`inf`), and the checks that turn flags into a run plan or say what is missing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

use crate::runner::{LoadPlan, Mode};

/// Upper bound of `--concurrency`: one task and one connection (two descriptors locally) each.
pub const MAX_CONCURRENCY: usize = 65536;

/// Upper bound of `--duration`, `--warmup` and `--timeout`: a day. Runs are bounded in time.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// In-flight cap of the open loop when `--concurrency` does not set one. Each request in flight
/// holds an HTTP/1.1 connection; without a cap, a stall of a few milliseconds at a high rate
/// opens thousands of new connections, whose handshakes slow both sides further until the run
/// collapses (seen against the trivial server at 15000 req/s). At the cap, arrivals wait and the
/// report's send lag shows it. 1024 in flight at 5000 req/s is 200 ms of queue.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Load generator for OpenAI-compatible servers (Distillery, vLLM, TGI, llama.cpp), reporting
/// as `vllm bench serve` does.
///
/// Closed loop: `--concurrency N`. Open loop: `--request-rate R` (gamma-distributed gaps of mean
/// 1/R and shape `--burstiness`; `inf` sends all at once), with `--concurrency` then capping
/// requests in flight. `--sweep R1,R2,...` runs the open loop at each rate. Every run stops
/// after `--duration` or `--num-requests` (whichever comes first). Targets must be loopback.
#[derive(Debug, Clone, Parser)]
#[command(name = "distillery-loadtest", version)]
pub struct Args {
    /// Server base URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,

    /// Model name to send; default: the first model of GET /v1/models.
    #[arg(long)]
    pub model: Option<String>,

    /// Bearer key sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Scenario TOML file (see loadtest/scenarios/).
    #[arg(long)]
    pub scenario: PathBuf,

    /// Override the scenario's `stream` setting.
    #[arg(long)]
    pub stream: Option<bool>,

    /// Drop the constraint fields (`response_format`, `structured_outputs`, `guided_json`,
    /// `guided_regex`, `guided_choice`, `guided_grammar`, `tools`, `tool_choice`) from the
    /// scenario's `extra_body`: the paired baseline of a structured-outputs scenario.
    #[arg(long)]
    pub unconstrained: bool,

    /// Closed loop: this many requests always in flight. With --request-rate or --sweep: the
    /// most requests in flight at once.
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Open loop: mean arrivals per second, or `inf` for all at once.
    #[arg(long, value_parser = parse_rate)]
    pub request_rate: Option<f64>,

    /// Gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier, > 1 more regular.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,

    /// Stop issuing requests after this long (after the warm-up), e.g. `60s`, `500ms`, `2m`.
    /// Default 60s when --num-requests is not given either.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after this many measured requests.
    #[arg(long)]
    pub num_requests: Option<u64>,

    /// Requests sent during this first period are left out of every figure.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,

    /// Per-request timeout.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,

    /// Write the full result (summary and per-request records) as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,

    /// Leave the per-request records out of --output.
    #[arg(long)]
    pub summary_only: bool,

    /// Seed for prompt order, random prompts and arrival gaps.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Run the open loop at each of these rates and report the highest that meets the SLOs.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub sweep: Vec<f64>,

    /// Sweep SLO: p99 end-to-end latency at most this (ms). Also gives per-request goodput.
    #[arg(long)]
    pub slo_p99_e2e_ms: Option<f64>,

    /// Sweep SLO: p99 time to first token at most this (ms). Also gives per-request goodput.
    #[arg(long)]
    pub slo_p99_ttft_ms: Option<f64>,

    /// SVG chart of a sweep; default: --output with an .svg extension, else sweep.svg.
    #[arg(long)]
    pub chart: Option<PathBuf>,

    /// Runtime worker threads; 1 is a single-threaded runtime, which on a small machine shared
    /// with the server outruns a multi-threaded one (no work stealing, no cross-thread wakeups).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Connections to open before the clock starts (0: none). Default: the concurrency of a
    /// closed loop; for an open loop, the arrivals of 50 ms (at least 16), at most the in-flight
    /// cap and the request count.
    #[arg(long)]
    pub preconnect: Option<usize>,

    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// What the flags ask for.
#[derive(Debug, Clone)]
pub enum Plan {
    Single(LoadPlan),
    /// One plan per rate, in the order given.
    Sweep(Vec<(f64, LoadPlan)>),
}

impl Args {
    /// Checks the flags together and builds the run plan(s).
    pub fn plan(&self) -> Result<Plan> {
        if !(self.burstiness.is_finite() && self.burstiness > 0.0) {
            bail!("--burstiness must be a positive number");
        }
        if self.concurrency == Some(0) {
            bail!("--concurrency must be at least 1");
        }
        if self.concurrency.is_some_and(|c| c > MAX_CONCURRENCY) {
            bail!("--concurrency is at most {MAX_CONCURRENCY} (one connection each)");
        }
        for (flag, d) in [
            ("--duration", self.duration.unwrap_or_default()),
            ("--warmup", self.warmup),
            ("--timeout", self.timeout),
        ] {
            if d > MAX_PERIOD {
                bail!("{flag} is at most {} s", MAX_PERIOD.as_secs());
            }
        }
        if self.num_requests == Some(0) {
            bail!("--num-requests must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be positive");
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be positive");
        }
        // Bounded by time unless a count is given.
        let duration = match (self.duration, self.num_requests) {
            (None, None) => Some(Duration::from_secs(60)),
            (d, _) => d,
        };
        let base = LoadPlan {
            mode: Mode::Closed { concurrency: 1 },
            duration,
            num_requests: self.num_requests,
            warmup: self.warmup,
            timeout: self.timeout,
            seed: self.seed,
            progress: !self.no_progress,
            preconnect: 0,
        };
        let open = |rate: f64| Mode::Open {
            rate,
            burstiness: self.burstiness,
            max_in_flight: self.concurrency.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
        };
        let inf_needs_count = |rate: f64| -> Result<()> {
            if rate.is_infinite() && self.num_requests.is_none() {
                bail!("a rate of inf needs --num-requests (it sends everything at once)");
            }
            Ok(())
        };
        if !self.sweep.is_empty() {
            if self.request_rate.is_some() {
                bail!("give --sweep or --request-rate, not both");
            }
            let mut plans = Vec::new();
            for &rate in &self.sweep {
                inf_needs_count(rate)?;
                let mode = open(rate);
                plans.push((
                    rate,
                    LoadPlan {
                        mode,
                        preconnect: self.preconnect_for(mode),
                        ..base.clone()
                    },
                ));
            }
            return Ok(Plan::Sweep(plans));
        }
        let mode = match (self.request_rate, self.concurrency) {
            (Some(rate), _) => {
                inf_needs_count(rate)?;
                open(rate)
            }
            (None, Some(concurrency)) => Mode::Closed { concurrency },
            (None, None) => bail!("give --concurrency N (closed loop), --request-rate R (open loop) or --sweep R1,R2,..."),
        };
        Ok(Plan::Single(LoadPlan {
            mode,
            preconnect: self.preconnect_for(mode),
            ..base
        }))
    }

    fn preconnect_for(&self, mode: Mode) -> usize {
        if let Some(n) = self.preconnect {
            return n;
        }
        let n = match mode {
            Mode::Closed { concurrency } => concurrency,
            Mode::Open {
                rate,
                max_in_flight,
                ..
            } => {
                let burst = if rate.is_finite() {
                    (rate * 0.05).ceil() as usize
                } else {
                    usize::MAX
                };
                burst.max(16).min(max_in_flight)
            }
        };
        let count = self
            .num_requests
            .map_or(usize::MAX, |c| usize::try_from(c).unwrap_or(usize::MAX));
        n.min(count)
    }
}

/// `60s`, `1.5s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 60s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A positive number of requests per second, or `inf`.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("inf") {
        return Ok(f64::INFINITY);
    }
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("{s:?} is not a positive rate (or inf)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["distillery-loadtest", "--scenario", "s.toml"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_rate("inf"), Ok(f64::INFINITY));
        assert_eq!(parse_rate("2500"), Ok(2500.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-3").is_err());
    }

    #[test]
    fn plans() {
        let p = args(&["--concurrency", "32", "--num-requests", "500"])
            .unwrap()
            .plan()
            .unwrap();
        let Plan::Single(p) = p else { panic!() };
        assert_eq!(p.mode, Mode::Closed { concurrency: 32 });
        assert_eq!((p.num_requests, p.duration), (Some(500), None));

        let p = args(&["--request-rate", "5000"]).unwrap().plan().unwrap();
        let Plan::Single(p) = p else { panic!() };
        assert_eq!(
            p.duration,
            Some(Duration::from_secs(60)),
            "bounded by default"
        );
        assert!(
            matches!(p.mode, Mode::Open { rate, max_in_flight: DEFAULT_MAX_IN_FLIGHT, .. } if rate == 5000.0)
        );

        let p = args(&["--sweep", "100,200", "--duration", "2s"])
            .unwrap()
            .plan()
            .unwrap();
        let Plan::Sweep(v) = p else { panic!() };
        assert_eq!(
            v.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            vec![100.0, 200.0]
        );

        assert!(args(&[]).unwrap().plan().is_err(), "a mode is required");
        assert!(!args(&[]).unwrap().unconstrained);
        assert!(args(&["--unconstrained"]).unwrap().unconstrained);
        assert!(
            args(&["--request-rate", "inf"]).unwrap().plan().is_err(),
            "inf needs a count"
        );
        assert!(args(&["--request-rate", "inf", "--num-requests", "10"])
            .unwrap()
            .plan()
            .is_ok());
        assert!(args(&["--concurrency", "0"]).unwrap().plan().is_err());
        assert!(args(&["--concurrency", "1000000"]).unwrap().plan().is_err());
        assert!(args(&["--concurrency", "1", "--duration", "9999999999s"])
            .unwrap()
            .plan()
            .is_err());
        assert!(args(&["--sweep", "1", "--request-rate", "2"])
            .unwrap()
            .plan()
            .is_err());
        assert!(args(&["--concurrency", "1", "--burstiness", "0"])
            .unwrap()
            .plan()
            .is_err());
    }
}
