//! Llama-3.x decoder (the original project's Llama-3.1-8B path): RmsNorm
//! multiplies by `w`, SwiGLU MLP, grouped-query attention, Llama-3 RoPE
//! scaling, optional tied head. Llama names its pre-MLP norm
//! `post_attention_layernorm`.
//!
//! GGUF: llama.cpp's converter permutes the rows of q and k for its
//! interleaved RoPE; [`from_gguf`] inverts that with the head counts from
//! the file's metadata. Norms are stored as they are.

use candle_core::Tensor;

use super::family::{Activation, Family, GgufMetadata};

pub const FAMILY: Family = Family {
    names: &["llama"],
    class_prefix: "Llama",
    norm_plus_one: false,
    qk_norm: false,
    mlp_norm: "post_attention_layernorm",
    attn_out_norm: None,
    mlp_out_norm: None,
    activation: Activation::Silu,
    activation_name: "silu",
    embed_scale: false,
    local_rope: false,
    rms_norm_eps: 1e-6,
    rope_theta: 10_000.0,
    rope_local_base_freq: 10_000.0,
    tie_word_embeddings: false,
    max_position_embeddings: 32_768,
    sliding_window_pattern: None,
    gguf_norms: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ],
    from_gguf,
};

/// Un-permutes q and k; only the head counts are read, not the whole config.
fn from_gguf(hf: &str, t: Tensor, md: GgufMetadata) -> candle_core::Result<Tensor> {
    let q = hf.ends_with("q_proj.weight");
    if !q && !hf.ends_with("k_proj.weight") {
        return Ok(t);
    }
    let heads = md("attention.head_count");
    let heads = if q {
        heads
    } else {
        md("attention.head_count_kv").or(heads)
    };
    let Some(heads) = heads else {
        candle_core::bail!("GGUF lacks llama.attention.head_count");
    };
    unpermute_qk(&t, heads)
}

/// Inverts llama.cpp's q/k row permutation: it stored
/// `w.reshape(h, 2, d/2, in).swapaxes(1, 2)`; undo with the same reshape
/// read the other way round.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    w.reshape((heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn unpermute_inverts_the_llama_cpp_permutation() -> candle_core::Result<()> {
        let (heads, d, inp) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * d * inp) as f32, &Device::Cpu)?
            .reshape((heads * d, inp))?;
        // llama.cpp's permute: reshape(h, 2, d/2, in).swapaxes(1, 2).
        let permuted = w
            .reshape((heads, 2, d / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * d, inp))?;
        let back = unpermute_qk(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
