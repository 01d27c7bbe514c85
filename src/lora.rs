//! LoRA adapters in PEFT's on-disk format: the config, the files, and
//! attaching them to a model. The run-time side (forward, merge, dropout)
//! lives with the layer it adapts, in `model/linear.rs`.
//!
//! `y = base(x) + scaling · B(A(dropout(x)))`, scaling `alpha / r` (or
//! `alpha / sqrt(r)` with rsLoRA); only the adapter term is scaled. A is
//! initialised like PEFT (uniform ±1/sqrt(in)), B to zero, so step 0 equals
//! the base model. LoRA weights stay in f32 whatever the compute dtype.
//!
//! An adapter directory holds `adapter_config.json` and
//! `adapter_model.safetensors` with keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
//! Loading refuses what would silently misbehave: shapes that do not fit,
//! keys that match no module, DoRA, `modules_to_save`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::{Decoder, Linear, Lora};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// File names inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";

/// `target_modules`: a list of module-name suffixes, or a regex PEFT
/// full-matches against module paths (`"all-linear"` is special).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

impl TargetModules {
    fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::List(names) => names
                .iter()
                .any(|n| module == n || module.ends_with(&format!(".{n}"))),
            TargetModules::Pattern(p) if p == "all-linear" => true,
            TargetModules::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| Error::TargetModules {
                    targets: format!("{self:?}"),
                    message: format!("invalid regex: {e}"),
                })?
                .is_match(module),
        })
    }
}

/// `adapter_config.json`, PEFT field names. Unknown fields are kept so that
/// a loaded-and-saved config loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_bias() -> String {
    "none".into()
}

impl LoraConfig {
    /// The original project's defaults: r 32, alpha 16, dropout 0.05, q/k/v/o.
    pub fn new(r: usize, lora_alpha: f64, lora_dropout: f64, targets: &[&str]) -> Self {
        Self {
            peft_type: default_peft_type(),
            r,
            lora_alpha,
            lora_dropout,
            target_modules: TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
            base_model_name_or_path: None,
            bias: default_bias(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: None,
            task_type: Some("CAUSAL_LM".into()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Scaling of the adapter term for a module of rank `r`.
    pub fn scaling(&self, module: &str, r: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let refuse = |message: String| {
            Err(Error::Adapter {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.peft_type != "LORA" {
            return refuse(format!(
                "peft_type `{}` is not supported (LORA only)",
                self.peft_type
            ));
        }
        if self.use_dora {
            return refuse("DoRA adapters (use_dora: true) are not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse(format!(
                "modules_to_save {:?} is not supported: the adapter would replace whole modules",
                self.modules_to_save.as_deref().unwrap_or_default()
            ));
        }
        if self.bias != "none" {
            return refuse(format!(
                "bias `{}` is not supported (\"none\" only)",
                self.bias
            ));
        }
        if self.r == 0 {
            return refuse("r must be at least 1".into());
        }
        Ok(())
    }
}

/// An adapter read from disk: config plus `(A, B)` per module path.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub path: PathBuf,
    pub config: LoraConfig,
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
}

fn adapter_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Adapter {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Adapter {
    /// Reads a PEFT adapter directory (weights on the CPU, f32).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                what: "adapter directory",
                path: dir.to_path_buf(),
            });
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: LoraConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            line: None,
            message: e.to_string(),
        })?;
        config.validate(dir)?;
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.exists() {
            let alt = dir.join("adapter_model.bin");
            let hint = if alt.exists() {
                " (adapter_model.bin found: re-save the adapter with safe_serialization=True)"
            } else {
                ""
            };
            return Err(adapter_err(dir, format!("{WEIGHTS_FILE} is missing{hint}")));
        }
        let tensors = candle_core::safetensors::load(&w_path, &Device::Cpu)
            .map_err(|e| adapter_err(&w_path, e.to_string()))?;
        let mut a_map = HashMap::new();
        let mut b_map = HashMap::new();
        for (key, t) in tensors {
            let module_key = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
            let parsed = [".lora_A", ".lora_B"].iter().find_map(|tag| {
                let (module, rest) = module_key.split_once(tag)?;
                // `.weight`, or `.<adapter_name>.weight` in some exports.
                rest.ends_with(".weight")
                    .then(|| (module.to_string(), *tag == ".lora_A"))
            });
            match parsed {
                Some((module, true)) => a_map.insert(module, t.to_dtype(DType::F32)?),
                Some((module, false)) => b_map.insert(module, t.to_dtype(DType::F32)?),
                None => {
                    return Err(adapter_err(
                        &w_path,
                        format!("tensor `{key}` is not a LoRA A/B weight (embedding or bias adapters are not supported)"),
                    ))
                }
            };
        }
        let mut weights = BTreeMap::new();
        for (module, a) in a_map {
            let b = b_map.remove(&module).ok_or_else(|| {
                adapter_err(&w_path, format!("`{module}` has lora_A but no lora_B"))
            })?;
            weights.insert(module, (a, b));
        }
        if let Some(module) = b_map.keys().next() {
            return Err(adapter_err(
                &w_path,
                format!("`{module}` has lora_B but no lora_A"),
            ));
        }
        if weights.is_empty() {
            return Err(adapter_err(&w_path, "no LoRA weights in the file"));
        }
        Ok(Self {
            path: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// Attaches the adapter to `decoder` (replacing any other), then merges
    /// it when `merge` is set. Every key must match a projection and every
    /// shape must fit, or nothing is changed.
    pub fn apply(&self, decoder: &mut Decoder, merge: bool) -> Result<()> {
        let dev = decoder.device.clone();
        let names: Vec<String> = decoder.linears().map(|l| l.name().to_string()).collect();
        let mut pending: HashMap<&str, Lora> = HashMap::new();
        for (module, (a, b)) in &self.weights {
            let linear = decoder
                .linears()
                .find(|l| l.name() == module)
                .ok_or_else(|| Error::AdapterModule {
                    path: self.path.clone(),
                    module: module.clone(),
                    example: names.first().map_or("?", String::as_str).to_string(),
                })?;
            let (out, inp) = linear.shape();
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if ia != inp || ra != rb || ob != out {
                return Err(Error::AdapterShape {
                    path: self.path.clone(),
                    module: module.clone(),
                    lora_a: a.dims().to_vec(),
                    lora_b: b.dims().to_vec(),
                    weight: [out, inp],
                });
            }
            pending.insert(
                module.as_str(),
                Lora::new(
                    Var::from_tensor(&a.to_device(&dev)?)?,
                    Var::from_tensor(&b.to_device(&dev)?)?,
                    self.config.scaling(module, ra),
                    self.config.lora_dropout,
                ),
            );
        }
        let mut work: Vec<(&mut Linear, Option<Lora>)> = decoder
            .linears_mut()
            .map(|l| {
                let lora = pending.remove(l.name());
                (l, lora)
            })
            .collect();
        // Merging (and making Q8_0 copies) is plain CPU work per projection:
        // on the CPU, spread it over the threads. Other devices merge on the
        // calling thread: a CUDA context is bound to the thread that uses it,
        // and a fresh thread fails with "invalid device context".
        if !dev.is_cpu() {
            return work
                .iter_mut()
                .try_for_each(|(linear, lora)| linear.adapt(lora.take(), merge))
                .map_err(Error::from);
        }
        let threads = candle_core::utils::get_num_threads().max(1);
        let per_thread = work.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = work
                .chunks_mut(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter_mut()
                            .try_for_each(|(linear, lora)| linear.adapt(lora.take(), merge))
                    })
                })
                .collect();
            for worker in workers {
                worker.join().map_err(|_| Error::Adapter {
                    path: self.path.clone(),
                    message: "a merge thread panicked".into(),
                })??;
            }
            Ok(())
        })
    }
}

