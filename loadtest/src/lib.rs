//! `distillery-loadtest`: a load generator for OpenAI-compatible LLM servers whose figures are
//! those of `vllm bench serve` (see `report`). This file owns the top level: from parsed flags to
//! printed report and written JSON, for one run or a rate sweep. The binary (`main.rs`) only
//! builds the runtime and calls `run_cli`.
//!
//! Modules: `cli` (flags), `scenario` (TOML scenarios, pre-serialised bodies), `client` (HTTP,
//! timing one request), `sse` (event-stream parser), `runner` (closed/open loop), `stats`
//! (percentiles), `report` (figures, text, JSON), `sweep` (rate sweeps, SVG chart), `canned`
//! (the trivial server that measures the generator itself).

pub mod canned;
pub mod cli;
pub mod client;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sse;
pub mod stats;
pub mod sweep;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Serialize;

pub use cli::Args;
use cli::Plan;
use report::{BenchSummary, RunConfig, RunReport, Slo};
use runner::{LoadPlan, Mode};
use scenario::Scenario;
use sweep::{SweepReport, SweepSlo};

/// What `run_cli` did: the same documents it printed and wrote.
#[derive(Debug, Clone)]
pub enum Outcome {
    Single(Box<RunReport>),
    Sweep(SweepReport),
}

/// Runs what the flags ask for: prints the report(s) to stdout, writes `--output` (and a sweep's
/// chart), and returns the result.
pub async fn run_cli(args: &Args) -> Result<Outcome> {
    let plan = args.plan()?;
    let mut scenario = Scenario::load(&args.scenario)?;
    if args.unconstrained {
        scenario = scenario.unconstrained();
    }
    let target = client::Target::new(&args.url, args.api_key.as_deref())?;
    let http = client::build_client();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client::discover_model(&http, &target).await?,
    };
    let workload = Arc::new(scenario.prepare(&model, args.stream, args.seed)?);
    let slo = Slo {
        e2e_ms: args.slo_p99_e2e_ms,
        ttft_ms: args.slo_p99_ttft_ms,
    };
    let config = |p: &LoadPlan| RunConfig {
        url: args.url.clone(),
        model: model.clone(),
        scenario: scenario.name.clone(),
        endpoint: workload.endpoint.path().to_string(),
        stream: workload.stream,
        unconstrained: args.unconstrained,
        mode: match p.mode {
            Mode::Closed { .. } => "closed-loop".into(),
            Mode::Open { .. } => "open-loop".into(),
        },
        request_rate: match p.mode {
            Mode::Open { rate, .. } => Some(rate),
            Mode::Closed { .. } => None,
        },
        burstiness: match p.mode {
            Mode::Open { burstiness, .. } => Some(burstiness),
            Mode::Closed { .. } => None,
        },
        concurrency: match p.mode {
            Mode::Closed { concurrency } => Some(concurrency),
            Mode::Open { .. } => args.concurrency,
        },
        duration_s: p.duration.map(|d| d.as_secs_f64()),
        num_requests: p.num_requests,
        warmup_s: p.warmup.as_secs_f64(),
        seed: p.seed,
    };
    let one = |p: LoadPlan| {
        let http = http.clone();
        let target = target.clone();
        let workload = workload.clone();
        let cfg = config(&p);
        async move {
            let out = runner::run(&http, &target, workload, &p).await?;
            let summary =
                BenchSummary::from_records(&out.records, out.duration_s, out.max_in_flight, &slo);
            let requests = if args.summary_only {
                Vec::new()
            } else {
                out.records
            };
            anyhow::Ok(RunReport {
                config: cfg,
                summary,
                requests,
            })
        }
    };
    let rate_of = |p: &LoadPlan| match p.mode {
        Mode::Open { rate, .. } => Some(rate),
        Mode::Closed { .. } => None,
    };

    match plan {
        Plan::Single(p) => {
            let rate = rate_of(&p);
            let report = one(p).await?;
            print!(
                "{}",
                report.summary.render("Serving Benchmark Result", rate)
            );
            if let Some(path) = &args.output {
                write_json(path, &report)?;
            }
            Ok(Outcome::Single(Box::new(report)))
        }
        Plan::Sweep(plans) => {
            let mut runs = Vec::with_capacity(plans.len());
            for (rate, p) in plans {
                eprintln!("sweep: request rate {rate} req/s");
                let report = one(p).await?;
                print!(
                    "{}",
                    report
                        .summary
                        .render(&format!("Rate {rate} req/s"), Some(rate))
                );
                runs.push((rate, report));
            }
            let sweep_slo = SweepSlo {
                p99_e2e_ms: args.slo_p99_e2e_ms,
                p99_ttft_ms: args.slo_p99_ttft_ms,
            };
            let mut sweep = SweepReport::new(sweep_slo, runs);
            let chart = chart_path(args.chart.as_deref(), args.output.as_deref());
            sweep::write_chart(&sweep, &chart)?;
            sweep.chart = Some(chart.display().to_string());
            print!("{}", sweep.render());
            if let Some(path) = &args.output {
                write_json(path, &sweep)?;
            }
            Ok(Outcome::Sweep(sweep))
        }
    }
}

fn chart_path(chart: Option<&Path>, output: Option<&Path>) -> PathBuf {
    match (chart, output) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(o)) => o.with_extension("svg"),
        (None, None) => PathBuf::from("sweep.svg"),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // Buffered: a 60 s run at thousands of requests per second writes hundreds of thousands of
    // records.
    let mut w = std::io::BufWriter::new(file);
    serde_json::to_writer(&mut w, value).with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::flush(&mut w).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
