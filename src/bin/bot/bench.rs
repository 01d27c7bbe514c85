//! `bot bench`: how fast the router decides, on the chosen device, over a
//! file of messages (issue 7's benchmark):
//!
//! - decision latency at batch 1, chat and image apart: the route is known
//!   after the first generated token, so this routes with one new token;
//! - the full image call (decision and prompt) at batch 1, over the
//!   messages whose decision was image;
//! - throughput with 1, 8, 32, 128 messages arriving together, for
//!   decisions alone and for whole routes (prompts written);
//! - decoder-level prefill tokens/s and decode ms per token: the system
//!   prefix and a typical message prefilled into a cache, then single-token
//!   greedy steps fed on the device, read back to the host once at the end;
//! - optionally fixed-length generation (`--generate N`: no early stop for
//!   chat, as transformers' `generate(max_new_tokens=N)`);
//! - optionally whether a CPU copy of the model routes the same way.
//!
//! `--dump-ids` writes the exact token ids fed to the model (system prefix
//! plus each message) with our decisions, so the reference script
//! (`scripts/gpu/hf_reference.py`) measures transformers on the same ids.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Tensor;
use clap::Args;
use router::cli::ModelArgs;
use router::model::{dense_batch, BaseModel, Cache, Decoder, GraphStep, Mode, StaticCache};
use router::prompt::CALL_PREFIX;
use router::router::{Decision, Route, Router, RouterConfig};
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
    /// Throughput: this many messages arrive together (cycled when the file
    /// has fewer).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batch_sizes: Vec<usize>,
    /// Messages decided one at a time for the decision latency [default:
    /// all]; 0 skips it (and the image call, which needs its routes).
    #[arg(long)]
    pub decision_limit: Option<usize>,
    /// At most this many image-routed messages for the full image call.
    #[arg(long, default_value_t = 100)]
    pub image_limit: usize,
    /// Single-token decode steps of the decoder-level measure; 0 skips it.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Fixed-length generation: up to N new tokens per message at batch 1,
    /// chat replies included; 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// Messages for `--generate`.
    #[arg(long, default_value_t = 20)]
    pub generate_limit: usize,
    /// Only the decoder-level measure and `--generate` (random-weight
    /// models, whose routes mean nothing).
    #[arg(long)]
    pub decoder_only: bool,
    /// Also route this many messages on a CPU copy and compare the routes.
    #[arg(long, default_value_t = 0)]
    pub compare_cpu: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the token ids fed to the model (system prefix + message, one
    /// JSON object a line after a `meta` line) here.
    #[arg(long)]
    pub dump_ids: Option<PathBuf>,
}

/// p50/p95 of a set of latencies.
#[derive(Debug, Clone, Serialize)]
struct Latency {
    n: usize,
    p50_ms: f64,
    p95_ms: f64,
    mean_ms: f64,
}

impl Latency {
    fn of(ms: &[f64]) -> Self {
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mean = if ms.is_empty() {
            f64::NAN
        } else {
            ms.iter().sum::<f64>() / ms.len() as f64
        };
        Self {
            n: ms.len(),
            p50_ms: percentile(&sorted, 0.5),
            p95_ms: percentile(&sorted, 0.95),
            mean_ms: mean,
        }
    }

    fn line(&self) -> String {
        if self.n == 0 {
            return "none".into();
        }
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, mean {:.2} ms (n {})",
            self.p50_ms, self.p95_ms, self.mean_ms, self.n
        )
    }
}

/// One throughput measurement.
#[derive(Debug, Serialize)]
struct Row {
    device: String,
    /// `decision` (one new token: the route) or `route` (prompts written).
    mode: &'static str,
    batch: usize,
    messages: usize,
    total_s: f64,
    messages_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    mean_new_tokens: f64,
    image_share: f64,
}

/// Decision latency at batch 1.
#[derive(Debug, Serialize)]
struct DecisionSection {
    all: Latency,
    chat: Latency,
    image: Latency,
}

