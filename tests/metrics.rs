//! `GET /metrics` of a real daemon on a loopback port: counters move by exactly what a known
//! set of requests did, histograms count them, gauges fall back to 0, bucket bounds are
//! vLLM's, the compat switch works, and a real Prometheus server scrapes it and answers
//! PromQL over it.
//!
//! Needs `../shared/models` (skipped loudly without it); the Prometheus test also needs the
//! `prometheus` binary on PATH (Debian package `prometheus`; skipped loudly without it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prom_text_format_parser::{Scrape, Type, ValueType};
use serde_json::{json, Value};

const MODEL: &str = "tiny-random-qwen2";
/// Its max_position_embeddings, which is the daemon's context limit.
const MAX_MODEL_LEN: usize = 2048;
/// The daemon's default block size, which the prefix-cache figures below count in.
const BLOCK_SIZE: usize = 8;

// vLLM v1's bucket lists, written out here (not taken from the crate) so that the test is an
// independent check of them.
const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const TOKEN_LATENCY: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const REQUEST_LATENCY: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Our own latency histograms' bounds: from half a millisecond, so a 250 ms p99 shows.
const NATIVE_LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
    0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 120.0, 160.0, 240.0, 480.0, 640.0, 960.0, 1920.0, 2560.0,
    7680.0,
];
/// 1-2-5 up to the context length (2048).
const TOKEN_COUNTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
];
const PARAMS_N: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
const ITERATION_TOKENS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Histograms observed once per request that ran to a normal end (stop or length).
const PER_REQUEST_HISTOGRAMS: &[&str] = &[
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_inference_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_time_per_output_token_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
    "request_params_max_tokens",
    "request_params_n",
];

fn model_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models");
    let model = dir.join(MODEL);
    if model.is_dir() {
        Some(model)
    } else {
        eprintln!(
            "\n!!! SKIPPING: {} not found; the metrics tests need ../shared/models beside the \
             checkout !!!\n",
            model.display()
        );
        None
    }
}

/// A `distillery serve` child process, killed when dropped.
struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    fn start(model: &Path, extra: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_distillery"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .env("RUST_LOG", "warn")
            // One engine unless `extra` asks: what these tests count must not vary by machine.
            .env("DISTILLERY_DATA_PARALLEL_SIZE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the daemon starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the address line, then keeps draining so the daemon never writes to a closed
        // pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("distillery listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("the daemon did not report its address within 120 s");
            }
        };
        Daemon { child, url }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn scrape_text(client: &reqwest::Client, url: &str) -> String {
    let res = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(res.status(), 200);
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ctype.starts_with("text/plain"), "content-type {ctype}");
    res.text().await.expect("the body")
}

async fn scrape(client: &reqwest::Client, url: &str) -> Scrape {
    let text = scrape_text(client, url).await;
    Scrape::parse(&text).unwrap_or_else(|e| panic!("unparsable scrape: {e:?}\n{text}"))
}

fn family<'a>(s: &'a Scrape, name: &str) -> &'a prom_text_format_parser::Metric {
    s.metrics
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("{name} missing from the scrape"))
}

