//! HTTP clients for the two places a routed message can go: an image
//! generator ([`image`]) and a chat model ([`chat`]).
//!
//! Both share one `reqwest::Client` (connection pools are per client) and the
//! same defences against a misbehaving server, which live here: every body is
//! read with a size cap, the whole call runs under one timeout, and every
//! failure becomes a [`BackendError`] whose `Display` is a one-line log
//! message and whose [`BackendError::user_message`] is safe to show in a
//! Discord channel. The API key never reaches either.

pub mod chat;
pub mod image;

use std::time::Duration;

use reqwest::{Response, Url};

/// Why a backend call failed.
///
/// `Display` is a one-line log message for operators; it names the backend
/// and the cause, never the API key (keys are scrubbed from every field even
/// when a server echoes them back).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The whole call (request, answer, and any image download) took longer
    /// than the configured timeout.
    #[error("{backend}: no answer within {after:?}")]
    Timeout {
        backend: &'static str,
        after: Duration,
    },

    /// No connection could be made (refused, DNS failure, TLS handshake).
    #[error("{backend}: cannot connect to {url}: {message}")]
    Unreachable {
        backend: &'static str,
        /// The URL without query string or password: signed download URLs
        /// carry tokens in the query.
        url: String,
        message: String,
    },

    /// The server answered with a non-success HTTP status.
    #[error("{backend}: HTTP {status}: {body}")]
    Status {
        backend: &'static str,
        status: u16,
        /// The first ~300 characters of the body, on one line.
        body: String,
    },

    /// The answer (announced or actually received) is larger than the cap.
    #[error("{backend}: answer larger than {limit} bytes")]
    TooLarge { backend: &'static str, limit: u64 },

    /// The image bytes are not PNG, JPEG or WebP.
    #[error("{backend}: answer is not a PNG, JPEG or WebP image")]
    NotAnImage { backend: &'static str },

    /// The answer is not the JSON (or base64) the protocol promises.
    #[error("{backend}: malformed answer: {message}")]
    Malformed {
        backend: &'static str,
        message: String,
    },

    /// The chat model answered with no text at all.
    #[error("{backend}: empty answer")]
    EmptyReply { backend: &'static str },

    /// The configuration cannot produce a valid request (bad base URL,
    /// unparsable image size); found at call time because `new` cannot fail.
    #[error("{backend}: invalid configuration: {message}")]
    InvalidConfig {
        backend: &'static str,
        message: String,
    },

    /// The connection broke after it was made (reset mid-body, protocol
    /// error).
    #[error("{backend}: transport error: {message}")]
    Transport {
        backend: &'static str,
        message: String,
    },
}

impl BackendError {
    /// The backend that failed (`"openai-images"`, `"a1111"` or `"chat"`).
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Timeout { backend, .. }
            | Self::Unreachable { backend, .. }
            | Self::Status { backend, .. }
            | Self::TooLarge { backend, .. }
            | Self::NotAnImage { backend }
            | Self::Malformed { backend, .. }
            | Self::EmptyReply { backend }
            | Self::InvalidConfig { backend, .. }
            | Self::Transport { backend, .. } => backend,
        }
    }

    /// A short friendly sentence for the Discord channel (no internals, no
    /// URL, no key).
    pub fn user_message(&self) -> String {
        let what = if self.backend() == chat::BACKEND {
            "chat model"
        } else {
            "image generator"
        };
        match self {
            Self::Timeout { .. } => {
                format!("The {what} took too long to answer. Please try again.")
            }
            Self::Unreachable { .. } => {
                format!("The {what} is not reachable right now. Please try again later.")
            }
            Self::Status { status: 429, .. } => {
                format!("The {what} is busy right now. Please try again in a moment.")
            }
            Self::Status {
                status: 401 | 403, ..
            }
            | Self::InvalidConfig { .. } => {
                format!("The {what} is not set up correctly. Please tell an admin.")
            }
            Self::Status { status: 400, .. } if what == "image generator" => {
                "The image generator refused this request. Try a different prompt.".to_string()
            }
            Self::Status { .. } | Self::Transport { .. } => {
                format!("The {what} ran into a problem. Please try again later.")
            }
            Self::TooLarge { .. } if what == "chat model" => {
                "The chat model's answer was too long to use.".to_string()
            }
            Self::TooLarge { .. } => "The generated image is too large to upload.".to_string(),
            Self::NotAnImage { .. } => {
                "The image generator sent back something that is not an image.".to_string()
            }
            Self::Malformed { .. } => {
                format!("The {what} gave an answer I could not understand.")
            }
            Self::EmptyReply { .. } => format!("The {what} had nothing to say. Please try again."),
        }
    }

    /// Replaces every occurrence of `key` in the error's text fields, so a
    /// server that echoes the key (some proxies quote the header back) cannot
    /// leak it into logs.
    pub(crate) fn redact(mut self, key: Option<&str>) -> Self {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return self;
        };
        match &mut self {
            Self::Unreachable { url, message, .. } => {
                *url = url.replace(key, "[redacted]");
                *message = message.replace(key, "[redacted]");
            }
            Self::Status { body: text, .. }
            | Self::Malformed { message: text, .. }
            | Self::InvalidConfig { message: text, .. }
            | Self::Transport { message: text, .. } => *text = text.replace(key, "[redacted]"),
            Self::Timeout { .. }
            | Self::TooLarge { .. }
            | Self::NotAnImage { .. }
            | Self::EmptyReply { .. } => {}
        }
        self
    }
}

