//! Chaos: 500 streaming requests against one real daemon, 100 at a time, each dropped by the
//! client at a point drawn from a seeded generator: halfway through sending the request, right
//! after sending it (before the first response byte), after the response headers, or after k
//! SSE events; some close with a FIN, some with a reset. Afterwards, polling `/metrics` (parsed
//! with a Prometheus text-format parser) until the engine is idle, the test asserts that no
//! request is left running or waiting, no KV block is held (free + cached = all blocks), that
//! the client-disconnect counter rose, and that the daemon still answers greedy requests exactly
//! as it did before the chaos.
//!
//! Serves `builtin:tiny`, so it needs no model files. The client speaks raw HTTP/1.1 over TCP so
//! that it controls exactly where each connection is cut.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::scrape::value;
use futures_util::StreamExt;
use prom_text_format_parser::Scrape;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::daemon::{distillery_command, DaemonProcess};

const MODEL: &str = "builtin:tiny";
const STREAMS: usize = 500;
const AT_ONCE: usize = 100;
const SEED: u64 = 20261128;
/// Bounds one chaotic connection, so that a daemon that stops answering fails the test.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the engine may take to notice every disconnect and free everything.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);

/// A `distillery serve` on 127.0.0.1 and a free port; killed (and reaped) on drop, with its
/// log's last lines printed when the test is failing.
struct Daemon {
    process: DaemonProcess,
    addr: String,
}

impl Daemon {
    fn start() -> Daemon {
        let mut cmd = distillery_command();
        cmd.env("RUST_LOG", "warn")
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(["--model", MODEL, "--kv-cache-memory", "32MiB"]);
        let process = DaemonProcess::spawn(cmd, "the daemon", 200, |_| {});
        let addr = process
            .base
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("listening on {:?}, not http://HOST:PORT", process.base))
            .to_string();
        Daemon { process, addr }
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- daemon log, last lines -----\n{}\n----- end of daemon log -----",
                self.process.tail()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The chaotic client.
// ---------------------------------------------------------------------------------------------

/// Where a client cuts its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cut {
    /// Halfway through the request body.
    MidRequest,
    /// The whole request sent, nothing read; closed after `delay_ms`.
    BeforeFirstByte { delay_ms: u64 },
    /// Once the status line and headers have arrived.
    AfterHeaders,
    /// Once `k` SSE events have arrived.
    AfterEvents { k: usize },
}

impl Cut {
    fn kind(self) -> &'static str {
        match self {
            Cut::MidRequest => "mid-request",
            Cut::BeforeFirstByte { .. } => "before the first byte",
            Cut::AfterHeaders => "after the headers",
            Cut::AfterEvents { .. } => "after k events",
        }
    }
}

#[derive(Clone, Debug)]
struct Plan {
    path: &'static str,
    body: Vec<u8>,
    max_tokens: u64,
    cut: Cut,
    /// Close with a reset (SO_LINGER 0) rather than a FIN.
    reset: bool,
}

fn plans() -> Vec<Plan> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    (0..STREAMS)
        .map(|i| {
            let max_tokens = if rng.gen_bool(0.35) {
                rng.gen_range(256..=1024u64)
            } else {
                rng.gen_range(8..=64u64)
            };
            let question = format!("Customer {i} asks: where is order {}?", rng.gen::<u32>());
            let mut body = json!({
                "model": MODEL, "max_tokens": max_tokens, "stream": true, "ignore_eos": true,
                "temperature": if rng.gen_bool(0.5) { 0.0 } else { 0.8 },
            });
            if rng.gen_bool(0.5) {
                body["stream_options"] = json!({"include_usage": true});
            }
            let path = if rng.gen_bool(0.5) {
                body["messages"] = json!([
                    {"role": "system", "content": "You are a helpful shop assistant."},
                    {"role": "user", "content": question},
                ]);
                "/v1/chat/completions"
            } else {
                body["prompt"] = json!(question);
                "/v1/completions"
            };
            let cut = match rng.gen_range(0..100) {
                0..=9 => Cut::MidRequest,
                10..=34 => Cut::BeforeFirstByte {
                    delay_ms: rng.gen_range(0..=20),
                },
                35..=54 => Cut::AfterHeaders,
                // Never past the last token: the stream is cut while it runs.
                _ => Cut::AfterEvents {
                    k: rng.gen_range(1..=(max_tokens as usize).min(200)),
                },
            };
            Plan {
                path,
                body: serde_json::to_vec(&body).expect("serialise a request"),
                max_tokens,
                cut,
                reset: rng.gen_bool(0.3),
            }
        })
        .collect()
}

