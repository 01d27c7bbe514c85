//! The `train` binary: retrains the router's LoRA adapter on the base data
//! plus moderator feedback (`train [OPTIONS]`), evaluates an adapter on a
//! test file (`train eval`), and expands seed rows into paraphrases through
//! an OpenAI-compatible endpoint (`train expand`).

mod eval;
mod expand;
mod fit;
mod optim;
mod step;
/// The workspace's one home of test helpers (tiny configs, random weights).
#[cfg(test)]
#[path = "../../tests/common/mod.rs"]
mod test_common;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use router::cli::{run_main, ModelArgs};
use router::router::{Route, RouterConfig};

#[derive(Debug, Parser)]
#[command(
    name = "train",
    version,
    about = "Retrain and evaluate the router's LoRA adapter"
)]
struct Cli {
    #[command(flatten)]
    model: ModelArgs,

    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    fit: fit::FitArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Route every row of the test files and report precision, recall and F1.
    Eval {
        /// Test files (repeatable) [default: datas/image_call_test.jsonl and
        /// datas/image_call_natural_test.jsonl under the home]. The last line
        /// is the metrics line over all of them.
        #[arg(long = "test-file")]
        test_files: Vec<PathBuf>,
        /// Write one JSON line per row: text, gold, pred, output, prompt.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Messages per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Expand seed rows into paraphrases through an OpenAI-compatible endpoint.
    Expand(expand::ExpandArgs),
}

/// The progress bar of every long task (`train`, `eval`, `expand`): one
/// style, so their lines look alike.
fn progress_bar(label: &str, len: usize) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}] {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

fn main() -> ExitCode {
    // Parsed inside run_main, after .env is read: options fall back to its variables.
    run_main(|| run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Some(Command::Expand(_))) && cli.model.default_base_missing() {
        router::cli::fetch_default_model()?;
    }
    match cli.command {
        None => {
            fit::run(&cli.model, cli.fit)?;
            Ok(())
        }
        Some(Command::Expand(args)) => expand::run(args),
        Some(Command::Eval {
            test_files,
            predictions,
            batch,
        }) => {
            let test_files = if test_files.is_empty() {
                eval::default_test_files()
            } else {
                test_files
            };
            let mut sets = Vec::new();
            for f in &test_files {
                let rows = router::dataset::read_jsonl(f)
                    .with_context(|| format!("reading the test file {}", f.display()))?;
                sets.push((f.clone(), rows));
            }
            let mut router = cli
                .model
                .load_router(RouterConfig {
                    max_batch: batch.max(1),
                    ..RouterConfig::default()
                })
                .context("loading the router")?;
            match router.adapter() {
                Some(a) => println!("adapter: {}", a.display()),
                None => println!("adapter: none (bare base model)"),
            }
            let mut out = std::io::stdout();
            let mut all = Vec::new();
            let mut overall = router::dataset::Confusion::default();
            for (file, rows) in &sets {
                let report = eval::evaluate(&mut router, rows, batch)?;
                if sets.len() > 1 {
                    println!("== {}", file.display());
                }
                eval::print_report(&report, &mut out)?;
                for p in &report.predictions {
                    overall.add(p.gold == Route::Image, p.pred == Route::Image);
                }
                all.extend(report.predictions);
            }
            if let Some(p) = predictions {
                eval::write_predictions(&all, &p)?;
            }
            if sets.len() > 1 {
                println!("== all test files");
                println!("{}", overall.metrics_line());
            }
            Ok(())
        }
    }
}
