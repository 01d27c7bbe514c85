//! `bot bench`: routing latency and throughput on the chosen device, per
//! batch size, over a file of messages; optionally checks that a CPU copy of
//! the model routes the same way.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use router::cli::ModelArgs;
use router::router::{Decision, Router, RouterConfig};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages: a JSONL conversation file or plain text, one per line
    /// [default: datas/image_call_test.jsonl under the home].
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Use at most this many messages.
    #[arg(long, default_value_t = 300)]
    pub limit: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Also route this many messages on a CPU copy and compare the routes.
    #[arg(long, default_value_t = 0)]
    pub compare_cpu: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    device: String,
    batch: usize,
    messages: usize,
    total_s: f64,
    messages_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    mean_new_tokens: f64,
    image_share: f64,
}

fn read_messages(path: &Path, limit: usize) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = text.trim_start().starts_with('{');
    let mut out = Vec::new();
    if jsonl {
        for ex in router::dataset::read_jsonl(path)? {
            out.push(ex.user);
        }
    } else {
        out.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from),
        );
    }
    out.truncate(limit);
    Ok(out)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn measure(
    router: &mut Router,
    device: &str,
    messages: &[String],
    batch: usize,
) -> Result<(Row, Vec<Decision>)> {
    router.config.max_batch = batch;
    // Warm-up: kernels, caches, the system-prompt prefix.
    let warm: Vec<&str> = messages.iter().take(batch).map(String::as_str).collect();
    router.route_batch(&warm)?;
    let mut latencies = Vec::with_capacity(messages.len());
    let mut decisions = Vec::with_capacity(messages.len());
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let t = Instant::now();
        let d = router.route_batch(&refs)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        latencies.extend(std::iter::repeat_n(ms, chunk.len()));
        decisions.extend(d);
    }
    let total_s = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let n = messages.len().max(1) as f64;
    let row = Row {
        device: device.to_string(),
        batch,
        messages: messages.len(),
        total_s,
        messages_per_s: messages.len() as f64 / total_s,
        p50_ms: percentile(&latencies, 0.5),
        p90_ms: percentile(&latencies, 0.9),
        p99_ms: percentile(&latencies, 0.99),
        mean_new_tokens: decisions.iter().map(|d| d.new_tokens as f64).sum::<f64>() / n,
        image_share: decisions.iter().filter(|d| d.prompt.is_some()).count() as f64 / n,
    };
    Ok((row, decisions))
}

pub fn run(model: &ModelArgs, args: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        !args.batch_sizes.is_empty(),
        "--batch-sizes needs at least one size"
    );
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| router::cli::default_path(router::cli::DEFAULT_TEST_FILE));
    let messages = read_messages(&file, args.limit)?;
    let mut router = model
        .load_router(RouterConfig::default())
        .context("loading the router")?;
    let device = router::device::describe(&router.base().decoder.device);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "model {} | adapter {} | device {device} | {cores} CPU threads | {} messages",
        router.base().source,
        router
            .adapter()
            .map_or("none".into(), |p| p.display().to_string()),
        messages.len()
    );
    let mut rows = Vec::new();
    let mut reference: Option<Vec<Decision>> = None;
    let mut mismatched_batches = Vec::new();
    for &b in &args.batch_sizes {
        let (row, decisions) = measure(&mut router, &device, &messages, b.max(1))?;
        match &reference {
            None => reference = Some(decisions),
            Some(r) => {
                let diff = r
                    .iter()
                    .zip(&decisions)
                    .filter(|(a, b)| a.route != b.route)
                    .count();
                if diff > 0 {
                    mismatched_batches.push((b, diff));
                }
            }
        }
        rows.push(row);
    }
    println!(
        "\n| device | batch | messages | total s | msg/s | p50 ms | p90 ms | p99 ms | new tokens | image share |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
            r.device,
            r.batch,
            r.messages,
            r.total_s,
            r.messages_per_s,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.mean_new_tokens,
            r.image_share
        );
    }
    for (b, d) in &mismatched_batches {
        println!(
            "batch {b}: {d} routes differ from batch {}",
            args.batch_sizes[0]
        );
    }
    let mut agreement = None;
    if args.compare_cpu > 0 && device != "cpu" {
        let cpu_args = ModelArgs {
            device: Some("cpu".into()),
            ..model.clone()
        };
        let mut cpu = cpu_args.load_router(RouterConfig::default())?;
        let n = args.compare_cpu.min(messages.len());
        let refs: Vec<&str> = messages[..n].iter().map(String::as_str).collect();
        let on_cpu = cpu.route_batch(&refs)?;
        let on_dev = &reference.as_deref().unwrap_or_default()[..n];
        let same_route = on_cpu
            .iter()
            .zip(on_dev)
            .filter(|(a, b)| a.route == b.route)
            .count();
        let same_prompt = on_cpu
            .iter()
            .zip(on_dev)
            .filter(|(a, b)| a.prompt == b.prompt)
            .count();
        println!("\n{device} vs cpu on {n} messages: same route {same_route}/{n}, same prompt {same_prompt}/{n}");
        agreement = Some(
            serde_json::json!({"messages": n, "same_route": same_route, "same_prompt": same_prompt}),
        );
    }
    if let Some(out) = args.out {
        let json =
            serde_json::json!({"rows": rows, "cpu_agreement": agreement, "cpu_threads": cores});
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