/// Decoder-level prefill and decode at batch 1.
#[derive(Debug, Serialize)]
struct DecoderSection {
    prompt_tokens: usize,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_steps: usize,
    decode_ms_per_token: f64,
    /// The same greedy steps as the router takes them on CUDA: each one
    /// replayed from a captured graph over a static cache, its token read
    /// back to the host (CUDA only).
    replayed_decode_ms_per_token: Option<f64>,
    /// Whether those steps ran from a captured graph (a failed capture
    /// falls back to eager steps, with a warning).
    replayed_from_graph: Option<bool>,
    /// The five highest logits after the prompt, `[id, logit]`, for a
    /// cross-check against another stack fed the same ids.
    top_logits: Vec<(u32, f32)>,
}

/// Fixed-length generation at batch 1.
#[derive(Debug, Serialize)]
struct GenerateSection {
    max_new_tokens: usize,
    latency: Latency,
    mean_new_tokens: f64,
    ms_per_new_token: f64,
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

/// At least `n` messages: the list itself, or cycled up to `n`.
fn at_least(messages: &[String], n: usize) -> Vec<String> {
    if messages.len() >= n || messages.is_empty() {
        return messages.to_vec();
    }
    messages.iter().cycle().take(n).cloned().collect()
}

/// Whether a decision cut after its first token opened a call.
fn opened_call(d: &Decision) -> bool {
    d.route == Route::Image || d.output.starts_with(CALL_PREFIX)
}

/// Routes `messages` in bursts of `batch` with the router's current config.
fn measure(
    router: &mut Router,
    device: &str,
    mode: &'static str,
    messages: &[String],
    batch: usize,
) -> Result<(Row, Vec<Decision>)> {
    router.config.max_batch = batch;
    let messages = at_least(messages, batch);
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
        mode,
        batch,
        messages: messages.len(),
        total_s,
        messages_per_s: messages.len() as f64 / total_s,
        p50_ms: percentile(&latencies, 0.5),
        p90_ms: percentile(&latencies, 0.9),
        p95_ms: percentile(&latencies, 0.95),
        p99_ms: percentile(&latencies, 0.99),
        mean_new_tokens: decisions.iter().map(|d| d.new_tokens as f64).sum::<f64>() / n,
        image_share: decisions.iter().filter(|d| opened_call(d)).count() as f64 / n,
    };
    Ok((row, decisions))
}

/// Routes each message alone with `config`; returns each one's latency and
/// decision.
fn one_by_one(
    router: &mut Router,
    config: RouterConfig,
    messages: &[String],
) -> Result<Vec<(f64, Decision)>> {
    let saved = std::mem::replace(&mut router.config, config);
    let result = (|| {
        if let Some(first) = messages.first() {
            router.route_batch(&[first.as_str()])?;
        }
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            let t = Instant::now();
            let mut d = router.route_batch(&[m.as_str()])?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            out.push((ms, d.pop().context("no decision")?));
        }
        Ok(out)
    })();
    router.config = saved;
    result
}

/// One decoder-level run.
struct DecodeRun {
    prefill_ms: f64,
    decode_ms: f64,
    /// The five highest logits after the prompt.
    top: Vec<(u32, f32)>,
}

/// Prefills `ids` (one row) into a fresh cache; returns the last
/// position's logits `[1, vocab]` and the cache.
fn prefill(dec: &Decoder, ids: &[u32]) -> Result<(Tensor, Cache)> {
    let mut cache = Cache::default();
    let tokens = Tensor::new(ids, &dec.device)?.unsqueeze(0)?;
    let batch = dense_batch(1, 0, ids.len());
    let hidden = dec.forward_hidden(&tokens, &batch, Some(&mut cache), Mode::Infer)?;
    Ok((dec.logits_at(&hidden, &[ids.len() - 1])?, cache))
}

