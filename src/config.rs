//! The bot's settings, resolved once at start-up: every option is a flag
//! with an environment-variable equivalent (also read from `.env`), and every
//! default path is resolved against the project home.
//!
//! Paths given by the user (flags or variables) are taken as they are:
//! absolute, or relative to the current directory. Default paths are
//! relative to the home ([`crate::cli::home`]), so the bot runs from any
//! working directory.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::backends::chat::ChatConfig;
use crate::backends::image::{ImageApi, ImageConfig};

/// A secret (token, API key): never printed, whatever prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.trim().to_string()))
    }
}

/// A range of shards run by this process, out of a total: `0..8/16`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRange {
    pub start: u32,
    pub end: u32,
    pub total: u32,
}

impl FromStr for ShardRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("SHARD_RANGE `{s}`: expected START..END/TOTAL, e.g. 0..8/16");
        let (range, total) = s.trim().split_once('/').ok_or_else(bad)?;
        let (start, end) = range.split_once("..").ok_or_else(bad)?;
        let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
        let r = ShardRange {
            start: parse(start)?,
            end: parse(end)?,
            total: parse(total)?,
        };
        if r.start >= r.end || r.end > r.total {
            return Err(bad());
        }
        Ok(r)
    }
}

/// Everything the bot needs besides the model options (see `.env.example`).
#[derive(Debug, Clone, Args)]
pub struct BotArgs {
    /// Discord bot token (required by `serve`).
    #[arg(long, env = "DISCORD_TOKEN", hide_env_values = true)]
    pub discord_token: Option<Secret>,

    /// Base URL for every Discord REST call (a proxy such as twilight-http-proxy, or a test server).
    #[arg(long, env = "DISCORD_API_BASE", default_value = "https://discord.com")]
    pub discord_api_base: String,

    /// Channels where every message is routed (comma-separated; empty: every channel the bot reads).
    #[arg(long, env = "ALLOWED_CHANNEL_IDS", value_delimiter = ',')]
    pub allowed_channel_ids: Vec<u64>,

    /// Roles whose members are moderators (besides Manage Messages in the channel).
    #[arg(long, env = "MODERATOR_ROLE_IDS", value_delimiter = ',')]
    pub moderator_role_ids: Vec<u64>,

    /// Messages per user per minute before a polite refusal (0: no limit).
    #[arg(long, env = "RATE_LIMIT_PER_MINUTE", default_value_t = 6)]
    pub rate_limit_per_minute: u32,

    /// Image backend: openai or a1111 (unset: image routes show the prompt only).
    #[arg(long, env = "IMAGE_BACKEND")]
    pub image_backend: Option<ImageApi>,

    /// Image server base URL.
    #[arg(long, env = "IMAGE_API_BASE")]
    pub image_api_base: Option<String>,

    /// Image server API key (sent as a bearer token).
    #[arg(long, env = "IMAGE_API_KEY", hide_env_values = true)]
    pub image_api_key: Option<Secret>,

    /// Image model name (openai backend).
    #[arg(long, env = "IMAGE_MODEL")]
    pub image_model: Option<String>,

    /// Image size, WIDTHxHEIGHT.
    #[arg(long, env = "IMAGE_SIZE", default_value = "1024x1024")]
    pub image_size: String,

    /// Seconds before an image request is abandoned.
    #[arg(long, env = "IMAGE_TIMEOUT_SECS", default_value_t = 180)]
    pub image_timeout_secs: u64,

    /// Largest picture the bot uploads (Discord's limit for bots: 10 MiB).
    #[arg(long, env = "UPLOAD_LIMIT_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub upload_limit_bytes: u64,

    /// Chat server base URL (OpenAI-compatible: Ollama, llama.cpp server, vLLM, OpenAI).
    #[arg(long, env = "CHAT_API_BASE")]
    pub chat_api_base: Option<String>,

    /// Chat server API key.
    #[arg(long, env = "CHAT_API_KEY", hide_env_values = true)]
    pub chat_api_key: Option<Secret>,

    /// Chat model name (required with CHAT_API_BASE).
    #[arg(long, env = "CHAT_MODEL")]
    pub chat_model: Option<String>,

    /// Seconds before a chat request is abandoned.
    #[arg(long, env = "CHAT_TIMEOUT_SECS", default_value_t = 90)]
    pub chat_timeout_secs: u64,

