//! GGUF checkpoints: metadata to [`ModelConfig`], tensors dequantized and
//! mapped back to the Hugging Face layout (names and conventions), served to
//! the model builders through a candle `VarBuilder` backend.
//!
//! Conventions undone (llama.cpp's `convert_hf_to_gguf.py`):
//! - Gemma-3 stores every norm weight as `w + 1`; we subtract 1.
//! - Llama permutes q/k rows for its interleaved RoPE; we invert it.
//! - Dimensions are stored fastest-first; candle already reverses them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::config::{gemma3_sliding_layers, Architecture, ModelConfig, RopeScaling};
use crate::{Error, Result};

/// An open GGUF file: parsed header plus a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    reader: Mutex<BufReader<File>>,
    pub architecture: Architecture,
}

fn invalid(path: &Path, message: impl Into<String>) -> Error {
    Error::InvalidModel {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| invalid(path, format!("not a readable GGUF file: {e}")))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| invalid(path, "GGUF lacks general.architecture"))?;
        let architecture = Architecture::from_name(arch)?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
            architecture,
        })
    }

    fn arch_key(&self) -> &'static str {
        match self.architecture {
            Architecture::Gemma3 => "gemma3",
            Architecture::Llama => "llama",
        }
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

    /// A descriptive name for the base model (`general.name`, else the file name).
    pub fn name(&self) -> String {
        self.content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// Hyper-parameters from metadata, with llama.cpp's defaults where the
    /// format has no key (Gemma-3's local RoPE base and layer pattern).
    pub fn config(&self) -> Result<ModelConfig> {
        let need = |k: &str| {
            self.md_u(k)
                .ok_or_else(|| invalid(&self.path, format!("GGUF lacks {}.{k}", self.arch_key())))
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
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| invalid(&self.path, "GGUF lacks token_embd.weight"))?;
        let gemma = self.architecture == Architecture::Gemma3;
        let sliding_window = if gemma {
            self.md_u("attention.sliding_window")
        } else {
            None
        };
        let sliding_layers = match sliding_window {
            Some(_) => gemma3_sliding_layers(
                num_hidden_layers,
                self.md_u("attention.sliding_window_pattern").unwrap_or(6),
            ),
            None => vec![false; num_hidden_layers],
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
                .unwrap_or(1e-6),
            rope_theta: self.md_f("rope.freq_base").unwrap_or(if gemma {
                1_000_000.0
            } else {
                10_000.0
            }),
            rope_local_base_freq: 10_000.0,
            rope_scaling,
            sliding_window,
            sliding_layers,
            // llama.cpp: 1/sqrt(head_dim) for every Gemma-3 size but 27B.
            query_pre_attn_scalar: head_dim as f64,
            attn_logit_softcapping: None,
            final_logit_softcapping: self.md_f("final_logit_softcapping"),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            max_position_embeddings: self.md_u("context_length").unwrap_or(32_768),
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
        let gemma = self.architecture == Architecture::Gemma3;
        let g = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" if gemma => "post_attention_norm",
            "post_attention_layernorm" => "ffn_norm",
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
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
        let is_norm = hf.ends_with("norm.weight");
        match self.architecture {
            Architecture::Gemma3 if is_norm => t - 1.0,
            Architecture::Llama
                if hf.ends_with("q_proj.weight") || hf.ends_with("k_proj.weight") =>
            {
                // Only the head counts matter here: read them, not the whole config.
                let heads = self.md_u("attention.head_count");
                let heads = if hf.ends_with("q_proj.weight") {
                    heads
                } else {
                    self.md_u("attention.head_count_kv").or(heads)
                }
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: GGUF lacks llama.attention.head_count",
                        self.path.display()
                    ))
                })?;
                unpermute_qk(&t, heads)
            }
            _ => Ok(t),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
