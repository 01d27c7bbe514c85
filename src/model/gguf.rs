//! GGUF checkpoints: metadata to [`ModelConfig`], tensors dequantized and
//! mapped back to the Hugging Face layout (names and conventions), served to
//! the model builders through a candle `VarBuilder` backend.
//!
//! The names shared by every family live here; what differs (norm names,
//! the converter's changes to weights, defaults for absent keys) comes from
//! the family's own file (`gemma3.rs`, `llama.rs`). Dimensions are stored
//! fastest-first; candle already reverses them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::config::{Architecture, ModelConfig, RopeScaling};
use super::family::Family;
use crate::{Error, Result};

/// An open GGUF file: parsed header plus a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: Mutex<BufReader<File>>,
    pub architecture: Architecture,
}

/// GGUF names of the modules every family names alike (after
/// `model.layers.N.` in Hugging Face naming, after `blk.N.` in GGUF).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::InvalidModel {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| Error::MissingKey {
                path: path.to_path_buf(),
                key: "general.architecture".into(),
            })?;
        let architecture = Architecture::from_name(arch)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            architecture,
        })
    }

    fn family(&self) -> &'static Family {
        self.architecture.family()
    }

    /// The architecture's prefix of metadata keys (`gemma3.`).
    fn arch_key(&self) -> &'static str {
        self.family().gguf_name()
    }

    fn md_u(&self, key: &str) -> Option<usize> {
        let v = self
            .content
            .metadata
            .get(&format!("{}.{key}", self.arch_key()))?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .ok()
    }

    fn md_f(&self, key: &str) -> Option<f64> {
        let v = self
            .content
            .metadata
            .get(&format!("{}.{key}", self.arch_key()))?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
    }

    /// Hyper-parameters from metadata, with the family's defaults where the
    /// format has no key (Gemma-3's local RoPE base and layer pattern).
    pub fn config(&self) -> Result<ModelConfig> {
        let family = self.family();
        let need = |k: &str| {
            self.md_u(k).ok_or_else(|| Error::MissingKey {
                path: self.path.clone(),
                key: format!("{}.{k}", self.arch_key()),
            })
        };
        let hidden_size = need("embedding_length")?;
        let num_attention_heads = need("attention.head_count")?;
        let num_hidden_layers = need("block_count")?;
        let head_dim = self
            .md_u("attention.key_length")
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied())
            .ok_or_else(|| Error::MissingKey {
                path: self.path.clone(),
                key: "token_embd.weight".into(),
            })?;
        let sliding_window = family
            .sliding_window_pattern
            .and_then(|_| self.md_u("attention.sliding_window"));
        let sliding_layers = match (sliding_window, family.sliding_window_pattern) {
            (Some(_), Some(pattern)) => Family::sliding_layers(
                num_hidden_layers,
                self.md_u("attention.sliding_window_pattern")
                    .unwrap_or(pattern),
            ),
            _ => vec![false; num_hidden_layers],
        };
        let rope_scaling = match self
            .content
            .metadata
            .get(&format!("{}.rope.scaling.type", self.arch_key()))
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
        {
            Some("linear") => RopeScaling::Linear {
                factor: self.md_f("rope.scaling.factor").unwrap_or(1.0),
            },
            _ => RopeScaling::None,
        };
        Ok(ModelConfig {
            architecture: self.architecture,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self
                .md_u("attention.head_count_kv")
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: self
                .md_f("attention.layer_norm_rms_epsilon")
                .unwrap_or(family.rms_norm_eps),
            rope_theta: self.md_f("rope.freq_base").unwrap_or(family.rope_theta),
            rope_local_base_freq: family.rope_local_base_freq,
            rope_scaling,
            sliding_window,
            sliding_layers,
            // llama.cpp: 1/sqrt(head_dim) for every Gemma-3 size but 27B.
            query_pre_attn_scalar: head_dim as f64,
            attn_logit_softcapping: None,
            final_logit_softcapping: self.md_f("final_logit_softcapping"),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            max_position_embeddings: self
                .md_u("context_length")
                .unwrap_or(family.max_position_embeddings),
        })
    }

    /// GGUF tensor name for a Hugging Face one.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let hf = hf.strip_suffix(".weight")?;
        if hf == "model.embed_tokens" {
            return Some("token_embd.weight".into());
        }
        if hf == "model.norm" {
            return Some("output_norm.weight".into());
        }
        if hf == "lm_head" {
            return Some("output.weight".into());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (idx, module) = rest.split_once('.')?;
        let (_, g) = LAYER_NAMES
            .iter()
            .chain(self.family().gguf_norms)
            .find(|(m, _)| *m == module)?;
        Some(format!("blk.{idx}.{g}.weight"))
    }

    /// Reads, dequantizes (f32, CPU) and converts one tensor to HF conventions.
    fn load_hf(&self, hf: &str) -> candle_core::Result<Tensor> {
        let name = self.gguf_name(hf).ok_or_else(|| {
            candle_core::Error::Msg(format!("no GGUF tensor corresponds to `{hf}`"))
        })?;
        let qt = {
            let mut reader = self
                .reader
                .lock()
                .map_err(|_| candle_core::Error::Msg("GGUF reader lock poisoned".into()))?;
            self.content.tensor(&mut *reader, &name, &Device::Cpu)?
        };
        let t = qt.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        (self.family().from_gguf)(hf, t, &|key: &str| self.md_u(key))
    }
}

impl SimpleBackend for GgufFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load_hf(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, the config expects {:?}",
                self.path.display(),
                t.dims(),
                s.dims()
            );
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_hf(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.gguf_name(name)
            .is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }
}
