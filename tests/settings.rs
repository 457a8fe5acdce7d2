//! Every numeric setting of `distillery serve` at 0, at -1 and at an absurd value, given as a
//! flag, as a `DISTILLERY_*` variable and as a config file key: either the daemon starts (the
//! value has a documented meaning) or it exits 2 before loading anything, with a message that
//! names the flag, the variable and the key.
//!
//! The expectations are written out here, not read from the daemon's own table, so that a
//! change of range shows up as a failing case.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::daemon::{distillery_command, DaemonProcess};

/// (config key, flag, values that mean something and must start a daemon).
const SETTINGS: &[(&str, &str, &[&str])] = &[
    ("port", "port", &["0"]),
    ("gpu_memory_utilization", "gpu-memory-utilization", &["0"]),
    ("max_num_seqs", "max-num-seqs", &[]),
    ("max_num_batched_tokens", "max-num-batched-tokens", &[]),
    ("max_waiting_requests", "max-waiting-requests", &[]),
    ("max_queued_prompt_tokens", "max-queued-prompt-tokens", &[]),
    ("kv_cache_memory", "kv-cache-memory", &[]),
    ("block_size", "block-size", &[]),
    ("max_model_len", "max-model-len", &[]),
    ("data_parallel_size", "data-parallel-size", &[]),
    ("tokenizer_workers", "tokenizer-workers", &[]),
    ("max_body_bytes", "max-body-bytes", &[]),
    ("body_read_timeout_secs", "body-read-timeout", &[]),
    ("header_read_timeout_secs", "header-read-timeout", &[]),
    ("keep_alive_timeout_secs", "keep-alive-timeout", &["0"]),
    ("max_connections", "max-connections", &[]),
    ("shutdown_grace_secs", "shutdown-grace", &["0"]),
    ("reasoning_budget", "reasoning-budget", &["0", "-1"]),
];

/// Past every range: a typo, not a machine.
const ABSURD: &str = "1000000000000000";

fn env_name(flag: &str) -> String {
    format!("DISTILLERY_{}", flag.replace('-', "_").to_ascii_uppercase())
}

enum Way {
    Flag,
    Env,
    File,
}

