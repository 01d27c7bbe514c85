//! LoRA adapters in PEFT's on-disk format.
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
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::transformer::{Decoder, Linear, Mode};
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
                .map_err(|e| Error::Adapter {
                    path: PathBuf::new(),
                    message: format!("target_modules regex `{p}`: {e}"),
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

/// The trainable pair of one adapted projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`, f32.
    pub a: Var,
    /// `[out, r]`, f32.
    pub b: Var,
    pub scaling: f64,
    pub dropout: f64,
}

impl Lora {
    /// `scaling · B A x` in f32 (`x` of any leading shape).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = if mode == Mode::Train && self.dropout > 0.0 {
            dropout(&x, self.dropout)?
        } else {
            x
        };
        let h = crate::model::transformer::matmul_t(&x, self.a.as_tensor())?;
        crate::model::transformer::matmul_t(&h, self.b.as_tensor())? * self.scaling
    }

    /// `scaling · B A`, the weight delta, `[out, in]` in f32.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }
}

impl Linear {
    /// Folds the adapter into `merged` (base weight untouched).
    pub fn merge(&mut self) -> candle_core::Result<()> {
        self.merged = match &self.lora {
            Some(l) => {
                let w = self.weight.to_dtype(DType::F32)?;
                let delta = l.delta()?.to_device(w.device())?;
                Some((w + delta)?.to_dtype(self.weight.dtype())?)
            }
            None => None,
        };
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
        let names: Vec<String> = decoder.linears().map(|l| l.name.clone()).collect();
        let mut pending: HashMap<&str, Lora> = HashMap::new();
        for (module, (a, b)) in &self.weights {
            let linear = decoder.linears().find(|l| &l.name == module).ok_or_else(|| {
                adapter_err(
                    &self.path,
                    format!(
                        "`{module}` matches no module of this base model (its modules look like `{}`); \
                         was the adapter trained for another model?",
                        names.first().map(String::as_str).unwrap_or("?")
                    ),
                )
            })?;
            let (out, inp) = linear.shape();
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if ia != inp || ra != rb || ob != out {
                return Err(adapter_err(
                    &self.path,
                    format!(
                        "shape mismatch at `{module}`: adapter has lora_A {:?} and lora_B {:?}, \
                         the base model's weight is {:?} (expected lora_A [r, {inp}], lora_B [{out}, r]); \
                         the adapter was trained for another base model",
                        a.dims(),
                        b.dims(),
                        [out, inp]
                    ),
                ));
            }
            pending.insert(
                module.as_str(),
                Lora {
                    a: Var::from_tensor(&a.to_device(&dev)?)?,
                    b: Var::from_tensor(&b.to_device(&dev)?)?,
                    scaling: self.config.scaling(module, ra),
                    dropout: self.config.lora_dropout,
                },
            );
        }
        for linear in decoder.linears_mut() {
            linear.lora = pending.remove(linear.name.as_str());
            linear.merged = None;
            if merge {
                linear.merge()?;
            }
        }
        Ok(())
    }
}

/// Attaches fresh, trainable LoRA weights to every projection the config
/// targets (A uniform ±1/sqrt(in), B zero). Returns how many were adapted.
pub fn init(decoder: &mut Decoder, config: &LoraConfig, seed: u64) -> Result<usize> {
    let mut rng = SplitMix64(seed);
    let mut count = 0;
    for linear in decoder.linears_mut() {
        linear.merged = None;
        if !config.target_modules.matches(&linear.name)? {
            linear.lora = None;
            continue;
        }
        let (out, inp) = linear.shape();
        let r = config
            .rank_pattern
            .iter()
            .find(|(k, _)| linear.name.ends_with(&format!(".{k}")))
            .map(|(_, r)| *r)
            .unwrap_or(config.r);
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..r * inp)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let dev = linear.weight.device();
        linear.lora = Some(Lora {
            a: Var::from_tensor(&Tensor::from_vec(a, (r, inp), dev)?)?,
            b: Var::zeros((out, r), DType::F32, dev)?,
            scaling: config.scaling(&linear.name, r),
            dropout: config.lora_dropout,
        });
        count += 1;
    }
    if count == 0 {
        return Err(Error::Adapter {
            path: PathBuf::new(),
            message: format!(
                "target_modules {:?} match no module of this model",
                config.target_modules
            ),
        });
    }
    Ok(count)
}

/// The trainable variables (A then B of every adapted module).
pub fn trainable_vars(decoder: &Decoder) -> Vec<Var> {
    decoder
        .linears()
        .filter_map(|l| l.lora.as_ref())
        .flat_map(|l| [l.a.clone(), l.b.clone()])
        .collect()
}

/// Writes the decoder's adapter as a PEFT directory (created if needed).
pub fn save(decoder: &Decoder, config: &LoraConfig, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    for l in decoder.linears() {
        if let Some(lora) = &l.lora {
            let a = lora.a.as_tensor().to_device(&Device::Cpu)?;
            let b = lora.b.as_tensor().to_device(&Device::Cpu)?;
            tensors.insert(format!("{KEY_PREFIX}{}.lora_A.weight", l.name), a);
            tensors.insert(format!("{KEY_PREFIX}{}.lora_B.weight", l.name), b);
        }
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

/// Seed of the CPU dropout masks; each mask draws the next stream.
static DROPOUT_SEED: AtomicU64 = AtomicU64::new(0);
static DROPOUT_CALLS: AtomicU64 = AtomicU64::new(0);

/// Makes training dropout reproducible: CUDA's generator is seeded, and CPU
/// masks come from a seeded counter-based stream (candle's CPU generator
/// cannot be seeded).
pub fn seed_dropout(device: &Device, seed: u64) -> Result<()> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    DROPOUT_SEED.store(seed, Ordering::SeqCst);
    DROPOUT_CALLS.store(0, Ordering::SeqCst);
    Ok(())
}

/// Inverted dropout: zeroes each element with probability `p`, scales the
/// rest by `1 / (1 - p)`.
fn dropout(x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::dropout(x, p as f32);
    }
    let call = DROPOUT_CALLS.fetch_add(1, Ordering::SeqCst);
    let mut rng =
        SplitMix64(DROPOUT_SEED.load(Ordering::SeqCst) ^ call.wrapping_mul(0xA24B_AED4_963E_E407));
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < p { 0.0 } else { keep })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

/// Small deterministic generator for initialisation (no global RNG state).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
