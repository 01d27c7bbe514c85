//! Numerical properties of the decoder and LoRA on tiny random-weight
//! Gemma-3 and Llama configurations built in the test.

mod common;

use std::collections::BTreeSet;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use common::{max_abs, max_diff, random_decoder, tiny_config};
use router::lora::{self, Adapter, LoraConfig};
use router::model::{dense_batch, Architecture, Batch, Cache, Decoder, Mode, TrainPass};

const ARCHS: [Architecture; 2] = [Architecture::Gemma3, Architecture::Llama];

fn tiny(arch: Architecture) -> Decoder {
    random_decoder(&tiny_config(arch), 7, &Device::Cpu)
}

/// A training pass; the tests' adapters have no dropout, so it never
/// draws.
fn no_dropout() -> TrainPass {
    TrainPass::new(0)
}

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 31 + salt * 7 + 5) % 97)
        .collect()
}

/// Logits at every position of a single sequence, no cache.
fn full_logits(dec: &Decoder, seq: &[u32], mode: Mode) -> Tensor {
    let n = seq.len();
    let t = Tensor::new(seq, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = dec
        .forward_hidden(&t, &dense_batch(1, 0, n), None, mode)
        .unwrap();
    dec.logits(&h.squeeze(0).unwrap()).unwrap()
}

/// Random non-zero adapter on q/k/v/o (B is zero at init, which would hide bugs).
fn adapted(arch: Architecture, cfg: &LoraConfig) -> Decoder {
    let mut dec = tiny(arch);
    lora::init(&mut dec, cfg, 3).unwrap();
    common::randomize_lora_b(&dec, 11, 0.5);
    dec
}

fn qkvo() -> LoraConfig {
    LoraConfig::new(4, 8.0, 0.0, &["q_proj", "k_proj", "v_proj", "o_proj"])
}

#[test]
fn shapes() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let t = Tensor::from_vec([ids(5, 0), ids(5, 1)].concat(), (2, 5), &Device::Cpu).unwrap();
        let h = dec
            .forward_hidden(&t, &dense_batch(2, 0, 5), None, Mode::Infer)
            .unwrap();
        assert_eq!(h.dims(), &[2, 5, 32]);
        let l = dec.logits_at(&h, &[4, 2]).unwrap();
        assert_eq!(l.dims(), &[2, 97]);
        assert_eq!(dec.linears().count(), 3 * 7);
    }
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    // 12 tokens > the tiny sliding window (4): windows are exercised.
    for arch in ARCHS {
        let dec = tiny(arch);
        let seq = ids(12, 2);
        let full = full_logits(&dec, &seq, Mode::Infer);
        for (k, step) in stepwise_logits(&dec, &seq, 5).iter().enumerate() {
            let want = full.get(5 + k).unwrap();
            assert!(max_diff(step, &want) < 1e-4, "{arch:?} position {}", 5 + k);
        }
    }
}

#[test]
fn padded_batches_equal_single_rows() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let a = ids(7, 3);
        let b = ids(4, 4);
        // Row b is left-padded by 3 columns; its positions still start at 0.
        let mut tokens = a.clone();
        tokens.extend([0, 0, 0]);
        tokens.extend(&b);
        let t = Tensor::from_vec(tokens, (2, 7), &Device::Cpu).unwrap();
        let batch = Batch {
            rows: vec![
                (0..7).map(Some).collect(),
                [None, None, None]
                    .into_iter()
                    .chain((0..4).map(Some))
                    .collect(),
            ],
        };
        let h = dec.forward_hidden(&t, &batch, None, Mode::Infer).unwrap();
        let got = dec.logits_at(&h, &[6, 6]).unwrap();
        let want_a = full_logits(&dec, &a, Mode::Infer).get(6).unwrap();
        let want_b = full_logits(&dec, &b, Mode::Infer).get(3).unwrap();
        assert!(max_diff(&got.get(0).unwrap(), &want_a) < 1e-4, "{arch:?}");
        assert!(max_diff(&got.get(1).unwrap(), &want_b) < 1e-4, "{arch:?}");
    }
}