/// Attaches fresh, trainable LoRA weights to every projection the config
/// targets (A uniform ±1/sqrt(in), B zero). Returns how many were adapted.
pub fn init(decoder: &mut Decoder, config: &LoraConfig, seed: u64) -> Result<usize> {
    let mut rng = SplitMix64(seed);
    let mut count = 0;
    for linear in decoder.linears_mut() {
        if !config.target_modules.matches(linear.name())? {
            linear.set_lora(None)?;
            continue;
        }
        let (out, inp) = linear.shape();
        let r = config
            .rank_pattern
            .iter()
            .find(|(k, _)| linear.name().ends_with(&format!(".{k}")))
            .map(|(_, r)| *r)
            .unwrap_or(config.r);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let dev = linear.weight().device();
        let lora = Lora::new(
            Var::from_tensor(&Tensor::from_vec(a, (r, inp), dev)?)?,
            Var::zeros((out, r), DType::F32, dev)?,
            config.scaling(linear.name(), r),
            config.lora_dropout,
        );
        linear.set_lora(Some(lora))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::TargetModules {
            targets: format!("{:?}", config.target_modules),
            message: "match no module of this model".into(),
        });
    }
    Ok(count)
}

/// The trainable variables (A then B of every adapted module).
pub fn trainable_vars(decoder: &Decoder) -> Vec<Var> {
    decoder.lora_vars()
}

/// Writes the decoder's adapter as a PEFT directory (created if needed).
pub fn save(decoder: &Decoder, config: &LoraConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    for (name, lora) in decoder.loras() {
        let a = lora.a().as_tensor().to_device(&Device::Cpu)?;
        let b = lora.b().as_tensor().to_device(&Device::Cpu)?;
        tensors.insert(format!("{KEY_PREFIX}{name}.lora_A.weight"), a);
        tensors.insert(format!("{KEY_PREFIX}{name}.lora_B.weight"), b);
    }
    if tensors.is_empty() {
        return Err(adapter_err(dir, "the model has no adapter to save"));
    }
    let w_path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &w_path)
        .map_err(|e| adapter_err(&w_path, e.to_string()))?;
    let c_path = dir.join(CONFIG_FILE);
    let text =
        serde_json::to_string_pretty(config).map_err(|e| adapter_err(&c_path, e.to_string()))?;
    std::fs::write(&c_path, text).map_err(|e| Error::io(&c_path, e))?;
    Ok(())
}