/// The decoder alone: prefills `ids` into a cache, then `steps` greedy
/// single-token steps whose next token stays on the device.
fn decode_once(base: &BaseModel, ids: &[u32], steps: usize) -> Result<DecodeRun> {
    let dec = &base.decoder;
    let n = ids.len();
    let t = Instant::now();
    let (logits, mut cache) = prefill(dec, ids)?;
    let mut next = dec.argmax(&logits)?.unsqueeze(1)?;
    // Reading a value back waits for the device.
    next.flatten_all()?.to_vec1::<u32>()?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let logits_host: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let t = Instant::now();
    for s in 0..steps {
        let batch = dense_batch(1, (n + s) as u32, 1);
        let hidden = dec.forward_hidden(&next, &batch, Some(&mut cache), Mode::Infer)?;
        next = dec.argmax(&dec.logits_at(&hidden, &[0])?)?.unsqueeze(1)?;
    }
    next.flatten_all()?.to_vec1::<u32>()?;
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut top: Vec<(u32, f32)> = logits_host
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1));
    top.truncate(5);
    Ok(DecodeRun {
        prefill_ms,
        decode_ms,
        top,
    })
}

/// Milliseconds for `steps` greedy single-token steps after `ids`, each a
/// run of `step` (a captured graph on CUDA, captured at its first run)
/// whose token is read back, as the router steps.
fn replayed_decode(
    base: &BaseModel,
    ids: &[u32],
    steps: usize,
    step: &mut GraphStep,
    fixed: &mut StaticCache,
) -> Result<f64> {
    let dec = &base.decoder;
    let n = ids.len();
    let (logits, cache) = prefill(dec, ids)?;
    let mut next = dec.pick(&logits, None)?.0;
    fixed.reset();
    fixed.load(&cache)?;
    let t = Instant::now();
    for s in 0..steps {
        let batch = dense_batch(1, (n + s) as u32, 1);
        let logits = step.run(dec, fixed, &next, &batch, &[0])?;
        fixed.advance(&batch)?;
        next = dec.pick(&logits, None)?.0;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn decoder_measure(base: &BaseModel, ids: &[u32], steps: usize) -> Result<DecoderSection> {
    // Warm-up, then the median of a few runs.
    decode_once(base, ids, steps.min(4))?;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut top = Vec::new();
    for _ in 0..3 {
        let run = decode_once(base, ids, steps)?;
        prefill.push(run.prefill_ms);
        decode.push(run.decode_ms);
        top = run.top;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill_ms = median(&mut prefill);
    let decode_ms = median(&mut decode);
    let replayed = if base.decoder.device.is_cuda() {
        let dec = &base.decoder;
        let mut fixed = dec.static_cache(1, (ids.len() + steps).next_multiple_of(64))?;
        let mut step = GraphStep::new(dec, 1, 1, fixed.capacity(), 1)?;
        replayed_decode(base, ids, steps.min(4), &mut step, &mut fixed)?;
        let mut runs = (0..3)
            .map(|_| replayed_decode(base, ids, steps, &mut step, &mut fixed))
            .collect::<Result<Vec<_>>>()?;
        Some((median(&mut runs) / steps.max(1) as f64, step.is_captured()))
    } else {
        None
    };
    Ok(DecoderSection {
        prompt_tokens: ids.len(),
        prefill_ms,
        prefill_tokens_per_s: ids.len() as f64 / (prefill_ms / 1e3),
        decode_steps: steps,
        decode_ms_per_token: decode_ms / steps.max(1) as f64,
        replayed_decode_ms_per_token: replayed.map(|r| r.0),
        replayed_from_graph: replayed.map(|r| r.1),
        top_logits: top,
    })
}

/// The ids file: a `meta` line, then one line per message.
fn dump_ids(
    path: &Path,
    router: &Router,
    messages: &[String],
    user_ids: &[Vec<u32>],
    typical: usize,
    decisions: Option<&[(f64, Decision)]>,
    decoder: Option<&DecoderSection>,
) -> Result<()> {
    let format = &router.base().format;
    let prefix = format.prefix_ids()?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let meta = serde_json::json!({
        "kind": "meta",
        "model": router.base().source,
        "adapter": router.adapter(),
        "prefix_ids": prefix,
        "call_prefix_ids": format.call_prefix_ids()?,
        "stop_ids": format.stop_ids,
        "call_threshold": router.call_threshold(),
        "typical": typical,
        "typical_top_logits": decoder.map(|d| &d.top_logits),
    });
    writeln!(out, "{meta}")?;
    for (i, (text, user)) in messages.iter().zip(user_ids).enumerate() {
        let mut ids = prefix.clone();
        ids.extend(user);
        let decided = decisions.and_then(|d| d.get(i)).map(|(_, d)| d);
        let line = serde_json::json!({
            "kind": "message",
            "index": i,
            "text": text,
            "ids": ids,
            "route": decided.map(|d| if opened_call(d) { "image" } else { "chat" }),
            "call_probability": decided.map(|d| d.call_probability),
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(model: &ModelArgs, args: BenchArgs) -> Result<()> {
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| router::cli::default_path(router::cli::DEFAULT_TEST_FILE));
    let messages = read_messages(&file, args.limit)?;
    anyhow::ensure!(!messages.is_empty(), "{} has no messages", file.display());
    let mut router = model
        .load_router(RouterConfig::default())
        .context("loading the router")?;
    // As the bot's engine does at start: no measured message pays a capture.
    let started = Instant::now();
    let shapes = router.warm_up()?;
    if shapes > 0 {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        println!("replayed step shapes prepared: {shapes} in {ms:.0} ms");
    }
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
    let user_ids = messages
        .iter()
        .map(|m| router.input_ids(m))
        .collect::<router::Result<Vec<_>>>()?;
    // The typical message: median length in tokens.
    let typical = {
        let mut by_len: Vec<(usize, usize)> = user_ids
            .iter()
            .enumerate()
            .map(|(i, ids)| (ids.len(), i))
            .collect();
        by_len.sort_unstable();
        by_len[by_len.len() / 2].1
    };

    // 1. Decision latency at batch 1.
    let mut decisions: Option<Vec<(f64, Decision)>> = None;
    let mut decision_section = None;
    let decision_limit = args.decision_limit.unwrap_or(messages.len());
    if !args.decoder_only && decision_limit > 0 {
        let n = decision_limit.min(messages.len());
        let config = RouterConfig {
            max_new_tokens: 1,
            max_batch: 1,
            ..router.config.clone()
        };
        let decided = one_by_one(&mut router, config, &messages[..n])?;
        let pick = |want: Option<bool>| -> Vec<f64> {
            decided
                .iter()
                .filter(|(_, d)| want.is_none_or(|w| opened_call(d) == w))
                .map(|(ms, _)| *ms)
                .collect()
        };
        let s = DecisionSection {
            all: Latency::of(&pick(None)),
            chat: Latency::of(&pick(Some(false))),
            image: Latency::of(&pick(Some(true))),
        };
        println!("\ndecision at batch 1 (route known after one new token):");
        println!("  chat   {}", s.chat.line());
        println!("  image  {}", s.image.line());
        decision_section = Some(s);
        decisions = Some(decided);
    }

    // 2. The full image call at batch 1, over the messages routed to image.
    let mut image_section = None;
    if let Some(decided) = &decisions {
        let images: Vec<String> = decided
            .iter()
            .zip(&messages)
            .filter(|((_, d), _)| opened_call(d))
            .map(|(_, m)| m.clone())
            .take(args.image_limit)
            .collect();
        if !images.is_empty() {
            let config = RouterConfig {
                max_batch: 1,
                ..router.config.clone()
            };
            let calls = one_by_one(&mut router, config, &images)?;
            let ms: Vec<f64> = calls.iter().map(|(ms, _)| *ms).collect();
            let s = Latency::of(&ms);
            let tokens =
                calls.iter().map(|(_, d)| d.new_tokens as f64).sum::<f64>() / calls.len() as f64;
            println!(
                "full image call at batch 1 (decision + prompt, {tokens:.1} new tokens): {}",
                s.line()
            );
            image_section = Some(serde_json::json!({"latency": s, "mean_new_tokens": tokens}));
        }
    }

    // 3. Throughput with n messages arriving together: decisions, whole routes.
    let mut rows = Vec::new();
    let mut reference: Option<Vec<Decision>> = None;
    let mut mismatched_batches = Vec::new();
    if !args.decoder_only {
        let saved = router.config.clone();
        for (mode, max_new_tokens) in [("decision", 1), ("route", saved.max_new_tokens)] {
            router.config.max_new_tokens = max_new_tokens;
            for &b in &args.batch_sizes {
                let (row, decided) = measure(&mut router, &device, mode, &messages, b.max(1))?;
                if mode == "route" {
                    match &reference {
                        None => reference = Some(decided),
                        Some(r) => {
                            let diff = r
                                .iter()
                                .zip(&decided)
                                .filter(|(a, b)| a.route != b.route)
                                .count();
                            if diff > 0 {
                                mismatched_batches.push((b, diff));
                            }
                        }
                    }
                }
                rows.push(row);
            }
        }
        router.config = saved;
        println!(
            "\n| device | mode | batch | messages | total s | msg/s | p50 ms | p95 ms | p99 ms | new tokens | image share |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
                r.device,
                r.mode,
                r.batch,
                r.messages,
                r.total_s,
                r.messages_per_s,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms,
                r.mean_new_tokens,
                r.image_share
            );
        }
        for (b, d) in &mismatched_batches {
            println!(
                "batch {b}: {d} routes differ from batch {}",
                args.batch_sizes.first().copied().unwrap_or(1)
            );
        }
    }

    // 4. Decoder-level prefill and decode.
    let mut decoder_section = None;
    if args.decode_steps > 0 {
        let mut ids = router.base().format.prefix_ids()?;
        ids.extend(&user_ids[typical]);
        let s = decoder_measure(router.base(), &ids, args.decode_steps)?;
        println!(
            "\ndecoder at batch 1: prefill {} tokens in {:.2} ms ({:.0} tokens/s); decode {:.3} ms per token ({} steps)",
            s.prompt_tokens, s.prefill_ms, s.prefill_tokens_per_s, s.decode_ms_per_token, s.decode_steps
        );
        if let (Some(ms), Some(graph)) = (s.replayed_decode_ms_per_token, s.replayed_from_graph) {
            let how = if graph {
                "a CUDA graph"
            } else {
                "eager: the capture failed"
            };
            println!("replayed steps ({how}; token read back each step): {ms:.3} ms per token");
        }
        decoder_section = Some(s);
    }

    // 5. Fixed-length generation.
    let mut generate_section = None;
    if args.generate > 0 {
        let n = args.generate_limit.min(messages.len());
        let config = RouterConfig {
            max_new_tokens: args.generate,
            stop_at_chat: false,
            max_batch: 1,
            ..router.config.clone()
        };
        let out = one_by_one(&mut router, config, &messages[..n])?;
        let ms: Vec<f64> = out.iter().map(|(ms, _)| *ms).collect();
        let tokens: f64 = out.iter().map(|(_, d)| d.new_tokens as f64).sum();
        let s = GenerateSection {
            max_new_tokens: args.generate,
            latency: Latency::of(&ms),
            mean_new_tokens: tokens / n.max(1) as f64,
            ms_per_new_token: ms.iter().sum::<f64>() / tokens.max(1.0),
        };
        println!(
            "generate up to {} tokens at batch 1 ({:.1} new tokens on average): {}",
            s.max_new_tokens,
            s.mean_new_tokens,
            s.latency.line()
        );
        generate_section = Some(s);
    }

    // 6. The same routes on a CPU copy?
    let mut agreement = None;
    if args.compare_cpu > 0 && device != "cpu" && !args.decoder_only {
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

    if let Some(path) = &args.dump_ids {
        dump_ids(
            path,
            &router,
            &messages,
            &user_ids,
            typical,
            decisions.as_deref(),
            decoder_section.as_ref(),
        )?;
    }
    if let Some(out) = args.out {
        let json = serde_json::json!({
            "model": router.base().source,
            "adapter": router.adapter(),
            "device": device,
            "cpu_threads": cores,
            "messages": messages.len(),
            "decision": decision_section,
            "image_call": image_section,
            "rows": rows,
            "decoder": decoder_section,
            "generate": generate_section,
            "cpu_agreement": agreement,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
