//! Llama-3.x decoder (the original project's Llama-3.1-8B path): RmsNorm
//! multiplies by `w`, SwiGLU MLP, grouped-query attention, Llama-3 RoPE
//! scaling, optional tied head. Llama names its pre-MLP norm
//! `post_attention_layernorm`.

use super::transformer::{Activation, Family};

pub const FAMILY: Family = Family {
    norm_plus_one: false,
    qk_norm: false,
    mlp_norm: "post_attention_layernorm",
    attn_out_norm: None,
    mlp_out_norm: None,
    activation: Activation::Silu,
    embed_scale: false,
    local_rope: false,
};
