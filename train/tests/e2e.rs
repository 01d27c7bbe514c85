//! End to end on CPU with the tiny random Gemma-3 fixture: feedback flips a
//! label, `train` runs a few steps and promotes its adapter, the adapter
//! loads in the router, `train eval` prints its metrics line; malformed data
//! stops the run before training; an interrupted run resumes to the same
//! weights as an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = "../tests/fixtures/tiny_gemma3";

fn row(user: &str, answer: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
        .to_string()
}

fn call(prompt: &str) -> String {
    router::prompt::render_call(prompt)
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let train = [
            row("draw a cat", "what should i draw?"),
            row("draw a dog", &call("a dog")),
            row("draw a red car", &call("a red car")),
            row("paint a tree", &call("a tree")),
            row("hello", "hi there"),
            row("what is this", "a photo"),
            row("good night", "good night!"),
            row("who made this", "i do not know"),
        ]
        .join("\n");
        std::fs::write(dir.path().join("train.jsonl"), train + "\n").unwrap();
        let feedback = serde_json::json!({
            "messages": [{"role": "user", "content": "draw a cat"}, {"role": "assistant", "content": call("a cat")}],
            "meta": {"flagged_by": "moderator", "original_route": "chat"}
        });
        std::fs::write(dir.path().join("feedback.jsonl"), format!("{feedback}\n")).unwrap();
        let test = [
            row("draw a bird", &call("a bird")),
            row("hi", "hello"),
            row("sketch a cat", &call("a cat")),
        ]
        .join("\n");
        std::fs::write(dir.path().join("test.jsonl"), test).unwrap();
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `train` on the CPU with this setup's files and the bot's default
    /// CPU weights, without a recipe.
    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_train"));
        c.env("ROUTER_DEVICE", "cpu")
            .env("RUST_LOG", "warn")
            .env_remove("ROUTER_ADAPTER")
            .env_remove("ROUTER_CPU_WEIGHTS");
        c.args(["--base-model", TINY]);
        c.arg("--train-file").arg(self.path("train.jsonl"));
        c.arg("--feedback").arg(self.path("feedback.jsonl"));
        c.arg("--test-file").arg(self.path("test.jsonl"));
        c.arg("--out-dir").arg(self.path("adapters"));
        c.arg("--current").arg(self.path("current"));
        c
    }

    fn train(&self, extra: &[&str]) -> Output {
        let mut c = self.command();
        c.args([
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--batch-size",
            "2",
            "--grad-accum",
            "2",
            "--eval-batch",
            "4",
        ]);
        c.args(["--lr", "1e-2", "--epochs", "2", "--eval-every", "1"]);
        c.args(extra);
        c.output().unwrap()
    }
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn metrics_line_ok(line: &str) -> bool {
    let parts: Vec<&str> = line.split(' ').collect();
    parts.len() == 3
        && ["precision=", "recall=", "f1="]
            .iter()
            .zip(&parts)
            .all(|(k, p)| {
                p.strip_prefix(k)
                    .is_some_and(|v| v.len() == 6 && v.parse::<f64>().is_ok())
            })
}

