//! The fused CUDA kernels (`src/model/fused.cu`) against candle's composed
//! kernels, on the GPU: the same random-weight decoders with
//! `set_fused_kernels` on and off must compute the same hidden states and
//! write the same keys and values, with a growing cache, without a cache
//! and over a static cache (the replayed steps' path), in f32 (to rounding)
//! and bf16 (to bf16's precision).
//!
//! Shapes: the tiny test configurations (head size 8, 4 query heads over 2
//! kv heads, Gemma's sliding window shorter than the sequences), Gemma-3-270M's
//! attention shape (4 heads over 1 kv head of 256, hidden size 640) and a
//! Llama shape with a query scale and soft-capped scores.
//!
//! The attention masks, built on the device from positions, must equal the
//! CPU's exactly.
//!
//! Only in a build with `--features cuda`, and it needs a GPU: without one
//! each test says so and passes (the CPU CI cannot run CUDA kernels;
//! `scripts/gpu/fused.sh` runs these on the GPU machine).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_decoder_in, tiny_config};
use router::lora::{self, LoraConfig};
use router::model::{
    dense_batch, Architecture, Batch, Cache, Decoder, Mode, ModelConfig, StaticCache, StepInputs,
    TrainPass,
};
use router::rng::SplitMix64;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// The shapes under test, by name.
fn configs() -> Vec<(&'static str, ModelConfig)> {
    let mut gemma_270m = tiny_config(Architecture::Gemma3);
    gemma_270m.hidden_size = 640;
    gemma_270m.intermediate_size = 2048;
    gemma_270m.num_hidden_layers = 2;
    gemma_270m.num_attention_heads = 4;
    gemma_270m.num_key_value_heads = 1;
    gemma_270m.head_dim = 256;
    gemma_270m.query_pre_attn_scalar = 256.0;
    gemma_270m.sliding_layers = vec![true, false];
    let mut capped = tiny_config(Architecture::Llama);
    capped.attn_logit_softcapping = Some(5.0);
    capped.head_dim = 16;
    vec![
        ("tiny gemma3", tiny_config(Architecture::Gemma3)),
        ("tiny llama", tiny_config(Architecture::Llama)),
        ("gemma3-270m shape", gemma_270m),
        ("llama, soft-capped", capped),
    ]
}

/// The same weights twice: candle's kernels, then the fused ones.
fn pair(cfg: &ModelConfig, dev: &Device, dtype: DType) -> (Decoder, Decoder) {
    let plain = random_decoder_in(cfg, 11, dev, dtype);
    let mut fused = random_decoder_in(cfg, 11, dev, dtype);
    assert!(!plain.fused_kernels(), "off unless asked for");
    assert!(
        fused.set_fused_kernels(true),
        "fused kernels available on CUDA in {dtype:?}"
    );
    (plain, fused)
}

/// Relative error `|a - b| / |b|` (Frobenius norms), in f32.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(&a - &b).unwrap()) / norm(&b).max(1e-12)
}

/// What the dtype's rounding allows between two orders of summation.
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 2e-2,
    }
}

fn check(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let r = relative(got, want);
    assert!(r <= tolerance(dtype), "{what}: relative difference {r}");
}

/// Every layer's keys and values against the reference's.
fn check_kv(what: &str, got: &[(Tensor, Tensor)], want: &[(Tensor, Tensor)], dtype: DType) {
    assert_eq!(got.len(), want.len(), "{what}: layers");
    for (layer, ((gk, gv), (wk, wv))) in got.iter().zip(want).enumerate() {
        check(&format!("{what} layer {layer} keys"), gk, wk, dtype);
        check(&format!("{what} layer {layer} values"), gv, wv, dtype);
    }
}

/// A prefix of 5 tokens on one row, repeated for 3 rows, then: a ragged
/// left-padded prefill, three single-token steps (past Gemma's window of
/// 4) and a step of three columns where one row has a padding column.
fn steps() -> Vec<Batch> {
    let p = Some;
    vec![
        Batch {
            rows: vec![
                vec![p(5), p(6), p(7), p(8)],
                vec![None, p(5), p(6), p(7)],
                vec![None, None, None, p(5)],
            ],
        },
        Batch {
            rows: vec![vec![p(9)], vec![p(8)], vec![p(6)]],
        },
        Batch {
            rows: vec![vec![p(10)], vec![p(9)], vec![p(7)]],
        },
        Batch {
            rows: vec![vec![p(11)], vec![p(10)], vec![p(8)]],
        },
        Batch {
            rows: vec![
                vec![p(12), p(13), p(14)],
                vec![p(11), p(12), None],
                vec![p(9), p(10), p(11)],
            ],
        },
    ]
}