#[test]
fn training_ops_equal_inference_ops() {
    for arch in ARCHS {
        let dec = adapted(arch, &qkvo());
        let seq = ids(9, 5);
        let d = max_diff(
            &full_logits(&dec, &seq, Mode::Infer),
            &full_logits(&dec, &seq, Mode::Train(&no_dropout())),
        );
        assert!(d < 1e-4, "{arch:?}: {d}");
    }
}

#[test]
fn lora_merged_equals_unmerged() {
    for arch in ARCHS {
        let mut dec = adapted(arch, &qkvo());
        let seq = ids(8, 6);
        let base = full_logits(&tiny(arch), &seq, Mode::Infer);
        let unmerged = full_logits(&dec, &seq, Mode::Infer);
        assert!(
            max_diff(&base, &unmerged) > 1e-3,
            "{arch:?}: the adapter changes nothing"
        );
        for l in dec.linears_mut() {
            l.merge().unwrap();
        }
        let merged = full_logits(&dec, &seq, Mode::Infer);
        assert!(max_diff(&merged, &unmerged) < 1e-4, "{arch:?}");
    }
}

#[test]
fn fresh_adapter_starts_at_the_base_model() {
    let mut dec = tiny(Architecture::Gemma3);
    let seq = ids(6, 1);
    let before = full_logits(&dec, &seq, Mode::Infer);
    assert_eq!(lora::init(&mut dec, &qkvo(), 1).unwrap(), 12);
    assert!(max_diff(&before, &full_logits(&dec, &seq, Mode::Infer)) < 1e-6);
}

#[test]
fn adapter_save_load_round_trip() {
    for arch in ARCHS {
        let mut cfg = qkvo();
        cfg.use_rslora = true;
        let dec = adapted(arch, &cfg);
        let dir = tempfile::tempdir().unwrap();
        lora::save(&dec, &cfg, dir.path()).unwrap();
        let loaded = Adapter::load(dir.path()).unwrap();
        assert_eq!(loaded.config, cfg);
        assert_eq!(loaded.weights.len(), 12);
        assert!(loaded
            .weights
            .contains_key("model.layers.0.self_attn.q_proj"));
        let mut fresh = tiny(arch);
        loaded.apply(&mut fresh, true).unwrap();
        let seq = ids(7, 9);
        let d = max_diff(
            &full_logits(&dec, &seq, Mode::Infer),
            &full_logits(&fresh, &seq, Mode::Infer),
        );
        assert!(d < 1e-4, "{arch:?}: {d}");
    }
}

#[test]
fn gradients_reach_only_lora_weights() {
    for arch in ARCHS {
        let dec = adapted(arch, &qkvo());
        let seq = ids(6, 8);
        let pass = no_dropout();
        let logits = full_logits(&dec, &seq, Mode::Train(&pass));
        let targets = Tensor::new(&ids(6, 9)[..], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let grads: GradStore = pass.backward(&loss).unwrap();
        let vars = lora::trainable_vars(&dec);
        assert_eq!(vars.len(), 24);
        for (i, v) in vars.iter().enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for var {i}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{arch:?}: zero gradient for var {i}");
        }
        // Frozen base weights get no gradient.
        for l in dec.linears() {
            assert!(
                grads.get(l.weight()).is_none(),
                "{arch:?}: {} has a gradient",
                l.name()
            );
        }
        assert!(grads.get(dec.embed_tokens()).is_none());
    }
}

