//! The chat backend: an OpenAI-compatible `chat/completions` endpoint, which
//! Ollama, llama.cpp's server, vLLM and OpenAI all speak.
//!
//! Only the non-streaming subset is used (`stream: false`): the bot posts one
//! finished message, so streaming would buy nothing but parsing work.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{endpoint, guarded, parse_config_url, parse_json, read_capped, send, BackendError};

/// The `backend` name in this module's [`BackendError`]s.
pub const BACKEND: &str = "chat";

/// A chat answer is text; 1 MiB is far beyond any Discord message.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;

/// Long enough for a slow local model to write a paragraph.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Who said a [`ChatMessage`]; serialized lowercase as the protocol wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

/// One message of a conversation, as sent in `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: ChatRole::Assistant,
            content: content.into(),
        }
    }
}

/// Where and how to chat.
#[derive(Clone)]
pub struct ChatConfig {
    /// Server root; a trailing `/` or `/v1` is accepted.
    pub base_url: String,
    /// Sent as `Authorization: Bearer`; never logged. Local servers need none.
    pub api_key: Option<String>,
    pub model: String,
    /// Limit on the whole call.
    pub timeout: Duration,
    /// Largest answer body accepted; see [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
    /// Sent first as a `system` message; left out when blank.
    pub system_prompt: String,
    /// Passed through as `max_tokens`; `None` lets the server decide.
    pub max_tokens: Option<u32>,
}

impl ChatConfig {
    /// A config with the defaults: no key, no system prompt, no token limit,
    /// [`DEFAULT_TIMEOUT`], [`DEFAULT_MAX_BYTES`].
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            model: model.into(),
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
            system_prompt: String::new(),
            max_tokens: None,
        }
    }
}

impl fmt::Debug for ChatConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &super::redacted(&self.api_key))
            .field("model", &self.model)
            .field("timeout", &self.timeout)
            .field("max_bytes", &self.max_bytes)
            .field("system_prompt", &self.system_prompt)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

/// A chat model client; cheap to clone (the client is shared).
#[derive(Clone)]
pub struct ChatBackend {
    client: reqwest::Client,
    config: ChatConfig,
}

impl fmt::Debug for ChatBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct CompletionRequest<'a> {
    model: &'a str,
    messages: Vec<&'a ChatMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    stream: bool,
}

#[derive(Deserialize)]
struct CompletionResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: AnswerMessage,
}

#[derive(Deserialize)]
struct AnswerMessage {
    /// `null` when a model answers with tool calls only.
    content: Option<String>,
}

impl ChatBackend {
    pub fn new(client: reqwest::Client, config: ChatConfig) -> Self {
        Self { client, config }
    }

    /// The configuration this backend was built with.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// `context`: earlier channel messages, oldest first; `message`: the one
    /// to answer. Sends system prompt + context + message and returns the
    /// answer trimmed of surrounding whitespace.
    pub async fn reply(
        &self,
        context: &[ChatMessage],
        message: &str,
    ) -> Result<String, BackendError> {
        let started = std::time::Instant::now();
        let result = guarded(
            BACKEND,
            self.config.timeout,
            self.config.api_key.as_deref(),
            self.complete(context, message),
        )
        .await;
        match &result {
            Ok(text) => tracing::debug!(
                backend = BACKEND,
                chars = text.chars().count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "chat answered"
            ),
            Err(e) => tracing::debug!(backend = BACKEND, error = %e, "chat failed"),
        }
        result
    }

    async fn complete(
        &self,
        context: &[ChatMessage],
        message: &str,
    ) -> Result<String, BackendError> {
        let url = endpoint(&self.config.base_url, "v1/chat/completions");
        let url = parse_config_url(BACKEND, &url)?;
        let system = ChatMessage::system(self.config.system_prompt.clone());
        let user = ChatMessage::user(message);
        let mut messages = Vec::with_capacity(context.len() + 2);
        if !system.content.trim().is_empty() {
            messages.push(&system);
        }
        messages.extend(context);
        messages.push(&user);
        let body = CompletionRequest {
            model: &self.config.model,
            messages,
            max_tokens: self.config.max_tokens,
            stream: false,
        };
        let mut request = self.client.post(url.clone()).json(&body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = send(BACKEND, &url, request, self.config.timeout).await?;
        let json = read_capped(BACKEND, response, self.config.max_bytes).await?;
        let answer: CompletionResponse = parse_json(BACKEND, &json)?;
        let Some(choice) = answer.choices.into_iter().next() else {
            return Err(BackendError::Malformed {
                backend: BACKEND,
                message: "`choices` is empty".to_string(),
            });
        };
        let text = choice.message.content.unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            return Err(BackendError::EmptyReply { backend: BACKEND });
        }
        Ok(text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_serialize_lowercase() {
        let json = serde_json::to_string(&ChatMessage::assistant("hi")).unwrap();
        assert_eq!(json, r#"{"role":"assistant","content":"hi"}"#);
    }

    #[test]
    fn debug_redacts_the_key() {
        let mut config = ChatConfig::new("http://h", "m");
        config.api_key = Some("sk-very-secret".into());
        let text = format!("{config:?}");
        assert!(!text.contains("sk-very-secret") && text.contains("[redacted]"));
    }
}
