//! A daemon serving one shared model with its log kept (tests read its lines), and the
//! request helpers the OpenAI-fidelity tests share: a refusal naming its field, ids and
//! logprobs out of JSON, `/tokenize` and `/detokenize`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use reqwest::StatusCode;
use serde_json::{json, Value};

use super::daemon::{distillery_command, DaemonProcess};
use super::http::{ok, post};

/// `distillery serve --model MODELS/<model>` on a free port, every stderr line kept.
pub struct Served {
    process: DaemonProcess,
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    /// A shared model, or `None` (after a loud message) where the shared models are absent.
    pub fn start(model: &str, extra: &[&str]) -> Option<Served> {
        let dir = super::model_dir(model)?;
        Some(Served::serve(&dir, model, extra))
    }

    /// The model folder `dir` (a fixture assembled for the test, say); `what` names it in
    /// failure messages. The KV cache is 32 MiB unless `extra` sets `--kv-cache-memory`.
    pub fn serve(dir: &Path, what: &str, extra: &[&str]) -> Served {
        let mut cmd = distillery_command();
        cmd.arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0", "--model"])
            .arg(dir)
            .args(extra);
        if !extra.contains(&"--kv-cache-memory") {
            cmd.args(["--kv-cache-memory", "32MiB"]);
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        let process = DaemonProcess::spawn(
            cmd,
            &format!("the daemon ({what}, {extra:?})"),
            200,
            move |l| {
                keep.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(l.to_string());
            },
        );
        Served { process, log }
    }

    pub fn url(&self, path: &str) -> String {
        self.process.url(path)
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- daemon log -----\n{}\n-----", self.process.tail());
        }
    }
}

pub async fn refused(c: &reqwest::Client, url: &str, body: &Value, param: &str) -> Value {
    let (status, v) = post(c, url, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {v}");
    assert_eq!(v["error"]["param"], param, "{body} -> {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    v
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

/// A JSON array of numbers or nulls.
pub fn f32s(v: &Value) -> Vec<Option<f32>> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect()
}

pub async fn tokenize(c: &reqwest::Client, d: &Served, text: &str) -> Vec<u32> {
    let v = ok(
        c,
        &d.url("/tokenize"),
        &json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    ids(&v["tokens"])
}

pub async fn decode(c: &reqwest::Client, d: &Served, tokens: &[u32]) -> String {
    let v = ok(c, &d.url("/detokenize"), &json!({ "tokens": tokens })).await;
    v["prompt"].as_str().expect("text").to_string()
}
