//! Where a training pass's time goes, on any device, without model files:
//! one pass of `train`'s step (forward over padded rows, the loss at the
//! answer columns, backward, the LoRA gradients copied out) on a
//! random-weight Gemma-3 shape with LoRA on every projection, run eagerly
//! and replayed from a CUDA graph, and the captured graph's nodes by kind.
//!
//! ```text
//! cargo run --release --example train_profile -- [--device cuda] [--shape 270m|1b|tiny]
//!     [--rows 8] [--width 160] [--answers 192] [--rank 16] [--reps 20]
//! ```
//! The defaults are the shipped recipe's typical step (8 rows of about 160
//! tokens, r 16, dropout 0.05). Every time is synchronised; "issued" is the
//! eager pass's time until its call returns. A replayed pass whose time is
//! far above the sum of its kernels is bound by its graph's nodes.
#[path = "profile/mod.rs"]
mod profile;

use std::time::Instant;

use candle_core::Tensor;
use profile::{arg, ids, random_decoder, timed};
use router::lora::{self, LoraConfig};
use router::model::{dense_batch, Mode, Replay, TrainPass};

/// Every projection of a layer, as `train --targets` names them.
const PROJECTIONS: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

fn number(name: &str, default: usize) -> anyhow::Result<usize> {
    match arg(name) {
        Some(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name} takes a number, got `{v}`")),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let device = router::device::select(arg("--device").as_deref())?;
    let shape = arg("--shape").unwrap_or_else(|| "270m".into());
    let rows = number("--rows", 8)?.max(1);
    let width = number("--width", 160)?.max(2);
    let answers = number("--answers", 192)?.clamp(1, rows * width);
    let rank = number("--rank", 16)?.max(1);
    let reps = number("--reps", if device.is_cuda() { 20 } else { 2 })?.max(1);
    let mut dec = random_decoder(&shape, &device)?;
    let targets: Vec<&str> = PROJECTIONS.split(',').collect();
    let lora_cfg = LoraConfig::new(rank, rank as f64, 0.05, &targets);
    lora::init(&mut dec, &lora_cfg, 7)?;
    let vars = dec.lora_vars();
    let vocab = dec.vocab_size()?;
    println!(
        "random Gemma-3 {shape} shape on {} ({:?}), LoRA r {rank} on every projection: \
         {rows} rows x {width} columns, {answers} answer tokens",
        router::device::describe(&device),
        dec.dtype
    );

    // The step's buffers, filled once: rows of `width` tokens at positions
    // 0.., answers spread over the columns.
    let mut inputs = dec.step_inputs(rows, width, width)?;
    inputs.fill_rows(
        &ids(rows * width, 1, vocab),
        &dense_batch(rows, 0, width),
        &[],
    )?;
    let columns: Vec<u32> = (0..answers)
        .map(|i| (i * rows * width / answers) as u32)
        .collect();
    let answer_columns = Tensor::from_vec(columns, answers, &device)?;
    let targets = Tensor::from_vec(ids(answers, 2, vocab), answers, &device)?;
    let weights = Tensor::full(1.0 / answers as f32, answers, &device)?;
    let seed = Tensor::from_vec(TrainPass::seed_words(11).to_vec(), 2, &device)?;
    let grads: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().zeros_like())
        .collect::<candle_core::Result<_>>()?;
    let hidden_size = dec.cfg.hidden_size;
    let pass = || -> candle_core::Result<()> {
        let pass = TrainPass::with_seed_buffer(11, &seed);
        let hidden = dec.forward_rows(&inputs, None, Mode::Train(&pass))?;
        let picked = hidden
            .reshape((rows * width, hidden_size))?
            .index_select(&answer_columns, 0)?;
        let loss = dec.answer_loss(&picked, &targets, &weights)?;
        let store = pass.backward(&loss)?;
        for (buffer, var) in grads.iter().zip(&vars) {
            let Some(g) = store.get(var) else {
                candle_core::bail!("no gradient for a LoRA variable");
            };
            buffer.slice_set(&g.contiguous()?, 0, 0)?;
        }
        Ok(())
    };

    let eager_ms = timed(&device, reps, || Ok(pass()?))?;
    let mut issued_ms = 0.0;
    for _ in 0..reps {
        device.synchronize()?;
        let t = Instant::now();
        pass()?;
        issued_ms += t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    }
    device.synchronize()?;
    let mut replay = Replay::new();
    let replayed_ms = timed(&device, reps, || {
        Ok(replay.run(&device, "the profiled pass", pass)?)
    })?;
    let tokens = (rows * width) as f64;
    println!("| pass | ms | tokens/s |");
    println!("| --- | --- | --- |");
    println!("| eager | {eager_ms:.2} | {:.0} |", tokens / eager_ms * 1e3);
    println!("| eager, issued (call returned) | {issued_ms:.2} | |");
    if replay.is_captured() {
        println!(
            "| replayed | {replayed_ms:.2} | {:.0} |",
            tokens / replayed_ms * 1e3
        );
    } else {
        println!("| (not replayed: no CUDA graph on this device) | {replayed_ms:.2} | |");
    }
    if let Some(c) = replay.capture_timing() {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "capture: {:.1} ms (eager warm-up {:.1}, recording {:.1}, instantiation and upload {:.1})",
            ms(c.total()),
            ms(c.warm_up),
            ms(c.record),
            ms(c.instantiate)
        );
    }
    if let Some(n) = replay.nodes()? {
        println!(
            "graph nodes: {} ({} kernels, {} copies, {} sets, {} allocations, {} frees, {} other)",
            n.total(),
            n.kernels,
            n.copies,
            n.sets,
            n.allocs,
            n.frees,
            n.other
        );
        println!("| kernel | nodes |");
        println!("| --- | --- |");
        for (name, count) in n.kernel_names.iter().take(40) {
            println!("| {name} | {count} |");
        }
    }
    Ok(())
}
