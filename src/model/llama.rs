//! Llama-3.x decoder (the original project's Llama-3.1-8B path), built from
//! Hugging Face-named weights: RmsNorm multiplies by `w`, SwiGLU MLP,
//! grouped-query attention, Llama-3 RoPE scaling, optional tied head.

use candle_core::DType;
use candle_nn::VarBuilder;

use super::transformer::{linear, Activation, Attention, Decoder, Layer, Mlp, RmsNorm, Rotary};
use super::ModelConfig;

fn norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<RmsNorm> {
    Ok(RmsNorm {
        alpha: vb.to_dtype(DType::F32).get(size, "weight")?,
        eps,
    })
}

/// Builds the decoder; `vb` points at the checkpoint root.
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
            attn_out_norm: None,
            // Llama names its pre-MLP norm `post_attention_layernorm`.
            mlp_norm: norm(&l.pp("post_attention_layernorm"), h, eps)?,
            mlp_out_norm: None,
            attn: Attention {
                q_proj: linear(&a.pp("q_proj"), nh * hd, h)?,
                k_proj: linear(&a.pp("k_proj"), nkv * hd, h)?,
                v_proj: linear(&a.pp("v_proj"), nkv * hd, h)?,
                o_proj: linear(&a.pp("o_proj"), h, nh * hd)?,
                q_norm: None,
                k_norm: None,
            },
            mlp: Mlp {
                gate_proj: linear(&f.pp("gate_proj"), ff, h)?,
                up_proj: linear(&f.pp("up_proj"), ff, h)?,
                down_proj: linear(&f.pp("down_proj"), h, ff)?,
            },
            sliding: false,
        });
    }
    let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
        None
    } else {
        Some(vb.get((cfg.vocab_size, h), "lm_head.weight")?)
    };
    let rotary = Rotary::new(hd, cfg.rope_theta, &cfg.rope_scaling, &dev)?;
    Ok(Decoder {
        cfg: cfg.clone(),
        embed_tokens,
        embed_scale: None,
        layers,
        norm: norm(&m.pp("norm"), h, eps)?,
        lm_head,
        activation: Activation::Silu,
        rotary_global: rotary.clone(),
        rotary_local: rotary,
        dtype,
        device: dev,
    })
}