const PREFIX: usize = 5;
const ROWS: usize = 3;

fn tokens_for(batch: &Batch, salt: u32, vocab: usize) -> Vec<u32> {
    batch
        .rows
        .iter()
        .enumerate()
        .flat_map(|(r, cols)| {
            cols.iter().enumerate().map(move |(c, p)| match p {
                Some(_) => (salt * 13 + r as u32 * 7 + c as u32 * 3 + 1) % vocab as u32,
                None => 0,
            })
        })
        .collect()
}

fn prefix(dec: &Decoder) -> Cache {
    common::prefix_cache(dec, PREFIX)
}

/// Hidden states of every step with a growing cache.
fn growing(dec: &Decoder) -> Vec<Tensor> {
    let mut cache = prefix(dec).repeat(ROWS).unwrap();
    steps()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let ids = tokens_for(b, i as u32, dec.cfg.vocab_size);
            let t = Tensor::from_vec(ids, (ROWS, b.width()), &dec.device).unwrap();
            dec.forward_hidden(&t, b, Some(&mut cache), Mode::Infer)
                .unwrap()
        })
        .collect()
}

/// Hidden states of every step over a static cache of `capacity` columns,
/// and the cache's keys and values at the end.
fn static_run(dec: &Decoder, capacity: usize) -> (Vec<Tensor>, Vec<(Tensor, Tensor)>) {
    let mut cache = dec.static_cache(ROWS, capacity).unwrap();
    cache.load(&prefix(dec).repeat(ROWS).unwrap()).unwrap();
    let hidden = steps()
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let ids = tokens_for(b, i as u32, dec.cfg.vocab_size);
            let mut inputs = dec.step_inputs(ROWS, b.width(), capacity).unwrap();
            inputs.fill(&ids, b, &cache).unwrap();
            let h = dec.forward_static(&inputs, &cache).unwrap();
            cache.advance(b).unwrap();
            h
        })
        .collect();
    (hidden, cache.kv().to_vec())
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn fused_steps_equal_candle_steps_with_a_growing_cache() {
    let Some(dev) = gpu() else { return };
    for (name, cfg) in configs() {
        for dtype in DTYPES {
            let (plain, fused) = pair(&cfg, &dev, dtype);
            let (want, got) = (growing(&plain), growing(&fused));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                check(&format!("{name} {dtype:?} growing step {i}"), g, w, dtype);
            }
        }
    }
}

/// A ragged batch of 3 x 8 columns: 24 rows for the projections, more
/// than the skinny kernels take (candle's matmuls then, the other fused
/// kernels still).
fn wide() -> Batch {
    let p = Some;
    Batch {
        rows: vec![
            (0..8).map(p).collect(),
            [None, None].into_iter().chain((0..6).map(p)).collect(),
            (0..7).map(p).chain([None]).collect(),
        ],
    }
}

/// Hidden states of one uncached pass over `batch`.
fn uncached(dec: &Decoder, batch: &Batch) -> Tensor {
    let ids = tokens_for(batch, 3, dec.cfg.vocab_size);
    let t = Tensor::from_vec(ids, (batch.rows.len(), batch.width()), &dec.device).unwrap();
    dec.forward_hidden(&t, batch, None, Mode::Infer).unwrap()
}

#[test]
fn fused_forward_equals_candle_forward_without_a_cache() {
    let Some(dev) = gpu() else { return };
    for (name, cfg) in configs() {
        for dtype in DTYPES {
            let (plain, fused) = pair(&cfg, &dev, dtype);
            for (what, batch) in [("narrow", steps().remove(0)), ("wide", wide())] {
                let (got, want) = (uncached(&fused, &batch), uncached(&plain, &batch));
                check(
                    &format!("{name} {dtype:?} uncached {what}"),
                    &got,
                    &want,
                    dtype,
                );
            }
        }
    }
}

/// The same random adapter (B non-zero) on every projection of `dec`.
fn adapt(dec: &mut Decoder) {
    lora::init(dec, &LoraConfig::new(4, 8.0, 0.0, &common::PROJECTIONS), 3).unwrap();
    common::randomize_lora_b(dec, 5, 0.2);
}

