//! Gemma-3 text decoder (270M, 1B and the text tower of larger models),
//! built from Hugging Face-named weights.
//!
//! Conventions checked against transformers' `modeling_gemma3.py`: RmsNorm
//! multiplies by `1 + w` in f32; GELU is the tanh approximation; embeddings
//! are scaled by `sqrt(hidden_size)` rounded to the compute dtype; q and k
//! are normalised per head before RoPE; every sixth layer (by default) is
//! global, the others use a sliding window and the local RoPE base; the
//! output head is tied to the embeddings.

use candle_core::DType;
use candle_nn::VarBuilder;

use super::transformer::{linear, Activation, Attention, Decoder, Layer, Mlp, RmsNorm, Rotary};
use super::ModelConfig;

/// Gemma's norm: `x̂ * (1 + w)`, the `1 +` folded into the stored multiplier.
fn norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<RmsNorm> {
    let w = vb.to_dtype(DType::F32).get(size, "weight")?;
    Ok(RmsNorm {
        alpha: (w + 1.0)?,
        eps,
    })
}

/// Builds the decoder; `vb` points at the checkpoint root (its `model.` and
/// `lm_head.` children).
pub fn build(cfg: &ModelConfig, vb: VarBuilder) -> candle_core::Result<Decoder> {
    let dev = vb.device().clone();
    let dtype = vb.dtype();
    let m = vb.pp("model");
    let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
    let (nh, nkv, ff) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    let embed_tokens = m.get((cfg.vocab_size, h), "embed_tokens.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let l = m.pp(format!("layers.{i}"));
        let a = l.pp("self_attn");
        let f = l.pp("mlp");
        layers.push(Layer {
            attn_norm: norm(&l.pp("input_layernorm"), h, eps)?,
            attn_out_norm: Some(norm(&l.pp("post_attention_layernorm"), h, eps)?),
            mlp_norm: norm(&l.pp("pre_feedforward_layernorm"), h, eps)?,
            mlp_out_norm: Some(norm(&l.pp("post_feedforward_layernorm"), h, eps)?),
            attn: Attention {
                q_proj: linear(&a.pp("q_proj"), nh * hd, h)?,
                k_proj: linear(&a.pp("k_proj"), nkv * hd, h)?,
                v_proj: linear(&a.pp("v_proj"), nkv * hd, h)?,
                o_proj: linear(&a.pp("o_proj"), h, nh * hd)?,
                q_norm: Some(norm(&a.pp("q_norm"), hd, eps)?),
                k_norm: Some(norm(&a.pp("k_norm"), hd, eps)?),
            },
            mlp: Mlp {
                gate_proj: linear(&f.pp("gate_proj"), ff, h)?,
                up_proj: linear(&f.pp("up_proj"), ff, h)?,
                down_proj: linear(&f.pp("down_proj"), h, ff)?,
            },
            sliding: cfg.sliding_layers.get(i).copied().unwrap_or(false),
        });
    }
    let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
        None
    } else {
        Some(vb.get((cfg.vocab_size, h), "lm_head.weight")?)
    };
    Ok(Decoder {
        cfg: cfg.clone(),
        embed_tokens,
        embed_scale: Some((h as f64).sqrt()),
        layers,
        norm: norm(&m.pp("norm"), h, eps)?,
        lm_head,
        activation: Activation::GeluTanh,
        rotary_global: Rotary::new(hd, cfg.rope_theta, &cfg.rope_scaling, &dev)?,
        rotary_local: Rotary::new(
            hd,
            cfg.rope_local_base_freq,
            &super::RopeScaling::None,
            &dev,
        )?,
        dtype,
        device: dev,
    })
}
