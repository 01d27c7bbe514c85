//! `train expand`: grows seed rows into paraphrases through any
//! OpenAI-compatible chat-completions endpoint, as the original project did
//! with GPT. Each seed asks for a batch of new user messages with the same
//! intent (and, for calls, the matching image prompt). Output is balanced
//! between calls and chat, deduplicated against the seeds and everything
//! written so far, validated with the strict call parser, appended line by
//! line, and resumable: rerunning continues where the file stopped.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use router::dataset::{read_jsonl, Example};
use router::prompt::{parse_reply, render_call, Reply};
use serde::Deserialize;
use serde_json::json;

use crate::progress_bar;

#[derive(Debug, Clone, Args)]
pub struct ExpandArgs {
    /// Seed rows to expand.
    #[arg(long, default_value = "datas/seed.jsonl")]
    pub seed_file: PathBuf,
    /// Output JSONL (appended to; rerun to resume).
    #[arg(long, default_value = "datas/expanded.jsonl")]
    pub out: PathBuf,
    /// Rows wanted in total, split evenly between calls and chat.
    #[arg(long, default_value_t = 3000)]
    pub target: usize,
    /// Paraphrases asked for per request.
    #[arg(long, default_value_t = 10)]
    pub per_request: usize,
    /// Base URL of the OpenAI-compatible API (ends before /chat/completions).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub endpoint: String,
    /// Model name sent to the endpoint.
    #[arg(long, env = "EXPAND_MODEL", default_value = "gpt-4o-mini")]
    pub model: String,
    /// API key (sent as a bearer token; never logged).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    /// Give up on a seed after this many failed requests in a row.
    #[arg(long, default_value_t = 3)]
    pub max_failures: usize,
}

/// One generated item, as the prompt asks the model to write it.
#[derive(Debug, Deserialize)]
struct Item {
    user: String,
    /// Image prompt (calls) or the reply (chat).
    answer: String,
}

#[derive(Debug, Deserialize)]
struct Items {
    items: Vec<Item>,
}

const INSTRUCTIONS: &str = "You write training data for a Discord bot that decides whether a chat \
message asks it to create or edit an image. Given one example message, write new, varied messages \
with the SAME intent and label, as real Discord members would: Traditional or Simplified Chinese, \
English, mixed, slang, emoji, typos, short and long. Change subjects, styles and wording; never \
copy the example. Answer with JSON only: {\"items\": [{\"user\": \"...\", \"answer\": \"...\"}]}.";

fn request_text(seed: &Example, n: usize) -> String {
    match seed.gold_prompt() {
        Some(prompt) => format!(
            "Example message: {:?}\nIt IS an image request; its image prompt is {:?}.\nWrite {n} new \
             image requests. For each, \"answer\" is a concise image prompt in the message's language \
             that keeps the subject and style asked for.",
            seed.user, prompt
        ),
        None => format!(
            "Example message: {:?}\nIt is NOT an image request (a question, advice, another kind of \
             task, or a request without any content to draw); the bot replied {:?}.\nWrite {n} new \
             messages of this kind. For each, \"answer\" is a short, helpful natural-language reply in \
             the message's language (for a request without content, ask what to draw).",
            seed.user, seed.assistant
        ),
    }
}

/// Normalised key for de-duplication.
fn key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Calls the endpoint once and returns the parsed items.
fn ask(
    client: &reqwest::blocking::Client,
    args: &ExpandArgs,
    seed: &Example,
    n: usize,
) -> Result<Vec<Item>> {
    let url = format!("{}/chat/completions", args.endpoint.trim_end_matches('/'));
    let body = json!({
        "model": args.model,
        "temperature": args.temperature,
        "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": request_text(seed, n)},
        ],
    });
    let mut req = client.post(&url).json(&body);
    if let Some(key) = &args.api_key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().context("reading the response")?;
    if !status.is_success() {
        let snippet: String = text.chars().take(300).collect();
        bail!("{url} answered {status}: {snippet}");
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("response is not JSON")?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .context("response has no choices[0].message.content")?;
    // Models sometimes wrap JSON in a code fence.
    let trimmed = content
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    let items: Items =
        serde_json::from_str(trimmed).context("the model's answer is not the requested JSON")?;
    Ok(items.items)
}