#[test]
fn fused_steps_follow_adapters_merged_or_not() {
    let Some(dev) = gpu() else { return };
    for (name, cfg) in configs() {
        for dtype in DTYPES {
            let (mut plain, mut fused) = pair(&cfg, &dev, dtype);
            let base = growing(&fused);
            adapt(&mut plain);
            adapt(&mut fused);
            for merged in [false, true] {
                if merged {
                    for l in plain.linears_mut().chain(fused.linears_mut()) {
                        l.merge().unwrap();
                    }
                }
                let (want, got) = (growing(&plain), growing(&fused));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    check(
                        &format!("{name} {dtype:?} adapted (merged {merged}) step {i}"),
                        g,
                        w,
                        dtype,
                    );
                }
                // The adapter changes the states (the check is not vacuous;
                // the same kernels on the same inputs repeat exactly).
                assert!(
                    relative(&got[0], &base[0]) > 1e-3,
                    "{name}: adapter had no effect"
                );
            }
        }
    }
}

#[test]
fn fused_static_steps_write_the_same_cache_and_states() {
    let Some(dev) = gpu() else { return };
    let appended: usize = steps().iter().map(Batch::width).sum();
    for (name, cfg) in configs() {
        for dtype in DTYPES {
            let (plain, fused) = pair(&cfg, &dev, dtype);
            // Room to spare: the unwritten columns stay masked (and zero).
            let capacity = PREFIX + appended + 9;
            let (want, want_kv) = static_run(&plain, capacity);
            let (got, got_kv) = static_run(&fused, capacity);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                check(&format!("{name} {dtype:?} static step {i}"), g, w, dtype);
            }
            check_kv(&format!("{name} {dtype:?}"), &got_kv, &want_kv, dtype);
            // And the static steps agree with the growing cache's.
            for (i, (g, w)) in got.iter().zip(&growing(&plain)).enumerate() {
                check(
                    &format!("{name} {dtype:?} static vs growing step {i}"),
                    g,
                    w,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn fused_pick_equals_candle_argmax_and_probability() {
    let Some(dev) = gpu() else { return };
    let (plain, fused) = pair(&tiny_config(Architecture::Gemma3), &dev, DType::BF16);
    // Gemma's vocabulary size and a ragged one; rows whose maximum sits in
    // the first, a middle and the last chunk, and a row of equal values
    // (the first index wins, as candle's arg-max picks it).
    for vocab in [262_144usize, 1_000_003] {
        let mut rng = SplitMix64(vocab as u64);
        let mut data: Vec<f32> = (0..4 * vocab)
            .map(|_| (rng.next_f64() as f32 - 0.5) * 20.0)
            .collect();
        data[7] = 50.0;
        data[vocab + vocab / 2 + 3] = 50.0;
        data[3 * vocab - 1] = 50.0;
        data[3 * vocab..].iter_mut().for_each(|x| *x = 1.5);
        let logits = Tensor::from_vec(data, (4, vocab), &dev).unwrap();
        for token in [0u32, 7, (vocab - 1) as u32] {
            let (want_arg, want_p) = plain.pick(&logits, Some(token)).unwrap();
            let (got_arg, got_p) = fused.pick(&logits, Some(token)).unwrap();
            assert_eq!(got_arg, want_arg, "arg-max over {vocab}");
            for (g, w) in got_p.unwrap().iter().zip(want_p.unwrap()) {
                assert!(
                    (g - w).abs() <= 1e-6 + 1e-4 * w.abs(),
                    "p({token}) over {vocab}: {g} vs {w}"
                );
            }
        }
        let on_device = fused.argmax(&logits).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(on_device, plain.pick(&logits, None).unwrap().0);
    }
}

#[test]
fn fused_single_row_steps_equal_candle_steps() {
    // One row: steps of 1 and 2 columns take the skinny kernels' smallest
    // row bounds (the batches above take 4 and 8, or cuBLAS from 9 rows).
    let Some(dev) = gpu() else { return };
    for (name, cfg) in configs() {
        for dtype in DTYPES {
            let (plain, fused) = pair(&cfg, &dev, dtype);
            let run = |dec: &Decoder| -> Vec<Tensor> {
                let mut cache = prefix(dec);
                let mut start = PREFIX as u32;
                [1usize, 1, 2, 1]
                    .iter()
                    .map(|&width| {
                        let ids: Vec<u32> =
                            (0..width as u32).map(|i| (start * 7 + i) % 97).collect();
                        let t = Tensor::from_vec(ids, (1, width), &dec.device).unwrap();
                        let batch = dense_batch(1, start, width);
                        start += width as u32;
                        dec.forward_hidden(&t, &batch, Some(&mut cache), Mode::Infer)
                            .unwrap()
                    })
                    .collect()
            };
            for (i, (g, w)) in run(&fused).iter().zip(&run(&plain)).enumerate() {
                check(
                    &format!("{name} {dtype:?} single row step {i}"),
                    g,
                    w,
                    dtype,
                );
            }
        }
    }
}

#[test]
fn masks_built_on_the_gpu_equal_the_cpus() {
    let Some(dev) = gpu() else { return };
    // Gemma's window of 4 is shorter than these steps: both masks differ.
    let cfg = tiny_config(Architecture::Gemma3);
    let capacity = PREFIX + 16;
    for dtype in [DType::F32, DType::BF16] {
        let on = |d: &Device| {
            let mut cache = StaticCache::new(&cfg, ROWS, capacity, dtype, d).unwrap();
            cache.advance(&dense_batch(ROWS, 0, PREFIX)).unwrap();
            cache
        };
        let (mut cpu_cache, mut gpu_cache) = (on(&Device::Cpu), on(&dev));
        for (i, batch) in steps().iter().enumerate() {
            let t = batch.width();
            let tokens = tokens_for(batch, i as u32, cfg.vocab_size);
            let mut cpu = StepInputs::new(&cfg, ROWS, t, capacity, dtype, &Device::Cpu).unwrap();
            let mut gpu = StepInputs::new(&cfg, ROWS, t, capacity, dtype, &dev).unwrap();
            cpu.fill(&tokens, batch, &cpu_cache).unwrap();
            gpu.fill(&tokens, batch, &gpu_cache).unwrap();
            let host = |m: &Tensor| {
                m.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(host(cpu.mask_global()), host(gpu.mask_global()), "step {i}");
            let (cl, gl) = (cpu.mask_local().unwrap(), gpu.mask_local().unwrap());
            assert_eq!(host(cl), host(gl), "step {i}, local");
            cpu_cache.advance(batch).unwrap();
            gpu_cache.advance(batch).unwrap();
        }
    }
}

/// A batched prefill after a cached prefix of `prefix` tokens, wide enough
/// that attention leaves the per-row kernel (`B·T·heads·S·D > 2^26`): the
/// repeated prefix (one kernel), the scores by candle's matmuls and the
/// probabilities by the fused softmax. Rows are left-padded by 0-4 columns.
/// Returns the hidden states and every layer's keys and values.
fn wide_prefill(dec: &Decoder, rows: usize, prefix: usize, width: usize) -> (Tensor, Cache) {
    let mut cache = common::prefix_cache(dec, prefix).repeat(rows).unwrap();
    let batch = Batch {
        rows: (0..rows)
            .map(|r| {
                (0..width)
                    .map(|c| (c >= r % 5).then_some((prefix + c - r % 5) as u32))
                    .collect()
            })
            .collect(),
    };
    let ids = tokens_for(&batch, 5, dec.cfg.vocab_size);
    let t = Tensor::from_vec(ids, (rows, width), &dec.device).unwrap();
    let h = dec
        .forward_hidden(&t, &batch, Some(&mut cache), Mode::Infer)
        .unwrap();
    (h, cache)
}

#[test]
fn fused_wide_prefills_equal_candle_prefills() {
    let Some(dev) = gpu() else { return };
    // (name, config, rows, prefix, width): one kv head (queries read in
    // place) and two (query heads stacked per kv head), soft-capped.
    let cases: Vec<(&str, ModelConfig, usize, usize, usize)> = configs()
        .into_iter()
        .filter_map(|(name, cfg)| match name {
            "gemma3-270m shape" => Some((name, cfg, 16, 240, 48)),
            "llama, soft-capped" => Some((name, cfg, 32, 512, 64)),
            _ => None,
        })
        .collect();
    assert_eq!(cases.len(), 2);
    for (name, cfg, rows, prefix, width) in cases {
        let work = rows * width * cfg.num_attention_heads * (prefix + width) * cfg.head_dim;
        assert!(
            work > 1 << 26,
            "{name}: {work} is within the per-row kernel"
        );
        for dtype in DTYPES {
            let (plain, fused) = pair(&cfg, &dev, dtype);
            let (want, want_cache) = wide_prefill(&plain, rows, prefix, width);
            let (got, got_cache) = wide_prefill(&fused, rows, prefix, width);
            check(
                &format!("{name} {dtype:?} wide prefill"),
                &got,
                &want,
                dtype,
            );
            // The caches' keys and values, the repeated prefix included.
            let kv = |c: &Cache| {
                let mut s = StaticCache::new(&cfg, rows, prefix + width, dtype, &dev).unwrap();
                s.load(c).unwrap();
                s.kv().to_vec()
            };
            let what = format!("{name} {dtype:?} wide prefill cache");
            check_kv(&what, &kv(&got_cache), &kv(&want_cache), dtype);
        }
    }
}

/// Smooth weights `[dims]` (f32) for a scalar loss `Σ h · probe` whose
/// gradients differ from element to element.
fn probe(dims: &[usize], device: &Device) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::arange(0u32, n as u32, device)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1e-3, -0.1)
        .unwrap()
        .sin()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// Training on the GPU takes kernels of its own (`grad.rs`'s nodes): the
/// dropout mask (drawn from the same counter-based stream as on the CPU),
/// the LoRA term added to the frozen projection, the norms and their
/// backward, the heads' transposes, the attention probabilities and their
/// backward, the adds where gradients meet. In f32 a training forward with
/// dropout and its LoRA gradients must equal the CPU's composed ops, for
/// every shape under test (the soft-capped one takes the cap's backward).
#[test]
fn gpu_training_steps_equal_cpu_training_steps() {
    let Some(dev) = gpu() else { return };
    for (name, cfg) in configs() {
        training_step_on_both(name, &cfg, &dev);
    }
}

fn training_step_on_both(name: &str, cfg: &ModelConfig, dev: &Device) {
    let lora_cfg = LoraConfig::new(4, 8.0, 0.25, &common::PROJECTIONS);
    let run = |device: &Device| {
        let mut dec = random_decoder_in(cfg, 3, device, DType::F32);
        lora::init(&mut dec, &lora_cfg, 9).unwrap();
        common::randomize_lora_b(&dec, 4, 0.2);
        let batch = wide();
        let ids = tokens_for(&batch, 2, cfg.vocab_size);
        let t = Tensor::from_vec(ids, (batch.rows.len(), batch.width()), device).unwrap();
        let pass = TrainPass::new(77);
        let h = dec
            .forward_hidden(&t, &batch, None, Mode::Train(&pass))
            .unwrap();
        let probe = probe(h.dims(), device);
        let grads = pass
            .backward(&(&h * &probe).unwrap().sum_all().unwrap())
            .unwrap();
        let g: Vec<Tensor> = lora::trainable_vars(&dec)
            .iter()
            .map(|v| grads.get(v).unwrap().to_device(&Device::Cpu).unwrap())
            .collect();
        (h.to_device(&Device::Cpu).unwrap(), g)
    };
    let (want_h, want_g) = run(&Device::Cpu);
    let (got_h, got_g) = run(dev);
    check(
        &format!("{name}: training forward with dropout"),
        &got_h,
        &want_h,
        DType::F32,
    );
    assert_eq!(got_g.len(), want_g.len());
    for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
        check(&format!("{name}: LoRA gradient {i}"), g, w, DType::F32);
    }
}

/// The optimizer's kernels (`FusedAdamW`: the gradients' norm, clipping,
/// AdamW with weight decay, every tensor at once) against AdamW written out
/// per element in f64 on the host, over three steps with clipping active,
/// for tensors of three lengths (one spans several blocks) whose gradients
/// and moments are rows of stacked buffers.
#[test]
fn fused_adamw_equals_adamw_written_out() {
    let Some(dev) = gpu() else { return };
    let lens = [6usize, 5000, 300];
    let mut rng = SplitMix64(4);
    let mut draw =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| draw(n)).collect();
    let params: Vec<Tensor> = init
        .iter()
        .map(|v| Tensor::new(v.as_slice(), &dev).unwrap())
        .collect();
    // Each tensor's gradient and moments: a row of a buffer of two rows.
    let stacked = |n: usize| Tensor::zeros((2, n), DType::F32, &dev).unwrap();
    let (g_bufs, m_bufs, v_bufs): (Vec<_>, Vec<_>, Vec<_>) = lens
        .iter()
        .map(|&n| (stacked(n), stacked(n), stacked(n)))
        .fold((vec![], vec![], vec![]), |mut acc, (g, m, v)| {
            acc.0.push(g);
            acc.1.push(m);
            acc.2.push(v);
            acc
        });
    let row = |bufs: &[Tensor]| -> Vec<Tensor> { bufs.iter().map(|b| b.get(1).unwrap()).collect() };
    let kernels =
        router::model::FusedAdamW::new(&params, &row(&g_bufs), &row(&m_bufs), &row(&v_bufs))
            .unwrap()
            .expect("the kernels run on CUDA");
    let (beta1, beta2, eps, wd, lr, max_norm) = (0.9, 0.999, 1e-8, 0.01, 0.01, 0.5);
    let hyper = Tensor::zeros(4, DType::F32, &dev).unwrap();
    let norm = Tensor::zeros(1, DType::F32, &dev).unwrap();
    let mut p: Vec<Vec<f64>> = init
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let mut m: Vec<Vec<f64>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    for step in 1..=3 {
        let g: Vec<Vec<f32>> = lens.iter().map(|&n| draw(n)).collect();
        for (buf, gk) in g_bufs.iter().zip(&g) {
            let t = Tensor::new(gk.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            buf.slice_set(&t, 0, 1).unwrap();
        }
        let bc1 = 1.0 - f64::powi(beta1, step);
        let bc2 = 1.0 - f64::powi(beta2, step);
        let h = [lr / bc1, 1.0 - lr * wd, 1.0 / bc2, max_norm].map(|x| x as f32);
        hyper
            .slice_set(&Tensor::new(&h, &dev).unwrap(), 0, 0)
            .unwrap();
        kernels.apply(&hyper, &norm, beta1, beta2, eps).unwrap();
        let want: f64 = g
            .iter()
            .flatten()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let got = norm.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-5 * want, "norm {got} vs {want}");
        let clip = (max_norm / (want + 1e-6)).min(1.0);
        for k in 0..lens.len() {
            for e in 0..lens[k] {
                let gi = g[k][e] as f64 * clip;
                m[k][e] = beta1 * m[k][e] + (1.0 - beta1) * gi;
                v[k][e] = beta2 * v[k][e] + (1.0 - beta2) * gi * gi;
                let upd = (m[k][e] / bc1) / ((v[k][e] / bc2).sqrt() + eps);
                p[k][e] = p[k][e] * (1.0 - lr * wd) - lr * upd;
            }
        }
    }
    for (k, (t, want)) in params.iter().zip(&p).enumerate() {
        let got = t.to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5, "tensor {k}: {a} vs {b}");
        }
        // The other row of each stacked buffer is untouched.
        let untouched = g_bufs[k].get(0).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(untouched.to_scalar::<f32>().unwrap(), 0.0);
    }
}

