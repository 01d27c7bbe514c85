//! What the profiling examples share: random-weight Gemma-3 shapes (no
//! files needed), their arguments and a synchronised timer.
#![allow(dead_code)]

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use router::model::{Architecture, Decoder, ModelConfig, RopeScaling};

/// Random weights for any requested tensor (the output head stays tied).
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        name != "lm_head.weight"
    }
}

/// Gemma-3 text configurations by size (values of the published configs;
/// `tiny` keeps their structure at a size any CPU runs in a moment).
pub fn gemma3_shape(name: &str) -> anyhow::Result<ModelConfig> {
    let (hidden, intermediate, layers) = match name {
        "270m" => (640, 2048, 18),
        "1b" => (1152, 6912, 26),
        "tiny" => (64, 128, 6),
        other => anyhow::bail!("unknown shape `{other}` (270m, 1b or tiny)"),
    };
    Ok(ModelConfig {
        architecture: Architecture::Gemma3,
        vocab_size: if name == "tiny" { 1_024 } else { 262_144 },
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: if name == "tiny" { 16 } else { 256 },
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_local_base_freq: 10_000.0,
        rope_scaling: RopeScaling::None,
        sliding_window: Some(512),
        sliding_layers: (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
        query_pre_attn_scalar: 256.0,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        tie_word_embeddings: true,
        max_position_embeddings: 32_768,
    })
}

pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Runs `f` `reps` times after one warm-up, synchronising, and returns ms per run.
pub fn timed(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    f()?;
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3 / reps as f64)
}

pub fn ids(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(300).max(1);
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729) % span + 300) as u32)
        .collect()
}

/// A decoder of the Gemma-3 shape `name` with random weights, in the
/// device's compute dtype.
pub fn random_decoder(name: &str, device: &Device) -> anyhow::Result<Decoder> {
    let cfg = gemma3_shape(name)?;
    let dtype = router::model::compute_dtype(device);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    Ok(Decoder::new(&cfg, vb)?)
}
