//! Image calls with and without prompt-lookup drafts on this machine: the
//! default model with the shipped adapter routes the first 10 call rows of
//! the generator test file at batch 1, for several draft lengths.
//! `cargo run --release --example draft_ab [-- --device cuda] [--f32]`
//! (`--f32`: no Q8_0 copies on the CPU, as `--cpu-weights f32`)
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let spec = std::env::args().skip_while(|a| a != "--device").nth(1);
    let device = router::device::select(spec.as_deref())?;
    let mut base = router::model::load(
        router::cli::default_path(router::cli::DEFAULT_BASE_MODEL)
            .to_str()
            .unwrap_or_default(),
        &device,
    )?;
    let f32_only = std::env::args().any(|a| a == "--f32");
    base.decoder.set_cpu_quantized(!f32_only)?;
    router::lora::Adapter::load(&router::cli::default_path(router::cli::DEFAULT_ADAPTER))?
        .apply(&mut base.decoder, true)?;
    let mut router = router::router::Router::new(base, Default::default())?;
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