/// A training pass captured as a CUDA graph (`Replay`, the way `train`
/// replays its steps) and replayed with other tokens, positions, padding
/// and dropout seed must leave the gradients an eager pass of those inputs
/// computes: the replay reads every input from its buffers, including the
/// dropout seed.
#[test]
fn replayed_training_passes_equal_eager_ones() {
    let Some(dev) = gpu() else { return };
    let cfg = tiny_config(Architecture::Gemma3);
    let lora_cfg = LoraConfig::new(4, 8.0, 0.25, &common::PROJECTIONS);
    let mut dec = random_decoder_in(&cfg, 3, &dev, DType::BF16);
    lora::init(&mut dec, &lora_cfg, 9).unwrap();
    common::randomize_lora_b(&dec, 4, 0.2);
    let vars = lora::trainable_vars(&dec);
    let (first, second) = (wide(), steps().remove(0));
    let width = first.width().max(second.width());
    let padded = |b: &Batch| Batch {
        rows: b
            .rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(width, None);
                r
            })
            .collect(),
    };
    let (first, second) = (padded(&first), padded(&second));
    assert_eq!(first.rows.len(), second.rows.len(), "one shape for both");
    let rows = first.rows.len();
    let probe = probe(&[rows, width, cfg.hidden_size], &dev);
    let loss = |h: &Tensor| (h.to_dtype(DType::F32)? * &probe)?.sum_all();
    let buffers: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().zeros_like().unwrap())
        .collect();
    let seed_buffer = Tensor::zeros(2, DType::U32, &dev).unwrap();
    let mut inputs = dec.step_inputs(rows, width, width).unwrap();
    let mut replay = router::model::Replay::new();
    for (batch, seed) in [(&first, 11u64), (&second, 12)] {
        let ids = tokens_for(batch, seed as u32, cfg.vocab_size);
        inputs.fill_rows(&ids, batch, &[]).unwrap();
        let words = TrainPass::seed_words(seed);
        seed_buffer
            .slice_set(&Tensor::new(&words, &dev).unwrap(), 0, 0)
            .unwrap();
        replay
            .run(&dev, "the test pass", || {
                let pass = TrainPass::with_seed_buffer(seed, &seed_buffer);
                let h = dec.forward_rows(&inputs, None, Mode::Train(&pass))?;
                let grads = pass.backward(&loss(&h)?)?;
                for (buffer, var) in buffers.iter().zip(&vars) {
                    let Some(g) = grads.get(var) else {
                        candle_core::bail!("no gradient");
                    };
                    buffer.slice_set(&g.contiguous()?, 0, 0)?;
                }
                Ok(())
            })
            .unwrap();
    }
    assert!(replay.is_captured(), "the training pass was not captured");
    let nodes = replay.nodes().unwrap().expect("a captured graph has nodes");
    assert!(
        nodes.kernels > 0 && nodes.total() >= nodes.kernels,
        "{nodes:?}"
    );
    // Every kernel node is named (the counts cover every kernel).
    let named: usize = nodes.kernel_names.iter().map(|(_, n)| n).sum();
    assert_eq!(named, nodes.kernels, "{:?}", nodes.kernel_names);
    assert!(
        nodes
            .kernel_names
            .iter()
            .any(|(name, _)| name.contains("dropout_mask")),
        "{:?}",
        nodes.kernel_names
    );
    // The eager pass of the second inputs, its masks drawn from the seed.
    let ids = tokens_for(&second, 12, cfg.vocab_size);
    let t = Tensor::from_vec(ids, (rows, width), &dev).unwrap();
    let pass = TrainPass::new(12);
    let h = dec
        .forward_hidden(&t, &second, None, Mode::Train(&pass))
        .unwrap();
    let grads = pass.backward(&loss(&h).unwrap()).unwrap();
    for (i, (buffer, var)) in buffers.iter().zip(&vars).enumerate() {
        let want = grads.get(var).unwrap();
        check(
            &format!("replayed LoRA gradient {i}"),
            buffer,
            want,
            DType::F32,
        );
    }
}

