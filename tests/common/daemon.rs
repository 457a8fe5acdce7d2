//! The real `distillery` binary as a child process: spawned with piped output, its stderr
//! kept as a bounded tail (for failure messages) and shown line by line to a hook, its stdout
//! read for the `distillery listening on URL` line. Each test wraps it in a type of its own
//! with the flags, the log it prints on failure and the state its hook keeps.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// Model load plus bind, on a machine shared with concurrent builds.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// The daemon binary with no `DISTILLERY_*` variable inherited (settings come from the flags
/// the test adds only) and `NO_COLOR=1`.
pub fn distillery_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distillery"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DISTILLERY_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("NO_COLOR", "1");
    // One engine unless a test asks for more: `auto` would give the small test models one per
    // core, and what a test counts (cache hits, load, events) would depend on the machine.
    cmd.env("DISTILLERY_DATA_PARALLEL_SIZE", "1");
    cmd
}

/// A running daemon; killed (and reaped) on drop.
pub struct DaemonProcess {
    pub child: Child,
    /// What the `distillery listening on` line names, e.g. `http://127.0.0.1:PORT`.
    pub base: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl DaemonProcess {
    /// Spawns `cmd` (stdin null, stdout and stderr piped), keeps the last `tail_len` stderr
    /// lines, calls `on_stderr` with each stderr line as it comes, and waits up to
    /// [`STARTUP_DEADLINE`] for the `distillery listening on URL` line; panics (with the
    /// exit status and the log's tail; the child killed) when none comes. `what` names the
    /// daemon in that message.
    pub fn spawn(
        mut cmd: Command,
        what: &str,
        tail_len: usize,
        mut on_stderr: impl FnMut(&str) + Send + 'static,
    ) -> DaemonProcess {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the distillery binary");
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(tail_len)));
        let stderr = child.stderr.take().expect("piped stderr");
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                on_stderr(&line);
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() >= tail_len {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout after the address line so that the pipe never fills.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.trim().strip_prefix("distillery listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut daemon = DaemonProcess {
            child,
            base: String::new(),
            tail,
        };
        match rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(url) => daemon.base = url,
            Err(e) => panic!(
                "{what} printed no `distillery listening on` line within {STARTUP_DEADLINE:?} \
                 ({e}; exit {:?}); log:\n{}",
                daemon.child.try_wait(),
                daemon.tail()
            ),
        }
        daemon
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The last stderr lines, for failure messages.
    pub fn tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
