//! The one JSONL schema shared by `datas/`, the bot's feedback log and the
//! evaluator: one conversation per line,
//! `{"messages":[{"role":"user","content":...},{"role":"assistant","content":...}]}`.
//! Extra fields (feedback metadata) are ignored. A malformed line is an
//! error naming the file and the line number.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::prompt::{parse_reply, Reply};
use crate::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One line of a dataset file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// Free-form metadata (`lang`, `kind`, feedback details); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
}

/// A training/evaluation example: the last user message and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub user: String,
    pub assistant: String,
    /// File the row came from and its 1-based line number.
    pub source: PathBuf,
    pub line: usize,
    /// The line's free-form `meta` object, if any.
    pub meta: Option<serde_json::Value>,
}

impl Example {
    /// Gold label under the strict rule: is the answer a valid call?
    pub fn is_call(&self) -> bool {
        parse_reply(&self.assistant).is_call()
    }

    /// The gold image prompt, for calls.
    pub fn gold_prompt(&self) -> Option<String> {
        match parse_reply(&self.assistant) {
            Reply::Call { prompt } => Some(prompt),
            Reply::Chat(_) => None,
        }
    }

    /// A string field of `meta` (`lang`, `seed`, ...).
    pub fn meta_str(&self, field: &str) -> Option<&str> {
        self.meta.as_ref()?.get(field)?.as_str()
    }

    /// `meta.lang`, for per-language reports.
    pub fn lang(&self) -> Option<&str> {
        self.meta_str("lang")
    }

    /// The row as a JSONL conversation.
    pub fn to_conversation(&self) -> Conversation {
        Conversation {
            messages: vec![
                Message {
                    role: "user".into(),
                    content: self.user.clone(),
                },
                Message {
                    role: "assistant".into(),
                    content: self.assistant.clone(),
                },
            ],
            meta: self.meta.clone(),
        }
    }
}

fn bad_line(path: &Path, line: usize, message: impl Into<String>) -> Error {
    Error::Json {
        path: path.to_path_buf(),
        line: Some(line),
        message: message.into(),
    }
}

/// Turns one parsed line into an example: the last assistant message is the
/// answer, the user message right before it the input.
fn example(conv: Conversation, path: &Path, line: usize) -> Result<Example> {
    let last_assistant = conv
        .messages
        .iter()
        .rposition(|m| m.role == "assistant")
        .ok_or_else(|| bad_line(path, line, "no assistant message"))?;
    let meta = conv.meta.clone();
    let user = conv.messages[..last_assistant]
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .ok_or_else(|| bad_line(path, line, "no user message before the assistant message"))?;
    if user.content.trim().is_empty() {
        return Err(bad_line(path, line, "empty user message"));
    }
    Ok(Example {
        user: user.content.clone(),
        assistant: conv.messages[last_assistant].content.clone(),
        source: path.to_path_buf(),
        line,
        meta,
    })
}

/// Reads a JSONL file; blank lines are skipped, anything else must parse.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| bad_line(path, n, format!("unreadable line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let conv: Conversation =
            serde_json::from_str(&line).map_err(|e| bad_line(path, n, e.to_string()))?;
        out.push(example(conv, path, n)?);
    }
    Ok(out)
}

/// Is this row a retraction (`meta.retracted: true`, written by the bot
/// when a moderator takes a flag back)? Such a row is never trained on.
pub fn is_retraction(ex: &Example) -> bool {
    ex.meta
        .as_ref()
        .and_then(|m| m.get("retracted"))
        .and_then(serde_json::Value::as_bool)
        == Some(true)
}

/// Reads several files in order; a later row with the same user text
/// replaces the earlier one (a moderator's correction wins), keeping the
/// earlier row's place.
///
/// A retraction row undoes the latest row for its text from the same flagged
/// message (same `meta.user_message_id`; the latest row when the retraction
/// names none): the text falls back to the row before that one, and
/// disappears when there is none. The retraction itself is never a row.
pub fn read_merged(paths: &[PathBuf]) -> Result<Vec<Example>> {
    // Per text, every row still in force, oldest first: undoing the last
    // must bring back the one it replaced (curated data, an older flag).
    let mut rows: Vec<Vec<Example>> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for p in paths {
        for ex in read_jsonl(p)? {
            let slot = *index.entry(ex.user.trim().to_string()).or_insert_with(|| {
                rows.push(Vec::new());
                rows.len() - 1
            });
            let history = &mut rows[slot];
            if is_retraction(&ex) {
                let message = |e: &Example| e.meta.as_ref()?.get("user_message_id").cloned();
                let undone = match message(&ex) {
                    Some(id) => history
                        .iter()
                        .rposition(|e| message(e).as_ref() == Some(&id)),
                    None => history.len().checked_sub(1),
                };
                if let Some(i) = undone {
                    history.remove(i);
                }
            } else {
                history.push(ex);
            }
        }
    }
    Ok(rows.into_iter().filter_map(|mut h| h.pop()).collect())
}

