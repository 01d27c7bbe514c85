//! What one decoder family is: the description every architecture file
//! (`gemma3.rs`, `llama.rs`) fills in once, and that the shared decoder, the
//! `config.json` reader and the GGUF reader consult instead of asking "is
//! this Gemma?" themselves.

use candle_core::Tensor;

/// Feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh` (Gemma).
    GeluTanh,
    /// SiLU (Llama).
    Silu,
}

/// Reads an unsigned GGUF metadata value by its key without the
/// architecture prefix (`attention.head_count`).
pub type GgufMetadata<'a> = &'a dyn Fn(&str) -> Option<usize>;

/// Everything that distinguishes one architecture's checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    // ---- names
    /// `model_type` values in `config.json`; the first is also GGUF's
    /// `general.architecture` and the prefix of its metadata keys.
    pub names: &'static [&'static str],
    /// Prefix of the `architectures` class names in `config.json`
    /// (`Gemma3ForCausalLM`), for configs without `model_type`.
    pub class_prefix: &'static str,

    // ---- layout
    /// Norm weights are stored as `w` with effective multiplier `1 + w`.
    pub norm_plus_one: bool,
    /// Per-head RmsNorm on q and k (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// Checkpoint name of the norm before the MLP.
    pub mlp_norm: &'static str,
    /// Checkpoint names of the norms on the attention and MLP outputs.
    pub attn_out_norm: Option<&'static str>,
    pub mlp_out_norm: Option<&'static str>,
    pub activation: Activation,
    /// The `hidden_act` / `hidden_activation` name of [`Family::activation`].
    pub activation_name: &'static str,
    /// Embeddings are multiplied by `sqrt(hidden_size)`.
    pub embed_scale: bool,
    /// Sliding layers use `rope_local_base_freq` without scaling.
    pub local_rope: bool,

    // ---- defaults where the checkpoint is silent
    pub rms_norm_eps: f64,
    /// Rotary base of global layers.
    pub rope_theta: f64,
    /// Rotary base of sliding layers (families with sliding layers only).
    pub rope_local_base_freq: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Every n-th layer is global, the others slide; `None`: the family has
    /// no sliding-window layers (a `sliding_window` value is ignored).
    pub sliding_window_pattern: Option<usize>,

    // ---- GGUF (llama.cpp's `convert_hf_to_gguf.py`)
    /// GGUF names of the per-layer norms (`input_layernorm` -> `attn_norm`),
    /// the part of the name map that differs between families.
    pub gguf_norms: &'static [(&'static str, &'static str)],
    /// Undoes what the converter did to one tensor, named in Hugging Face
    /// naming (`model.layers.0.self_attn.q_proj.weight`); f32 in and out.
    pub from_gguf: fn(hf: &str, t: Tensor, md: GgufMetadata) -> candle_core::Result<Tensor>,
}

impl Family {
    /// The name GGUF files use for this family.
    pub fn gguf_name(&self) -> &'static str {
        self.names[0]
    }

    /// Per layer: true when it uses the sliding window (every
    /// `pattern`-th layer is global).
    pub fn sliding_layers(layers: usize, pattern: usize) -> Vec<bool> {
        let pattern = pattern.max(1);
        (0..layers).map(|i| (i + 1) % pattern != 0).collect()
    }
}
