//! A short bounded load against the real daemon: `distillery serve` on
//! `../shared/models/tiny-llama-v512`, on 127.0.0.1 and a free port. The daemon binary is the
//! one in this test's own profile directory, which `cargo test --workspace` builds; run alone
//! (`cargo test -p distillery-loadtest`) or without the model beside the checkout, the test
//! skips loudly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::Parser;
use distillery_loadtest::{run_cli, Args, Outcome};

/// Kills the daemon however the test ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn paths() -> Option<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // target/<profile>/deps/<this test> → target/<profile>/distillery
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("distillery")))
        .unwrap_or_default();
    let model = root.join("../shared/models/tiny-llama-v512");
    if bin.is_file() && model.is_dir() {
        Some((bin, model))
    } else {
        eprintln!(
            "SKIPPING real_daemon: needs {} (cargo test --workspace builds it) and {}",
            bin.display(),
            model.display()
        );
        None
    }
}

/// Starts the daemon and returns it with the URL it printed.
fn start(bin: &Path, model: &Path) -> (Daemon, String) {
    let mut child = Command::new(bin)
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--model"])
        .arg(model)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let daemon = Daemon(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("daemon printed `distillery listening on URL` within 120 s");
    (daemon, url)
}

async fn load(url: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let scen = format!(
        "{}/scenarios/customer-service.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let o = out.to_str().unwrap();
    let mut argv = vec![
        "distillery-loadtest",
        "--url",
        url,
        "--scenario",
        &scen,
        "--no-progress",
        "--output",
        o,
    ];
    argv.extend_from_slice(extra);
    let outcome = run_cli(&Args::try_parse_from(argv).unwrap()).await.unwrap();
    assert!(matches!(outcome, Outcome::Single(_)));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let _ = std::fs::remove_file(out);
    v
}

#[tokio::test]
async fn bounded_load_against_the_real_daemon() {
    let Some((bin, model)) = paths() else { return };
    let (_daemon, url) = start(&bin, &model);
    let dir = std::env::temp_dir();
    let pid = std::process::id();

    for (name, extra, n) in [
        (
            "plain",
            &["--concurrency", "16", "--num-requests", "300"][..],
            300u64,
        ),
        (
            "stream",
            &[
                "--concurrency",
                "16",
                "--num-requests",
                "200",
                "--stream",
                "true",
            ][..],
            200,
        ),
        (
            "open",
            &["--request-rate", "500", "--num-requests", "200"][..],
            200,
        ),
    ] {
        let r = load(
            &url,
            &dir.join(format!("loadtest-daemon-{pid}-{name}.json")),
            extra,
        )
        .await;
        let s = &r["summary"];
        assert_eq!(s["successful_requests"], n, "{name}: {s}");
        assert_eq!(s["failed_requests"], 0, "{name}: {s}");
        assert_eq!(s["requests_without_usage"], 0, "{name}: usage reported");
        let reqs = r["requests"].as_array().unwrap();
        assert_eq!(reqs.len() as u64, n);
        assert!(
            s["total_input_tokens"].as_u64().unwrap() >= n,
            "{name}: prompt tokens counted"
        );
        let out = s["total_output_tokens"].as_u64().unwrap();
        assert!(
            out >= n && out <= 16 * n,
            "{name}: output tokens counted ({out})"
        );
        eprintln!(
            "real daemon, {name}: {:.0} req/s, p99 E2E {:.2} ms",
            s["request_throughput"].as_f64().unwrap(),
            s["e2e_ms"]["p99"].as_f64().unwrap()
        );
    }
}