/// How much of an error body is kept in [`BackendError::Status`].
const SNIPPET_CHARS: usize = 300;

/// How much of an error body is read at most to build the snippet: enough for
/// 300 characters of 4-byte UTF-8, and no more, whatever the server sends.
const SNIPPET_READ_BYTES: usize = SNIPPET_CHARS * 4;

/// `{base}/{path}` where `base` may or may not end in `/` and may already end
/// in a leading part of `path` (`http://host/v1` + `v1/chat/completions`):
/// users paste base URLs both ways, and a doubled `/v1/v1/` is a 404.
pub(crate) fn endpoint(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let path = path.trim_start_matches('/');
    // Longest overlap first, on segment boundaries only.
    let cuts = path.match_indices('/').map(|(i, _)| i).rev();
    for cut in cuts {
        let (head, tail) = (&path[..cut], &path[cut + 1..]);
        if base
            .strip_suffix(head)
            .is_some_and(|rest| rest.ends_with('/'))
        {
            return format!("{base}/{tail}");
        }
    }
    format!("{base}/{path}")
}

/// Parses a configured endpoint URL; a failure is the operator's to fix.
pub(crate) fn parse_config_url(backend: &'static str, url: &str) -> Result<Url, BackendError> {
    Url::parse(url).map_err(|e| BackendError::InvalidConfig {
        backend,
        message: format!("bad URL {url:?}: {e}"),
    })
}

