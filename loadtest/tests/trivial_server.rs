//! The loadtest end to end against its trivial canned-completion server (`canned`), in process:
//! bounded loads in every mode, checked through the JSON report it writes, and a short
//! measurement of the highest rate the generator reaches (printed; run with `--nocapture` to see
//! it). Tests are serialised so the measurement does not share the machine with the others.

use std::path::PathBuf;
use tokio::sync::Mutex;

use clap::Parser;
use distillery_loadtest::canned::{self, CannedServer};
use distillery_loadtest::{run_cli, Args, Outcome};
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn scenario(name: &str) -> String {
    format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("distillery-loadtest-{}-{name}", std::process::id()))
}

async fn run(server: &CannedServer, scenario_name: &str, extra: &[&str]) -> Outcome {
    let url = server.url();
    let scen = scenario(scenario_name);
    let mut argv = vec![
        "distillery-loadtest",
        "--url",
        &url,
        "--scenario",
        &scen,
        "--no-progress",
    ];
    argv.extend_from_slice(extra);
    let args = Args::try_parse_from(argv).expect("flags parse");
    run_cli(&args).await.expect("run succeeds")
}

fn read_json(path: &PathBuf) -> Value {
    let text = std::fs::read_to_string(path).expect("report written");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("report is JSON")
}

/// Checks a single run's report: every request counted, none failed, tokens from `usage`.
fn check_counts(report: &Value, n: u64) {
    let s = &report["summary"];
    assert_eq!(s["successful_requests"], n, "{s}");
    assert_eq!(s["failed_requests"], 0, "{s}");
    assert_eq!(s["requests_without_usage"], 0);
    assert_eq!(s["total_input_tokens"], n * canned::PROMPT_TOKENS);
    assert_eq!(s["total_output_tokens"], n * canned::OUTPUT_TOKENS);
    assert!(s["request_throughput"].as_f64().unwrap() > 0.0);
    assert_eq!(s["e2e_ms"]["count"], n);
    let reqs = report["requests"].as_array().expect("per-request records");
    assert_eq!(reqs.len() as u64, n);
    for r in reqs {
        assert_eq!(r["status"], 200);
        assert_eq!(r["output_tokens"], canned::OUTPUT_TOKENS);
        assert!(r.get("error").is_none());
    }
}

#[tokio::test]
async fn non_streaming_chat_counts_every_request() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("chat.json");
    let o = out.to_str().unwrap();
    let outcome = run(
        &server,
        "customer-service",
        &[
            "--num-requests",
            "500",
            "--concurrency",
            "32",
            "--output",
            o,
        ],
    )
    .await;
    assert!(matches!(outcome, Outcome::Single(_)));
    let report = read_json(&out);
    check_counts(&report, 500);
    assert_eq!(
        report["config"]["model"],
        canned::MODEL,
        "model found through /v1/models"
    );
    assert_eq!(report["config"]["mode"], "closed-loop");
    let s = &report["summary"];
    assert_eq!(s["max_in_flight"], 32);
    // Not streaming: TTFT is the whole response, and there are no inter-token gaps.
    assert_eq!(s["ttft_ms"]["mean"], s["e2e_ms"]["mean"]);
    assert_eq!(s["itl_ms"]["count"], 0);
}

#[tokio::test]
async fn streaming_chat_times_every_chunk() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("stream.json");
    let o = out.to_str().unwrap();
    run(
        &server,
        "customer-service",
        &[
            "--stream",
            "true",
            "--num-requests",
            "500",
            "--concurrency",
            "32",
            "--output",
            o,
        ],
    )
    .await;
    let report = read_json(&out);
    check_counts(&report, 500);
    let s = &report["summary"];
    assert_eq!(report["config"]["stream"], true);
    // 16 content chunks per response: 15 gaps each; the role and usage chunks are not tokens.
    assert_eq!(s["itl_ms"]["count"], 500 * (canned::OUTPUT_TOKENS - 1));
    assert_eq!(s["tpot_ms"]["count"], 500);
    for r in report["requests"].as_array().unwrap() {
        assert_eq!(
            r["itl_ms"].as_array().unwrap().len() as u64,
            canned::OUTPUT_TOKENS - 1
        );
        assert!(r["ttft_ms"].as_f64().unwrap() <= r["e2e_ms"].as_f64().unwrap());
    }
}

#[tokio::test]
async fn streaming_completions_open_loop_keeps_its_schedule() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("open.json");
    let o = out.to_str().unwrap();
    // 400 Poisson arrivals at 1000/s: the schedule alone takes about 0.4 s.
    run(
        &server,
        "completions-short",
        &[
            "--stream",
            "true",
            "--request-rate",
            "1000",
            "--num-requests",
            "400",
            "--seed",
            "3",
            "--output",
            o,
        ],
    )
    .await;
    let report = read_json(&out);
    check_counts(&report, 400);
    let s = &report["summary"];
    assert_eq!(report["config"]["endpoint"], "/v1/completions");
    assert_eq!(report["config"]["mode"], "open-loop");
    assert_eq!(s["itl_ms"]["count"], 400 * (canned::OUTPUT_TOKENS - 1));
    let duration = s["duration_s"].as_f64().unwrap();
    assert!(
        duration > 0.25,
        "an open loop at 1000/s cannot send 400 requests in {duration} s"
    );
    assert_eq!(s["send_lag_ms"]["count"], 400);
}

