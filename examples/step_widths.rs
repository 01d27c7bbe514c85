//! What one cached step of W new tokens costs on this machine, split into
//! the decoder stack and the output head, with the f32 weights and with the
//! CPU's Q8_0 copies (`--cpu-weights`): the measurements behind
//! `Q8_MAX_ROWS` and `Q8_HEAD_MAX_ROWS`. After an 80-token prefill, the
//! median of 9 steps per width. The base model and adapter are the defaults
//! unless given, as for `bot`; the device is the CPU.
//! `cargo run --release --example step_widths [-- 1 2 4 7 12 16 25]`
use std::time::Instant;

use candle_core::Tensor;
use clap::Parser;
use router::cli::ModelArgs;
use router::model::{dense_batch, Cache, Mode};
use router::router::RouterConfig;

#[derive(Parser)]
struct Args {
    /// Rows per step to measure.
    #[arg(default_values_t = [1, 2, 4, 7, 12, 16, 25])]
    widths: Vec<usize>,
    #[command(flatten)]
    model: ModelArgs,
}

fn main() -> anyhow::Result<()> {
    let Args { widths, mut model } = Args::parse();
    model.device = Some("cpu".into());
    let mut router = model.load_router(RouterConfig::default())?;
    let base = router.base_mut();
    let device = base.decoder.device.clone();
    let context: Vec<u32> = (0..80u32).map(|i| 1000 + i * 7).collect();
    println!("| rows | stack f32 | stack q8 | head f32 | head q8 |");
    println!("|---|---|---|---|---|");
    for &w in &widths {
        let mut cells = Vec::new();
        for q8 in [false, true] {
            base.decoder.set_cpu_quantized(q8)?;
            let dec = &base.decoder;
            let mut stack = Vec::new();
            let mut head = Vec::new();
            for _ in 0..9 {
                let mut cache = Cache::default();
                let t = Tensor::new(context.as_slice(), &device)?.unsqueeze(0)?;
                dec.forward_hidden(&t, &dense_batch(1, 0, 80), Some(&mut cache), Mode::Infer)?;
                let step = Tensor::new(&context[..w], &device)?.unsqueeze(0)?;
                let started = Instant::now();
                let h = dec.forward_hidden(
                    &step,
                    &dense_batch(1, 80, w),
                    Some(&mut cache),
                    Mode::Infer,
                )?;
                let h = h.squeeze(0)?.contiguous()?;
                stack.push(started.elapsed().as_secs_f64() * 1e3);
                let started = Instant::now();
                dec.logits(&h)?.argmax(1)?.to_vec1::<u32>()?;
                head.push(started.elapsed().as_secs_f64() * 1e3);
            }
            cells.push(median(&mut stack));
            cells.push(median(&mut head));
        }
        println!(
            "| {w} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            cells[0], cells[2], cells[1], cells[3]
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
