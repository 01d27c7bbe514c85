//! Where a routing decision's time goes on this machine: prefill, one decode
//! step of the decoder body, and the output head, for batch 1 and 8, on the
//! default model or the one named (CPU).
//! `cargo run --release --example decode_profile [-- <model>]`
use candle_core::{Device, Tensor};
use router::model::{dense_batch, Batch, Cache, Mode};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let spec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| router::cli::DEFAULT_BASE_MODEL.to_string());
    let m = router::model::load(&spec, &Device::Cpu)?;
    let d = &m.decoder;
    let hidden = d.cfg.hidden_size;
    // Ordinary tokens: above the control tokens, within any vocabulary.
    let span = (d.vocab_size()? as u32).saturating_sub(300).max(1);
    for b in [1usize, 8] {
        let ids: Vec<u32> = (0..b * 120)
            .map(|i| (i as u32 * 7919) % span + 300)
            .collect();
        let t = Tensor::from_vec(ids, (b, 120), &Device::Cpu)?;
        let mut cache = Cache::default();
        let t0 = Instant::now();
        let h = d.forward_hidden(&t, &dense_batch(b, 0, 120), Some(&mut cache), Mode::Infer)?;
        let p = t0.elapsed();
        let t0 = Instant::now();
        for s in 0..5 {
            let tok = Tensor::from_vec(vec![500u32; b], (b, 1), &Device::Cpu)?;
            let batch = Batch {
                rows: (0..b).map(|_| vec![Some(120 + s)]).collect(),
            };
            let _h = d.forward_hidden(&tok, &batch, Some(&mut cache), Mode::Infer)?;
        }
        let body = t0.elapsed() / 5;
        let hid = h.narrow(1, 119, 1)?.reshape((b, hidden))?;
        let t0 = Instant::now();
        for _ in 0..5 {
            let _ = d.logits(&hid)?;
        }
        let head = t0.elapsed() / 5;
        println!(
            "batch {b}: prefill 120 tokens {p:?}; decode step: body {body:?}, output head {head:?}"
        );
    }
    Ok(())
}
