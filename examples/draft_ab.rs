//! Image calls with and without prompt-lookup drafts on this machine: the
//! base model and adapter (the defaults unless given, as for `bot`) route
//! the first 10 call rows of the generator test file at batch 1, for
//! several draft lengths.
//! `cargo run --release --example draft_ab [-- --device cuda] [--cpu-weights f32]`
use std::time::Instant;

use clap::Parser;
use router::cli::ModelArgs;
use router::router::RouterConfig;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

fn main() -> anyhow::Result<()> {
    let mut router = Args::parse().model.load_router(RouterConfig::default())?;
    let messages: Vec<String> =
        router::dataset::read_jsonl(&router::cli::default_path("datas/image_call_test.jsonl"))?
            .into_iter()
            .filter(|e| e.assistant.starts_with("call("))
            .take(10)
            .map(|e| e.user)
            .collect();
    router.route(&messages[0])?;
    for drafts in [0usize, 2, 4, 6, 0] {
        router.config.draft_tokens = Some(drafts);
        let started = Instant::now();
        let mut tokens = 0;
        for m in &messages {
            tokens += router.route(m)?.new_tokens;
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / messages.len() as f64;
        println!("drafts {drafts}: {ms:.0} ms per image call ({tokens} new tokens in all)");
    }
    Ok(())
}