/// Training's loss on CUDA (one kernel for the rows' log-sum-exp and loss,
/// one for the gradient) against the CPU's composed ops, in f32 and bf16:
/// the loss and the gradient reaching the hidden states.
#[test]
fn the_fused_training_loss_equals_the_composed_one() {
    let Some(dev) = gpu() else { return };
    let cfg = tiny_config(Architecture::Gemma3);
    let rows = 5;
    let values: Vec<f32> = (0..rows * cfg.hidden_size)
        .map(|i| ((i as f32) * 0.37).sin() * 2.0)
        .collect();
    let run = |device: &Device, dtype: DType| {
        let dec = random_decoder_in(&cfg, 3, device, dtype);
        let hidden = Tensor::from_vec(values.clone(), (rows, cfg.hidden_size), device)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let hidden = candle_core::Var::from_tensor(&hidden).unwrap();
        let targets = Tensor::new(&[1u32, 7, 0, 3, 7], device).unwrap();
        let weights = Tensor::new(&[0.5f32, 1.0, 0.0, 0.25, 2.0], device).unwrap();
        let loss = dec
            .answer_loss(hidden.as_tensor(), &targets, &weights)
            .unwrap();
        let grad = loss.backward().unwrap().get(&hidden).unwrap().clone();
        let cpu = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        (cpu(&loss), cpu(&grad))
    };
    let (want_loss, want_grad) = run(&Device::Cpu, DType::F32);
    for dtype in [DType::F32, DType::BF16] {
        let (loss, grad) = run(&dev, dtype);
        check(&format!("loss, {dtype:?}"), &loss, &want_loss, dtype);
        check(
            &format!("its gradient, {dtype:?}"),
            &grad,
            &want_grad,
            dtype,
        );
    }
}
