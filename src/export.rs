//! Writing a base model out as a Hugging Face directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`), so that transformers and PEFT
//! load exactly the weights we serve: the speed benchmark compares both
//! stacks on the same weights, adapter and token ids.
//!
//! The weights come from the checkpoint through the same reader the model
//! builder uses (for GGUF: dequantized, renamed, and the converter's changes
//! undone, e.g. Gemma's norms stored as `w + 1` come back as `w`), never
//! from the built [`Decoder`](crate::model::Decoder), whose internal layout
//! (fused projections, precomputed `1 + w` norms) is free to change.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::{json, Value};

use crate::model::gguf::GgufFile;
use crate::model::{Architecture, ModelConfig, RopeScaling};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub tensors: usize,
    pub parameters: usize,
}

/// Exports the GGUF checkpoint at `path` into `dir` with weights in `dtype`
/// (bf16 is what both stacks compute in on a GPU; f32 keeps the dequantized
/// values exactly).
pub fn export_gguf(path: &Path, dir: &Path, dtype: DType) -> Result<Exported> {
    if !path.is_file() {
        return Err(Error::InvalidModel {
            path: path.to_path_buf(),
            message: "the export reads a GGUF file (a Hugging Face directory already is one)"
                .into(),
        });
    }
    let file = GgufFile::open(path)?;
    let cfg = file.config()?;
    let tokenizer = Tokenizer::from_gguf(&file.content)?;
    let backend: Box<dyn SimpleBackend> = Box::new(file);
    let vb = VarBuilder::from_backend(backend, dtype, Device::Cpu);
    write_hf_dir(&cfg, &vb, &tokenizer, dir)
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` for `cfg`
/// into `dir`, reading every tensor by its Hugging Face name from
/// `weights` (in the builder's dtype).
pub fn write_hf_dir(
    cfg: &ModelConfig,
    weights: &VarBuilder,
    tokenizer: &Tokenizer,
    dir: &Path,
) -> Result<Exported> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut parameters = 0;
    // A separate head is written only when the checkpoint has one; without
    // it the decoder uses the embedding, so the config must say "tied".
    let has_head = !cfg.tie_word_embeddings && weights.contains_tensor("lm_head.weight");
    for (name, shape) in tensor_shapes(cfg, has_head) {
        let t = weights.get(shape, &name)?;
        parameters += t.elem_count();
        tensors.insert(name, t);
    }
    let path = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(&tensors, Some(metadata), &path).map_err(|e| Error::Io {
        path: path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let config = hf_config(cfg, tokenizer, weights.dtype(), !has_head);
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Json {
        path: config_path.clone(),
        line: None,
        message: e.to_string(),
    })?;
    std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    tokenizer.save(&dir.join("tokenizer.json"))?;
    Ok(Exported {
        tensors: tensors.len(),
        parameters,
    })
}

/// Hugging Face names and shapes of every weight of `cfg`, in layer order.
pub fn tensor_shapes(cfg: &ModelConfig, separate_head: bool) -> Vec<(String, Vec<usize>)> {
    let family = cfg.architecture.family();
    let (h, hd, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let norms = [
            Some("input_layernorm"),
            family.attn_out_norm,
            Some(family.mlp_norm),
            family.mlp_out_norm,
        ];
        for n in norms.into_iter().flatten() {
            out.push((format!("{p}.{n}.weight"), vec![h]));
        }
        for (m, shape) in [
            ("q_proj", [nh * hd, h]),
            ("k_proj", [nkv * hd, h]),
            ("v_proj", [nkv * hd, h]),
            ("o_proj", [h, nh * hd]),
        ] {
            out.push((format!("{p}.self_attn.{m}.weight"), shape.to_vec()));
        }
        if family.qk_norm {
            for n in ["q_norm", "k_norm"] {
                out.push((format!("{p}.self_attn.{n}.weight"), vec![hd]));
            }
        }
        for (m, shape) in [
            ("gate_proj", [ff, h]),
            ("up_proj", [ff, h]),
            ("down_proj", [h, ff]),
        ] {
            out.push((format!("{p}.mlp.{m}.weight"), shape.to_vec()));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if separate_head {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// A JSON number as a person would write it: integral values as integers,
/// others with the shortest f32 digits (GGUF stores f32: `1e-6`, not
/// `9.99999997e-7`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        format!("{}", x as f32)
            .parse::<f64>()
            .map_or(json!(x), |v| json!(v))
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Rotary parameters in transformers 5's `rope_parameters` form.
fn rope_json(theta: f64, scaling: &RopeScaling) -> Value {
    match scaling {
        RopeScaling::None => json!({"rope_type": "default", "rope_theta": theta}),
        RopeScaling::Linear { factor } => {
            json!({"rope_type": "linear", "rope_theta": theta, "factor": number(*factor)})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": number(*factor),
            "low_freq_factor": number(*low_freq_factor),
            "high_freq_factor": number(*high_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

/// `config.json` for `cfg` as transformers 5 writes it
/// (`Gemma3ForCausalLM` / `gemma3_text`, or `LlamaForCausalLM`).
pub fn hf_config(cfg: &ModelConfig, tokenizer: &Tokenizer, dtype: DType, tied: bool) -> Value {
    let family = cfg.architecture.family();
    let mut c = json!({
        "architectures": [format!("{}ForCausalLM", family.class_prefix)],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": number(cfg.rms_norm_eps),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.token_id("<pad>"),
        "dtype": dtype_name(dtype),
        "use_cache": true,
    });
    let extra = match cfg.architecture {
        Architecture::Gemma3 => json!({
            "model_type": "gemma3_text",
            "hidden_activation": family.activation_name,
            "query_pre_attn_scalar": number(cfg.query_pre_attn_scalar),
            "attn_logit_softcapping": cfg.attn_logit_softcapping,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "sliding_window": cfg.sliding_window.unwrap_or(cfg.max_position_embeddings),
            "layer_types": cfg.sliding_layers.iter()
                .map(|&s| if s { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>(),
            "rope_parameters": {
                "full_attention": rope_json(cfg.rope_theta, &cfg.rope_scaling),
                "sliding_attention": rope_json(cfg.rope_local_base_freq, &RopeScaling::None),
            },
            "use_bidirectional_attention": false,
        }),
        Architecture::Llama => json!({
            "model_type": "llama",
            "hidden_act": family.activation_name,
            "mlp_bias": false,
            "rope_parameters": rope_json(cfg.rope_theta, &cfg.rope_scaling),
        }),
    };
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}
