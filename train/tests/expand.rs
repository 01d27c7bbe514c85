//! `train expand` against a local HTTP server speaking the OpenAI
//! chat-completions protocol: balanced, de-duplicated, validated, resumable
//! output; clear errors when the endpoint is unreachable.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Answers chat-completion requests with generated items: each request gets
/// fresh messages, plus one duplicate and one invalid item to be filtered.
struct FakeOpenAi {
    port: u16,
    requests: Arc<AtomicUsize>,
}

fn handle(stream: TcpStream, requests: Arc<AtomicUsize>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if lower.starts_with("authorization:") {
                auth = h["authorization:".len()..].trim().to_string();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            request_line.starts_with("POST /v1/chat/completions "),
            "{request_line}"
        );
        assert_eq!(auth, "Bearer sk-test");
        let prompt = req["messages"][1]["content"].as_str().unwrap().to_string();
        let is_call = prompt.contains("It IS an image request");
        let mut items: Vec<serde_json::Value> = (0..3)
            .map(|i| {
                if is_call {
                    serde_json::json!({"user": format!("please draw thing {n}-{i} 🎨"), "answer": format!("thing {n}-{i}")})
                } else {
                    serde_json::json!({"user": format!("what is thing {n}-{i}?"), "answer": "It is a thing."})
                }
            })
            .collect();
        items.push(serde_json::json!({"user": "please draw thing 0-0 🎨", "answer": "dup"}));
        items.push(serde_json::json!({"user": "", "answer": "empty user"}));
        let content = serde_json::json!({ "items": items }).to_string();
        let resp = serde_json::json!({
            "id": format!("chatcmpl-{n}"), "object": "chat.completion", "model": req["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        })
        .to_string();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{resp}",
            resp.len()
        )
        .unwrap();
        out.flush().unwrap();
    }
}

impl FakeOpenAi {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let r = r.clone();
                std::thread::spawn(move || handle(stream, r));
            }
        });
        Self { port, requests }
    }
}

fn expand(endpoint: &str, seeds: &std::path::Path, out: &std::path::Path, target: usize) -> Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .env("RUST_LOG", "warn")
        .env("OPENAI_API_KEY", "sk-test")
        .args([
            "expand",
            "--endpoint",
            endpoint,
            "--per-request",
            "3",
            "--target",
            &target.to_string(),
        ])
        .arg("--seed-file")
        .arg(seeds)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn expands_balanced_deduplicated_and_resumable() {
    let server = FakeOpenAi::start();
    let endpoint = format!("http://127.0.0.1:{}/v1", server.port);
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seed.jsonl");
    std::fs::copy("../datas/seed.jsonl", &seeds).unwrap();
    let out = dir.path().join("expanded.jsonl");

    let first = expand(&endpoint, &seeds, &out, 40);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        !stdout.contains("sk-test") && !String::from_utf8_lossy(&first.stderr).contains("sk-test")
    );
    let rows = router::dataset::read_jsonl(&out).unwrap();
    let calls = rows.iter().filter(|r| r.is_call()).count();
    assert_eq!((calls, rows.len() - calls), (20, 20), "{stdout}");
    let mut users: Vec<&str> = rows.iter().map(|r| r.user.as_str()).collect();
    users.sort();
    users.dedup();
    assert_eq!(users.len(), rows.len(), "duplicates written");
    assert!(rows
        .iter()
        .filter(|r| r.is_call())
        .all(|r| r.gold_prompt().unwrap().starts_with("thing ")));

    // Resume: a larger target continues the same file without redoing work.
    let before = server.requests.load(Ordering::SeqCst);
    let second = expand(&endpoint, &seeds, &out, 60);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let rows = router::dataset::read_jsonl(&out).unwrap();
    let calls = rows.iter().filter(|r| r.is_call()).count();
    assert_eq!((calls, rows.len() - calls), (30, 30));
    let made = server.requests.load(Ordering::SeqCst) - before;
    assert!(
        made <= 10,
        "{made} requests to add 20 rows at 3 per request"
    );
}

#[test]
fn unreachable_endpoint_is_reported() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let seeds = dir.path().join("seed.jsonl");
    std::fs::copy("../datas/seed.jsonl", &seeds).unwrap();
    let out = expand(
        &format!("http://127.0.0.1:{port}/v1"),
        &seeds,
        &dir.path().join("x.jsonl"),
        4,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach http://127.0.0.1"), "{err}");
}