/// What one chaotic client saw before it cut the connection.
#[derive(Debug, Default)]
struct Seen {
    /// The response's status code, when the headers were read.
    status: Option<u16>,
    events: usize,
    /// The stream ended (`data: [DONE]`, or the daemon closed it) before the planned cut.
    ended: bool,
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs one plan: raw HTTP/1.1, cut where the plan says.
async fn chaotic(addr: &str, plan: &Plan) -> std::io::Result<Seen> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    if plan.reset {
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
        plan.path,
        plan.body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(&plan.body);
    let mut seen = Seen::default();
    match plan.cut {
        Cut::MidRequest => {
            let half = request.len() - plan.body.len() / 2;
            s.write_all(&request[..half]).await?;
            return Ok(seen);
        }
        Cut::BeforeFirstByte { delay_ms } => {
            s.write_all(&request).await?;
            if delay_ms > 0 {
                // Chaos timing (where the cut lands), not synchronisation.
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            return Ok(seen);
        }
        Cut::AfterHeaders | Cut::AfterEvents { .. } => s.write_all(&request).await?,
    }
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 4096];
    let mut body_at = None;
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            seen.ended = true;
            return Ok(seen);
        }
        buf.extend_from_slice(&chunk[..n]);
        if body_at.is_none() {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let status = std::str::from_utf8(&buf[..end])
                    .ok()
                    .and_then(|h| h.split_whitespace().nth(1))
                    .and_then(|c| c.parse().ok());
                seen.status = status;
                body_at = Some(end + 4);
                if plan.cut == Cut::AfterHeaders || status != Some(200) {
                    return Ok(seen);
                }
            }
        }
        if let (Some(at), Cut::AfterEvents { k }) = (body_at, plan.cut) {
            seen.events = count(&buf[at..], b"data: ");
            if find(&buf[at..], b"data: [DONE]").is_some() {
                // Fewer events than k: the stream is complete.
                seen.ended = true;
                return Ok(seen);
            }
            if seen.events >= k {
                return Ok(seen);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and the reference answers.
// ---------------------------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

async fn scrape(c: &reqwest::Client, d: &Daemon) -> Scrape {
    common::scrape::scrape(c, &d.url("")).await
}

/// `num_gpu_blocks` of `distillery:cache_config_info`: every block the cache has.
fn total_blocks(s: &Scrape) -> f64 {
    s.metrics
        .iter()
        .find(|m| m.name == "distillery:cache_config_info")
        .expect("distillery:cache_config_info in the scrape")
        .samples
        .first()
        .and_then(|x| x.labels.iter().find(|l| l.key == "num_gpu_blocks"))
        .map(|l| l.value.parse().expect("num_gpu_blocks is a number"))
        .expect("cache_config_info carries num_gpu_blocks")
}

fn gauge(s: &Scrape, suffix: &str) -> f64 {
    value(s, &format!("distillery:{suffix}"), &[])
}

fn blocks(s: &Scrape, state: &str) -> f64 {
    value(s, "distillery:kv_cache_blocks", &[("state", state)])
}

/// Greedy answers to a completion and a chat request.
async fn reference_answers(c: &reqwest::Client, d: &Daemon) -> (String, String) {
    let post = |path: &'static str, body: Value| {
        let url = d.url(path);
        async move {
            let r = c
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {url}: {e}"));
            let status = r.status();
            let v: Value = r.json().await.expect("a JSON answer");
            assert_eq!(status, 200, "{path}: {v}");
            assert_eq!(v["choices"][0]["finish_reason"], "length", "{path}: {v}");
            assert_eq!(v["usage"]["completion_tokens"], 24, "{path}: {v}");
            v
        }
    };
    let v = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 24,
               "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let text = v["choices"][0]["text"]
        .as_str()
        .expect("completion text")
        .to_string();
    let v = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Where is my order?"}],
               "max_tokens": 24, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    let chat = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("chat content")
        .to_string();
    (text, chat)
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_dropped_streams_leave_nothing_behind() {
    let started = Instant::now();
    let d = Daemon::start();
    let c = client();
    let before_answers = reference_answers(&c, &d).await;
    let before = scrape(&c, &d).await;

    let plans = plans();
    let addr = d.addr.clone();
    let results: Vec<(Plan, std::io::Result<Seen>)> = futures_util::stream::iter(plans)
        .map(|plan| {
            let addr = addr.clone();
            async move {
                let r = match tokio::time::timeout(CONNECTION_TIMEOUT, chaotic(&addr, &plan)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no progress within {CONNECTION_TIMEOUT:?}"),
                    )),
                };
                (plan, r)
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let chaos_took = started.elapsed();

    // Every client that read a response got a 200 stream (nothing refused, nothing broken).
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ended_early = 0;
    let mut long_cut_mid_stream = 0;
    for (i, (plan, r)) in results.iter().enumerate() {
        *by_kind.entry(plan.cut.kind()).or_default() += 1;
        let seen = r
            .as_ref()
            .unwrap_or_else(|e| panic!("chaotic client {i} ({:?}): {e}", plan.cut));
        if matches!(plan.cut, Cut::AfterHeaders | Cut::AfterEvents { .. }) {
            assert_eq!(
                seen.status,
                Some(200),
                "client {i} ({:?}, {} {} bytes): {seen:?}",
                plan.cut,
                plan.path,
                plan.body.len()
            );
        }
        if seen.ended {
            ended_early += 1;
        } else if match plan.cut {
            Cut::AfterHeaders => plan.max_tokens >= 200,
            Cut::AfterEvents { k } => plan.max_tokens >= k as u64 + 200,
            _ => false,
        } {
            long_cut_mid_stream += 1;
        }
    }

    // The engine lets go of everything: nothing running or waiting, no block held.
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let after = loop {
        let s = scrape(&c, &d).await;
        let busy = (
            gauge(&s, "num_requests_running"),
            gauge(&s, "num_requests_waiting"),
            blocks(&s, "used"),
            gauge(&s, "queued_prompt_tokens"),
        );
        if busy == (0.0, 0.0, 0.0, 0.0) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{SETTLE_DEADLINE:?} after the chaos: running {}, waiting {}, used blocks {}, \
             queued prompt tokens {}",
            busy.0,
            busy.1,
            busy.2,
            busy.3
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let settled_after = started.elapsed() - chaos_took;
    let total = total_blocks(&after);
    assert!(total > 0.0, "cache_config_info num_gpu_blocks = {total}");
    assert_eq!(
        blocks(&after, "free") + blocks(&after, "cached"),
        total,
        "free + cached blocks must be all {total} blocks once nothing runs \
         (free {}, cached {}, used {})",
        blocks(&after, "free"),
        blocks(&after, "cached"),
        blocks(&after, "used")
    );

    let disconnected = gauge(&after, "http_requests_client_disconnected_total")
        - gauge(&before, "http_requests_client_disconnected_total");
    let aborted = value(
        &after,
        "distillery:request_success_total",
        &[("finished_reason", "abort")],
    ) - value(
        &before,
        "distillery:request_success_total",
        &[("finished_reason", "abort")],
    );
    assert!(
        disconnected >= 1.0,
        "http_requests_client_disconnected_total did not rise over {STREAMS} dropped streams"
    );
    // A stream that had started (headers read) and was cut 200 or more tokens before its end
    // cannot have finished: the daemon must have seen each of those clients go.
    assert!(
        disconnected >= long_cut_mid_stream as f64,
        "{long_cut_mid_stream} streams were cut 200+ tokens before their end, but only \
         {disconnected} disconnects were counted"
    );

    // Still serving, and serving the same answers.
    let after_answers = reference_answers(&c, &d).await;
    assert_eq!(
        after_answers, before_answers,
        "greedy answers changed after the chaos"
    );
    eprintln!(
        "chaos: {STREAMS} streams ({by_kind:?}), {ended_early} ended by the daemon before their \
         cut; {disconnected} disconnects counted (at least {long_cut_mid_stream} expected), \
         {aborted} aborted; chaos took {chaos_took:?}, idle {settled_after:?} later; \
         {total} blocks all free or cached; whole test {:?}",
        started.elapsed()
    );
}
