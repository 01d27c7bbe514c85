//! What one cached step of W new tokens costs on this machine, split into
//! the decoder stack and the output head, with the f32 weights and with the
//! CPU's Q8_0 copies (`--cpu-weights`): the measurements behind
//! `Q8_MAX_ROWS` and `Q8_HEAD_MAX_ROWS`. Default model and adapter, after an
//! 80-token prefill, the median of 9 steps per width.
//! `cargo run --release --example step_widths [-- 1 2 4 7 12 16 25]`
use std::time::Instant;

use candle_core::Tensor;
use router::model::{dense_batch, Cache, Mode};

fn main() -> anyhow::Result<()> {
    let widths: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let widths = if widths.is_empty() {
        vec![1, 2, 4, 7, 12, 16, 25]
    } else {
        widths
    };
    let device = router::device::select(Some("cpu"))?;
    let mut base = router::model::load(
        router::cli::default_path(router::cli::DEFAULT_BASE_MODEL)
            .to_str()
            .unwrap_or_default(),
        &device,
    )?;
    router::lora::Adapter::load(&router::cli::default_path(router::cli::DEFAULT_ADAPTER))?
        .apply(&mut base.decoder, true)?;
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
