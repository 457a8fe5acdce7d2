//! Failover behind the shipped load balancer: two real daemons on loopback ports, a real nginx
//! (Debian's package) running `deploy/nginx/nginx.conf` adapted only in its ports, hosts and
//! writable paths, and a bounded closed-loop load through nginx with `distillery-loadtest`.
//! Mid-load one daemon gets SIGTERM. The test asserts that no request failed and every one got
//! a complete response (streamed, ending `data: [DONE]`, with `usage`), that the stopped daemon
//! drained its in-flight requests and exited 0, and that traffic went on through the other
//! daemon; then that the stopped daemon, restarted on the same port, receives traffic through
//! nginx again once its `/ready` passes.
//!
//! Needs the `nginx` binary (Debian package `nginx`): without it the test prints a loud
//! SKIPPING line and passes, unless the environment variable `CI` is set, where it fails. Needs
//! `distillery-loadtest` beside the daemon binary (`cargo test --release --workspace` builds
//! both). Serves `builtin:tiny`, so it needs no model files.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prom_text_format_parser::{Scrape, ValueType};
use serde_json::{json, Value};

use common::daemon::{distillery_command, DaemonProcess};

const MODEL: &str = "builtin:tiny";
/// The scenario's answers are at most this long.
const MAX_TOKENS: u64 = 16;
/// How long the load runs: long enough that the SIGTERM, the drain and a good stretch of load
/// on the remaining daemon all fall inside it on a slow, busy 2-core machine.
const LOAD_DURATION_S: u64 = 8;
const CONCURRENCY: usize = 16;
/// The stream held open across daemon 1's SIGTERM: long enough to be still running when the
/// drain begins on a busy machine, short against the grace period.
const LONG_TOKENS: u64 = 1500;
/// Requests daemon 1 must have served before it gets SIGTERM: proof that the load is running
/// through it.
const SERVED_BEFORE_SIGTERM: f64 = 100.0;
/// The daemons' --shutdown-grace; the drain of 16-token requests takes milliseconds.
const SHUTDOWN_GRACE_S: u64 = 20;

// ---------------------------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------------------------

/// Sends `signal` (a name kill(1) knows: TERM, QUIT, KILL) to `pid`; a negative pid names a
/// process group.
fn signal(pid: i64, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .status()
        .expect("run kill(1)");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Waits for `child` to exit, polling with a deadline; `None` when it is still running then.
async fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a daemon's log says, counted as it is written.
#[derive(Default)]
struct LogWatch {
    /// `shutdown signal: draining` has been logged.
    draining: AtomicBool,
    /// `request finished` lines logged after the drain began: requests that were in flight.
    finished_while_draining: AtomicU64,
    /// `request rejected` lines with status 503 (new work refused during the drain).
    rejected_503: AtomicU64,
    drained: AtomicBool,
    grace_over: AtomicBool,
}

impl LogWatch {
    fn see(&self, line: &str) {
        if line.contains("shutdown signal: draining") {
            self.draining.store(true, Ordering::SeqCst);
        } else if line.contains("request finished") {
            if self.draining.load(Ordering::SeqCst) {
                self.finished_while_draining.fetch_add(1, Ordering::SeqCst);
            }
        } else if line.contains("request rejected") && line.contains("503") {
            self.rejected_503.fetch_add(1, Ordering::SeqCst);
        } else if line.contains("drained; exiting") {
            self.drained.store(true, Ordering::SeqCst);
        } else if line.contains("grace period over") {
            self.grace_over.store(true, Ordering::SeqCst);
        }
    }
}

/// A running `distillery serve` on 127.0.0.1; killed (and reaped) on drop, its log's last
/// lines printed when the test is failing.
struct Daemon {
    name: &'static str,
    process: DaemonProcess,
    port: u16,
    log: Arc<LogWatch>,
}

impl Daemon {
    /// Starts a daemon on `port` (0: any free port) and waits for its `listening` line.
    fn start(name: &'static str, port: u16) -> Daemon {
        let mut cmd = distillery_command();
        cmd.env("RUST_LOG", "info")
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--model", MODEL, "--kv-cache-memory", "32MiB"])
            .args(["--shutdown-grace", &SHUTDOWN_GRACE_S.to_string()]);
        let log = Arc::new(LogWatch::default());
        let watch = log.clone();
        let process = DaemonProcess::spawn(cmd, name, 200, move |line| watch.see(line));
        let listening = process
            .base
            .strip_prefix("http://127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name} listens on {:?}, not 127.0.0.1:PORT", process.base));
        if port != 0 {
            assert_eq!(listening, port, "{name} restarted on another port");
        }
        Daemon {
            name,
            process,
            port: listening,
            log,
        }
    }

    fn url(&self, path: &str) -> String {
        self.process.url(path)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} ({}) log, last lines -----\n{}\n----- end of {} log -----",
                self.name,
                self.process.base,
                self.process.tail(),
                self.name
            );
        }
    }
}

