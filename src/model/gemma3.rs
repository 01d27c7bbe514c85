//! Gemma-3 text decoder (270M, 1B and the text tower of larger models).
//!
//! Conventions checked against transformers' `modeling_gemma3.py`: RmsNorm
//! multiplies by `1 + w` in f32; GELU is the tanh approximation; embeddings
//! are scaled by `sqrt(hidden_size)` rounded to the compute dtype; q and k
//! are normalised per head before RoPE; attention and MLP outputs are
//! normalised again before their residual adds; every sixth layer (by
//! default) is global, the others use a sliding window and the local RoPE
//! base; the output head is tied to the embeddings.

use super::transformer::{Activation, Family};

pub const FAMILY: Family = Family {
    norm_plus_one: true,
    qk_norm: true,
    mlp_norm: "pre_feedforward_layernorm",
    attn_out_norm: Some("post_attention_layernorm"),
    mlp_out_norm: Some("post_feedforward_layernorm"),
    activation: Activation::GeluTanh,
    embed_scale: true,
    local_rope: true,
};
