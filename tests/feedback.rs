//! The append-only JSONL log under real concurrency: threads with their own
//! handles, several processes, writers killed with SIGKILL mid-stream, and
//! the repair of a torn tail. Child processes are this test binary run again
//! with `--exact child_appender` (see that function).
#![cfg(feature = "bot")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use router::feedback::JsonlLog;
use serde::{Deserialize, Serialize};

const CHILD_LOG: &str = "FEEDBACK_TEST_CHILD_LOG";
const CHILD_WRITER: &str = "FEEDBACK_TEST_CHILD_WRITER";
/// A row count, or `forever`.
const CHILD_ROWS: &str = "FEEDBACK_TEST_CHILD_ROWS";
const CHILD_PAD: &str = "FEEDBACK_TEST_CHILD_PAD";

#[derive(Debug, Serialize, Deserialize)]
struct Row {
    writer: u64,
    seq: u64,
    pad: String,
}

/// Not a test by itself: the body of the child processes. Without the
/// environment the parent sets, it does nothing.
#[test]
fn child_appender() {
    let Ok(path) = std::env::var(CHILD_LOG) else {
        return;
    };
    let var = |name| std::env::var(name).unwrap();
    let writer: u64 = var(CHILD_WRITER).parse().unwrap();
    let rows = match var(CHILD_ROWS).as_str() {
        "forever" => u64::MAX,
        n => n.parse().unwrap(),
    };
    let pad = "x".repeat(var(CHILD_PAD).parse().unwrap());
    let log = JsonlLog::open(Path::new(&path)).unwrap();
    for seq in 0..rows {
        log.append(&Row {
            writer,
            seq,
            pad: pad.clone(),
        })
        .unwrap();
    }
}

fn spawn_appender(path: &Path, writer: u64, rows: Option<u64>, pad: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_appender",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_LOG, path)
        .env(CHILD_WRITER, writer.to_string())
        .env(
            CHILD_ROWS,
            rows.map_or("forever".to_string(), |n| n.to_string()),
        )
        .env(CHILD_PAD, pad.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Every line of the log, each of which must be a whole row; per writer,
/// the sequence numbers it wrote, in file order.
fn rows_by_writer(path: &Path) -> BTreeMap<u64, Vec<u64>> {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "{} ends mid-line",
        path.display()
    );
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let row: Row = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        out.entry(row.writer).or_default().push(row.seq);
    }
    out
}

fn torn_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".torn");
    PathBuf::from(p)
}

#[test]
fn threads_with_their_own_handles_never_interleave_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/threads.jsonl");
    let handles: Vec<_> = (0..8u64)
        .map(|writer| {
            let path = path.clone();
            std::thread::spawn(move || {
                let log = JsonlLog::open(&path).unwrap();
                // Rows longer than a page, so a non-atomic writer would show.
                let pad = "é".repeat(3000 + writer as usize);
                for seq in 0..200 {
                    log.append(&Row {
                        writer,
                        seq,
                        pad: pad.clone(),
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let rows = rows_by_writer(&path);
    assert_eq!(rows.len(), 8);
    for seqs in rows.values() {
        assert_eq!(*seqs, (0..200).collect::<Vec<_>>());
    }
}

#[test]
fn processes_appending_at_once_write_whole_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("procs.jsonl");
    let children: Vec<_> = (0..4)
        .map(|w| spawn_appender(&path, w, Some(150), 5000))
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let rows = rows_by_writer(&path);
    assert_eq!(rows.len(), 4);
    for seqs in rows.values() {
        assert_eq!(*seqs, (0..150).collect::<Vec<_>>());
    }
}

#[test]
fn writers_killed_mid_stream_leave_only_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.jsonl");
    // Big rows make it likely that SIGKILL lands inside a write (the kernel
    // abandons a large write at a page boundary on a fatal signal); whether
    // it does or not, the log must hold only whole rows afterwards.
    for writer in 0..3 {
        let start = std::fs::metadata(&path).map_or(0, |m| m.len());
        let mut child = spawn_appender(&path, writer, None, 512 * 1024);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&path).map_or(0, |m| m.len()) < start + 4 * 512 * 1024 {
            assert!(Instant::now() < deadline, "the child wrote nothing");
            assert!(child.try_wait().unwrap().is_none(), "the child exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let log = JsonlLog::open(&path).unwrap();
    let rows = rows_by_writer(&path);
    assert_eq!(rows.len(), 3);
    for seqs in rows.values() {
        assert!(seqs.len() >= 3, "{seqs:?}");
        assert_eq!(*seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    }
    if let Ok(torn) = std::fs::read(torn_path(&path)) {
        eprintln!(
            "{} torn fragment(s) moved aside",
            torn.iter().filter(|&&b| b == b'\n').count()
        );
    }
    // And the log takes new rows after the crashes.
    log.append(&Row {
        writer: 9,
        seq: 0,
        pad: String::new(),
    })
    .unwrap();
    assert_eq!(rows_by_writer(&path)[&9], vec![0]);
}

#[test]
fn a_torn_tail_is_moved_aside_on_open_and_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("torn.jsonl");
    let whole = "{\"writer\":1,\"seq\":0,\"pad\":\"\"}\n{\"writer\":1,\"seq\":1,\"pad\":\"\"}\n";
    std::fs::write(&path, format!("{whole}{{\"writer\":1,\"seq\":2,\"pa")).unwrap();

    let log = JsonlLog::open(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), whole);
    assert_eq!(
        std::fs::read_to_string(torn_path(&path)).unwrap(),
        "{\"writer\":1,\"seq\":2,\"pa\n"
    );

    // A tail torn after opening (another writer crashed) is repaired before
    // the next append, which would otherwise glue onto it.
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"writer\":2,");
    std::fs::write(&path, text).unwrap();
    log.append(&Row {
        writer: 1,
        seq: 2,
        pad: String::new(),
    })
    .unwrap();
    assert_eq!(rows_by_writer(&path)[&1], vec![0, 1, 2]);
    assert_eq!(
        std::fs::read_to_string(torn_path(&path)).unwrap(),
        "{\"writer\":1,\"seq\":2,\"pa\n{\"writer\":2,\n"
    );

    // A file that is one partial line only.
    let lone = dir.path().join("lone.jsonl");
    std::fs::write(&lone, "{\"wri").unwrap();
    JsonlLog::open(&lone).unwrap();
    assert_eq!(std::fs::read(&lone).unwrap(), b"");
    assert_eq!(std::fs::read(torn_path(&lone)).unwrap(), b"{\"wri\n");
}