#[tokio::test]
async fn warmup_requests_are_excluded() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("warmup.json");
    let o = out.to_str().unwrap();
    run(
        &server,
        "customer-service",
        &[
            "--concurrency",
            "4",
            "--warmup",
            "200ms",
            "--num-requests",
            "100",
            "--output",
            o,
        ],
    )
    .await;
    let report = read_json(&out);
    let s = &report["summary"];
    assert_eq!(s["successful_requests"], 100);
    let warm = s["warmup_requests"].as_u64().unwrap();
    assert!(warm > 0, "200 ms of warm-up sent nothing");
    let reqs = report["requests"].as_array().unwrap();
    assert_eq!(reqs.len() as u64, 100 + warm);
    assert_eq!(
        reqs.iter().filter(|r| r["warmup"] == true).count() as u64,
        warm
    );
}

#[tokio::test]
async fn sweep_picks_the_highest_rate_within_the_slo_and_draws_it() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("sweep.json");
    let chart = temp("sweep.svg");
    let (o, c) = (out.to_str().unwrap(), chart.to_str().unwrap());
    let outcome = run(
        &server,
        "customer-service",
        &[
            "--sweep",
            "200,400",
            // Near-constant gaps: the achieved rate of 100 requests is then close to the target.
            "--burstiness",
            "50",
            "--num-requests",
            "100",
            "--slo-p99-e2e-ms",
            "5000",
            "--slo-p99-ttft-ms",
            "5000",
            "--output",
            o,
            "--chart",
            c,
            "--summary-only",
        ],
    )
    .await;
    assert!(matches!(outcome, Outcome::Sweep(_)));
    let report = read_json(&out);
    assert_eq!(report["best_rate"], 400.0);
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    assert!(points.iter().all(|p| p["meets_slo"] == true));
    assert_eq!(report["runs"][1]["summary"]["successful_requests"], 100);
    assert!(
        report["runs"][0].get("requests").is_none(),
        "--summary-only"
    );
    let svg = std::fs::read_to_string(&chart).expect("chart written");
    let _ = std::fs::remove_file(&chart);
    assert!(svg.contains("<svg") && svg.contains("p99 E2E"));

    // An SLO nothing can meet: no best rate.
    let out = temp("sweep-miss.json");
    let o = out.to_str().unwrap();
    run(
        &server,
        "customer-service",
        &[
            "--sweep",
            "300",
            "--num-requests",
            "30",
            "--slo-p99-e2e-ms",
            "0.000001",
            "--output",
            o,
            "--chart",
            c,
        ],
    )
    .await;
    let _ = std::fs::remove_file(&chart);
    assert!(read_json(&out)["best_rate"].is_null());
}

#[tokio::test]
async fn server_errors_are_counted_as_failures() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let out = temp("errors.json");
    let o = out.to_str().unwrap();
    // A base path the server does not know turns every request into a 404 (the model is given,
    // so /v1/models is not asked).
    let url = format!("{}/nowhere", server.url());
    let scen = scenario("customer-service");
    let args = Args::try_parse_from([
        "distillery-loadtest",
        "--url",
        &url,
        "--scenario",
        &scen,
        "--model",
        "m",
        "--no-progress",
        "--concurrency",
        "2",
        "--num-requests",
        "20",
        "--output",
        o,
    ])
    .unwrap();
    run_cli(&args).await.unwrap();
    let report = read_json(&out);
    let s = &report["summary"];
    assert_eq!(s["successful_requests"], 0);
    assert_eq!(s["failed_requests"], 20);
    assert_eq!(s["failures_by_status"]["404"], 20);
    assert!(report["requests"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("HTTP 404"));
}

/// The generator's ceiling: closed and open loop against the trivial server for a couple of
/// seconds each. Bounded in time; asserts only that it ran, and prints the rates.
#[tokio::test]
async fn highest_rate_against_the_trivial_server() {
    let _serial = SERIAL.lock().await;
    let server = CannedServer::start(0, 1).unwrap();
    let mut lines = Vec::new();
    for (what, extra) in [
        (
            "closed loop, concurrency 32, non-streaming",
            &["--concurrency", "32"][..],
        ),
        (
            "closed loop, concurrency 32, streaming",
            &["--concurrency", "32", "--stream", "true"][..],
        ),
        (
            "open loop at 20000 req/s, non-streaming",
            &["--request-rate", "20000"][..],
        ),
    ] {
        let mut argv = vec!["--duration", "2s", "--warmup", "500ms", "--summary-only"];
        argv.extend_from_slice(extra);
        let Outcome::Single(r) = run(&server, "customer-service", &argv).await else {
            panic!("single run expected");
        };
        let s = &r.summary;
        assert_eq!(s.failed_requests, 0);
        assert!(s.request_throughput > 0.0);
        lines.push(format!(
            "trivial server, {what}: {:.0} req/s, p99 E2E {:.2} ms",
            s.request_throughput, s.e2e_ms.p99
        ));
    }
    for l in lines {
        eprintln!("{l}");
    }
}