/// Every projection's pair, `A` and `B`, in both architectures: one
/// coordinate's analytic derivative against the numerical one. Covers every
/// fused training node (projections with their adapters, norms, rotary,
/// attention) as the whole model chains them; with adapters on the
/// attention only, the first layer's pairs' gradients also pass through
/// frozen projections (the MLP's).
#[test]
fn gradients_match_finite_differences() {
    let all = LoraConfig::new(4, 8.0, 0.0, &common::PROJECTIONS);
    let runs = [(&all, "layers.1.", 14), (&qkvo(), "layers.0.", 8)];
    for (arch, (cfg, layer, pairs)) in ARCHS.into_iter().flat_map(|a| runs.map(|r| (a, r))) {
        let dec = adapted(arch, cfg);
        let seq = ids(7, 2);
        let targets = Tensor::new(&ids(7, 3)[..], &Device::Cpu).unwrap();
        let loss_of = |d: &Decoder, pass: &TrainPass| {
            let l = full_logits(d, &seq, Mode::Train(pass));
            candle_nn::loss::cross_entropy(&l, &targets).unwrap()
        };
        let pass = no_dropout();
        let grads = pass.backward(&loss_of(&dec, &pass)).unwrap();
        let mut checked = 0;
        for l in dec.linears().filter(|l| l.name().contains(layer)) {
            let Some(lora) = l.lora() else { continue };
            for (which, var) in [("A", lora.a()), ("B", lora.b())] {
                let k = 5;
                let analytic = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .get(k)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let orig = var.as_tensor().copy().unwrap();
                let eps = 1e-2f32;
                let bump = |delta: f32| {
                    let mut v = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&dec, &no_dropout()).to_scalar::<f32>().unwrap()
                };
                let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
                var.set(&orig).unwrap();
                assert!(
                    (numeric - analytic).abs() < 1e-2 * (1.0 + analytic.abs()),
                    "{arch:?} {} {which}: numeric {numeric} vs analytic {analytic}",
                    l.name()
                );
                checked += 1;
            }
        }
        assert_eq!(checked, pairs, "{arch:?}");
    }
}

fn save_with(dec: &Decoder, cfg: &LoraConfig) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    lora::save(dec, cfg, dir.path()).unwrap();
    dir
}

