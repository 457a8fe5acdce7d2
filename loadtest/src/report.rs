//! The figures of one run as `vllm bench serve` defines them (request and token throughput over
//! the measured duration; TTFT, TPOT, ITL and E2E over successful requests, ITL pooled over all
//! of them; goodput against per-request SLOs), the text report printed in vLLM's layout, and the
//! JSON document written with `--output`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::client::RequestRecord;
use crate::stats::Summary;

/// Per-request service-level objectives, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
}

impl Slo {
    pub fn is_set(&self) -> bool {
        self.e2e_ms.is_some() || self.ttft_ms.is_some()
    }

    fn met_by(&self, r: &RequestRecord) -> bool {
        self.e2e_ms.is_none_or(|s| r.e2e_ms <= s)
            && self
                .ttft_ms
                .is_none_or(|s| r.ttft_ms.is_some_and(|t| t <= s))
    }
}

/// The summary of one run (all times in milliseconds, rates per second).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BenchSummary {
    pub successful_requests: u64,
    pub failed_requests: u64,
    pub warmup_requests: u64,
    pub duration_s: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Requests per second that succeeded and met every SLO given (absent without SLOs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goodput: Option<f64>,
    /// The most requests in flight at once (the client's view).
    pub max_in_flight: u64,
    /// Successful requests whose server sent no `usage` (their token counts are estimates).
    pub requests_without_usage: u64,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    /// Open loop: send time − scheduled arrival, over all measured requests. A p99 of more than
    /// a millisecond or two means arrivals waited (for the in-flight cap, or for a busy client)
    /// and the achieved rate fell short of the schedule.
    pub send_lag_ms: Summary,
    /// Failed requests by HTTP status (0 = no response).
    pub failures_by_status: BTreeMap<u16, u64>,
    /// Up to ten distinct error texts, with their counts.
    pub errors: BTreeMap<String, u64>,
}

impl BenchSummary {
    /// Figures over the measured (non-warm-up) records.
    pub fn from_records(
        records: &[RequestRecord],
        duration_s: f64,
        max_in_flight: u64,
        slo: &Slo,
    ) -> BenchSummary {
        let mut s = BenchSummary {
            duration_s,
            max_in_flight,
            ..BenchSummary::default()
        };
        let (mut ttft, mut tpot, mut itl, mut e2e) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut good = 0u64;
        let mut lag = Vec::new();
        for r in records {
            if r.warmup {
                s.warmup_requests += 1;
                continue;
            }
            lag.extend(r.lag_ms);
            if let Some(err) = &r.error {
                s.failed_requests += 1;
                *s.failures_by_status.entry(r.status).or_default() += 1;
                if let Some(n) = s.errors.get_mut(err) {
                    *n += 1;
                } else if s.errors.len() < 10 {
                    s.errors.insert(err.clone(), 1);
                }
                continue;
            }
            s.successful_requests += 1;
            s.total_input_tokens += r.prompt_tokens;
            s.total_output_tokens += r.output_tokens;
            if !r.usage_reported {
                s.requests_without_usage += 1;
            }
            ttft.extend(r.ttft_ms);
            tpot.extend(r.tpot_ms);
            itl.extend_from_slice(&r.itl_ms);
            e2e.push(r.e2e_ms);
            if slo.met_by(r) {
                good += 1;
            }
        }
        if duration_s > 0.0 {
            s.request_throughput = s.successful_requests as f64 / duration_s;
            s.output_throughput = s.total_output_tokens as f64 / duration_s;
            s.total_token_throughput =
                (s.total_input_tokens + s.total_output_tokens) as f64 / duration_s;
            if slo.is_set() {
                s.goodput = Some(good as f64 / duration_s);
            }
        }
        s.ttft_ms = Summary::of(&mut ttft);
        s.tpot_ms = Summary::of(&mut tpot);
        s.itl_ms = Summary::of(&mut itl);
        s.e2e_ms = Summary::of(&mut e2e);
        s.send_lag_ms = Summary::of(&mut lag);
        s
    }

