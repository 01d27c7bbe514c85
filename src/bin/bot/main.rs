//! The `bot` binary: `bot` / `bot serve` runs the Discord bot, `bot
//! console` the same pipeline on the terminal, `bot route` prints the
//! router's decisions, `bot bench` measures them, `bot export-hf` writes the
//! base model as a Hugging Face directory. One file per subcommand; this one
//! only dispatches.

mod app;
mod bench;
mod console;
mod serve;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use router::cli::{run_main, ModelArgs};
use router::config::BotArgs;
use router::router::{Route, RouterConfig};

#[derive(Debug, Parser)]
#[command(
    name = "bot",
    version,
    about = "Discord bot with a built-in LLM router"
)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    bot: BotArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to Discord and route every message (the default).
    Serve,
    /// The bot's pipeline on the terminal: a message per line, `/flag image|chat`.
    Console,
    /// Route messages: one JSON object per message on stdout.
    Route {
        /// JSON lines even on a terminal (the default when piped).
        #[arg(long)]
        json: bool,
        /// Generate whole chat replies instead of stopping once the route is known.
        #[arg(long)]
        full: bool,
        /// Messages decided together in one batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Upper bound on generated tokens per message.
        #[arg(long, default_value_t = 96)]
        max_new_tokens: usize,
        /// Messages; read from stdin (one per line) when none are given.
        text: Vec<String>,
    },
    /// Measure routing latency and throughput per batch size.
    Bench(bench::BenchArgs),
    /// Write the base model (a GGUF file) as a Hugging Face directory:
    /// config.json, model.safetensors (dequantized), tokenizer.json.
    ExportHf {
        /// Directory to write (created if needed).
        dir: std::path::PathBuf,
        /// Weight dtype: bf16 (what CUDA computes in) or f32 (exact).
        #[arg(long, default_value = "bf16", value_parser = ["bf16", "f32"])]
        dtype: String,
    },
}

/// One line of `bot route` output.
#[derive(serde::Serialize)]
struct RouteLine<'a> {
    text: &'a str,
    route: Route,
    prompt: Option<&'a str>,
    output: &'a str,
    ms: f64,
}

fn main() -> ExitCode {
    // Parsed inside run_main, after .env is read: options fall back to its variables.
    run_main(|| run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    if matches!(
        command,
        Command::Route { .. } | Command::Bench(_) | Command::ExportHf { .. }
    ) && cli.model.default_base_missing()
    {
        router::cli::fetch_default_model()?;
    }
    match command {
        Command::Serve => serve::run(&cli.model, &cli.bot),
        Command::Console => console::run(&cli.model, &cli.bot),
        Command::Bench(args) => bench::run(&cli.model, args),
        Command::ExportHf { dir, dtype } => {
            let dtype = match dtype.as_str() {
                "f32" => candle_core::DType::F32,
                _ => candle_core::DType::BF16,
            };
            let base = cli.model.base_spec();
            let done = router::export::export_gguf(std::path::Path::new(&base), &dir, dtype)
                .with_context(|| format!("exporting {base}"))?;
            println!(
                "{base} -> {}: {} tensors, {} parameters",
                dir.display(),
                done.tensors,
                done.parameters
            );
            Ok(())
        }
        Command::Route {
            json,
            full,
            batch,
            max_new_tokens,
            text,
        } => {
            let config = RouterConfig {
                max_new_tokens,
                stop_at_chat: !full,
                max_batch: batch.max(1),
                ..RouterConfig::default()
            };
            let mut router = cli
                .model
                .load_router(config)
                .context("loading the router")?;
            let stdout = std::io::stdout();
            let json = json || !stdout.is_terminal();
            let mut out = stdout.lock();
            let mut emit = |texts: &[String]| -> anyhow::Result<()> {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                let started = Instant::now();
                let decisions = router.route_batch(&refs)?;
                let ms = started.elapsed().as_secs_f64() * 1e3;
                for (t, d) in texts.iter().zip(&decisions) {
                    if json {
                        let line = RouteLine {
                            text: t,
                            route: d.route,
                            prompt: d.prompt.as_deref(),
                            output: &d.output,
                            ms: (ms * 10.0).round() / 10.0,
                        };
                        writeln!(out, "{}", serde_json::to_string(&line)?)?;
                    } else {
                        match &d.prompt {
                            Some(p) => writeln!(out, "image  {t}\n       prompt: {p}")?,
                            None => {
                                writeln!(out, "chat   {t}\n       output: {}", d.output.trim())?
                            }
                        }
                    }
                }
                out.flush()?;
                Ok(())
            };
            if !text.is_empty() {
                for chunk in text.chunks(batch.max(1)) {
                    emit(chunk)?;
                }
            } else {
                // Lines are routed as they come when interactive, batched when piped.
                let stdin = std::io::stdin();
                let interactive = stdin.is_terminal();
                let mut pending = Vec::new();
                for line in stdin.lock().lines() {
                    let line = line.context("reading stdin")?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    pending.push(line);
                    if interactive || pending.len() >= batch.max(1) {
                        emit(&pending)?;
                        pending.clear();
                    }
                }
                if !pending.is_empty() {
                    emit(&pending)?;
                }
            }
            Ok(())
        }
    }
}
