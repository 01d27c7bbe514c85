//! Black-box tests of the `bot` binary: real process, real files.

use std::io::Write;
use std::process::{Command, Stdio};

fn bot() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bot"));
    c.env_remove("ROUTER_BASE_MODEL")
        .env_remove("ROUTER_ADAPTER")
        .env("ROUTER_DEVICE", "cpu")
        .env("RUST_LOG", "warn");
    c
}

#[test]
fn route_prints_one_json_object_per_argument() {
    let out = bot()
        .args([
            "--no-adapter",
            "route",
            "--json",
            "幫我畫一隻貓 🐱",
            "what is 2+2?",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], "幫我畫一隻貓 🐱");
    for l in &lines {
        assert!(l["route"] == "image" || l["route"] == "chat", "{l}");
        assert!(l["output"].is_string() && l["ms"].is_number(), "{l}");
        assert_eq!(l["prompt"].is_string(), l["route"] == "image", "{l}");
    }
}

#[test]
fn route_reads_stdin_lines_when_given_no_text() {
    let mut child = bot()
        .args(["--no-adapter", "route", "--batch", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("draw a fox\n\n請問圖片中有幾個人?\nmake it darker pls\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let texts: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        texts,
        ["draw a fox", "請問圖片中有幾個人?", "make it darker pls"]
    );
}

#[test]
fn missing_base_model_is_a_clear_error() {
    let out = bot()
        .args(["--base-model", "/nonexistent/model.gguf", "route", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("base model not found: /nonexistent/model.gguf"),
        "{err}"
    );
}

#[test]
fn adapter_for_another_base_model_is_refused() {
    let out = bot()
        .args([
            "--adapter",
            "tests/fixtures/tiny_gemma3/adapter",
            "route",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shape mismatch at `model.layers.0.self_attn."),
        "{err}"
    );
}

#[test]
fn unknown_device_is_a_clear_error() {
    let out = bot()
        .args(["--device", "tpu", "route", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn dotenv_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "ROUTER_DEVICE=tpu-from-dotenv\n").unwrap();
    let out = bot()
        .env_remove("ROUTER_DEVICE")
        .current_dir(dir.path())
        .args(["route", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tpu-from-dotenv"), "{err}");
}

#[test]
fn a_default_adapter_link_to_nothing_is_a_clear_error() {
    // `model/current` left pointing at a removed adapter: an error naming
    // the link and its target, not a silent run of the bare base model.
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("model")).unwrap();
    std::fs::create_dir_all(home.path().join("datas")).unwrap();
    std::os::unix::fs::symlink("adapters/gone", home.path().join("model/current")).unwrap();
    let base = std::fs::canonicalize("tests/fixtures/tiny_gemma3").unwrap();
    let out = bot()
        .env("ROUTER_HOME", home.path())
        .arg("--base-model")
        .arg(&base)
        .args(["route", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model/current") && err.contains("adapters/gone"),
        "{err}"
    );
    assert!(err.contains("--no-adapter"), "{err}");
    // --no-adapter runs the bare model.
    let ok = bot()
        .env("ROUTER_HOME", home.path())
        .arg("--base-model")
        .arg(&base)
        .args(["--no-adapter", "route", "hi"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
