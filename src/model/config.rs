//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF
//! metadata, normalised into one [`ModelConfig`] that both architectures use.
//! What a checkpoint leaves out is filled from its [`Family`]'s defaults.

use std::path::Path;

use serde::Deserialize;

use super::family::Family;
use super::{gemma3, llama};
use crate::{Error, Result};

/// The decoder families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Gemma-3 text models (270M, 1B, and the text tower of 4B+).
    Gemma3,
    /// Llama-3.x (and Llama-2 style checkpoints sharing the layout).
    Llama,
}

impl Architecture {
    pub const ALL: [Architecture; 2] = [Architecture::Gemma3, Architecture::Llama];

    /// What the architecture file says about this family.
    pub fn family(self) -> &'static Family {
        match self {
            Architecture::Gemma3 => &gemma3::FAMILY,
            Architecture::Llama => &llama::FAMILY,
        }
    }

    /// From a name in `config.json` (`model_type`) or GGUF (`general.architecture`).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.family().names.contains(&name))
            .ok_or_else(|| Error::UnsupportedArchitecture {
                found: name.to_string(),
                supported: Self::ALL
                    .iter()
                    .flat_map(|a| a.family().names)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (Gemma-3 4B+ global layers).
    Linear {
        factor: f64,
    },
    /// Llama-3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Everything the model code needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Rotary base of global (full-attention) layers.
    pub rope_theta: f64,
    /// Rotary base of sliding-window layers (Gemma-3 only).
    pub rope_local_base_freq: f64,
    pub rope_scaling: RopeScaling,
    /// Attention window of sliding layers; `None` means every layer is global.
    pub sliding_window: Option<usize>,
    /// Per layer: true when the layer uses the sliding window.
    pub sliding_layers: Vec<bool>,
    /// Attention scores are multiplied by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Deserialize)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// The subset of `config.json` fields that matter, all optional so that the
/// defaults of each architecture can fill the gaps (the 270M config, for
/// instance, lacks `sliding_window_pattern`).
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    text_config: Option<Box<RawConfig>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    /// transformers v5 replaces `rope_theta`/`rope_scaling` with this: one
    /// set of parameters, or one per layer type (Gemma-3).
    rope_parameters: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
}

fn missing(path: &Path, field: &'static str) -> Error {
    Error::MissingKey {
        path: path.to_path_buf(),
        key: field.to_string(),
    }
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            line: None,
            message: e.to_string(),
        })?;
        // Multimodal Gemma-3 (4B+) nests the text model's config.
        let outer_type = raw.model_type.clone();
        let mut raw = match raw.text_config {
            Some(text) => *text,
            None => raw,
        };
        if let Some(params) = raw.rope_parameters.take() {
            let parse = |v: &serde_json::Value| {
                serde_json::from_value::<RawRopeScaling>(v.clone()).map_err(|e| Error::Json {
                    path: path.to_path_buf(),
                    line: None,
                    message: format!("rope_parameters: {e}"),
                })
            };
            let (global, local) = match (
                params.get("full_attention"),
                params.get("sliding_attention"),
            ) {
                (Some(g), l) => (parse(g)?, l.map(parse).transpose()?),
                (None, _) => (parse(&params)?, None),
            };
            if let Some(theta) = local.as_ref().and_then(|l| l.rope_theta) {
                raw.rope_local_base_freq = Some(theta);
            }
            if let Some(theta) = global.rope_theta {
                raw.rope_theta = Some(theta);
            }
            raw.rope_scaling = Some(global);
        }
        let model_type = raw
            .model_type
            .clone()
            .or(outer_type)
            .or_else(|| {
                raw.architectures.as_ref().and_then(|a| a.first()).map(|a| {
                    Architecture::ALL
                        .iter()
                        .map(|arch| arch.family())
                        .find(|f| a.starts_with(f.class_prefix))
                        .map_or_else(|| a.clone(), |f| f.gguf_name().to_string())
                })
            })
            .ok_or_else(|| missing(path, "model_type"))?;
        let architecture = Architecture::from_name(&model_type)?;
        let family = architecture.family();

        for act in [&raw.hidden_activation, &raw.hidden_act]
            .into_iter()
            .flatten()
        {
            if act != family.activation_name {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    setting: "activation",
                    value: act.clone(),
                    supported: family.activation_name.to_string(),
                });
            }
        }

        let hidden_size = raw
            .hidden_size
            .ok_or_else(|| missing(path, "hidden_size"))?;
        let num_attention_heads = raw
            .num_attention_heads
            .ok_or_else(|| missing(path, "num_attention_heads"))?;
        let num_hidden_layers = raw
            .num_hidden_layers
            .ok_or_else(|| missing(path, "num_hidden_layers"))?;
        let head_dim = raw
            .head_dim
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let sliding_window = family.sliding_window_pattern.and(raw.sliding_window);
        let sliding_layers = match (
            &raw.layer_types,
            sliding_window,
            family.sliding_window_pattern,
        ) {
            (Some(types), Some(_), _) => types.iter().map(|t| t == "sliding_attention").collect(),
            (None, Some(_), Some(pattern)) => Family::sliding_layers(
                num_hidden_layers,
                raw.sliding_window_pattern.unwrap_or(pattern),
            ),
            _ => vec![false; num_hidden_layers],
        };
        if sliding_layers.len() != num_hidden_layers {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                message: format!(
                    "layer_types has {} entries for {num_hidden_layers} layers",
                    sliding_layers.len()
                ),
            });
        }
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref() {
                Some("linear") => RopeScaling::Linear {
                    factor: s.factor.unwrap_or(1.0),
                },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                Some("default") | None => RopeScaling::None,
                Some(other) => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        setting: "rope_scaling type",
                        value: other.to_string(),
                        supported: "default, linear, llama3".to_string(),
                    })
                }
            },
        };
        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size.ok_or_else(|| missing(path, "vocab_size"))?,
            hidden_size,
            intermediate_size: raw
                .intermediate_size
                .ok_or_else(|| missing(path, "intermediate_size"))?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(family.rms_norm_eps),
            rope_theta: raw.rope_theta.unwrap_or(family.rope_theta),
            rope_local_base_freq: raw
                .rope_local_base_freq
                .unwrap_or(family.rope_local_base_freq),
            rope_scaling,
            sliding_window,
            sliding_layers,
            query_pre_attn_scalar: raw.query_pre_attn_scalar.unwrap_or(head_dim as f64),
            attn_logit_softcapping: raw.attn_logit_softcapping,
            final_logit_softcapping: raw.final_logit_softcapping,
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(family.tie_word_embeddings),
            max_position_embeddings: raw
                .max_position_embeddings
                .unwrap_or(family.max_position_embeddings),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_270m_config_defaults_the_missing_pattern() {
        let json = r#"{"architectures":["Gemma3ForCausalLM"],"model_type":"gemma3_text",
            "hidden_size":640,"intermediate_size":2048,"num_hidden_layers":18,
            "num_attention_heads":4,"num_key_value_heads":1,"head_dim":256,
            "vocab_size":262144,"sliding_window":512,"rope_theta":1000000.0,
            "rope_local_base_freq":10000.0,"query_pre_attn_scalar":256,
            "hidden_activation":"gelu_pytorch_tanh","rms_norm_eps":1e-6}"#;
        let cfg = ModelConfig::from_hf_json(Path::new("config.json"), json).unwrap();
        assert_eq!(cfg.architecture, Architecture::Gemma3);
        assert_eq!(cfg.sliding_layers.iter().filter(|s| !**s).count(), 3);
        assert!(!cfg.sliding_layers[5] && cfg.sliding_layers[4]);
        assert!(cfg.tie_word_embeddings);
    }

    #[test]
    fn unknown_architecture_lists_the_supported_ones() {
        let json = r#"{"model_type":"mistral","hidden_size":8,"num_attention_heads":1,"num_hidden_layers":1}"#;
        let err = ModelConfig::from_hf_json(Path::new("c.json"), json).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("mistral") && msg.contains("gemma3") && msg.contains("llama"),
            "{msg}"
        );
    }

    #[test]
    fn llama3_rope_scaling_is_read() {
        let json = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},
            "tie_word_embeddings":true}"#;
        let cfg = ModelConfig::from_hf_json(Path::new("c.json"), json).unwrap();
        assert_eq!(cfg.head_dim, 16);
        assert!(matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(cfg.sliding_window, None);
    }
}
