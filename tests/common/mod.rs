//! Helpers shared by integration tests: the one home of test-only code
//! (toy tokenizer, tiny configurations, random weights), kept out of the
//! library's public API.
#![allow(dead_code)]

use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use router::model::{
    build_decoder, compute_dtype, dense_batch, Architecture, Cache, Decoder, Mode, ModelConfig,
    RopeScaling,
};
use router::rng::SplitMix64;
use router::tokenizer::Tokenizer;

/// A toy Gemma-style SentencePiece vocabulary that fits the tiny fixture
/// models' 97-row embedding: control tokens, ASCII letters, digits, the
/// call syntax's punctuation and a few merges.
pub fn toy_tokenizer() -> Tokenizer {
    let mut pieces: Vec<(String, f32, i32)> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|p| (p.to_string(), 0.0, if *p == "<unk>" { 2 } else { 3 }))
    .collect();
    pieces.push(("\n".into(), 0.0, 4));
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789▁\"(){}:,_.!?'";
    for (i, c) in chars.chars().enumerate() {
        pieces.push((c.to_string(), -(i as f32) - 100.0, 1));
    }
    for (i, p) in [
        "ca", "ll", "call", "ge", "im", "age", "▁a", "▁c", "▁d", "ra", "▁dra", "aw", "▁draw", "at",
        "▁cat", "pt", "om", "pr", "er", "at",
    ]
    .iter()
    .enumerate()
    {
        if !pieces.iter().any(|x| x.0 == *p) {
            pieces.push((p.to_string(), -(i as f32), 1));
        }
    }
    assert!(pieces.len() <= 97, "{} pieces", pieces.len());
    let tokens: Vec<String> = pieces.iter().map(|p| p.0.clone()).collect();
    let scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
    let types: Vec<i32> = pieces.iter().map(|p| p.2).collect();
    Tokenizer::from_sentencepiece(&tokens, &scores, &types, "<unk>", false, Some(2), Some(1))
        .unwrap()
}

/// The tiny Gemma-3 fixture is a complete Hugging Face directory once it has
/// a tokenizer.json; it is committed, and this keeps it in step with
/// [`toy_tokenizer`] (`UPDATE_FIXTURES=1` rewrites it).
pub fn tiny_gemma3_dir() -> &'static Path {
    let dir = Path::new("tests/fixtures/tiny_gemma3");
    let path = dir.join("tokenizer.json");
    if std::env::var_os("UPDATE_FIXTURES").is_some() {
        toy_tokenizer().save(&path).unwrap();
    }
    let committed =
        Tokenizer::from_file(&path).expect("tokenizer.json fixture (UPDATE_FIXTURES=1 writes it)");
    let probe = "draw a cat call(\"generate_image\", {\"prompt\": \"x\"})";
    assert_eq!(
        committed.encode(probe).unwrap(),
        toy_tokenizer().encode(probe).unwrap()
    );
    dir
}

/// A small random-weight-friendly configuration: 3 layers (Gemma: sliding,
/// global, sliding with a window of 4), GQA 4:2, a 97-row vocabulary.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    let gemma = architecture == Architecture::Gemma3;
    ModelConfig {
        architecture,
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: if gemma { 1_000_000.0 } else { 500_000.0 },
        rope_local_base_freq: 10_000.0,
        rope_scaling: if gemma {
            RopeScaling::None
        } else {
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16,
            }
        },
        sliding_window: gemma.then_some(4),
        sliding_layers: if gemma {
            vec![true, false, true]
        } else {
            vec![false; 3]
        },
        query_pre_attn_scalar: 8.0,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        tie_word_embeddings: gemma,
        max_position_embeddings: 256,
    }
}

/// Deterministic pseudo-random weights, served by name so that any
/// architecture's builder can use them.
pub struct RandomWeights {
    pub seed: u64,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut h = self.seed ^ 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut rng = SplitMix64(h);
        let n = s.elem_count();
        let fan_in = *s.dims().last().unwrap_or(&1) as f64;
        let std = if s.rank() == 1 {
            0.1
        } else {
            1.0 / fan_in.sqrt()
        };
        let data: Vec<f32> = (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * std * 1.7) as f32)
            .collect();
        Tensor::from_vec(data, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A random-weight decoder for `cfg` in the device's compute dtype.
pub fn random_decoder(cfg: &ModelConfig, seed: u64, device: &Device) -> Decoder {
    random_decoder_in(cfg, seed, device, compute_dtype(device))
}

/// A random-weight decoder for `cfg` in `dtype`.
pub fn random_decoder_in(cfg: &ModelConfig, seed: u64, device: &Device, dtype: DType) -> Decoder {
    let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights { seed });
    build_decoder(
        cfg,
        VarBuilder::from_backend(backend, dtype, device.clone()),
    )
    .unwrap()
}

/// The keys and values of a shared prompt prefix of `len` tokens (ids
/// `(31·i + 5) mod vocab`), read by the growing path for one row on the
/// decoder's device, as the router caches its system prompt.
pub fn prefix_cache(dec: &Decoder, len: usize) -> Cache {
    let vocab = dec.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 31 + 5) % vocab).collect();
    let t = Tensor::from_vec(ids, (1, len), &dec.device).unwrap();
    let mut cache = Cache::default();
    dec.forward_hidden(&t, &dense_batch(1, 0, len), Some(&mut cache), Mode::Infer)
        .unwrap();
    cache
}

/// Largest absolute element-wise difference of two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Largest absolute element of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every projection a LoRA adapter can target, by module name.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Gives every attached LoRA pair of `dec` a random non-zero `B`, uniform
/// in `±amplitude / 2` (a fresh adapter's `B` is zero, which would hide
/// bugs), in the pair's dtype and device.
pub fn randomize_lora_b(dec: &Decoder, seed: u64, amplitude: f32) {
    let mut rng = SplitMix64(seed);
    for l in dec.linears() {
        if let Some(pair) = l.lora() {
            let b = pair.b().as_tensor();
            let (o, r) = b.dims2().unwrap();
            let v: Vec<f32> = (0..o * r)
                .map(|_| (rng.next_f64() as f32 - 0.5) * amplitude)
                .collect();
            let v = Tensor::from_vec(v, (o, r), &Device::Cpu)
                .and_then(|t| t.to_dtype(b.dtype()))
                .and_then(|t| t.to_device(b.device()))
                .unwrap();
            pair.b().set(&v).unwrap();
        }
    }
}