pub fn run(args: ExpandArgs) -> Result<()> {
    let seeds = read_jsonl(&args.seed_file).context("reading seeds")?;
    if seeds.is_empty() {
        bail!("{} has no rows", args.seed_file.display());
    }
    // Resume: what is already written counts towards every quota.
    let existing = if args.out.exists() {
        read_jsonl(&args.out)?
    } else {
        Vec::new()
    };
    let mut seen: HashSet<String> = seeds
        .iter()
        .chain(&existing)
        .map(|e| key(&e.user))
        .collect();
    let mut per_seed: HashMap<usize, usize> = HashMap::new();
    let mut done_by_label = [0usize; 2];
    for e in &existing {
        done_by_label[usize::from(e.is_call())] += 1;
        if let Some(i) = seeds.iter().position(|s| key(&s.user) == e.seed_key()) {
            *per_seed.entry(i).or_default() += 1;
        }
    }
    let calls: Vec<usize> = (0..seeds.len()).filter(|&i| seeds[i].is_call()).collect();
    let chats: Vec<usize> = (0..seeds.len()).filter(|&i| !seeds[i].is_call()).collect();
    let half = args.target / 2;
    let quota = |group: &[usize]| {
        if group.is_empty() {
            0
        } else {
            half.div_ceil(group.len())
        }
    };
    let (call_quota, chat_quota) = (quota(&calls), quota(&chats));

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    let bar = progress_bar("expand", args.target);
    bar.set_position(existing.len().min(args.target) as u64);
    let mut skipped = 0usize;
    for (label, group, q) in [(1usize, &calls, call_quota), (0, &chats, chat_quota)] {
        for &i in group {
            let seed = &seeds[i];
            let mut failures = 0;
            while per_seed.get(&i).copied().unwrap_or(0) < q && done_by_label[label] < half {
                let want = (q - per_seed.get(&i).copied().unwrap_or(0)).min(args.per_request);
                let items = match ask(&client, &args, seed, want) {
                    Ok(items) => items,
                    Err(e) => {
                        let unreachable = e
                            .chain()
                            .filter_map(|c| c.downcast_ref::<reqwest::Error>())
                            .any(|r| r.is_connect() || r.is_timeout());
                        if unreachable {
                            return Err(e);
                        }
                        failures += 1;
                        bar.suspend(|| eprintln!("seed {}: {e:#}", seed.line));
                        if failures >= args.max_failures {
                            bar.suspend(|| {
                                eprintln!("seed {}: giving up after {failures} failures", seed.line)
                            });
                            break;
                        }
                        continue;
                    }
                };
                let mut added = 0;
                for item in items {
                    if done_by_label[label] >= half {
                        break;
                    }
                    let user = item.user.trim().to_string();
                    let answer = if label == 1 {
                        render_call(item.answer.trim())
                    } else {
                        item.answer.trim().to_string()
                    };
                    let valid = !user.is_empty()
                        && !item.answer.trim().is_empty()
                        && matches!(parse_reply(&answer), Reply::Call { .. }) == (label == 1);
                    if !valid || !seen.insert(key(&user)) {
                        skipped += 1;
                        continue;
                    }
                    let row = Example {
                        user,
                        assistant: answer,
                        source: args.out.clone(),
                        line: 0,
                        meta: Some(
                            json!({"seed": seed.user, "source": "expand", "model": args.model}),
                        ),
                    };
                    writeln!(out, "{}", serde_json::to_string(&row.to_conversation())?)?;
                    *per_seed.entry(i).or_default() += 1;
                    done_by_label[label] += 1;
                    added += 1;
                    bar.inc(1);
                }
                out.flush()?;
                if added == 0 {
                    failures += 1;
                    if failures >= args.max_failures {
                        break;
                    }
                } else {
                    failures = 0;
                }
                bar.set_message(format!(
                    "calls {} chat {} skipped {skipped}",
                    done_by_label[1], done_by_label[0]
                ));
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "{}: {} calls, {} chat ({} duplicates or invalid items skipped)",
        args.out.display(),
        done_by_label[1],
        done_by_label[0],
        skipped
    );
    Ok(())
}

/// The seed a generated row came from (`meta.seed`), for resuming.
trait SeedKey {
    fn seed_key(&self) -> String;
}

impl SeedKey for Example {
    fn seed_key(&self) -> String {
        key(self.meta_str("seed").unwrap_or(""))
    }
}