/// Precision, recall and F1 of the "call" class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub tn: usize,
}

impl Confusion {
    pub fn add(&mut self, gold: bool, pred: bool) {
        match (gold, pred) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (true, false) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }

    pub fn total(&self) -> usize {
        self.tp + self.fp + self.fn_ + self.tn
    }

    /// `precision=0.xxxx recall=0.xxxx f1=0.xxxx`.
    pub fn metrics_line(&self) -> String {
        format!(
            "precision={:.4} recall={:.4} f1={:.4}",
            self.precision(),
            self.recall(),
            self.f1()
        )
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Situations (`meta.kind`) kept out of every training file, so that the
/// natural test file measures generalisation to situations never seen.
pub const HELD_OUT_KINDS: [&str; 3] = ["dreams", "sports", "science-space"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl");
        std::fs::write(
            &p,
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n\n{not json}\n",
        )
        .unwrap();
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains("f.jsonl:3:"), "{err}");
    }

    #[test]
    fn later_rows_override_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let row = |u: &str, a: &str| {
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{u}\"}},{{\"role\":\"assistant\",\"content\":{}}}],\"meta\":{{\"x\":1}}}}\n",
                serde_json::to_string(a).unwrap()
            )
        };
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        std::fs::write(&a, row("draw a cat", "sure") + &row("hello", "hi")).unwrap();
        std::fs::write(
            &b,
            row(
                "draw a cat",
                "call(\"generate_image\", {\"prompt\": \"a cat\"})",
            ),
        )
        .unwrap();
        let rows = read_merged(&[a, b.clone()]).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].is_call());
        assert_eq!(rows[0].source, b);
        assert_eq!(rows[0].gold_prompt().as_deref(), Some("a cat"));
    }

    #[test]
    fn retractions_remove_the_row_they_undo_and_are_never_trained_on() {
        let dir = tempfile::tempdir().unwrap();
        let row = |u: &str, a: &str, retracted: bool| {
            let conv = Conversation {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: u.into(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: a.into(),
                    },
                ],
                meta: Some(serde_json::json!({
                    "source": "discord", "user_message_id": "1", "retracted": retracted,
                })),
            };
            serde_json::to_string(&conv).unwrap() + "\n"
        };
        let call = "call(\"generate_image\", {\"prompt\": \"a cat\"})";
        let a = row("draw a cat", call, false);
        let undo = row("draw a cat", call, true);
        let other = row("hello", "hi", false);
        let merged = |text: String| {
            let p = dir.path().join("f.jsonl");
            std::fs::write(&p, text).unwrap();
            read_merged(&[p]).unwrap()
        };

        // A, then its retraction: the text is gone.
        let rows = merged(a.clone() + &other + &undo);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].user, "hello");

        // A, retraction, A again: one live row, not the retraction.
        let rows = merged(a.clone() + &undo + &a);
        assert_eq!(rows.len(), 1);
        assert!(!is_retraction(&rows[0]));
        assert!(rows[0].is_call());

        // Curated data comes back when the correction of it is retracted.
        let base = dir.path().join("base.jsonl");
        std::fs::write(&base, "{\"messages\":[{\"role\":\"user\",\"content\":\"draw a cat\"},{\"role\":\"assistant\",\"content\":\"no\"}]}\n").unwrap();
        let fb = dir.path().join("fb.jsonl");
        std::fs::write(&fb, a + &undo).unwrap();
        let rows = read_merged(&[base.clone(), fb]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].source.clone(), rows[0].assistant.as_str()),
            (base, "no")
        );
    }

    #[test]
    fn metrics() {
        let mut c = Confusion::default();
        for (g, p) in [
            (true, true),
            (true, true),
            (true, false),
            (false, true),
            (false, false),
        ] {
            c.add(g, p);
        }
        assert_eq!(c.metrics_line(), "precision=0.6667 recall=0.6667 f1=0.6667");
        assert_eq!(
            Confusion::default().metrics_line(),
            "precision=0.0000 recall=0.0000 f1=0.0000"
        );
    }
}