/// The URL as it may appear in logs: no password, no query (signed download
/// URLs carry their token there), no fragment.
pub(crate) fn loggable_url(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// Sends a request and turns transport failures and non-success statuses
/// into [`BackendError`]s; a success is returned unread.
pub(crate) async fn send(
    backend: &'static str,
    url: &Url,
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<Response, BackendError> {
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            // A timeout set on the shared client rather than ours.
            BackendError::Timeout {
                backend,
                after: timeout,
            }
        } else if e.is_connect() {
            BackendError::Unreachable {
                backend,
                url: loggable_url(url),
                message: error_chain(e),
            }
        } else {
            BackendError::Transport {
                backend,
                message: error_chain(e),
            }
        }
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_prefix(response, SNIPPET_READ_BYTES).await;
    Err(BackendError::Status {
        backend,
        status: status.as_u16(),
        body: snippet(&body),
    })
}

/// Reads a whole body, refusing one that announces or delivers more than
/// `limit` bytes. Chunks are counted as they arrive so a server streaming
/// without `Content-Length` cannot make us buffer more than the cap; dropping
/// the response on error closes the connection.
///
/// (reqwest is built without gzip/brotli, so what arrives is what counts: no
/// decompression bomb can inflate past the cap.)
pub(crate) async fn read_capped(
    backend: &'static str,
    mut response: Response,
    limit: u64,
) -> Result<Vec<u8>, BackendError> {
    let announced = response.content_length();
    if announced.is_some_and(|len| len > limit) {
        return Err(BackendError::TooLarge { backend, limit });
    }
    // Trust the announced length only as a hint, and only up to 1 MiB.
    let hint = announced.unwrap_or(0).min(limit).min(1 << 20);
    let mut body = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BackendError::Transport {
            backend,
            message: error_chain(e),
        })?
    {
        if (body.len() as u64).saturating_add(chunk.len() as u64) > limit {
            return Err(BackendError::TooLarge { backend, limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads at most `max` bytes of a body (for error snippets); read errors just
/// end the snippet, since the status is already the error being reported.
async fn read_prefix(mut response: Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(max - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The first [`SNIPPET_CHARS`] characters of a body, lossily decoded and
/// flattened to one line so the log message stays one line.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .trim()
        .chars()
        .take(SNIPPET_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().chars().nth(SNIPPET_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Parses a JSON answer; the message says what was missing or wrong.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    backend: &'static str,
    body: &[u8],
) -> Result<T, BackendError> {
    serde_json::from_slice(body).map_err(|e| BackendError::Malformed {
        backend,
        message: e.to_string(),
    })
}

/// A reqwest error and its causes on one line, without the URL (the caller
/// reports a scrubbed one where useful). The innermost cause is usually the
/// telling one ("Connection refused").
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message.replace(['\n', '\r'], " ")
}

/// Runs `call` under the whole-call `timeout` and scrubs `key` from any
/// error it returns.
pub(crate) async fn guarded<T>(
    backend: &'static str,
    timeout: Duration,
    key: Option<&str>,
    call: impl std::future::Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Timeout {
            backend,
            after: timeout,
        }),
    };
    result.map_err(|e| e.redact(key))
}

/// `Some("[redacted]")` or `None`, for hand-written `Debug` impls of configs.
pub(crate) fn redacted(key: &Option<String>) -> Option<&'static str> {
    key.as_ref().map(|_| "[redacted]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_never_doubles_the_prefix() {
        let path = "v1/chat/completions";
        for base in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            assert_eq!(endpoint(base, path), "http://h:1/v1/chat/completions");
        }
        assert_eq!(
            endpoint("http://h/proxy/", "v1/images/generations"),
            "http://h/proxy/v1/images/generations"
        );
        assert_eq!(
            endpoint("http://h/sdapi/v1", "sdapi/v1/txt2img"),
            "http://h/sdapi/v1/txt2img"
        );
        // "xv1" is not the segment "v1".
        assert_eq!(endpoint("http://h/xv1", "v1/a"), "http://h/xv1/v1/a");
    }

    #[test]
    fn snippet_is_one_line_and_cut_by_characters() {
        let body = format!("line one\nline two {}", "é".repeat(400));
        let s = snippet(body.as_bytes());
        assert!(!s.contains('\n'));
        assert_eq!(s.chars().count(), SNIPPET_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(snippet(b"  short  "), "short");
        assert_eq!(snippet(&[0xff, 0xfe]), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn redact_scrubs_every_text_field() {
        let e = BackendError::Status {
            backend: "chat",
            status: 401,
            body: "bad key sk-123".into(),
        }
        .redact(Some("sk-123"));
        assert!(!format!("{e} {e:?}").contains("sk-123"));
    }

    #[test]
    fn loggable_url_drops_query_and_password() {
        let url = Url::parse("https://u:pw@h/f.png?sig=secret#x").unwrap();
        assert_eq!(loggable_url(&url), "https://u@h/f.png");
    }
}
