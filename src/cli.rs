//! Options shared by every binary (`bot`, `train`): base model, adapter,
//! device, each with an environment-variable equivalent read from `.env`.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::lora::Adapter;
use crate::model::{self, BaseModel};
use crate::router::{Router, RouterConfig};
use crate::{Error, Result};

/// The embedded default base model, fetched by `scripts/fetch-model.sh`.
pub const DEFAULT_BASE_MODEL: &str = "model/gemma-3-270m-q4_k_m.gguf";
/// Where the trained adapter in use lives (a directory or a link to one).
pub const DEFAULT_ADAPTER: &str = "model/current";

/// `--base-model`, `--adapter`, `--device`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model: a .gguf file, a Hugging Face directory, or a hub id.
    #[arg(long, env = "ROUTER_BASE_MODEL", default_value = DEFAULT_BASE_MODEL, global = true)]
    pub base_model: String,

    /// LoRA adapter directory (PEFT format). Defaults to model/current when present.
    #[arg(long, env = "ROUTER_ADAPTER", global = true)]
    pub adapter: Option<PathBuf>,

    /// Use the bare base model even if a default adapter exists.
    #[arg(long, global = true, conflicts_with = "adapter")]
    pub no_adapter: bool,

    /// cpu, cuda or cuda:N (default: CUDA when built with it and a GPU is present).
    #[arg(long, env = "ROUTER_DEVICE", global = true)]
    pub device: Option<String>,
}

impl ModelArgs {
    /// The adapter to use: the explicit one, else the default if present.
    pub fn adapter_path(&self) -> Option<PathBuf> {
        if self.no_adapter {
            return None;
        }
        self.adapter.clone().or_else(|| {
            let p = PathBuf::from(DEFAULT_ADAPTER);
            p.join(crate::lora::CONFIG_FILE).exists().then_some(p)
        })
    }

    /// Loads the base model, fetching the embedded default when missing.
    pub fn load_base(&self) -> Result<BaseModel> {
        let device = crate::device::select(self.device.as_deref())?;
        if self.base_model == DEFAULT_BASE_MODEL && !Path::new(DEFAULT_BASE_MODEL).exists() {
            fetch_default_model()?;
        }
        tracing::info!(base = %self.base_model, device = %crate::device::describe(&device), "loading base model");
        model::load(&self.base_model, &device)
    }

    /// Loads the base model alone into a router (no adapter).
    pub fn load_router_bare(&self, config: RouterConfig) -> Result<Router> {
        Router::new(self.load_base()?, config)
    }

    /// Loads base model and adapter into a router.
    pub fn load_router(&self, config: RouterConfig) -> Result<Router> {
        let base = self.load_base()?;
        let mut router = Router::new(base, config)?;
        if let Some(path) = self.adapter_path() {
            tracing::info!(adapter = %path.display(), "loading adapter");
            let adapter = Adapter::load(&path)?;
            router.set_adapter(Some(&adapter))?;
        }
        Ok(router)
    }
}

/// Runs `scripts/fetch-model.sh`, which downloads and checks the default model.
pub fn fetch_default_model() -> Result<()> {
    let script = Path::new("scripts/fetch-model.sh");
    if !script.exists() {
        return Err(Error::NotFound {
            what: "default base model (and scripts/fetch-model.sh to fetch it; run from the repository root)",
            path: PathBuf::from(DEFAULT_BASE_MODEL),
        });
    }
    tracing::info!(
        "{DEFAULT_BASE_MODEL} is missing; fetching it with {}",
        script.display()
    );
    let status = std::process::Command::new("bash")
        .arg(script)
        .status()
        .map_err(|e| Error::io(script, e))?;
    if !status.success() {
        return Err(Error::NotFound {
            what: "default base model (scripts/fetch-model.sh failed)",
            path: PathBuf::from(DEFAULT_BASE_MODEL),
        });
    }
    Ok(())
}

/// The body of every binary's `main`: reads `.env`, sets up logging, runs
/// `run`, and prints an error with its whole chain (`{:#}`) on failure.
pub fn run_main(run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    let _ = dotenvy::dotenv();
    init_tracing();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logging to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
