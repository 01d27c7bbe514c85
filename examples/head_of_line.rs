//! Does one long message hold up the short ones that arrive with it? Routes
//! 11 short messages alone, then the same 11 together with one message of
//! 20,000 characters queued at the same moment, then with the long one
//! arriving first, through the engine (as the bot does), and prints what
//! the short messages waited for. Default model and adapter, CPU.
//! `cargo run --release --example head_of_line`
use std::time::Instant;

use clap::Parser;
use router::cli::ModelArgs;
use router::engine::Engine;
use router::router::RouterConfig;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

async fn round(engine: &Engine, texts: &[String]) -> anyhow::Result<Vec<f64>> {
    let started = Instant::now();
    let tasks: Vec<_> = texts
        .iter()
        .map(|t| {
            let (e, t) = (engine.clone(), t.clone());
            tokio::spawn(async move {
                e.route(t).await?;
                anyhow::Ok(started.elapsed().as_secs_f64() * 1e3)
            })
        })
        .collect();
    let mut waited = Vec::new();
    for t in tasks {
        waited.push(t.await??);
    }
    Ok(waited)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut model = args.model;
    model.device.get_or_insert_with(|| "cpu".into());
    let router = model.load_router(RouterConfig::default())?;
    let engine = Engine::spawn(router)?;
    let rt = tokio::runtime::Runtime::new()?;
    let short: Vec<String> = [
        "幫我畫一隻貓",
        "早安",
        "what's up",
        "畫一張海邊的夕陽",
        "謝謝你",
        "lol",
        "draw a red fox",
        "今天好冷",
        "這張圖是誰拍的",
        "hello bot",
        "幫我畫一隻柴犬",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = "我今天想跟你分享一個很長的故事，".repeat(1250); // 20,000 characters
    rt.block_on(async {
        round(&engine, &short).await?; // warm-up
        let alone = round(&engine, &short).await?;
        let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        println!("11 short messages alone: slowest answered after {:.0} ms", max(&alone));
        // Queued together: a busy engine (one short message in flight)
        // finds all twelve waiting when it takes the next batch.
        let busy = {
            let e = engine.clone();
            tokio::spawn(async move { e.route("hold on a moment".into()).await })
        };
        let mut with_long = short.clone();
        with_long.push(long.clone());
        let mixed = round(&engine, &with_long).await?;
        busy.await??;
        println!(
            "queued together with one of 20,000 characters: slowest short answered after {:.0} ms, the long one after {:.0} ms",
            max(&mixed[..11]),
            mixed[11]
        );
        // The long one first, alone: it is read in chunks, and the others,
        // arriving during its prefill, are decided between two chunks.
        let mut first = vec![long.clone()];
        first.extend(short.iter().cloned());
        let late = round(&engine, &first).await?;
        println!(
            "the long one arriving first: slowest short answered after {:.0} ms, the long one after {:.0} ms",
            max(&late[1..]),
            late[0]
        );
        anyhow::Ok(())
    })
}
