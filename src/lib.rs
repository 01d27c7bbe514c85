//! A chat-message router: a small LoRA-adapted language model decides, for
//! each message, between an image-generation call and a plain chat answer.
//!
//! # Layout
//! - [`model`]: configuration, one file per architecture family (defaults,
//!   GGUF names and weight fixes), the one decoder (used for inference and
//!   training), adapted linear layers with their LoRA runtime, batches and
//!   the KV caches (growing, and preallocated for steps replayed from CUDA
//!   graphs), loading from GGUF, safetensors directories and hub ids.
//! - [`tokenizer`]: `tokenizer.json`, or SentencePiece BPE rebuilt from GGUF.
//! - [`lora`]: PEFT-compatible LoRA adapters (config, files, apply, init, save).
//! - [`prompt`]: THE prompt format and THE strict call parser.
//! - [`router`]: batched, early-stopping routing decisions (replayed steps on
//!   CUDA).
//! - [`engine`]: the routing thread and its queue, serving async callers.
//! - [`dataset`]: the JSONL conversation schema and routing metrics.
//! - [`device`]: choosing CPU or CUDA.
//! - [`rng`]: the seeded generator every random draw uses (no global state).
//! - [`cli`]: options and start-up shared by the `bot` and `train` binaries,
//!   and the one place default paths are resolved.
//! - [`error`]: the library's error type.
//!
//! The bot (feature `bot`, on by default; `train` builds without it):
//! - [`config`]: the bot's settings from flags, the environment and `.env`.
//! - [`adapters`]: the `model/current` link: reload and watch for promotions.
//! - [`backends`]: HTTP clients for the image and chat backends.
//! - [`feedback`]: the routing record (SQLite) and the append-only JSONL logs.
//! - [`respond`]: the transport-neutral pipeline (route, answer, flags).
//! - [`discord`]: serenity glue: events, commands, replies.

#[cfg(feature = "bot")]
pub mod adapters;
#[cfg(feature = "bot")]
pub mod backends;
pub mod cli;
#[cfg(feature = "bot")]
pub mod config;
pub mod dataset;
pub mod device;
#[cfg(feature = "bot")]
pub mod discord;
pub mod engine;
pub mod error;
pub mod export;
#[cfg(feature = "bot")]
pub mod feedback;
pub mod lora;
pub mod model;
pub mod prompt;
#[cfg(feature = "bot")]
pub mod respond;
pub mod rng;
pub mod router;
pub mod tokenizer;

pub use error::{Error, Result};
