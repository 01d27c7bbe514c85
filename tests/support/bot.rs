//! Runs the real `bot` binary as a child process for end-to-end tests: its
//! environment built from a fake Discord and fake backends, its stderr kept
//! for the failure message, SIGTERM and SIGKILL on demand.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The repository root (tests run with it as the working directory).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real default model and the shipped adapter.
pub fn default_model_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "ROUTER_BASE_MODEL",
            repo()
                .join("model/gemma-3-270m-q4_k_m.gguf")
                .display()
                .to_string(),
        ),
        (
            "ROUTER_ADAPTER",
            repo().join("model/current").display().to_string(),
        ),
    ]
}

/// The tiny random Gemma-3 fixture and its PEFT adapter: fast, routes at random.
pub fn tiny_model_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "ROUTER_BASE_MODEL",
            repo()
                .join("tests/fixtures/tiny_gemma3")
                .display()
                .to_string(),
        ),
        (
            "ROUTER_ADAPTER",
            repo()
                .join("tests/fixtures/tiny_gemma3/adapter")
                .display()
                .to_string(),
        ),
    ]
}

/// Every variable the bot reads, so that the developer's own `.env` or
/// shell cannot leak into a test.
const BOT_VARIABLES: &[&str] = &[
    "DISCORD_TOKEN",
    "DISCORD_API_BASE",
    "ALLOWED_CHANNEL_IDS",
    "MODERATOR_ROLE_IDS",
    "RATE_LIMIT_PER_MINUTE",
    "IMAGE_BACKEND",
    "IMAGE_API_BASE",
    "IMAGE_API_KEY",
    "IMAGE_MODEL",
    "IMAGE_SIZE",
    "CHAT_API_BASE",
    "CHAT_API_KEY",
    "CHAT_MODEL",
    "ROUTER_DB",
    "FEEDBACK_FILE",
    "REPORTS_FILE",
    "SHARD_RANGE",
    "ROUTER_ADAPTER",
    "ROUTER_BASE_MODEL",
    "ROUTER_DEVICE",
    "ROUTER_CPU_WEIGHTS",
    "ROUTER_CALL_THRESHOLD",
    "ADAPTER_WATCH_SECS",
];

/// A running bot process.
pub struct BotProcess {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
    /// The threads copying stderr and stdout; each ends at its pipe's end of file.
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl BotProcess {
    /// Starts `bot <args>` in `dir` with exactly `env` (plus PATH/HOME).
    pub fn start(dir: &Path, args: &[&str], env: &BTreeMap<String, String>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bot"));
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for v in BOT_VARIABLES {
            cmd.env_remove(v);
        }
        cmd.env("RUST_LOG", "info,serenity=warn,tracing=warn")
            .env("NO_COLOR", "1")
            // The home's .env must not leak in either.
            .env("ROUTER_HOME", dir);
        cmd.envs(env);
        let mut child = cmd.spawn().expect("starting the bot binary");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let pumps = vec![
            pump(child.stderr.take().expect("stderr"), stderr.clone()),
            pump(child.stdout.take().expect("stdout"), stdout.clone()),
        ];
        Self {
            child,
            stderr,
            stdout,
            pumps,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM: the bot finishes what is in flight and exits.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit (blocking poll with a deadline), then
    /// for its last output lines: the exit can be seen before the pump
    /// threads have copied what the process wrote just before it.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while Instant::now() < deadline && self.pumps.iter().any(|p| !p.is_finished()) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "the bot did not exit in {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BotProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump(
    stream: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    })
}

/// The non-empty lines of a JSONL file, each parsed; panics on a torn line.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "{} ends with a partial line",
        path.display()
    );
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: torn line {l:?}: {e}", path.display()))
        })
        .collect()
}
