//! Gemma-3 text decoder (270M, 1B and the text tower of larger models).
//!
//! Conventions checked against transformers' `modeling_gemma3.py`: RmsNorm
//! multiplies by `1 + w` in f32; GELU is the tanh approximation; embeddings
//! are scaled by `sqrt(hidden_size)` rounded to the compute dtype; q and k
//! are normalised per head before RoPE; attention and MLP outputs are
//! normalised again before their residual adds; every sixth layer (by
//! default) is global, the others use a sliding window and the local RoPE
//! base; the output head is tied to the embeddings.
//!
//! Defaults fill what checkpoints leave out: the 270M `config.json` lacks
//! `sliding_window_pattern` (candle #3060), and GGUF has no key for it nor
//! for the local RoPE base (llama.cpp hard-codes both).
//!
//! GGUF: llama.cpp's converter stores every norm weight as `w + 1` (the
//! effective multiplier); [`from_gguf`] subtracts 1 to get back to the
//! Hugging Face weight. q/k are not permuted for Gemma.

use candle_core::Tensor;

use super::family::{Activation, Family, GgufMetadata};

pub const FAMILY: Family = Family {
    names: &["gemma3", "gemma3_text"],
    class_prefix: "Gemma3",
    norm_plus_one: true,
    qk_norm: true,
    mlp_norm: "pre_feedforward_layernorm",
    attn_out_norm: Some("post_attention_layernorm"),
    mlp_out_norm: Some("post_feedforward_layernorm"),
    activation: Activation::GeluTanh,
    activation_name: "gelu_pytorch_tanh",
    embed_scale: true,
    local_rope: true,
    rms_norm_eps: 1e-6,
    rope_theta: 1_000_000.0,
    rope_local_base_freq: 10_000.0,
    tie_word_embeddings: true,
    max_position_embeddings: 32_768,
    sliding_window_pattern: Some(6),
    gguf_norms: &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ],
    from_gguf,
};

/// Norm weights come back from `w + 1` to `w`; everything else is as stored.
fn from_gguf(hf: &str, t: Tensor, _: GgufMetadata) -> candle_core::Result<Tensor> {
    if hf.ends_with("norm.weight") {
        t - 1.0
    } else {
        Ok(t)
    }
}
