//! The library's error type: one variant per cause, each message written for
//! the person who has to fix it (which file, which tensor, which value).

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the router.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory the user pointed at does not exist.
    #[error("{what} not found: {path}")]
    NotFound { what: &'static str, path: PathBuf },

    /// Reading a file failed for another reason than its absence.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (config, adapter config, JSONL line) does not parse.
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// The checkpoint declares an architecture this crate does not implement.
    #[error("unsupported model architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    /// The checkpoint is readable but incomplete or inconsistent.
    #[error("invalid model {path}: {message}")]
    InvalidModel { path: PathBuf, message: String },

    /// A required field, metadata key or tensor is absent from a file.
    #[error("{path} lacks `{key}`")]
    MissingKey { path: PathBuf, key: String },

    /// A file asks for a setting this crate does not implement.
    #[error("{path}: {setting} `{value}` is not supported ({supported})")]
    Unsupported {
        path: PathBuf,
        setting: &'static str,
        value: String,
        supported: String,
    },

    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The adapter's files are unusable (missing, unsupported options, stray keys).
    #[error("adapter {path}: {message}")]
    Adapter { path: PathBuf, message: String },

    /// An adapter's weights do not fit the base model's projection.
    #[error(
        "adapter {path}: shape mismatch at `{module}`: adapter has lora_A {lora_a:?} and lora_B \
         {lora_b:?}, the base model's weight is {weight:?} (expected lora_A [r, {}], lora_B [{}, r]); \
         the adapter was trained for another base model",
        .weight[1],
        .weight[0]
    )]
    AdapterShape {
        path: PathBuf,
        module: String,
        lora_a: Vec<usize>,
        lora_b: Vec<usize>,
        weight: [usize; 2],
    },

    /// An adapter key names a module the base model does not have.
    #[error(
        "adapter {path}: `{module}` matches no module of this base model (its modules look like \
         `{example}`); was the adapter trained for another model?"
    )]
    AdapterModule {
        path: PathBuf,
        module: String,
        example: String,
    },

    /// `target_modules` is an invalid pattern or selects nothing.
    #[error("target_modules {targets}: {message}")]
    TargetModules { targets: String, message: String },

    /// The requested device does not exist or this build cannot use it.
    #[error("device `{requested}`: {message}")]
    Device { requested: String, message: String },

    /// Downloading from the Hugging Face hub failed (or we are offline).
    #[error("hub model `{id}`: {message}")]
    Hub { id: String, message: String },

    /// The engine thread is gone (it panicked or was shut down).
    #[error("the router engine has stopped")]
    EngineStopped,

    /// The engine failed a batch or could not start.
    #[error("router engine: {0}")]
    Engine(String),

    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias used throughout the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { what: "file", path }
        } else {
            Error::Io { path, source }
        }
    }
}
