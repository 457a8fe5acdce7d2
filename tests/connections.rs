//! The connection layer against slow and hostile clients, end to end: the real daemon on a
//! loopback port, raw sockets for the attackers, reqwest for the clients being served.
//! Slowloris and silent sockets, dribbled bodies, idle keep-alive, the connection bound,
//! oversized bodies and `Expect: 100-continue`, SIGTERM with slow sockets open, and
//! tokenization for clients that hung up.
//!
//! Every wait is bounded; every daemon is killed on drop. Where `../shared/models` is absent
//! every test prints a loud SKIPPING line and passes.

mod common;

use common::http::client;

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::daemon::{distillery_command, DaemonProcess};
use common::models_dir;
use common::scrape::{scrape, value};

const MODEL: &str = "tiny-random-qwen2";

struct Daemon {
    process: DaemonProcess,
}

impl Daemon {
    fn start(extra: &[&str]) -> Option<Daemon> {
        let dir = models_dir()?.join(MODEL);
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(&dir)
            .args(["--kv-cache-memory", "32MiB", "--disable-log-requests"])
            .args(extra);
        let process = DaemonProcess::spawn(cmd, &format!("the daemon ({extra:?})"), 200, |_| {});
        Some(Daemon { process })
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    fn addr(&self) -> String {
        self.process.base.trim_start_matches("http://").to_string()
    }

    fn sigterm(&self) {
        let pid = self.process.child.id().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {pid}");
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.process.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        value(&scrape(&client(), &self.process.base).await, name, &[])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- daemon log -----\n{}\n-----", self.process.tail());
        }
    }
}

fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

/// When the server closed the socket, counted from `since`, or `None` when it was still open
/// at `give_up`. Sends `dribble` one byte a second meanwhile (after `head`, sent at once).
async fn time_to_close(
    addr: String,
    head: Vec<u8>,
    dribble: Vec<u8>,
    since: Instant,
    give_up: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    if !head.is_empty() && s.write_all(&head).await.is_err() {
        return (Some(since.elapsed()), Vec::new());
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = dribble.into_iter();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let end = tokio::time::Instant::now() + give_up;
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return (Some(since.elapsed()), got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick() => {
                if let Some(b) = next.next() {
                    if s.write_all(&[b]).await.is_err() {
                        return (Some(since.elapsed()), got);
                    }
                }
            }
            _ = tokio::time::sleep_until(end) => return (None, got),
        }
    }
}

fn slow_header() -> (Vec<u8>, Vec<u8>) {
    (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec(),
        vec![b'a'; 600],
    )
}