/// A scratch directory, removed on drop unless the test is failing (then its path is printed:
/// nginx's logs and the loadtest's report are in it).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "distillery-failover-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scratch directory kept: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// nginx's master process, in a process group of its own; stopped (master and workers) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Graceful stop (SIGQUIT: workers finish their requests and flush the access log).
    async fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        signal(i64::from(self.child.id()), "QUIT");
        wait_exit(&mut self.child, Duration::from_secs(10)).await
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- nginx error log -----\n{}\n----- end of nginx error log -----",
                self.error_log()
            );
        }
        if let Ok(None) = self.child.try_wait() {
            let pid = i64::from(self.child.id());
            let _ = Command::new("kill")
                .args(["-TERM", "--", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() > deadline {
                    // The whole group: workers outlive a killed master.
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &(-pid).to_string()])
                        .status();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
    }
}

/// A child killed (and reaped) on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `nginx` binary: on PATH, or in /usr/sbin (not on a non-root PATH).
fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// `distillery-loadtest`, built by `cargo test --workspace` into the daemon's directory.
fn loadtest_binary() -> PathBuf {
    let daemon = Path::new(env!("CARGO_BIN_EXE_distillery"));
    let dir = daemon
        .parent()
        .expect("the daemon binary lives in a directory");
    let bin = dir.join("distillery-loadtest");
    assert!(
        bin.is_file(),
        "{} is absent: this test drives the load with the workspace's load generator; build it \
         with `cargo test --release --workspace` (as .ci/run does) or \
         `cargo build --release -p distillery-loadtest`",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago (nginx binds it next; a clash fails its start loudly).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

// ---------------------------------------------------------------------------------------------
// The shipped config, adapted by substitution.
// ---------------------------------------------------------------------------------------------

/// Directives whose only change is their path, which moves into `dir` (same file name).
const PATH_DIRECTIVES: &[&str] = &[
    "pid",
    "error_log",
    "access_log",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
];

/// `deploy/nginx/nginx.conf` with its listen port, its two upstream hosts and the paths it
/// writes replaced; every other line is kept as it is. Fails if the file no longer has exactly
/// one line for each of those.
fn adapt_config(shipped: &str, dir: &Path, listen: u16, upstreams: [u16; 2]) -> String {
    let mut out = String::with_capacity(shipped.len() + 512);
    let mut changed: Vec<String> = Vec::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        let mut words = t.split_whitespace();
        let first = words.next().unwrap_or("");
        let replaced = if PATH_DIRECTIVES.contains(&first) && t != "access_log off;" {
            let path = words
                .next()
                .unwrap_or_else(|| panic!("{first} without a path: {line:?}"))
                .trim_end_matches(';');
            let file = Path::new(path)
                .file_name()
                .unwrap_or_else(|| panic!("{first} path {path:?} has no file name"));
            changed.push(first.to_string());
            Some(line.replacen(path, &dir.join(file).to_string_lossy(), 1))
        } else if t == "listen 8080;" {
            changed.push("listen".into());
            Some(line.replacen("8080", &format!("127.0.0.1:{listen}"), 1))
        } else if first == "server" && t.starts_with("server distillery-") {
            let (host, port) = match t.split_whitespace().nth(1) {
                Some("distillery-1:8000") => ("distillery-1:8000", upstreams[0]),
                Some("distillery-2:8000") => ("distillery-2:8000", upstreams[1]),
                other => panic!("unexpected upstream server {other:?} in {line:?}"),
            };
            changed.push(host.into());
            Some(line.replacen(host, &format!("127.0.0.1:{port}"), 1))
        } else {
            None
        };
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    changed.sort();
    let mut want: Vec<String> = PATH_DIRECTIVES
        .iter()
        .map(|s| s.to_string())
        .chain(["listen", "distillery-1:8000", "distillery-2:8000"].map(String::from))
        .collect();
    want.sort();
    assert_eq!(
        changed, want,
        "deploy/nginx/nginx.conf should have exactly one line for each adapted directive"
    );
    out
}

async fn start_nginx(nginx: &Path, dir: &Path, upstreams: [u16; 2]) -> (Nginx, String) {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/nginx.conf"),
    )
    .expect("read deploy/nginx/nginx.conf");
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, adapt_config(&shipped, dir, port, upstreams))
        .expect("write the adapted nginx.conf");
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("spawn nginx");
    let mut nginx = Nginx {
        child,
        dir: dir.to_path_buf(),
    };
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c.get(format!("{base}/nginx-health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        if let Ok(Some(status)) = nginx.child.try_wait() {
            panic!(
                "nginx exited at start ({status}); its error log:\n{}",
                nginx.error_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not answer /nginx-health within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nginx, base)
}

// ---------------------------------------------------------------------------------------------
// HTTP and metrics.
// ---------------------------------------------------------------------------------------------

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

async fn scrape(c: &reqwest::Client, d: &Daemon) -> Scrape {
    let text = c
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {} /metrics: {e}", d.name))
        .text()
        .await
        .expect("the /metrics body");
    Scrape::parse(&text).unwrap_or_else(|e| panic!("unparsable scrape: {e:?}\n{text}"))
}

/// Requests the daemon ran to a normal end (`request_success_total`, stop + length).
fn served(s: &Scrape) -> f64 {
    let family = s
        .metrics
        .iter()
        .find(|m| m.name == "distillery:request_success_total")
        .expect("distillery:request_success_total in the scrape");
    family
        .samples
        .iter()
        .filter(|x| x.value.value_type == ValueType::Sample)
        .filter(|x| {
            x.labels
                .iter()
                .any(|l| l.key == "finished_reason" && (l.value == "stop" || l.value == "length"))
        })
        .map(|x| x.value.value.as_f64())
        .sum()
}

async fn served_by(c: &reqwest::Client, d: &Daemon) -> f64 {
    served(&scrape(c, d).await)
}

/// A short greedy completion through nginx; asserts a complete 200 answer.
async fn complete_through(c: &reqwest::Client, nginx: &str, i: usize) {
    let url = format!("{nginx}/v1/completions");
    let r = c
        .post(&url)
        .json(
            &json!({"model": MODEL, "prompt": format!("Hello {i}"), "max_tokens": 4,
                      "temperature": 0}),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = r.status();
    let v: Value = r.json().await.expect("a JSON answer");
    assert_eq!(status, 200, "through nginx: {v}");
    assert!(
        v["choices"][0]["finish_reason"].is_string(),
        "a complete answer through nginx: {v}"
    );
}

// ---------------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_load_behind_nginx_loses_no_request() {
    let Some(nginx_bin) = find_nginx() else {
        if std::env::var_os("CI").is_some() {
            panic!("no `nginx` binary on PATH or in /usr/sbin, and CI is set: install the Debian package `nginx`");
        }
        eprintln!(
            "\n!!! SKIPPING failover test: no `nginx` binary on PATH or in /usr/sbin (Debian \
             package `nginx`; .ci/run installs it) !!!\n"
        );
        return;
    };
    let loadtest = loadtest_binary();
    let started = Instant::now();
    let scratch = Scratch::new();
    let dir = scratch.0.clone();

    let mut d1 = Daemon::start("daemon 1", 0);
    let d2 = Daemon::start("daemon 2", 0);
    let (mut nginx, lb) = start_nginx(&nginx_bin, &dir, [d1.port, d2.port]).await;
    let c = client();
    // Both replicas answer through nginx before the load starts.
    for i in 0..4 {
        complete_through(&c, &lb, i).await;
    }
    // The request id travels to the replica and back; a body over the daemon's limit is refused
    // by nginx itself.
    let r = c
        .post(format!("{lb}/v1/completions"))
        .header("x-request-id", "failover-test-42")
        .json(&json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}))
        .send()
        .await
        .expect("POST with an X-Request-Id through nginx");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("failover-test-42"),
        "the replica echoes the client's X-Request-Id through nginx"
    );
    let r = c
        .post(format!("{lb}/v1/completions"))
        .header("content-type", "application/json")
        .body(vec![b' '; 5 << 20])
        .send()
        .await
        .expect("POST a 5 MiB body through nginx");
    assert_eq!(r.status(), 413, "nginx's client_max_body_size");

    // The load: closed loop, streaming (so a cut response shows as a stream without
    // `data: [DONE]`), usage on every response.
    let report = dir.join("load.json");
    let scenario =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("loadtest/scenarios/customer-service.toml");
    let load_log = dir.join("loadtest.log");
    let load_out = std::fs::File::create(&load_log).expect("create the loadtest log");
    let mut load = Reaped(
        Command::new(&loadtest)
            .args(["--url", &lb, "--model", MODEL, "--stream", "true"])
            .arg("--scenario")
            .arg(&scenario)
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--duration", &format!("{LOAD_DURATION_S}s")])
            .args(["--timeout", "30s", "--seed", "7", "--no-progress"])
            .arg("--output")
            .arg(&report)
            .stdin(Stdio::null())
            .stdout(load_out.try_clone().expect("clone the log handle"))
            .stderr(load_out)
            .spawn()
            .expect("spawn distillery-loadtest"),
    );
    let load_text = || std::fs::read_to_string(&load_log).unwrap_or_default();

    // SIGTERM once daemon 1 has demonstrably been serving the load.
    let deadline = Instant::now() + Duration::from_secs(30);
    let d1_before = loop {
        let n = served_by(&c, &d1).await;
        if n >= SERVED_BEFORE_SIGTERM {
            break n;
        }
        if let Ok(Some(s)) = load.0.try_wait() {
            panic!(
                "the loadtest ended ({s}) before daemon 1 served {SERVED_BEFORE_SIGTERM} \
                 requests (it served {n}):\n{}",
                load_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "daemon 1 served only {n} requests of the load within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let d2_at_sigterm = served_by(&c, &d2).await;
    // One long stream straight to daemon 1, running when the signal comes: the load's own
    // requests last milliseconds and may all end before the drain is even logged, which
    // would leave the drain with nothing in flight to prove it waits for.
    let long = c
        .post(d1.url("/v1/completions"))
        .json(
            &json!({"model": MODEL, "prompt": "Hi", "max_tokens": LONG_TOKENS,
                      "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .expect("open a long stream to daemon 1");
    assert_eq!(long.status(), 200, "the long stream");
    let mut long = long.bytes_stream();
    let first = long
        .next()
        .await
        .expect("the long stream's first bytes")
        .expect("read the long stream");
    assert!(!first.is_empty());
    signal(i64::from(d1.process.child.id()), "TERM");
    let sigterm_at = Instant::now();
    assert!(
        matches!(load.0.try_wait(), Ok(None)),
        "the loadtest had already ended when daemon 1 got SIGTERM: not mid-load\n{}",
        load_text()
    );

    // The long stream runs to its end during the drain.
    let mut body = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = long.next().await {
        body.push_str(&String::from_utf8_lossy(
            &chunk.expect("read the long stream"),
        ));
    }
    assert!(
        body.trim_end().ends_with("data: [DONE]"),
        "the stream in flight at SIGTERM was cut: ...{}",
        &body[body.len().saturating_sub(300)..]
    );

    // The stopped daemon drains and exits 0.
    let status = wait_exit(
        &mut d1.process.child,
        Duration::from_secs(SHUTDOWN_GRACE_S + 10),
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "daemon 1 still running {}s after SIGTERM",
            SHUTDOWN_GRACE_S + 10
        )
    });
    let drain_took = sigterm_at.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "daemon 1's exit after the drain: {status}"
    );
    // The log reader may still be reading the last lines.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d1.log.drained.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        d1.log.drained.load(Ordering::SeqCst) && !d1.log.grace_over.load(Ordering::SeqCst),
        "daemon 1 should log `drained; exiting`, with no request left at the end of the grace"
    );
    let in_flight_finished = d1.log.finished_while_draining.load(Ordering::SeqCst);
    let refused = d1.log.rejected_503.load(Ordering::SeqCst);
    assert!(
        in_flight_finished > 0,
        "daemon 1 was serving ~{} requests when it got SIGTERM, yet logged no request finished \
         during its drain",
        CONCURRENCY / 2
    );

    // The load runs to its end.
    let load_status = wait_exit(&mut load.0, Duration::from_secs(LOAD_DURATION_S + 60))
        .await
        .unwrap_or_else(|| panic!("the loadtest did not finish:\n{}", load_text()));
    assert!(
        load_status.success(),
        "distillery-loadtest: {load_status}\n{}",
        load_text()
    );
    let d2_after = served_by(&c, &d2).await;

    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(&report).expect("the loadtest's --output report"),
    )
    .expect("the report is JSON");
    let s = &r["summary"];
    let records = r["requests"].as_array().expect("per-request records");
    let ok = s["successful_requests"]
        .as_u64()
        .expect("successful_requests");
    assert_eq!(
        s["failed_requests"], 0,
        "failed requests through nginx: {s}"
    );
    assert_eq!(ok as usize, records.len(), "every record is a success: {s}");
    assert!(ok >= 200, "only {ok} requests in {LOAD_DURATION_S}s: {s}");
    assert_eq!(s["requests_without_usage"], 0, "{s}");
    for (i, rec) in records.iter().enumerate() {
        // A streamed response is complete only with `data: [DONE]`; the loadtest records a
        // stream without it as an error.
        assert!(
            rec.get("error").is_none() && rec["status"] == 200 && rec["usage_reported"] == true,
            "request {i} did not get a complete 200 response: {rec}"
        );
        let out = rec["output_tokens"].as_u64().expect("output_tokens");
        assert!(
            (1..=MAX_TOKENS).contains(&out),
            "request {i}: {out} output tokens: {rec}"
        );
        assert!(
            rec["ttft_ms"].is_number(),
            "request {i} streamed no token: {rec}"
        );
    }
    assert!(
        d2_after >= d2_at_sigterm + 50.0,
        "daemon 2 served {d2_at_sigterm} requests before daemon 1's SIGTERM and {d2_after} \
         by the end of the load: traffic did not go on through it"
    );
    eprintln!(
        "load through nginx: {ok} requests, none failed; daemon 1 served {d1_before} before \
         SIGTERM, finished {in_flight_finished} in flight and refused {refused} (503, retried \
         by nginx) while draining for {drain_took:?}; daemon 2 served {d2_at_sigterm} before \
         and {d2_after} by the end"
    );

    // Restarted on the same port: once /ready passes, nginx sends it traffic again (after the
    // fail_timeout that its refused connections earned it).
    let port = d1.port;
    drop(d1);
    let d1 = Daemon::start("daemon 1 (restarted)", port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c.get(d1.url("/ready")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the restarted daemon's /ready did not pass within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarted_at = Instant::now();
    let deadline = restarted_at + Duration::from_secs(30);
    let mut sent = 0usize;
    let back = loop {
        let batch: Vec<_> = (0..4)
            .map(|i| complete_through(&c, &lb, sent + i))
            .collect();
        futures_util::future::join_all(batch).await;
        sent += 4;
        let n = served_by(&c, &d1).await;
        if n >= 3.0 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted daemon served {n} of {sent} requests sent through nginx in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "restarted daemon 1 served {back} of {sent} requests through nginx within {:?} of \
         /ready",
        restarted_at.elapsed()
    );

    let nginx_status = nginx.stop().await;
    let access = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    let retried = access
        .lines()
        .filter(|l| {
            l.split(" upstream=").nth(1).is_some_and(|u| {
                u.split(" upstream_status=")
                    .next()
                    .is_some_and(|a| a.contains(", "))
            })
        })
        .count();
    eprintln!(
        "nginx: {} requests logged, {retried} passed to the second replica; stopped: {:?}; \
         whole test {:?}",
        access.lines().count(),
        nginx_status,
        started.elapsed()
    );
    // What nginx saw of the replicas, by kind ("connect() failed (111: Connection refused)",
    // "upstream prematurely closed connection", ...).
    let errors = nginx.error_log();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for line in errors.lines().filter(|l| l.contains("upstream")) {
        let what = line
            .split_once(": *")
            .and_then(|(_, rest)| rest.split_once(' '))
            .map(|(_, rest)| rest.split(", client:").next().unwrap_or(rest))
            .unwrap_or(line);
        *kinds.entry(what.to_string()).or_default() += 1;
    }
    eprintln!("nginx error log, upstream events by kind: {kinds:#?}");
    drop(d2);
}