    /// Earlier channel messages sent to the chat backend as context.
    #[arg(long, env = "CHAT_CONTEXT_MESSAGES", default_value_t = 10)]
    pub chat_context_messages: u8,

    /// The chat backend's system prompt.
    #[arg(
        long,
        env = "CHAT_SYSTEM_PROMPT",
        default_value = "You are a friendly member of a Discord server. Answer briefly, in the language of the last message."
    )]
    pub chat_system_prompt: String,

    /// The routing record (SQLite). Default: var/router.sqlite3 under the home.
    #[arg(long, env = "ROUTER_DB")]
    pub router_db: Option<PathBuf>,

    /// Where moderators' corrections go (training rows). Default: datas/feedback/discord.jsonl.
    #[arg(long, env = "FEEDBACK_FILE")]
    pub feedback_file: Option<PathBuf>,

    /// Where flags from non-moderators are counted. Default: var/reports.jsonl.
    #[arg(long, env = "REPORTS_FILE")]
    pub reports_file: Option<PathBuf>,

    /// Where `bot console` saves pictures. Default: var/images.
    #[arg(long, env = "IMAGE_OUT_DIR")]
    pub image_out_dir: Option<PathBuf>,

    /// Reaction meaning "should have been an image".
    #[arg(long, env = "FLAG_IMAGE_EMOJI", default_value = "🖼️")]
    pub flag_image_emoji: String,

    /// Reaction meaning "should have been chat".
    #[arg(long, env = "FLAG_CHAT_EMOJI", default_value = "💬")]
    pub flag_chat_emoji: String,

    /// Shards run by this process, START..END/TOTAL (default: autosharded).
    #[arg(long, env = "SHARD_RANGE")]
    pub shard_range: Option<ShardRange>,

    /// Seconds between checks of the adapter link for a promoted adapter (0: never).
    #[arg(long, env = "ADAPTER_WATCH_SECS", default_value_t = 5)]
    pub adapter_watch_secs: u64,

    /// Seconds to finish messages in flight after SIGTERM / Ctrl-C.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 60)]
    pub shutdown_grace_secs: u64,
}

/// Resolved settings: paths made concrete, backends configured.
#[derive(Debug, Clone)]
pub struct Settings {
    pub router_db: PathBuf,
    pub feedback_file: PathBuf,
    pub reports_file: PathBuf,
    pub image_out_dir: PathBuf,
    pub image: Option<ImageConfig>,
    pub chat: Option<ChatConfig>,
    pub rate_limit_per_minute: u32,
    pub chat_context_messages: u8,
    pub flag_image_emoji: String,
    pub flag_chat_emoji: String,
    pub allowed_channel_ids: Vec<u64>,
    pub moderator_role_ids: Vec<u64>,
    pub upload_limit_bytes: u64,
    pub shutdown_grace: Duration,
}

/// A setting that cannot work, named for the person who set it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is set but {1} is not")]
    Missing(&'static str, &'static str),
    #[error("{variable} `{value}`: {message}")]
    Invalid {
        variable: &'static str,
        value: String,
        message: &'static str,
    },
}