async fn one_completion(c: &reqwest::Client, d: &Daemon) -> Duration {
    let t = Instant::now();
    let r = c
        .post(d.url("/v1/completions"))
        .json(&json!({"prompt": "Hello there", "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .expect("completion");
    assert_eq!(r.status(), StatusCode::OK);
    r.bytes().await.expect("body");
    t.elapsed()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_and_silent_sockets_close_at_the_header_deadline_while_others_are_served() {
    const HEADER_S: u64 = 2;
    let Some(d) = Daemon::start(&["--header-read-timeout", "2"]) else {
        return;
    };
    let c = client();
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(one_completion(&c, &d).await);
    }
    let start = Instant::now();
    let mut attackers = Vec::new();
    for i in 0..60 {
        let (head, dribble) = if i < 50 {
            slow_header()
        } else {
            (Vec::new(), Vec::new())
        };
        attackers.push(tokio::spawn(time_to_close(
            d.addr(),
            head,
            dribble,
            start,
            Duration::from_secs(HEADER_S + 10),
        )));
    }
    // The client served meanwhile; its connection is pooled from before, as a real one's is.
    let mut during = Vec::new();
    while start.elapsed() < Duration::from_secs(HEADER_S) {
        during.push(one_completion(&c, &d).await);
    }
    let bound = Duration::from_secs(HEADER_S + 1);
    for (i, a) in attackers.into_iter().enumerate() {
        let what = if i < 50 { "slowloris" } else { "silent" };
        let (closed, _) = a.await.expect("attacker task");
        let closed = closed.unwrap_or_else(|| panic!("{what} socket {i} never closed"));
        assert!(
            closed <= bound,
            "{what} socket {i} closed after {closed:?}, past the header timeout + 1 s"
        );
    }
    let (p_idle, p_during) = (p99(idle), p99(during));
    eprintln!("p99 served alone {p_idle:?}, beside 60 slow sockets {p_during:?}");
    assert!(
        p_during <= p_idle * 3 + Duration::from_millis(50),
        "the served client's p99 went from {p_idle:?} to {p_during:?}"
    );
    // Counted as each connection's task ends, just after its socket closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let timed_out = d
            .metric("distillery:http_connections_timed_out_total")
            .await;
        if timed_out >= 60.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{timed_out} connections counted as timed out, expected 60"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dribbled_bodies_end_at_the_body_deadline_with_408() {
    let Some(d) = Daemon::start(&["--body-read-timeout", "2"]) else {
        return;
    };
    let start = Instant::now();
    let head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 300\r\n\r\n"
        .to_vec();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(time_to_close(
                d.addr(),
                head.clone(),
                vec![b' '; 300],
                start,
                Duration::from_secs(12),
            ))
        })
        .collect();
    for t in tasks {
        let (closed, got) = t.await.expect("task");
        let closed = closed.expect("a dribbled body was never ended");
        assert!(
            closed <= Duration::from_secs(3),
            "ended after {closed:?}, past the 2 s deadline + 1 s"
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || text.starts_with("HTTP/1.1 408"),
            "expected a 408 or a close, got {text}"
        );
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            let v: Value = serde_json::from_str(body).expect("the 408 body is JSON");
            assert_eq!(v["error"]["code"], "request_timeout", "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_close_and_the_bound_holds_new_ones_back() {
    let Some(d) = Daemon::start(&[
        "--keep-alive-timeout",
        "1",
        "--header-read-timeout",
        "30",
        "--max-connections",
        "4",
    ]) else {
        return;
    };
    // A kept-alive connection with nothing to do is closed after its idle time.
    let start = Instant::now();
    let (closed, got) = time_to_close(
        d.addr(),
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        Vec::new(),
        start,
        Duration::from_secs(10),
    )
    .await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let closed = closed.expect("an idle keep-alive connection stayed open");
    assert!(
        closed >= Duration::from_millis(900) && closed <= Duration::from_secs(2),
        "idle connection closed after {closed:?}, expected about 1 s"
    );

    // Four silent sockets take every slot: a fifth client waits in the backlog.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(d.addr()).await.expect("connect"));
    }
    let c = fresh_client();
    let waiting = {
        let c = c.clone();
        let url = d.url("/health");
        tokio::spawn(async move { c.get(url).send().await.map(|r| r.status()) })
    };
    // The open gauge is read over a connection too: it can only be scraped once a slot frees.
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting client was never served")
        .expect("task")
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    let open = d.metric("distillery:http_connections_open").await;
    assert!(open <= 4.0, "{open} connections open with a bound of 4");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_back_connection_is_not_served_while_the_slots_are_full() {
    let Some(d) = Daemon::start(&["--header-read-timeout", "30", "--max-connections", "2"]) else {
        return;
    };
    let a = TcpStream::connect(d.addr()).await.expect("connect");
    let b = TcpStream::connect(d.addr()).await.expect("connect");
    // Bounded by the client's own timeout: with both slots held, nothing may answer.
    let short = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(1500))
        .build()
        .expect("client");
    let r = short.get(d.url("/health")).send().await;
    assert!(
        r.is_err(),
        "a third connection was served with --max-connections 2: {:?}",
        r.map(|r| r.status())
    );
    drop(a);
    let r = fresh_client()
        .get(d.url("/health"))
        .send()
        .await
        .expect("served once a slot is free");
    assert_eq!(r.status(), StatusCode::OK);
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_uploads_get_their_413_and_expect_continue_is_refused_at_once() {
    let Some(d) = Daemon::start(&[]) else {
        return;
    };
    // 20 uploads of 5–10 MB against the 4 MiB default, each on a fresh connection.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = d.url(if i % 2 == 0 {
                "/v1/completions"
            } else {
                "/v1/chat/completions"
            });
            tokio::spawn(async move {
                let size = 5_000_000 + i * 250_000;
                let body = format!(r#"{{"prompt": "{}", "max_tokens": 1}}"#, "x".repeat(size));
                let r = fresh_client()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("upload {i} of {size} bytes: {e}"))?;
                let status = r.status();
                let v: Value = r.json().await.map_err(|e| format!("upload {i}: {e}"))?;
                Ok::<_, String>((status, v))
            })
        })
        .collect();
    for t in tasks {
        let (status, v) = t.await.expect("task").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["code"], "request_too_large", "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }

    // Expect: 100-continue over the limit: the 413 at once, and never a 100 Continue.
    let mut s = TcpStream::connect(d.addr()).await.expect("connect");
    s.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("send headers");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "no answer within 5 s to Expect: 100-continue");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 413"), "got {text}");
    assert!(!text.contains("100 Continue"), "got {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_half_sent_headers_and_nothing_in_flight_exits_at_once() {
    let Some(mut d) = Daemon::start(&["--header-read-timeout", "60", "--shutdown-grace", "30"])
    else {
        return;
    };
    let mut socks = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(d.addr()).await.expect("connect");
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Half: ")
            .await
            .expect("half a header");
        socks.push(s);
    }
    // Wait until the daemon holds them (its gauge counts the scrape's own connection too).
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.metric("distillery:http_connections_open").await < 4.0 {
        assert!(
            Instant::now() < deadline,
            "the sockets never showed as open"
        );
    }
    let t = Instant::now();
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(10)).await;
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        took <= Duration::from_secs(1),
        "exit took {took:?} with only half-sent headers open"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_slow_sockets_at_once_and_lets_streams_finish() {
    const TOKENS: u64 = 200;
    let Some(mut d) = Daemon::start(&["--header-read-timeout", "60", "--shutdown-grace", "60"])
    else {
        return;
    };
    let c = client();
    let streams = open_streams(&c, &d, 20, TOKENS).await;
    for (r, _) in &streams {
        assert_eq!(r.status(), StatusCode::OK);
    }
    let (head, dribble) = slow_header();
    let mark = Instant::now();
    let slow: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(time_to_close(
                d.addr(),
                head.clone(),
                dribble.clone(),
                mark,
                Duration::from_secs(30),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.metric("distillery:http_connections_open").await < 31.0 {
        assert!(
            Instant::now() < deadline,
            "the slow sockets never showed as open"
        );
    }
    let term = mark.elapsed();
    d.sigterm();
    for s in slow {
        let (closed, _) = s.await.expect("task");
        let closed = closed.expect("a slow socket stayed open through the drain");
        assert!(
            closed <= term + Duration::from_secs(1),
            "a slow socket closed {:?} after SIGTERM",
            closed.saturating_sub(term)
        );
    }
    for (i, (r, first)) in streams.into_iter().enumerate() {
        let text = finish_stream(&format!("stream {i}"), r, first).await;
        assert_eq!(
            completion_tokens(&text),
            Some(TOKENS),
            "stream {i} did not finish"
        );
    }
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

/// `n` streaming completions of `tokens` tokens each, every one past its first chunk.
async fn open_streams(
    c: &reqwest::Client,
    d: &Daemon,
    n: usize,
    tokens: u64,
) -> Vec<(reqwest::Response, bytes::Bytes)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut r = c
            .post(d.url("/v1/completions"))
            .json(
                &json!({"prompt": "Hello", "max_tokens": tokens, "ignore_eos": true,
                          "temperature": 0, "stream": true,
                          "stream_options": {"include_usage": true}}),
            )
            .send()
            .await
            .expect("a stream");
        let first = r
            .chunk()
            .await
            .expect("first chunk")
            .expect("a first chunk");
        streams.push((r, first));
    }
    streams
}

/// Reads a stream to its end; it must end with `[DONE]`.
async fn finish_stream(what: &str, mut r: reqwest::Response, first: bytes::Bytes) -> String {
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = r.chunk().await.expect("stream chunk") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "{what} cut short"
    );
    text
}

