//! A chat-message router: a small LoRA-adapted language model decides, for
//! each message, between an image-generation call and a plain chat answer.
//!
//! # Layout
//! - [`model`]: configuration, the one decoder implementation (Gemma-3,
//!   Llama-3) used for inference and training, loading from GGUF,
//!   safetensors directories and hub ids.
//! - [`tokenizer`]: `tokenizer.json`, or SentencePiece BPE rebuilt from GGUF.
//! - [`lora`]: PEFT-compatible LoRA adapters (load, apply/merge, init, save).
//! - [`prompt`]: THE prompt format and THE strict call parser.
//! - [`router`]: batched, early-stopping routing decisions, and the engine
//!   thread that serves them to async code.
//! - [`dataset`]: the JSONL conversation schema and routing metrics.
//! - [`device`]: choosing CPU or CUDA.
//! - [`cli`]: options and start-up shared by the `bot` and `train` binaries.
//! - [`error`]: the library's error type.

pub mod cli;
pub mod dataset;
pub mod device;
pub mod error;
pub mod lora;
pub mod model;
pub mod prompt;
pub mod router;
pub mod tokenizer;

pub use error::{Error, Result};
