//! Options shared by every binary (`bot`, `train`): base model, adapter,
//! device, each with an environment-variable equivalent read from `.env`;
//! and THE place where default paths are resolved (against the project
//! home, so the binaries run from any working directory).

use std::path::{Path, PathBuf};

use clap::Args;

use crate::lora::Adapter;
use crate::model::{self, BaseModel, Decoder};
use crate::router::{Router, RouterConfig};
use crate::{Error, Result};

/// The embedded default base model, fetched by `scripts/fetch-model.sh`
/// (relative to the home).
pub const DEFAULT_BASE_MODEL: &str = "model/gemma-3-270m-q4_k_m.gguf";
/// Where the trained adapter in use lives (a directory or a link to one),
/// relative to the home.
pub const DEFAULT_ADAPTER: &str = "model/current";
/// The generator-made test file, relative to the home.
pub const DEFAULT_TEST_FILE: &str = "datas/image_call_test.jsonl";

/// The project home, against which every default path resolves:
/// `ROUTER_HOME`, else the nearest folder holding both `model/` and
/// `datas/`, searched above the current directory, then above the
/// executable (`target/release/bot` lives inside the checkout); else the
/// current directory. Paths the user gives are never resolved against it.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("ROUTER_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let is_home = |p: &Path| p.join("model").is_dir() && p.join("datas").is_dir();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let exe = std::env::current_exe().ok();
    let candidates = cwd
        .ancestors()
        .chain(exe.iter().flat_map(|e| e.ancestors().skip(1)));
    for dir in candidates {
        if is_home(dir) {
            return dir.to_path_buf();
        }
    }
    cwd
}

/// A default path (`model/current`, `datas/...`) under the home.
pub fn default_path(relative: &str) -> PathBuf {
    home().join(relative)
}

/// `--base-model`, `--adapter`, `--device`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model: a .gguf file, a Hugging Face directory, or a hub id
    /// [default: model/gemma-3-270m-q4_k_m.gguf under the home].
    #[arg(long, env = "ROUTER_BASE_MODEL", global = true)]
    pub base_model: Option<String>,

    /// LoRA adapter directory (PEFT format). Defaults to model/current when present.
    #[arg(long, env = "ROUTER_ADAPTER", global = true)]
    pub adapter: Option<PathBuf>,

    /// Use the bare base model even if a default adapter exists.
    #[arg(long, global = true, conflicts_with = "adapter")]
    pub no_adapter: bool,

    /// cpu, cuda or cuda:N (default: CUDA when built with it and a GPU is present).
    #[arg(long, env = "ROUTER_DEVICE", global = true)]
    pub device: Option<String>,

    /// Route to image when the call opening's probability at the first
    /// position reaches this (default: the adapter's recorded threshold,
    /// else the arg-max).
    #[arg(long, env = "ROUTER_CALL_THRESHOLD", global = true)]
    pub call_threshold: Option<f32>,

    /// On the CPU: q8 keeps Q8_0 copies of the weights for decode steps,
    /// short messages and the output head (about 3x faster there); f32
    /// computes everything from the f32 weights.
    #[arg(
        long,
        env = "ROUTER_CPU_WEIGHTS",
        global = true,
        value_enum,
        default_value_t
    )]
    pub cpu_weights: CpuWeights,

    /// auto: decide batches of up to 32 messages with steps replayed from
    /// CUDA graphs when on CUDA; off: eager steps everywhere; on: the
    /// replayed steps' static cache on every device (run eagerly on the
    /// CPU, where it is slower: for checks).
    #[arg(
        long,
        env = "ROUTER_CUDA_GRAPHS",
        global = true,
        value_enum,
        default_value_t
    )]
    pub cuda_graphs: Toggle,

    /// auto/on: inference steps on CUDA take the project's fused kernels
    /// (norms with the residual add, q/k norm with rotary embedding and the
    /// cache writes, attention, the gated activation); off: candle's
    /// composed kernels (for comparisons). No effect on the CPU.
    #[arg(
        long,
        env = "ROUTER_FUSED_KERNELS",
        global = true,
        value_enum,
        default_value_t
    )]
    pub fused_kernels: Toggle,
}

/// `auto`, `on` or `off` (`--cuda-graphs`, `train --shared-prefix`);
/// recorded by its command-line name.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    #[default]
    Auto,
    On,
    Off,
}

impl Toggle {
    /// `None` for auto, else whether it is on.
    pub fn forced(self) -> Option<bool> {
        match self {
            Toggle::Auto => None,
            Toggle::On => Some(true),
            Toggle::Off => Some(false),
        }
    }

    /// Whether it is on, `auto` standing for `when_auto`.
    pub fn is_on(self, when_auto: bool) -> bool {
        self.forced().unwrap_or(when_auto)
    }
}

/// How the CPU holds the weights for inference ([`ModelArgs::cpu_weights`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuWeights {
    /// f32 for long prefills, plus Q8_0 copies for steps of a few rows.
    #[default]
    Q8,
    /// f32 only.
    F32,
}