/// `usage.completion_tokens` of a finished stream's usage chunk.
fn completion_tokens(sse: &str) -> Option<u64> {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
}

/// Text the tokenizer cannot shortcut: varied words, no long runs of one word.
fn varied_text(bytes: usize, seed: u64) -> String {
    let mut x = seed | 1;
    let mut s = String::with_capacity(bytes + 16);
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 2 + (x % 9) as usize;
        for k in 0..len {
            s.push((b'a' + ((x >> (k * 5)) % 26) as u8) as char);
        }
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn tokenization_for_clients_that_left_does_not_delay_the_next_prompt() {
    let Some(d) = Daemon::start(&[]) else {
        return;
    };
    let c = client();
    let short = json!({"prompt": varied_text(2048, 7), "max_tokens": 1, "temperature": 0});
    let timed = || async {
        let t = Instant::now();
        let r = c
            .post(d.url("/v1/completions"))
            .json(&short)
            .send()
            .await
            .expect("the short prompt");
        assert_eq!(r.status(), StatusCode::OK);
        r.bytes().await.expect("body");
        t.elapsed()
    };
    let mut alone = Vec::new();
    for _ in 0..7 {
        alone.push(timed().await);
    }
    alone.sort();
    let alone = alone[alone.len() / 2];

    // Ten clients send 3 MB prompts and hang up after half a second.
    let started = Instant::now();
    let leavers: Vec<_> = (0..10)
        .map(|i| {
            let url = d.url("/v1/completions");
            let body = json!({"prompt": varied_text(3_000_000, 100 + i), "max_tokens": 1});
            tokio::spawn(async move {
                let send = fresh_client().post(url).json(&body).send();
                tokio::time::timeout(Duration::from_millis(500), send)
                    .await
                    .is_err()
            })
        })
        .collect();
    for l in leavers {
        assert!(
            l.await.expect("task"),
            "a 3 MB prompt was answered within 0.5 s: the test no longer loads the tokenizer"
        );
    }
    let after = timed().await;
    eprintln!(
        "2 KB prompt: {alone:?} on an idle daemon, {after:?} after 10 departed 3 MB prompts \
         ({:?} after they began)",
        started.elapsed()
    );
    // One 3 MB job may still be running on the other core when the short prompt arrives; the
    // 100 ms is scheduling noise on a shared 2-core machine (the bug this catches is seconds).
    assert!(
        after <= alone * 2 + Duration::from_millis(100),
        "the 2 KB prompt took {after:?} after the departed clients, {alone:?} alone"
    );
    // The departed clients' queued jobs were dropped, not run.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queued = d.metric("distillery:tokenizer_jobs_queued").await;
        let dropped = d.metric("distillery:tokenizer_jobs_abandoned_total").await;
        if queued == 0.0 && dropped >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokenizer queue {queued}, {dropped} abandoned jobs dropped"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_begun_on_a_kept_alive_connection_have_the_header_deadline_not_the_idle_one() {
    let Some(d) = Daemon::start(&["--header-read-timeout", "2", "--keep-alive-timeout", "60"])
    else {
        return;
    };
    let mut s = TcpStream::connect(d.addr()).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).await.expect("response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Idle for a while (under the idle timeout), then half a request's headers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let begun = Instant::now();
    s.write_all(b"POST /v1/completions HTTP/1.1\r\nX-Half: ")
        .await
        .expect("half a header");
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    let took = begun.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was not closed: {closed:?}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_secs(3),
        "closed {took:?} after its headers began, expected the 2 s header timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_does_not_cut_a_response_still_leaving_the_socket() {
    let Some(mut d) = Daemon::start(&["--shutdown-grace", "60"]) else {
        return;
    };
    // A client with a tiny receive window, so that a large answer cannot leave the daemon's
    // socket until the client reads it. (On loopback the kernel's send queue may take the
    // whole answer; the case where hyper itself still holds bytes needs answers of megabytes
    // and is covered by the `writing` flag's reasoning in connection.rs, not reproduced here.)
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let addr: std::net::SocketAddr = d.addr().parse().expect("address");
    let mut s = sock.connect(addr).await.expect("connect");
    let body = json!({"prompt": "Hello", "max_tokens": 600, "ignore_eos": true, "temperature": 0,
                      "logprobs": 5, "n": 8})
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("headers");
    s.write_all(body.as_bytes()).await.expect("body");
    // The engine has finished it: the whole answer is now with hyper and the socket.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = scrape(&client(), &d.process.base).await;
        let done = value(
            &s,
            "distillery:request_success_total",
            &[("finished_reason", "length")],
        );
        if done >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the request never finished");
    }
    d.sigterm();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .expect("the answer never ended")
        .expect("read");
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let declared: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    assert!(
        declared > 300_000,
        "the answer is only {declared} bytes: it no longer fills the socket"
    );
    assert_eq!(body.len(), declared, "the answer was cut short");
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the answer was cut ({} bytes): {e}", body.len()));
    assert_eq!(v["usage"]["completion_tokens"], 4800, "{}", v["usage"]);
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_streams_finish_through_a_drain() {
    const TOKENS: u64 = 150;
    let Some(mut d) = Daemon::start(&["--shutdown-grace", "60"]) else {
        return;
    };
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("h2 client");
    let streams = open_streams(&h2, &d, 5, TOKENS).await;
    for (r, _) in &streams {
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
    }
    d.sigterm();
    for (i, (r, first)) in streams.into_iter().enumerate() {
        let text = finish_stream(&format!("h2 stream {i}"), r, first).await;
        assert_eq!(
            completion_tokens(&text),
            Some(TOKENS),
            "h2 stream {i} did not finish"
        );
    }
    let status = d.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}");
}
