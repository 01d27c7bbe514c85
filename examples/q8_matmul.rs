//! Q8_0 products on this CPU: ours (`router::model::q8::Q8Matrix`, the
//! weight read once for all the rows of a step) against candle's
//! `QMatMul` (the weight read once per row), on the shapes of
//! Gemma-3-270M's output head and projections, random weights, the median
//! of several runs per width. The measurements behind the head's copy and
//! `Q8_HEAD_MAX_ROWS`.
//! `cargo run --release --example q8_matmul [-- 1 2 4 7 16 32]`
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use clap::Parser;
use router::model::q8::Q8Matrix;

#[derive(Parser)]
struct Args {
    /// Rows per product to measure.
    #[arg(default_values_t = [1, 2, 4, 7, 16, 32])]
    widths: Vec<usize>,
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() -> anyhow::Result<()> {
    let Args { widths } = Args::parse();
    let dev = Device::Cpu;
    println!("| weight `[out, in]` | rows | ours ms | candle ms |");
    println!("|---|---|---|---|");
    for (name, out, inp) in [
        ("head", 262_144, 640),
        ("q_proj", 1024, 640),
        ("gate/up", 2048, 640),
        ("o_proj", 640, 1024),
        ("down", 640, 2048),
    ] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let ours = Q8Matrix::quantize(&w)?;
        let theirs = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        let runs = if out > 100_000 { 7 } else { 101 };
        for &rows in &widths {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
            let a = median_ms(runs, || drop(ours.matmul(&x).unwrap()));
            let b = median_ms(runs, || drop(theirs.forward(&x).unwrap()));
            println!("| {name} `[{out}, {inp}]` | {rows} | {a:.3} | {b:.3} |");
        }
    }
    Ok(())
}