impl BotArgs {
    /// Resolves paths against `home` and checks the backend settings.
    pub fn resolve(&self, home: &Path) -> Result<Settings, ConfigError> {
        let path = |given: &Option<PathBuf>, default: &str| {
            given.clone().unwrap_or_else(|| home.join(default))
        };
        let image = match (&self.image_backend, &self.image_api_base) {
            (Some(api), Some(base)) => Some(ImageConfig {
                api: *api,
                base_url: base.clone(),
                api_key: self.image_api_key.as_ref().map(|k| k.expose().to_string()),
                model: self.image_model.clone(),
                size: self.image_size.clone(),
                timeout: Duration::from_secs(self.image_timeout_secs.max(1)),
                max_bytes: self.upload_limit_bytes,
            }),
            (Some(_), None) => return Err(ConfigError::Missing("IMAGE_BACKEND", "IMAGE_API_BASE")),
            (None, Some(_)) => return Err(ConfigError::Missing("IMAGE_API_BASE", "IMAGE_BACKEND")),
            (None, None) => None,
        };
        if !valid_size(&self.image_size) {
            return Err(ConfigError::Invalid {
                variable: "IMAGE_SIZE",
                value: self.image_size.clone(),
                message: "expected WIDTHxHEIGHT, e.g. 1024x1024",
            });
        }
        let chat = match &self.chat_api_base {
            Some(base) => Some(ChatConfig {
                base_url: base.clone(),
                api_key: self.chat_api_key.as_ref().map(|k| k.expose().to_string()),
                model: self
                    .chat_model
                    .clone()
                    .ok_or(ConfigError::Missing("CHAT_API_BASE", "CHAT_MODEL"))?,
                timeout: Duration::from_secs(self.chat_timeout_secs.max(1)),
                max_bytes: 1024 * 1024,
                system_prompt: self.chat_system_prompt.clone(),
                max_tokens: Some(700),
            }),
            None => None,
        };
        for (variable, value) in [
            ("FLAG_IMAGE_EMOJI", &self.flag_image_emoji),
            ("FLAG_CHAT_EMOJI", &self.flag_chat_emoji),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::Invalid {
                    variable,
                    value: value.clone(),
                    message: "must be an emoji",
                });
            }
        }
        Ok(Settings {
            router_db: path(&self.router_db, "var/router.sqlite3"),
            feedback_file: path(&self.feedback_file, "datas/feedback/discord.jsonl"),
            reports_file: path(&self.reports_file, "var/reports.jsonl"),
            image_out_dir: path(&self.image_out_dir, "var/images"),
            image,
            chat,
            rate_limit_per_minute: self.rate_limit_per_minute,
            chat_context_messages: self.chat_context_messages,
            flag_image_emoji: self.flag_image_emoji.trim().to_string(),
            flag_chat_emoji: self.flag_chat_emoji.trim().to_string(),
            allowed_channel_ids: self.allowed_channel_ids.clone(),
            moderator_role_ids: self.moderator_role_ids.clone(),
            upload_limit_bytes: self.upload_limit_bytes,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        })
    }
}

fn valid_size(size: &str) -> bool {
    size.split_once('x').is_some_and(|(w, h)| {
        w.parse::<u32>().is_ok_and(|w| w > 0) && h.parse::<u32>().is_ok_and(|h| h > 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bot: BotArgs,
    }

    fn parse(args: &[&str]) -> BotArgs {
        let mut all = vec!["bot"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().bot
    }

    #[test]
    fn shard_ranges_parse_and_bad_ones_are_named() {
        assert_eq!(
            "0..8/16".parse::<ShardRange>().unwrap(),
            ShardRange {
                start: 0,
                end: 8,
                total: 16
            }
        );
        for bad in ["8..8/16", "0..17/16", "0-8/16", "x..2/3", ""] {
            let e = bad.parse::<ShardRange>().unwrap_err();
            assert!(e.contains("SHARD_RANGE"), "{e}");
        }
    }

    #[test]
    fn defaults_resolve_against_home_and_given_paths_stay_as_given() {
        let s = parse(&["--feedback-file", "rel/fb.jsonl"])
            .resolve(Path::new("/srv/bot"))
            .unwrap();
        assert_eq!(s.router_db, Path::new("/srv/bot/var/router.sqlite3"));
        assert_eq!(s.feedback_file, Path::new("rel/fb.jsonl"));
        assert!(s.image.is_none() && s.chat.is_none());
    }

    #[test]
    fn half_configured_backends_are_refused_with_the_missing_variable() {
        let e = parse(&["--chat-api-base", "http://127.0.0.1:1"])
            .resolve(Path::new("."))
            .unwrap_err();
        assert_eq!(e.to_string(), "CHAT_API_BASE is set but CHAT_MODEL is not");
        let e = parse(&["--image-backend", "a1111"])
            .resolve(Path::new("."))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "IMAGE_BACKEND is set but IMAGE_API_BASE is not"
        );
        let e = parse(&["--image-size", "big"])
            .resolve(Path::new("."))
            .unwrap_err();
        assert!(e.to_string().starts_with("IMAGE_SIZE `big`"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        let args = parse(&["--discord-token", "abc.def.ghi", "--chat-api-key", "sk-123"]);
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("abc.def") && !shown.contains("sk-123"),
            "{shown}"
        );
    }
}