/// Runs `serve` with `key` set to `value` the given way; returns the exit code and stderr, or
/// `None` when it started (it is then killed).
fn run(
    key: &str,
    flag: &str,
    value: &str,
    way: &Way,
    dir: &std::path::Path,
) -> Option<(i32, String)> {
    let mut cmd = distillery_command();
    cmd.arg("serve")
        .args(["--host", "127.0.0.1", "--model", "builtin:tiny"]);
    if key != "port" {
        cmd.args(["--port", "0"]);
    }
    if key != "kv_cache_memory" {
        cmd.args(["--kv-cache-memory", "8MiB"]);
    }
    let file = dir.join(format!("{key}.toml"));
    match way {
        Way::Flag => {
            // The spaced form, as people type it: a negative value must not read as a flag.
            cmd.arg(format!("--{flag}")).arg(value);
        }
        Way::Env => {
            cmd.env(env_name(flag), value);
        }
        Way::File => {
            let mut f = std::fs::File::create(&file).expect("write the config file");
            writeln!(f, "{key} = {value}").expect("write the config file");
            cmd.arg("--config").arg(&file);
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn distillery");
    // A refusal comes before any model is loaded; a start prints its listening line.
    let mut child = out;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return Some((status.code().unwrap_or(-1), err));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when the daemon starts and prints its listening line with `key = value` as a flag.
fn starts(key: &str, flag: &str, value: &str) -> bool {
    let mut cmd = distillery_command();
    cmd.arg("serve")
        .args(["--host", "127.0.0.1", "--model", "builtin:tiny"])
        .args(["--kv-cache-memory", "8MiB"]);
    if key != "port" {
        cmd.args(["--port", "0"]);
    }
    cmd.arg(format!("--{flag}={value}"));
    let d = DaemonProcess::spawn(cmd, &format!("serve --{flag}={value}"), 50, |_| {});
    d.base.starts_with("http://127.0.0.1:")
}

#[test]
fn every_numeric_setting_is_refused_out_of_range_with_exit_2_or_means_something() {
    let dir = std::env::temp_dir().join(format!("distillery-settings-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut failures = Vec::new();
    for &(key, flag, meaningful) in SETTINGS {
        for value in ["0", "-1", ABSURD] {
            if meaningful.contains(&value) {
                if !starts(key, flag, value) {
                    failures.push(format!("--{flag}={value} should start a daemon"));
                }
                continue;
            }
            for way in [Way::Flag, Way::Env, Way::File] {
                let how = match way {
                    Way::Flag => format!("--{flag}={value}"),
                    Way::Env => format!("{}={value}", env_name(flag)),
                    Way::File => format!("{key} = {value} in the config file"),
                };
                match run(key, flag, value, &way, &dir) {
                    None => failures.push(format!("{how}: the daemon started")),
                    Some((code, err)) => {
                        if code != 2 {
                            failures.push(format!("{how}: exit {code}, not 2: {err}"));
                        }
                        for name in [format!("--{flag}"), env_name(flag), key.to_string()] {
                            if !err.contains(&name) {
                                failures.push(format!(
                                    "{how}: the message does not name {name}: {err}"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn limits_that_need_the_model_or_the_machine_exit_2_too() {
    // builtin:tiny has 2048 positions; the machine has less than 16 TiB.
    for (args, names) in [
        (vec!["--max-model-len", "4096"], "--max-model-len"),
        (
            vec!["--kv-cache-memory", "16492674416640"],
            "--kv-cache-memory",
        ),
        (vec!["--kv-cache-memory", "100"], "--kv-cache-memory"),
    ] {
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                "builtin:tiny",
            ])
            .args(&args);
        let out = cmd.output().expect("run distillery");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
}

/// `config/default.toml` lists every key with the flag and variable its header promises (the
/// rule, or one of the exceptions the header names), and every flag has a key there.
#[test]
fn the_default_config_and_the_flags_agree() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let toml = std::fs::read_to_string(root.join("config/default.toml")).expect("default.toml");
    let out = distillery_command()
        .args(["serve", "--help"])
        .output()
        .expect("serve --help");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let keys: Vec<String> = toml
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches('#').trim_start();
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            (!k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                .then(|| k.to_string())
        })
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    let flag_of = |key: &str| -> (String, String) {
        let base = match key {
            "api_keys" => return ("api-key".into(), "DISTILLERY_API_KEYS".into()),
            "cors_allow_origins" => {
                return (
                    "cors-allow-origin".into(),
                    "DISTILLERY_CORS_ALLOW_ORIGINS".into(),
                )
            }
            k => k.strip_suffix("_secs").unwrap_or(k),
        };
        (
            base.replace('_', "-"),
            format!("DISTILLERY_{}", base.to_ascii_uppercase()),
        )
    };
    for key in &keys {
        let (flag, env) = flag_of(key);
        assert!(
            help.contains(&format!("--{flag} ")) || help.contains(&format!("--{flag}\n")),
            "{key}: no flag --{flag} in serve --help"
        );
        // The one boolean read by hand keeps its variable out of clap's help.
        if key != "enable_prefix_caching" {
            assert!(
                help.contains(&env),
                "{key}: no variable {env} in serve --help"
            );
        }
        if key.ends_with("_secs") {
            assert!(
                toml.contains("drop _secs"),
                "the header names the _secs exception"
            );
        }
    }
    // Each option's own line (not a mention of a flag inside some help text).
    for flag in help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '\n']).next())
    {
        if ["help", "config", "no-enable-prefix-caching", ""].contains(&flag) {
            continue;
        }
        assert!(
            keys.iter().any(|k| flag_of(k).0 == flag),
            "--{flag} has no key in config/default.toml"
        );
    }
}
