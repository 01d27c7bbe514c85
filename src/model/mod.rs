//! Base models: configuration, the shared decoder, and loading from a GGUF
//! file, a Hugging Face directory (safetensors) or a hub id.
//!
//! Inside, imports run one way: `transformer` (the decoder) uses `linear`
//! (projections and their LoRA runtime, with `q8` for their Q8_0 copies on
//! the CPU), `cache` (batches, KV caches, masks), `grad` (training's fused
//! graph nodes), `fused` (inference's CUDA kernels) and `config`, which asks
//! `family` through the architecture files (`gemma3`, `llama`); `graph`
//! (steps replayed from CUDA graphs) uses the decoder and `cache`; `gguf`
//! reads files for all of them.

mod cache;
pub mod config;
mod family;
mod fused;
mod gemma3;
pub mod gguf;
mod grad;
mod graph;
mod linear;
mod llama;
pub mod q8;
#[cfg(test)]
mod test_util;
mod transformer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub use cache::{dense_batch, Batch, Cache, StaticCache, StepInputs};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use family::{Activation, Family};
pub use fused::FusedAdamW;
pub use graph::{CaptureTiming, GraphNodes, GraphStep, Replay};
pub use linear::{Linear, Lora, Mode, TrainPass};
pub use transformer::{token_probabilities, Decoder};

use crate::prompt::PromptFormat;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// A base model ready to use: weights, tokenizer and prompt format.
pub struct BaseModel {
    pub decoder: Decoder,
    pub format: PromptFormat,
    /// Where it came from (path or hub id), recorded in adapters we save.
    pub source: String,
}

/// The compute dtype for a device: bf16 on CUDA, f32 on CPU.
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Builds the decoder for `cfg` from Hugging Face-named weights.
pub fn build_decoder(cfg: &ModelConfig, vb: VarBuilder) -> Result<Decoder> {
    Ok(Decoder::new(cfg, vb)?)
}

/// Loads a base model from a `.gguf` file, a directory holding
/// `config.json` + safetensors + `tokenizer.json` (or a single `.gguf`), or a
/// Hugging Face hub id (downloaded once into the hub cache; offline use
/// works from the cache).
pub fn load(spec: &str, device: &Device) -> Result<BaseModel> {
    let path = Path::new(spec);
    if path.is_file() {
        return load_gguf(path, device);
    }
    if path.is_dir() {
        if path.join("config.json").exists() {
            return load_hf_dir(path, device);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => load_gguf(one, device),
            [] => Err(Error::InvalidModel {
                path: path.to_path_buf(),
                message: "directory has neither config.json nor a .gguf file".into(),
            }),
            _ => Err(Error::InvalidModel {
                path: path.to_path_buf(),
                message: "directory holds several .gguf files; name one".into(),
            }),
        };
    }
    let looks_like_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf");
    if looks_like_hub_id {
        return load_hub(spec, device);
    }
    Err(Error::NotFound {
        what: "base model",
        path: path.to_path_buf(),
    })
}

/// Loads a GGUF file: config and tokenizer from metadata, weights dequantized.
pub fn load_gguf(path: &Path, device: &Device) -> Result<BaseModel> {
    let file = gguf::GgufFile::open(path)?;
    let cfg = file.config()?;
    let tokenizer = Tokenizer::from_gguf(&file.content)?;
    let format = PromptFormat::new(tokenizer)?;
    let backend: Box<dyn SimpleBackend> = Box::new(file);
    let vb = VarBuilder::from_backend(backend, compute_dtype(device), device.clone());
    let decoder = build_decoder(&cfg, vb).map_err(|e| Error::InvalidModel {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(BaseModel {
        decoder,
        format,
        source: path.display().to_string(),
    })
}

/// Loads a Hugging Face directory: `config.json`, `model.safetensors` or a
/// sharded `model.safetensors.index.json`, and `tokenizer.json`.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<BaseModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = ModelConfig::from_hf_json(&cfg_path, &text)?;
    let files = safetensors_files(dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let format = PromptFormat::new(tokenizer)?;
    let decoder = decoder_from_safetensors(&cfg, &files, device).map_err(|e| match e {
        Error::Candle(c) => Error::InvalidModel {
            path: dir.to_path_buf(),
            message: c.to_string(),
        },
        other => other,
    })?;
    Ok(BaseModel {
        decoder,
        format,
        source: dir.display().to_string(),
    })
}

/// Builds a decoder from safetensors files in Hugging Face naming. Handles
/// multimodal checkpoints whose text model sits under `language_model.`.
pub fn decoder_from_safetensors(
    cfg: &ModelConfig,
    files: &[PathBuf],
    device: &Device,
) -> Result<Decoder> {
    // SAFETY: the files are memory-mapped read-only; like every mmap user we
    // assume nobody truncates them while the model is loading.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, compute_dtype(device), device)? };
    let vb = if !vb.contains_tensor("model.embed_tokens.weight")
        && vb.contains_tensor("language_model.model.embed_tokens.weight")
    {
        vb.pp("language_model")
    } else {
        vb
    };
    build_decoder(cfg, vb)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| Error::InvalidModel {
        path: dir.to_path_buf(),
        message: "neither model.safetensors nor model.safetensors.index.json found".into(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.clone(),
        line: None,
        message: e.to_string(),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::MissingKey {
            path: index.clone(),
            key: "weight_map".into(),
        })?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// A complete snapshot of `id` in the local hub cache, if there is one.
fn cached_snapshot(id: &str) -> Option<PathBuf> {
    let repo = hf_hub::Cache::from_env().model(id.to_string());
    let config = repo.get("config.json")?;
    repo.get("tokenizer.json")?;
    let dir = config.parent()?.to_path_buf();
    let files = safetensors_files(&dir).ok()?;
    files.iter().all(|f| f.exists()).then_some(dir)
}

/// Resolves a hub id: the local cache first (no network), else a download
/// into the cache unless `HF_HUB_OFFLINE` is set.
fn load_hub(id: &str, device: &Device) -> Result<BaseModel> {
    let hub_err = |e: String| Error::Hub {
        id: id.to_string(),
        message: e,
    };
    let dir = match cached_snapshot(id) {
        Some(dir) => dir,
        None if std::env::var_os("HF_HUB_OFFLINE").is_some() => {
            return Err(hub_err(
                "not (completely) in the local hub cache, and HF_HUB_OFFLINE is set".into(),
            ))
        }
        None => {
            let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true);
            // The cache's token file is read by default; HF_TOKEN overrides it.
            if let Ok(token) = std::env::var("HF_TOKEN") {
                builder = builder.with_token(Some(token));
            }
            let api = builder.build().map_err(|e| hub_err(e.to_string()))?;
            let repo = api.model(id.to_string());
            let get = |f: &str| repo.get(f).map_err(|e| hub_err(format!("{f}: {e}")));
            let config = get("config.json")?;
            get("tokenizer.json")?;
            if get("model.safetensors").is_err() {
                let index = get("model.safetensors.index.json")?;
                let dir = index.parent().map(Path::to_path_buf).unwrap_or_default();
                for shard in safetensors_files(&dir)? {
                    if let Some(name) = shard.file_name().and_then(|n| n.to_str()) {
                        get(name)?;
                    }
                }
            }
            config.parent().map(Path::to_path_buf).unwrap_or_default()
        }
    };
    let mut model = load_hf_dir(&dir, device)?;
    model.source = id.to_string();
    Ok(model)
}