#[test]
fn adapter_for_another_shape_is_refused_naming_tensor_and_shapes() {
    let mut other_cfg = tiny_config(Architecture::Gemma3);
    other_cfg.hidden_size = 48;
    let mut other = random_decoder(&other_cfg, 1, &Device::Cpu);
    lora::init(&mut other, &qkvo(), 1).unwrap();
    let dir = save_with(&other, &qkvo());
    let err = Adapter::load(dir.path())
        .unwrap()
        .apply(&mut tiny(Architecture::Gemma3), true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shape mismatch at `model.layers.0.self_attn"),
        "{err}"
    );
    assert!(
        err.contains("[32, 32]") || err.contains("[16, 32]") || err.contains("[32,"),
        "{err}"
    );
    assert!(err.contains("48"), "{err}");
}

#[test]
fn adapter_whose_keys_match_no_module_is_refused() {
    let dec = adapted(Architecture::Gemma3, &qkvo());
    let dir = save_with(&dec, &qkvo());
    // Rename the keys to a multimodal prefix this text model does not have.
    let path = dir.path().join(lora::WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(
                    "base_model.model.model.",
                    "base_model.model.language_model.model.",
                ),
                v,
            )
        })
        .collect();
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let err = Adapter::load(dir.path())
        .unwrap()
        .apply(&mut tiny(Architecture::Gemma3), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("matches no module"), "{err}");
}

#[test]
fn dora_and_modules_to_save_are_refused() {
    let dec = adapted(Architecture::Llama, &qkvo());
    for (field, value, needle) in [
        ("use_dora", serde_json::json!(true), "DoRA"),
        (
            "modules_to_save",
            serde_json::json!(["lm_head"]),
            "modules_to_save",
        ),
    ] {
        let dir = save_with(&dec, &qkvo());
        let cfg_path = dir.path().join(lora::CONFIG_FILE);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        json[field] = value;
        std::fs::write(&cfg_path, json.to_string()).unwrap();
        let err = Adapter::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn rslora_scaling_is_alpha_over_sqrt_r() {
    let mut cfg = LoraConfig::new(16, 8.0, 0.0, &["q_proj"]);
    assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 16), 0.5);
    cfg.use_rslora = true;
    assert_eq!(cfg.scaling("model.layers.0.self_attn.q_proj", 16), 2.0);
}

#[test]
fn dropping_rows_from_a_cache_keeps_the_others_exact() {
    for arch in ARCHS {
        let dec = tiny(arch);
        let prompt: Vec<u32> = [ids(6, 1), ids(6, 2), ids(6, 3)].concat();
        let t = Tensor::from_vec(prompt, (3, 6), &Device::Cpu).unwrap();
        let mut cache = Cache::default();
        dec.forward_hidden(&t, &dense_batch(3, 0, 6), Some(&mut cache), Mode::Infer)
            .unwrap();
        let mut kept = cache.select(&[2, 0]).unwrap();
        // One more token for all three rows, and for the two kept ones.
        let all = Tensor::new(&[[5u32], [6], [7]], &Device::Cpu).unwrap();
        let h = dec
            .forward_hidden(&all, &dense_batch(3, 6, 1), Some(&mut cache), Mode::Infer)
            .unwrap();
        let want = dec.logits_at(&h, &[0, 0, 0]).unwrap();
        let two = Tensor::new(&[[7u32], [5]], &Device::Cpu).unwrap();
        let h = dec
            .forward_hidden(&two, &dense_batch(2, 6, 1), Some(&mut kept), Mode::Infer)
            .unwrap();
        let got = dec.logits_at(&h, &[0, 0]).unwrap();
        assert!(
            max_diff(&got.get(0).unwrap(), &want.get(2).unwrap()) < 1e-5,
            "{arch:?}"
        );
        assert!(
            max_diff(&got.get(1).unwrap(), &want.get(0).unwrap()) < 1e-5,
            "{arch:?}"
        );
    }
}

/// Regression: a training step of a few rows on a decoder with CPU Q8_0
/// copies took the output head's copy, which has no backward pass, and no
/// LoRA variable got a gradient. Its gradients must be those without copies.
#[test]
fn cpu_q8_copies_leave_the_gradients_of_a_short_training_step_alone() {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"];
    for arch in ARCHS {
        let plain = adapted(arch, &LoraConfig::new(4, 8.0, 0.0, &targets));
        let mut quantized = plain.clone();
        quantized.set_cpu_quantized(true).unwrap();
        assert!(quantized.is_cpu_quantized());
        // Three positions: within both bounds (`Q8_HEAD_MAX_ROWS` is 4).
        let seq = ids(3, 2);
        let grads = |dec: &Decoder| -> GradStore {
            let pass = no_dropout();
            let logits = full_logits(dec, &seq, Mode::Train(&pass));
            let targets = Tensor::new(&ids(3, 5)[..], &Device::Cpu).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
            pass.backward(&loss).unwrap()
        };
        let (want, got) = (grads(&plain), grads(&quantized));
        // The clone shares the variables, so both stores key on the same ones.
        for (i, v) in lora::trainable_vars(&plain).iter().enumerate() {
            let w = want.get(v.as_tensor()).unwrap();
            let g = got
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for var {i}"));
            assert!(max_abs(w) > 0.0, "{arch:?}: var {i}");
            assert!(max_diff(g, w) < 1e-6 * max_abs(w), "{arch:?}: var {i}");
        }
    }
}

/// Logits of `seq[start..]` decoded one token per step after a cached prefill
/// of `seq[..start]`.
fn stepwise_logits(dec: &Decoder, seq: &[u32], start: usize) -> Vec<Tensor> {
    let mut cache = Cache::default();
    let head = Tensor::new(&seq[..start], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    dec.forward_hidden(
        &head,
        &dense_batch(1, 0, start),
        Some(&mut cache),
        Mode::Infer,
    )
    .unwrap();
    (start..seq.len())
        .map(|i| {
            let t = Tensor::new(&[[seq[i]]], &Device::Cpu).unwrap();
            let b = Batch {
                rows: vec![vec![Some(i as u32)]],
            };
            let h = dec
                .forward_hidden(&t, &b, Some(&mut cache), Mode::Infer)
                .unwrap();
            dec.logits_at(&h, &[0]).unwrap().squeeze(0).unwrap()
        })
        .collect()
}

#[test]
fn cpu_q8_copies_stay_close_to_f32_and_follow_the_adapter() {
    let seq = ids(12, 4);
    // Largest difference of single-token steps from an f32 decoder's full
    // recomputation, relative to the largest logit.
    let rel_diff = |quantized: &Decoder, reference: &Decoder| -> f32 {
        let full = full_logits(reference, &seq, Mode::Infer);
        let scale = max_abs(&full);
        stepwise_logits(quantized, &seq, 6)
            .iter()
            .enumerate()
            .map(|(k, step)| max_diff(step, &full.get(6 + k).unwrap()) / scale)
            .fold(0.0, f32::max)
    };
    for arch in ARCHS {
        let mut dec = adapted(arch, &qkvo());
        let unmerged = dec.clone();
        dec.set_cpu_quantized(true).unwrap();
        // The projections that have copies, by kind.
        let names = |d: &Decoder| -> BTreeSet<String> {
            d.linears()
                .filter(|l| l.is_quantized())
                .map(|l| l.name().rsplit('.').next().unwrap().to_string())
                .collect()
        };
        // 32 input features are whole Q8_0 blocks, the MLP's 48 are not
        // (down_proj stays f32); an unmerged pair is a trainable one, and
        // its projection keeps the f32 weights too.
        assert_eq!(
            names(&dec),
            BTreeSet::from(["gate_proj".into(), "up_proj".into()])
        );

        let d = rel_diff(&dec, &unmerged);
        assert!(d > 1e-6 && d < 0.03, "{arch:?}: unmerged adapter, {d}");

        // Merging makes the copies from the merged weights.
        let mut merged = unmerged.clone();
        for l in dec.linears_mut().chain(merged.linears_mut()) {
            l.merge().unwrap();
        }
        let quantized = names(&dec);
        assert!(quantized.contains("q_proj"), "{quantized:?}");
        assert!(!quantized.contains("down_proj"), "{quantized:?}");
        let d = rel_diff(&dec, &merged);
        assert!(d > 1e-6 && d < 0.03, "{arch:?}: merged adapter, {d}");
        // Merged weights are detached from the pair's variables, so the
        // router's hidden states carry no backward graph, which would keep
        // its steps off the copies (they have no backward pass).
        let t = Tensor::new(&[[seq[0]]], &Device::Cpu).unwrap();
        let h = dec
            .forward_hidden(&t, &dense_batch(1, 0, 1), None, Mode::Infer)
            .unwrap();
        assert!(!h.track_op(), "{arch:?}");

        // Without the adapter the copies hold the base weights again.
        dec.clear_adapter().unwrap();
        let d = rel_diff(&dec, &tiny(arch));
        assert!(d > 1e-6 && d < 0.03, "{arch:?}: bare base, {d}");

        // Off: exactly the f32 path.
        dec.set_cpu_quantized(false).unwrap();
        assert!(names(&dec).is_empty());
        assert!(rel_diff(&dec, &tiny(arch)) < 1e-5, "{arch:?}");
    }
}

#[test]
fn fused_kernels_stay_off_on_the_cpu() {
    // The fused kernels are CUDA code (tests/fused_cuda.rs checks them on a
    // GPU); asking for them on the CPU leaves candle's kernels in place.
    let mut dec = tiny(Architecture::Gemma3);
    assert!(!dec.set_fused_kernels(true));
    assert!(!dec.fused_kernels());
    let seq = ids(6, 1);
    let a = full_logits(&dec, &seq, Mode::Infer);
    let b = full_logits(&tiny(Architecture::Gemma3), &seq, Mode::Infer);
    assert_eq!(common::max_diff(&a, &b), 0.0);
}
