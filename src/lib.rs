//! A chat-message router: a small LoRA-adapted language model decides, for
//! each message, between an image-generation call and a plain chat answer.
//!
//! # Layout
//! - [`model`]: configuration, one file per architecture family (defaults,
//!   GGUF names and weight fixes), the one decoder (used for inference and
//!   training), adapted linear layers with their LoRA runtime, batches and
//!   the KV cache, loading from GGUF, safetensors directories and hub ids.
//! - [`tokenizer`]: `tokenizer.json`, or SentencePiece BPE rebuilt from GGUF.
//! - [`lora`]: PEFT-compatible LoRA adapters (config, files, apply, init, save).
//! - [`prompt`]: THE prompt format and THE strict call parser.
//! - [`router`]: batched, early-stopping routing decisions, and the engine
//!   thread that serves them to async code.
//! - [`dataset`]: the JSONL conversation schema and routing metrics.
//! - [`device`]: choosing CPU or CUDA.
//! - [`rng`]: the seeded generator every random draw uses (no global state).
//! - [`cli`]: options and start-up shared by the `bot` and `train` binaries.
//! - [`error`]: the library's error type.

pub mod cli;
pub mod dataset;
pub mod device;
pub mod error;
pub mod lora;
pub mod model;
pub mod prompt;
pub mod rng;
pub mod router;
pub mod tokenizer;

pub use error::{Error, Result};