    /// The report in `vllm bench serve`'s layout.
    pub fn render(&self, title: &str, target_rate: Option<f64>) -> String {
        let mut o = String::new();
        let line = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "{k:<40} {v:<10}");
        };
        let _ = writeln!(o, "{:=^50}", format!(" {title} "));
        line(
            &mut o,
            "Successful requests:",
            self.successful_requests.to_string(),
        );
        line(&mut o, "Failed requests:", self.failed_requests.to_string());
        if self.warmup_requests > 0 {
            line(
                &mut o,
                "Warm-up requests (excluded):",
                self.warmup_requests.to_string(),
            );
        }
        if let Some(r) = target_rate {
            let r = if r.is_finite() {
                format!("{r:.2}")
            } else {
                "inf".into()
            };
            line(&mut o, "Target request rate (req/s):", r);
        }
        line(
            &mut o,
            "Maximum requests in flight:",
            self.max_in_flight.to_string(),
        );
        if self.send_lag_ms.count > 0 {
            let l = &self.send_lag_ms;
            let v = format!("{:.2} / {:.2}", l.p99, l.max);
            line(&mut o, "Send lag behind schedule p99/max (ms):", v);
        }
        line(
            &mut o,
            "Benchmark duration (s):",
            format!("{:.2}", self.duration_s),
        );
        line(
            &mut o,
            "Total input tokens:",
            self.total_input_tokens.to_string(),
        );
        line(
            &mut o,
            "Total generated tokens:",
            self.total_output_tokens.to_string(),
        );
        line(
            &mut o,
            "Request throughput (req/s):",
            format!("{:.2}", self.request_throughput),
        );
        if let Some(g) = self.goodput {
            line(&mut o, "Request goodput (req/s):", format!("{g:.2}"));
        }
        line(
            &mut o,
            "Output token throughput (tok/s):",
            format!("{:.2}", self.output_throughput),
        );
        line(
            &mut o,
            "Total Token throughput (tok/s):",
            format!("{:.2}", self.total_token_throughput),
        );
        for (head, short, s) in [
            ("Time to First Token", "TTFT", &self.ttft_ms),
            (
                "Time per Output Token (excl. 1st token)",
                "TPOT",
                &self.tpot_ms,
            ),
            ("Inter-token Latency", "ITL", &self.itl_ms),
            ("End-to-end Latency", "E2EL", &self.e2e_ms),
        ] {
            let _ = writeln!(o, "{:-^50}", head);
            line(
                &mut o,
                &format!("Mean {short} (ms):"),
                format!("{:.2}", s.mean),
            );
            line(
                &mut o,
                &format!("Median {short} (ms):"),
                format!("{:.2}", s.median),
            );
            line(
                &mut o,
                &format!("Std {short} (ms):"),
                format!("{:.2}", s.std),
            );
            line(
                &mut o,
                &format!("P90 {short} (ms):"),
                format!("{:.2}", s.p90),
            );
            line(
                &mut o,
                &format!("P99 {short} (ms):"),
                format!("{:.2}", s.p99),
            );
        }
        if self.requests_without_usage > 0 {
            let _ = writeln!(
                o,
                "note: {} responses had no `usage`; their output tokens are content chunks",
                self.requests_without_usage
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(o, "{:-^50}", "Errors");
            for (e, n) in &self.errors {
                let _ = writeln!(o, "{n:>8} x {e}");
            }
        }
        let _ = writeln!(o, "{}", "=".repeat(50));
        o
    }
}

/// What was run, echoed into the JSON result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub url: String,
    pub model: String,
    pub scenario: String,
    pub endpoint: String,
    pub stream: bool,
    /// `--unconstrained`: the scenario's constraint fields were dropped from every body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconstrained: bool,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burstiness: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_requests: Option<u64>,
    pub warmup_s: f64,
    pub seed: u64,
}

/// One run: the `--output` document of a plain run, and one entry of a sweep's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub config: RunConfig,
    pub summary: BenchSummary,
    /// Every request (warm-up ones flagged); empty with `--summary-only`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ttft: f64, e2e: f64, out: u64, itl: &[f64]) -> RequestRecord {
        RequestRecord {
            ttft_ms: Some(ttft),
            e2e_ms: e2e,
            tpot_ms: (out > 1).then(|| (e2e - ttft) / (out - 1) as f64),
            itl_ms: itl.to_vec(),
            prompt_tokens: 10,
            output_tokens: out,
            usage_reported: true,
            status: 200,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn figures_skip_warmup_and_failures() {
        let mut warm = rec(1.0, 2.0, 3, &[]);
        warm.warmup = true;
        let mut bad = rec(0.0, 5.0, 0, &[]);
        bad.error = Some("HTTP 503: busy".into());
        bad.status = 503;
        let records = vec![
            warm,
            rec(10.0, 40.0, 4, &[10.0, 10.0, 10.0]),
            rec(20.0, 20.0, 1, &[]),
            bad,
        ];
        let slo = Slo {
            e2e_ms: Some(30.0),
            ttft_ms: None,
        };
        let s = BenchSummary::from_records(&records, 2.0, 3, &slo);
        assert_eq!(
            (s.successful_requests, s.failed_requests, s.warmup_requests),
            (2, 1, 1)
        );
        assert_eq!((s.total_input_tokens, s.total_output_tokens), (20, 5));
        assert_eq!(s.request_throughput, 1.0);
        assert_eq!(s.output_throughput, 2.5);
        assert_eq!(s.total_token_throughput, 12.5);
        assert_eq!(s.goodput, Some(0.5));
        assert_eq!(s.ttft_ms.count, 2);
        assert_eq!(s.ttft_ms.mean, 15.0);
        assert_eq!(s.tpot_ms.count, 1);
        assert_eq!(s.tpot_ms.mean, 10.0);
        assert_eq!(s.itl_ms.count, 3);
        assert_eq!(s.e2e_ms.p99, 20.0 + 20.0 * 0.99);
        assert_eq!(s.failures_by_status.get(&503), Some(&1));
        let text = s.render("Serving Benchmark Result", Some(f64::INFINITY));
        assert!(text.contains("Successful requests:                     2"));
        assert!(text.contains("P99 E2EL (ms):"));
        assert!(text.contains("1 x HTTP 503: busy"));
    }
}