/// The value of the sample of `name` carrying all of `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = family(s, name);
    f.samples
        .iter()
        .find(|x| {
            x.value.value_type == ValueType::Sample
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .unwrap_or_else(|| panic!("{name}{labels:?} missing"))
        .value
        .value
        .as_f64()
}

/// `_count` (or `_sum`) of the histogram `name` (with `labels`).
fn hist(s: &Scrape, name: &str, labels: &[(&str, &str)], which: ValueType) -> f64 {
    let f = family(s, name);
    assert_eq!(f.kind, Type::Histogram, "{name}");
    f.samples
        .iter()
        .find(|x| {
            x.value.value_type == which
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .unwrap_or_else(|| panic!("{name}{labels:?} {which:?} missing"))
        .value
        .value
        .as_f64()
}

fn count(s: &Scrape, name: &str) -> f64 {
    hist(s, name, &[], ValueType::Count)
}

fn sum(s: &Scrape, name: &str) -> f64 {
    hist(s, name, &[], ValueType::Sum)
}

/// The finite `le` bounds of a histogram, in order.
fn bounds(s: &Scrape, name: &str) -> Vec<f64> {
    let f = family(s, name);
    assert_eq!(f.kind, Type::Histogram, "{name}");
    f.samples
        .iter()
        .filter(|x| x.value.value_type == ValueType::Sample)
        .filter_map(|x| x.labels.iter().find(|l| l.key == "le"))
        .filter(|l| l.value != "+Inf")
        .map(|l| l.value.parse::<f64>().expect("a numeric le"))
        .collect()
}

async fn complete(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let res = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST /v1/completions");
    let status = res.status().as_u16();
    (status, res.json().await.expect("a JSON body"))
}

/// Polls `/metrics` until `done` holds for a scrape, or panics at the deadline.
async fn scrape_until(
    client: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(client, url).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const PROMPT: &str = "The quick brown fox jumps over the lazy dog while the five boxing wizards \
                      jump quickly, and a journey of a thousand miles begins with a single step \
                      taken by the curious traveller.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_histograms_and_gauges_match_a_known_set_of_requests() {
    let Some(model) = model_dir() else { return };
    let daemon = Daemon::start(&model, &[]);
    let url = daemon.url.as_str();
    let client = reqwest::Client::new();
    let before = scrape(&client, url).await;

    // A: a length finish. Greedy with EOS ignored, so B below generates the same tokens.
    let (status, a) = complete(
        &client,
        url,
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
               "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
    let prompt_len = a["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    assert!(
        prompt_len > 2 * BLOCK_SIZE,
        "the prompt should span full blocks"
    );
    let a_text = a["choices"][0]["text"].as_str().unwrap_or("").to_string();
    // One character: reached at B's first token with text, and found even if B's tokens
    // were ever to drift from A's.
    let stop: String = a_text.chars().take(1).collect();
    assert!(!stop.is_empty(), "A generated no text: {a}");

    // B: a stop-string finish. The stop text lies within A's first tokens while max_tokens
    // is far away, so the stop (not the length) ends it, however fast the engine runs.
    let (status, b) = complete(
        &client,
        url,
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0,
               "ignore_eos": true, "stop": [stop]}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["choices"][0]["finish_reason"], "stop", "{b}");
    let b_tokens = b["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
    assert!((1..=8).contains(&b_tokens), "{b}");

    // C: cancelled. A long stream, dropped once its first chunk (so its first token) is in.
    let c_max = MAX_MODEL_LEN - prompt_len - 8;
    let mut res = client
        .post(format!("{url}/v1/completions"))
        .json(
            &json!({"model": MODEL, "prompt": PROMPT, "max_tokens": c_max,
                      "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("the stream starts");
    assert_eq!(res.status(), 200);
    let first = res
        .chunk()
        .await
        .expect("a first chunk")
        .expect("not the end");
    assert!(
        String::from_utf8_lossy(&first).starts_with("data: "),
        "{first:?}"
    );
    drop(res);

    // D and E: refused. An unknown model (404, invalid), and too long for the context.
    let (status, d) = complete(
        &client,
        url,
        json!({"model": "no-such-model", "prompt": "hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 404, "{d}");
    let (status, e) = complete(
        &client,
        url,
        json!({"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");

    // The engine notices C's closed stream at its next step; wait for that and for idleness.
    let abort_before = value(
        &before,
        "vllm:request_success_total",
        &[("finished_reason", "abort")],
    );
    let after = scrape_until(
        &client,
        url,
        "the engine to drain and count the abort",
        |s| {
            value(s, "vllm:num_requests_running", &[]) == 0.0
                && value(s, "vllm:num_requests_waiting", &[]) == 0.0
                && value(
                    s,
                    "vllm:request_success_total",
                    &[("finished_reason", "abort")],
                ) > abort_before
        },
    )
    .await;

    // CPU time in fractions of a second (the collector's own count is whole seconds).
    let cpu = value(&after, "process_cpu_seconds_total", &[]);
    assert!(
        cpu > 0.0 && cpu.fract() != 0.0,
        "process_cpu_seconds_total {cpu}"
    );
    for p in ["distillery:", "vllm:"] {
        let name = |suffix: &str| format!("{p}{suffix}");
        let delta = |suffix: &str, labels: &[(&str, &str)]| {
            value(&after, &name(suffix), labels) - value(&before, &name(suffix), labels)
        };
        let count_delta =
            |suffix: &str| count(&after, &name(suffix)) - count(&before, &name(suffix));
        let sum_delta = |suffix: &str| sum(&after, &name(suffix)) - sum(&before, &name(suffix));

        // Counters, exactly.
        for (reason, want) in [("length", 1.0), ("stop", 1.0), ("abort", 1.0)] {
            assert_eq!(
                delta("request_success_total", &[("finished_reason", reason)]),
                want,
                "{p}request_success_total{{{reason}}}"
            );
        }
        assert_eq!(
            delta("http_requests_client_disconnected_total", &[]),
            1.0,
            "{p}"
        );
        assert_eq!(
            delta("prompt_tokens_total", &[]),
            (3 * prompt_len) as f64,
            "{p}prompt_tokens_total: the three admitted requests"
        );
        assert_eq!(delta("num_preemptions_total", &[]), 0.0, "{p}");
        assert_eq!(
            delta("prefix_cache_queries_total", &[]),
            (3 * prompt_len) as f64,
            "{p}"
        );
        // A found nothing cached; B and C each found A's full prompt blocks (all but the
        // block holding the last prompt token, which is always computed).
        assert_eq!(
            delta("prefix_cache_hits_total", &[]),
            (2 * ((prompt_len - 1) / BLOCK_SIZE * BLOCK_SIZE)) as f64,
            "{p}"
        );
        // Generation: A's 8 and B's tokens exactly, plus whatever C got before the engine saw
        // the cancellation (at least one), so only a lower bound holds.
        let generated = delta("generation_tokens_total", &[]);
        assert!(generated >= (8 + b_tokens + 1) as f64, "{p}: {generated}");

        // Histograms: TTFT once per request that got a token (A, B, C); the per-request ones
        // once per request that ran to a normal end (A, B); the cancelled one is counted by
        // request_success_total{abort} and the disconnect counter instead.
        assert_eq!(count_delta("time_to_first_token_seconds"), 3.0, "{p}");
        for h in PER_REQUEST_HISTOGRAMS {
            assert_eq!(count_delta(h), 2.0, "{p}{h}");
        }
        assert_eq!(
            sum_delta("request_prompt_tokens"),
            (2 * prompt_len) as f64,
            "{p}"
        );
        assert_eq!(
            sum_delta("request_generation_tokens"),
            (8 + b_tokens) as f64,
            "{p}"
        );
        assert_eq!(sum_delta("request_params_max_tokens"), 1008.0, "{p}");
        assert_eq!(sum_delta("request_params_n"), 2.0, "{p}");
        // One gap per token after the first: A's 7 and B's exactly, C's some.
        let itl = count_delta("inter_token_latency_seconds");
        assert!(itl >= (7 + b_tokens - 1) as f64, "{p}: {itl}");
        assert!(itl <= generated, "{p}: {itl} gaps for {generated} tokens");
        let steps = count_delta("iteration_tokens_total");
        assert!(steps >= 8.0, "{p}: {steps} steps");
        assert!(
            sum_delta("iteration_tokens_total") >= (prompt_len + 8) as f64,
            "{p}"
        );

        // Gauges at rest.
        for g in [
            "num_requests_running",
            "num_requests_waiting",
            "kv_cache_usage_perc",
            "gpu_cache_usage_perc",
        ] {
            assert_eq!(value(&after, &name(g), &[]), 0.0, "{p}{g}");
        }
        let info = family(&after, &name("cache_config_info"));
        assert_eq!(info.kind, Type::Gauge);
        let info = &info.samples[0];
        assert_eq!(info.value.value.as_f64(), 1.0);
        let label = |k: &str| {
            info.labels
                .iter()
                .find(|l| l.key == k)
                .map(|l| l.value.clone())
                .unwrap_or_else(|| panic!("cache_config_info lacks {k}"))
        };
        assert_eq!(label("block_size"), BLOCK_SIZE.to_string());
        assert_eq!(label("enable_prefix_caching"), "True");
        assert_eq!(label("cache_dtype"), "auto");
        let blocks: f64 = label("num_gpu_blocks").parse().expect("a number");
        assert!(blocks > 0.0);

        // vLLM's bucket bounds, exactly, under vLLM's names; ours resolve latencies finer.
        let latency = |vllm: &'static [f64]| if p == "vllm:" { vllm } else { NATIVE_LATENCY };
        for (h, want) in [
            ("time_to_first_token_seconds", latency(TTFT)),
            ("inter_token_latency_seconds", latency(TOKEN_LATENCY)),
            (
                "request_time_per_output_token_seconds",
                latency(TOKEN_LATENCY),
            ),
            ("e2e_request_latency_seconds", latency(REQUEST_LATENCY)),
            ("request_queue_time_seconds", latency(REQUEST_LATENCY)),
            ("request_inference_time_seconds", latency(REQUEST_LATENCY)),
            ("request_prefill_time_seconds", latency(REQUEST_LATENCY)),
            ("request_decode_time_seconds", latency(REQUEST_LATENCY)),
            ("request_prompt_tokens", TOKEN_COUNTS),
            ("request_generation_tokens", TOKEN_COUNTS),
            ("request_params_max_tokens", TOKEN_COUNTS),
            ("request_params_n", PARAMS_N),
            ("iteration_tokens_total", ITERATION_TOKENS),
        ] {
            assert_eq!(bounds(&after, &name(h)), want, "{p}{h} buckets");
        }
    }

    // Ours alone.
    let ours = |suffix: &str, labels: &[(&str, &str)]| {
        let n = format!("distillery:{suffix}");
        value(&after, &n, labels) - value(&before, &n, labels)
    };
    for (reason, want) in [
        ("invalid", 1.0),
        ("too_long", 1.0),
        ("overloaded", 0.0),
        ("unauthorized", 0.0),
    ] {
        assert_eq!(
            ours("requests_rejected_total", &[("reason", reason)]),
            want,
            "requests_rejected_total{{{reason}}}"
        );
    }
    assert_eq!(value(&after, "distillery:queued_prompt_tokens", &[]), 0.0);
    let block = |state: &str| value(&after, "distillery:kv_cache_blocks", &[("state", state)]);
    assert_eq!(block("used"), 0.0);
    assert!(block("cached") > 0.0, "A's prompt blocks stay cached");
    let total: f64 = family(&after, "distillery:cache_config_info").samples[0]
        .labels
        .iter()
        .find(|l| l.key == "num_gpu_blocks")
        .map(|l| l.value.parse().expect("a number"))
        .expect("num_gpu_blocks");
    assert_eq!(block("free") + block("used") + block("cached"), total);
    let steps = count(&after, "distillery:iteration_tokens_total")
        - count(&before, "distillery:iteration_tokens_total");
    let batch = count(&after, "distillery:batch_size") - count(&before, "distillery:batch_size");
    assert_eq!(batch, steps, "one batch-size sample per step");
    for phase in ["schedule", "forward", "sample"] {
        let c = |s: &Scrape| {
            hist(
                s,
                "distillery:step_duration_seconds",
                &[("phase", phase)],
                ValueType::Count,
            )
        };
        assert_eq!(c(&after) - c(&before), steps, "phase {phase}");
    }
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 0.0);

    // Every series names the model.
    for m in &after.metrics {
        for x in &m.samples {
            assert!(
                x.labels
                    .iter()
                    .any(|l| l.key == "model_name" && l.value == MODEL),
                "{} lacks model_name={MODEL}",
                m.name
            );
        }
    }
}

/// Also the two refusals the main test cannot provoke: a missing API key, and a queue bound
/// of zero, which turns every request away as overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_none_exports_only_the_native_names_and_counts_refusals_by_reason() {
    let Some(model) = model_dir() else { return };
    let daemon = Daemon::start(
        &model,
        &[
            "--metrics-compat",
            "none",
            "--api-key",
            "sesame",
            // One sequence runs, one waits for it; a third request finds the queue full.
            "--max-waiting-requests",
            "1",
            "--max-num-seqs",
            "1",
        ],
    );
    let url = daemon.url.as_str();
    let client = reqwest::Client::new();
    let long = json!({"model": MODEL, "prompt": "hi", "max_tokens": 1500, "ignore_eos": true,
                      "stream": true});
    let start_long = |client: reqwest::Client, url: String, long: serde_json::Value| async move {
        let r = client
            .post(format!("{url}/v1/completions"))
            .bearer_auth("sesame")
            .json(&long)
            .send()
            .await
            .expect("a long stream");
        assert_eq!(r.status(), 200);
        r
    };
    let mut running = start_long(client.clone(), url.to_string(), long.clone()).await;
    running.chunk().await.expect("its first chunk");
    let waiting = tokio::spawn(start_long(client.clone(), url.to_string(), long.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while value(
        &scrape(&client, url).await,
        "distillery:num_requests_waiting",
        &[],
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second stream never queued"
        );
    }
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 1});
    let send = |key: Option<&'static str>| {
        let mut req = client.post(format!("{url}/v1/completions")).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move { req.send().await.expect("a response").status().as_u16() }
    };
    assert_eq!(send(None).await, 401);
    assert_eq!(send(Some("sesame")).await, 503);
    assert_eq!(send(Some("sesame")).await, 503);

    // /metrics itself needs no key, as Prometheus scrapes it without one.
    let s = scrape(&client, url).await;
    assert!(
        s.metrics.iter().all(|m| !m.name.starts_with("vllm:")),
        "vllm: series exported with --metrics-compat none"
    );
    assert_eq!(
        bounds(&s, "distillery:time_to_first_token_seconds"),
        NATIVE_LATENCY,
        "the native family stays"
    );
    for (reason, want) in [
        ("unauthorized", 1.0),
        ("overloaded", 2.0),
        ("invalid", 0.0),
        ("too_long", 0.0),
    ] {
        assert_eq!(
            value(
                &s,
                "distillery:requests_rejected_total",
                &[("reason", reason)]
            ),
            want,
            "{reason}"
        );
    }
    drop(running);
    waiting.abort();
}

/// Deletes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

async fn promql(client: &reqwest::Client, prom: &str, query: &str) -> Option<Value> {
    let res = client
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .ok()?;
    res.json::<Value>().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_it_and_answers_promql() {
    let Some(model) = model_dir() else { return };
    if Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        eprintln!(
            "\n!!! SKIPPING: no `prometheus` binary on PATH (Debian package `prometheus`); the \
             real-Prometheus metrics test did not run !!!\n"
        );
        return;
    }
    let daemon = Daemon::start(&model, &[]);
    let port = daemon
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("a port in the daemon's address");

    // The shipped config, with the target pointed at this daemon and a 1 s interval so the
    // test does not wait on 5 s scrapes.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/prometheus.yml"),
    )
    .expect("deploy/prometheus/prometheus.yml");
    assert!(shipped.contains("localhost:8000"), "{shipped}");
    assert!(shipped.contains("scrape_interval: 5s"), "{shipped}");
    let config = shipped
        .replace("localhost:8000", &format!("127.0.0.1:{port}"))
        .replace("scrape_interval: 5s", "scrape_interval: 1s");
    let dir = TempDir(std::env::temp_dir().join(format!(
        "distillery-prometheus-{}-{}",
        std::process::id(),
        port
    )));
    std::fs::create_dir_all(dir.0.join("data")).expect("a temp dir");
    let config_path = dir.0.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("the temp config");
    let log_path = dir.0.join("prometheus.log");
    let log = std::fs::File::create(&log_path).expect("a log file");
    let prom_port = free_port();
    let prom = format!("http://127.0.0.1:{prom_port}");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts"),
    );

    // Keep traffic flowing so rate() over the buckets has increases to work with.
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let stop = stop.clone();
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = complete(
                    &client,
                    &url,
                    json!({"model": MODEL, "prompt": "hello there", "max_tokens": 4}),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let client = reqwest::Client::new();
    let query = "histogram_quantile(0.99, rate(vllm:time_to_first_token_seconds_bucket[1m]))";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    let p99 = loop {
        if let Some(v) = promql(&client, &prom, query).await {
            let number = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|x| x.is_finite());
            if v["status"] == "success" {
                if let Some(x) = number {
                    break x;
                }
            }
            last = Some(v);
        }
        if Instant::now() >= deadline {
            stop.store(true, Ordering::Relaxed);
            let up = promql(&client, &prom, "up").await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!(
                "no number from Prometheus within 60 s; last answer {last:?}; up = {up:?}\n\
                 prometheus log:\n{log}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Relaxed);
    driver.await.expect("the traffic driver");
    assert!(p99 > 0.0 && p99 <= 2560.0, "p99 TTFT {p99}");
    // The scrape itself is healthy and carries the model label.
    let up = promql(
        &client,
        &prom,
        &format!("up{{job=\"distillery\",instance=\"127.0.0.1:{port}\"}}"),
    )
    .await
    .expect("an answer for up");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let labelled = promql(
        &client,
        &prom,
        &format!("vllm:num_requests_waiting{{model_name=\"{MODEL}\"}}"),
    )
    .await
    .expect("an answer");
    assert_eq!(
        labelled["data"]["result"].as_array().map(Vec::len),
        Some(1),
        "{labelled}"
    );
}