impl ModelArgs {
    /// The adapter to use: the explicit one, else the default
    /// (`model/current`) when there is one. A default that exists but is
    /// no adapter (a link to a directory that was removed, a directory
    /// without `adapter_config.json`) is an error, never a silent fall back
    /// to the bare base model.
    pub fn adapter_path(&self) -> Result<Option<PathBuf>> {
        if self.no_adapter {
            return Ok(None);
        }
        if let Some(p) = &self.adapter {
            return Ok(Some(p.clone()));
        }
        let p = default_path(DEFAULT_ADAPTER);
        if std::fs::symlink_metadata(&p).is_err() {
            return Ok(None);
        }
        if !p.join(crate::lora::CONFIG_FILE).exists() {
            let target = std::fs::read_link(&p).unwrap_or_else(|_| p.clone());
            return Err(Error::Adapter {
                path: p,
                message: format!(
                    "it points at {}, which holds no {} (restore it, move the link, or pass --no-adapter)",
                    target.display(),
                    crate::lora::CONFIG_FILE
                ),
            });
        }
        Ok(Some(p))
    }

    /// The base model to load: the given one, else the embedded default.
    pub fn base_spec(&self) -> String {
        self.base_model.clone().unwrap_or_else(|| {
            default_path(DEFAULT_BASE_MODEL)
                .to_string_lossy()
                .into_owned()
        })
    }

    /// Whether the base model is the embedded default and is missing (the
    /// binaries then fetch it; the library never downloads on its own).
    pub fn default_base_missing(&self) -> bool {
        self.base_model.is_none() && !default_path(DEFAULT_BASE_MODEL).exists()
    }

    /// Loads the base model for inference, holding the CPU weights as
    /// `--cpu-weights` says (the bot, `train eval`).
    pub fn load_base(&self) -> Result<BaseModel> {
        let mut base = self.load_base_for_training()?;
        self.apply_inference_kernels(&mut base.decoder)?;
        Ok(base)
    }

    /// Loads the base model with its own weights alone, without Q8_0
    /// copies whatever `--cpu-weights` says: training computes from those
    /// weights (the copies have no backward pass), so copies would only
    /// cost the memory and the time to make them. A run that goes on to
    /// route calls [`ModelArgs::apply_inference_kernels`] first, to route as the
    /// bot does.
    pub fn load_base_for_training(&self) -> Result<BaseModel> {
        let device = crate::device::select(self.device.as_deref())?;
        let spec = self.base_spec();
        tracing::info!(base = %spec, device = %crate::device::describe(&device), "loading base model");
        model::load(&spec, &device)
    }

    /// Sets up the decoder's inference as the options say: the CPU's Q8_0
    /// copies (`--cpu-weights`; a no-op on other devices) and CUDA's fused
    /// kernels (`--fused-kernels`; a no-op on the CPU, with a warning when
    /// asked for there).
    pub fn apply_inference_kernels(&self, decoder: &mut Decoder) -> Result<()> {
        decoder.set_cpu_quantized(self.cpu_weights == CpuWeights::Q8)?;
        let fused = decoder.set_fused_kernels(self.fused_kernels.is_on(true));
        if self.fused_kernels == Toggle::On && !fused {
            tracing::warn!(
                "--fused-kernels on: the fused kernels run on CUDA only; using candle's"
            );
        }
        Ok(())
    }

    /// Loads base model and adapter into a router.
    pub fn load_router(&self, mut config: RouterConfig) -> Result<Router> {
        config.call_threshold = config.call_threshold.or(self.call_threshold);
        config.cuda_graphs = config.cuda_graphs.or(self.cuda_graphs.forced());
        let base = self.load_base()?;
        let mut router = Router::new(base, config)?;
        if let Some(path) = self.adapter_path()? {
            // The resolved directory names the version (`model/current` is
            // a link that moves when a new adapter is promoted).
            let dir = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
            tracing::info!(adapter = %dir.display(), "loading adapter");
            let adapter = Adapter::load(&dir)?;
            router.set_adapter(Some(&adapter))?;
        }
        Ok(router)
    }
}

/// Runs the home's `scripts/fetch-model.sh`, which downloads and checks the
/// default model. Called by the binaries when [`ModelArgs::default_base_missing`].
pub fn fetch_default_model() -> Result<()> {
    let home = home();
    let script = home.join("scripts/fetch-model.sh");
    let target = home.join(DEFAULT_BASE_MODEL);
    if !script.exists() {
        return Err(Error::NotFound {
            what: "default base model (and scripts/fetch-model.sh to fetch it; set ROUTER_HOME to the checkout)",
            path: target,
        });
    }
    tracing::info!(
        "{} is missing; fetching it with {}",
        target.display(),
        script.display()
    );
    let status = std::process::Command::new("bash")
        .arg(&script)
        .current_dir(&home)
        .status()
        .map_err(|e| Error::io(&script, e))?;
    if !status.success() {
        return Err(Error::NotFound {
            what: "default base model (scripts/fetch-model.sh failed)",
            path: target,
        });
    }
    Ok(())
}

/// The body of every binary's `main`: reads `.env`, sets up logging, runs
/// `run`, and prints an error with its whole chain (`{:#}`) on failure.
pub fn run_main(run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    // `.env` from the current directory (or above), then the home's: a
    // variable already set is never overridden.
    let _ = dotenvy::dotenv();
    let _ = dotenvy::from_path(home().join(".env"));
    init_tracing();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logging to stderr, filtered by `RUST_LOG` (default `info`); colours
/// only on a terminal, so that logs sent to a file or journal stay plain.
pub fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