#[test]
fn feedback_training_promotion_and_eval() {
    let s = Setup::new();
    let stdout = ok(&s.train(&["--name", "v1"]));
    // The moderator's correction replaced the base row: counts by source.
    let fb_line = stdout
        .lines()
        .find(|l| l.contains("feedback.jsonl"))
        .unwrap();
    let counts: Vec<&str> = fb_line.split_whitespace().collect();
    assert_eq!(&counts[1..], ["1", "0"], "{stdout}");
    let total = stdout.lines().find(|l| l.starts_with("total")).unwrap();
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>()[1..],
        ["4", "4"],
        "{stdout}"
    );
    // A versioned adapter, promoted because there was none.
    let v1 = s.path("adapters/v1");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_log.jsonl",
        "metrics.json",
    ] {
        assert!(v1.join(f).exists(), "{f} missing");
    }
    assert!(!s.path("adapters/v1.partial").exists());
    assert_eq!(
        std::fs::canonicalize(s.path("current")).unwrap(),
        std::fs::canonicalize(&v1).unwrap()
    );
    assert!(stdout.contains("promoted"), "{stdout}");
    let log = std::fs::read_to_string(v1.join("training_log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(
        first["loss"].as_f64().unwrap() > 0.0 && first["val_loss"].is_number(),
        "{first}"
    );

    // The adapter loads in the router.
    let base = router::model::load(TINY, &candle_core::Device::Cpu).unwrap();
    let mut r = router::router::Router::new(base, Default::default()).unwrap();
    r.set_adapter(Some(&router::lora::Adapter::load(&v1).unwrap()))
        .unwrap();
    r.route("draw a cat").unwrap();

    // train eval prints the metrics line last, and writes predictions.
    let preds = s.path("preds.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .env("ROUTER_DEVICE", "cpu")
        .env("RUST_LOG", "warn")
        .args(["--base-model", TINY, "--adapter"])
        .arg(&v1)
        .args(["eval", "--test-file"])
        .arg(s.path("test.jsonl"))
        .arg("--predictions")
        .arg(&preds)
        .output()
        .unwrap();
    let stdout = ok(&out);
    let last = stdout.lines().last().unwrap();
    assert!(metrics_line_ok(last), "{last}");
    assert!(
        stdout.contains("TP")
            && stdout.contains("FN")
            && stdout.contains("FP")
            && stdout.contains("TN")
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for k in ["text", "gold", "pred", "output", "prompt"] {
        assert!(lines[0].get(k).is_some(), "{k} missing in {}", lines[0]);
    }

    // A second run that is worse is not promoted (a single tiny step vs two epochs
    // is not guaranteed worse, so compare against a forced check instead).
    let stdout = ok(&s.train(&["--name", "v2", "--max-steps", "1"]));
    let promoted = stdout.contains("promoted");
    let kept = stdout.contains("kept the current adapter");
    assert!(promoted ^ kept, "{stdout}");
    let target = std::fs::canonicalize(s.path("current")).unwrap();
    let expect = if promoted {
        s.path("adapters/v2")
    } else {
        v1.clone()
    };
    assert_eq!(target, std::fs::canonicalize(expect).unwrap());
}

/// Regression: with the default Q8_0 copies on the CPU (`--cpu-weights
/// q8`), a step of a few answer tokens went through the output head's copy,
/// which has no backward pass, and the run stopped at "no gradient for LoRA
/// variable 0".
#[test]
fn cpu_training_with_the_default_cpu_weights_learns_from_short_answers() {
    let s = Setup::new();
    // One row per micro-batch, chat answers cut to two answer tokens: two
    // steps of four micro-batches cover all seven training rows.
    let out = s
        .command()
        .args(["--name", "short", "--no-promote", "--lora-r", "4"])
        .args(["--batch-size", "1", "--grad-accum", "4", "--max-steps", "2"])
        .args(["--chat-answer-tokens", "2", "--eval-batch", "4"])
        .output()
        .unwrap();
    ok(&out);
    let log = std::fs::read_to_string(s.path("adapters/short/training_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    for line in &lines {
        let grad_norm = line["grad_norm"].as_f64().unwrap();
        assert!(grad_norm.is_finite() && grad_norm > 0.0, "{line}");
    }
}

#[test]
fn malformed_line_stops_the_run_before_training() {
    let s = Setup::new();
    let text = std::fs::read_to_string(s.path("train.jsonl")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(2, "{\"messages\": [oops");
    std::fs::write(s.path("train.jsonl"), lines.join("\n")).unwrap();
    let out = s.train(&["--name", "bad"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.jsonl:3"), "{err}");
    assert!(!s.path("adapters").exists());
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
    .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn interrupted_run_resumes_to_the_same_weights() {
    let s = Setup::new();
    ok(&s.train(&["--name", "full", "--no-promote", "--lora-dropout", "0.1"]));
    // Same run, stopped after 2 of 4 steps with a checkpoint at step 2.
    let out = s.train(&[
        "--name",
        "cut",
        "--no-promote",
        "--lora-dropout",
        "0.1",
        "--save-every",
        "2",
        "--stop-after",
        "2",
    ]);
    assert!(
        !out.status.success(),
        "the interrupted run must not look finished"
    );
    let ckpt = s.path("adapters/cut.partial/checkpoint-2");
    assert!(ckpt.join("optimizer.safetensors").exists());
    assert!(
        !s.path("adapters/cut").exists(),
        "no adapter where the bot reads before the run ends"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .env("ROUTER_DEVICE", "cpu")
        .env("RUST_LOG", "warn")
        .args(["--base-model", TINY, "--resume"])
        .arg(&ckpt)
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(
        weights(&s.path("adapters/full")),
        weights(&s.path("adapters/cut"))
    );
}

#[test]
fn training_can_start_from_an_existing_adapter() {
    let s = Setup::new();
    ok(&s.train(&["--name", "first", "--no-promote", "--max-steps", "1"]));
    let first = s.path("adapters/first");
    let stdout = ok(&s.train(&[
        "--name",
        "second",
        "--no-promote",
        "--max-steps",
        "1",
        "--init-adapter",
        first.to_str().unwrap(),
    ]));
    assert!(stdout.contains("LoRA r=4"), "{stdout}");
    // It continued from the first adapter's weights, so it differs from a fresh run's.
    ok(&s.train(&["--name", "fresh", "--no-promote", "--max-steps", "1"]));
    assert_ne!(
        weights(&s.path("adapters/second")),
        weights(&s.path("adapters/fresh"))
    );
    assert_eq!(
        weights(&s.path("adapters/first")),
        weights(&s.path("adapters/fresh"))
    );
}
