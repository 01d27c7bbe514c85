//! Where a routing decision's time goes, phase by phase, on any device:
//! the system prompt's prefill, a message's prefill after it, one decode
//! step of the decoder body, the output head, and the first-token softmax
//! read back to the host, for several batch sizes. Each phase ends with a
//! device synchronisation, so GPU numbers are wall times of finished work.
//!
//! ```text
//! cargo run --release --example decode_profile -- [--device cuda] [--model PATH | --shape 270m|1b]
//!     [--batches 1,8,32,128] [--fused-kernels on|off]
//! ```
//! The fused kernels are on where they exist (CUDA), as in the bot. The
//! "issued" column is the time until the message prefill's call returns,
//! before the device finishes: close to the synchronised time, a pass is
//! bound by the host (launches, host work), not by the GPU.
//! `--shape` builds random weights of that Gemma-3 shape (no files needed);
//! the default is the default model.
#[path = "profile/mod.rs"]
mod profile;

use std::time::Instant;

use candle_core::Tensor;
use profile::{arg, ids, random_decoder, timed};
use router::model::{dense_batch, Batch, Cache, Decoder, Mode};

fn main() -> anyhow::Result<()> {
    let device = router::device::select(arg("--device").as_deref())?;
    // `--default-pool`: the driver's default release threshold (0), for a
    // before/after comparison of what `device::select` sets.
    if std::env::args().any(|a| a == "--default-pool")
        && router::device::set_pool_release_threshold(&device, 0)
    {
        println!("(CUDA memory pool release threshold back at the default, 0)");
    }
    let (dec, source): (Decoder, String) = match arg("--shape") {
        Some(shape) => (
            random_decoder(&shape, &device)?,
            format!("random Gemma-3 {shape} shape"),
        ),
        None => {
            let spec =
                arg("--model").unwrap_or_else(|| router::cli::DEFAULT_BASE_MODEL.to_string());
            (router::model::load(&spec, &device)?.decoder, spec)
        }
    };
    let mut dec = dec;
    let fused = arg("--fused-kernels").as_deref() != Some("off");
    let fused = dec.set_fused_kernels(fused);
    let vocab = dec.vocab_size()?;
    let (prefix_len, user_len) = (240usize, 30usize);
    println!(
        "{source} on {} ({:?}, fused kernels {}); system prefix {prefix_len} tokens, message {user_len} tokens",
        router::device::describe(&device),
        dec.dtype,
        if fused { "on" } else { "off" }
    );
    println!("| batch | prefix prefill ms | message prefill ms | issued ms | prefill tok/s | decode step ms | head ms | first-token probability+argmax read ms | message decided, read back each time ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let batches: Vec<usize> = arg("--batches")
        .unwrap_or_else(|| {
            if device.is_cuda() {
                "1,8,32,128".into()
            } else {
                "1,8".into()
            }
        })
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reps = if device.is_cuda() { 20 } else { 3 };
    // The system prompt, once (batch of one), as the router caches it.
    let prefix_tokens = Tensor::from_vec(ids(prefix_len, 0, vocab), (1, prefix_len), &device)?;
    let mut prefix = Cache::default();
    let prefix_ms = timed(&device, reps, || {
        prefix = Cache::default();
        dec.forward_hidden(
            &prefix_tokens,
            &dense_batch(1, 0, prefix_len),
            Some(&mut prefix),
            Mode::Infer,
        )?;
        Ok(())
    })?;
    for b in batches {
        let user = Tensor::from_vec(ids(b * user_len, b, vocab), (b, user_len), &device)?;
        let user_batch = dense_batch(b, prefix_len as u32, user_len);
        let mut cache = Cache::default();
        let mut hidden = None;
        let user_ms = timed(&device, reps, || {
            cache = prefix.repeat(b)?;
            hidden = Some(dec.forward_hidden(&user, &user_batch, Some(&mut cache), Mode::Infer)?);
            Ok(())
        })?;
        let hidden = hidden.expect("ran at least once");
        // The same pass timed until its call returns (no synchronisation).
        let mut issued_ms = 0.0;
        for _ in 0..reps {
            let mut c = prefix.repeat(b)?;
            device.synchronize()?;
            let t = Instant::now();
            dec.forward_hidden(&user, &user_batch, Some(&mut c), Mode::Infer)?;
            issued_ms += t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            device.synchronize()?;
        }
        // As the router runs a message: prefill, then read the first token
        // back (a synchronisation after every message).
        let last_col = vec![user_len - 1; b];
        let routed_ms = timed(&device, reps, || {
            let mut c = prefix.repeat(b)?;
            let h = dec.forward_hidden(&user, &user_batch, Some(&mut c), Mode::Infer)?;
            let l = dec.logits_at(&h, &last_col)?;
            router::model::token_probabilities(&l, 300)?;
            Ok(())
        })?;
        let last = vec![user_len - 1; b];
        let head_ms = timed(&device, reps, || {
            dec.logits_at(&hidden, &last)?;
            Ok(())
        })?;
        let logits = dec.logits_at(&hidden, &last)?;
        let read_ms = timed(&device, reps, || {
            router::model::token_probabilities(&logits, 300)?;
            logits.argmax(1)?.to_vec1::<u32>()?;
            Ok(())
        })?;
        // Decode steps on top of the message's cache (the cache grows).
        let mut pos = (prefix_len + user_len) as u32;
        let step = Tensor::from_vec(ids(b, b + 1, vocab), (b, 1), &device)?;
        let decode_ms = timed(&device, reps, || {
            let batch = Batch {
                rows: (0..b).map(|_| vec![Some(pos)]).collect(),
            };
            pos += 1;
            dec.forward_hidden(&step, &batch, Some(&mut cache), Mode::Infer)?;
            Ok(())
        })?;
        println!(
            "| {b} | {prefix_ms:.2} | {user_ms:.2} | {issued_ms:.2} | {:.0} | {decode_ms:.2} | {head_ms:.2} | {read_ms:.2} | {routed_ms:.2} |",
            (b * user_len) as f64 / (user_ms / 1e3)
        );
    }
    Ok(())
}
