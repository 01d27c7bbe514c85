//! The image backend: one prompt in, one PNG/JPEG/WebP out, from either an
//! OpenAI-compatible images API or an AUTOMATIC1111 (`sdapi`) server.
//!
//! What comes back is checked before anyone uploads it: size-capped while
//! downloading, base64 decoded only when its decoded size fits, and sniffed
//! by magic bytes, because servers label things `image/png` that are not.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{endpoint, guarded, parse_config_url, parse_json, read_capped, send, BackendError};

/// Discord's upload limit for servers without boosts: an image larger than
/// this could not be posted anyway.
pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024;

/// Image generation is slow (tens of seconds on a busy GPU).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Room for the JSON around a base64 image: field names, `created`,
/// `revised_prompt`, A1111's `parameters` and `info` echo.
const ENVELOPE_SLACK: u64 = 256 * 1024;

/// Which wire protocol the image server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageApi {
    /// `POST /v1/images/generations` (OpenAI, LocalAI, most proxies).
    OpenAi,
    /// `POST /sdapi/v1/txt2img` (AUTOMATIC1111, Forge, SD.Next).
    A1111,
}

impl ImageApi {
    /// The name used in config files and in [`BackendError`]s' `backend`.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAi => "openai-images",
            Self::A1111 => "a1111",
        }
    }
}

impl fmt::Display for ImageApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OpenAi => "openai",
            Self::A1111 => "a1111",
        })
    }
}

/// An image API name that is neither `openai` nor `a1111`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image API {0:?}; expected \"openai\" or \"a1111\"")]
pub struct UnknownImageApi(pub String);

impl FromStr for ImageApi {
    type Err = UnknownImageApi;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(Self::OpenAi),
            "a1111" => Ok(Self::A1111),
            _ => Err(UnknownImageApi(s.to_string())),
        }
    }
}

/// Where and how to generate images.
#[derive(Clone)]
pub struct ImageConfig {
    pub api: ImageApi,
    /// Server root; a trailing `/` or `/v1` (OpenAI) is accepted.
    pub base_url: String,
    /// Sent as `Authorization: Bearer` (OpenAI API only); never logged.
    pub api_key: Option<String>,
    /// OpenAI: the `model` field. A1111: the checkpoint to switch to
    /// (`override_settings.sd_model_checkpoint`); `None` keeps the loaded one.
    pub model: Option<String>,
    /// `WIDTHxHEIGHT`, e.g. `1024x1024`; A1111 gets it split in two.
    pub size: String,
    /// Limit on the whole call, including downloading a URL answer.
    pub timeout: Duration,
    /// Largest decoded image accepted; see [`DEFAULT_MAX_BYTES`].
    pub max_bytes: u64,
}

impl ImageConfig {
    /// A config with the defaults: no key, no model, 1024x1024,
    /// [`DEFAULT_TIMEOUT`], [`DEFAULT_MAX_BYTES`].
    pub fn new(api: ImageApi, base_url: impl Into<String>) -> Self {
        Self {
            api,
            base_url: base_url.into(),
            api_key: None,
            model: None,
            size: "1024x1024".to_string(),
            timeout: DEFAULT_TIMEOUT,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

impl fmt::Debug for ImageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageConfig")
            .field("api", &self.api)
            .field("base_url", &self.base_url)
            .field("api_key", &super::redacted(&self.api_key))
            .field("model", &self.model)
            .field("size", &self.size)
            .field("timeout", &self.timeout)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

/// An image generator client; cheap to clone (the client is shared).
#[derive(Clone)]
pub struct ImageBackend {
    client: reqwest::Client,
    config: ImageConfig,
}

impl fmt::Debug for ImageBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The container formats Discord displays inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// The format named by the leading magic bytes, if it is one we accept.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(Self::Jpeg)
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(Self::Webp)
        } else {
            None
        }
    }

    /// File extension without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    /// MIME type for an upload's content type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// A generated image whose bytes sniffed as [`ImageFormat`].
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub bytes: Vec<u8>,
    pub format: ImageFormat,
}

impl GeneratedImage {
    /// A file name for an attachment, e.g. `image.png`.
    pub fn file_name(&self) -> String {
        format!("image.{}", self.format.extension())
    }
}

/// `POST /v1/images/generations` body.
#[derive(Serialize)]
struct OpenAiRequest<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    prompt: &'a str,
    n: u32,
    size: &'a str,
    /// Left out for OpenAI's GPT image models, which always answer in
    /// base64 and reject the field.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a str>,
}

#[derive(Deserialize)]
struct OpenAiResponse {
    data: Vec<OpenAiImage>,
}

#[derive(Deserialize)]
struct OpenAiImage {
    b64_json: Option<String>,
    url: Option<String>,
}

/// `POST /sdapi/v1/txt2img` body.
#[derive(Serialize)]
struct A1111Request<'a> {
    prompt: &'a str,
    width: u32,
    height: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    override_settings: Option<A1111Settings<'a>>,
}

#[derive(Serialize)]
struct A1111Settings<'a> {
    sd_model_checkpoint: &'a str,
}

#[derive(Deserialize)]
struct A1111Response {
    images: Vec<String>,
}

impl ImageBackend {
    pub fn new(client: reqwest::Client, config: ImageConfig) -> Self {
        Self { client, config }
    }

    /// The configuration this backend was built with.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// Generates one image for `prompt`.
    pub async fn generate(&self, prompt: &str) -> Result<GeneratedImage, BackendError> {
        let backend = self.config.api.name();
        let started = std::time::Instant::now();
        let call = async {
            match self.config.api {
                ImageApi::OpenAi => self.generate_openai(prompt).await,
                ImageApi::A1111 => self.generate_a1111(prompt).await,
            }
        };
        let result = guarded(
            backend,
            self.config.timeout,
            self.config.api_key.as_deref(),
            call,
        )
        .await;
        match &result {
            Ok(image) => tracing::debug!(
                backend,
                bytes = image.bytes.len(),
                format = image.format.extension(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "image generated"
            ),
            Err(e) => tracing::debug!(backend, error = %e, "image generation failed"),
        }
        result
    }

    async fn generate_openai(&self, prompt: &str) -> Result<GeneratedImage, BackendError> {
        let backend = ImageApi::OpenAi.name();
        let url = endpoint(&self.config.base_url, "v1/images/generations");
        let url = parse_config_url(backend, &url)?;
        let body = OpenAiRequest {
            model: self.config.model.as_deref(),
            prompt,
            n: 1,
            size: &self.config.size,
            response_format: (!self
                .config
                .model
                .as_deref()
                .is_some_and(|m| m.starts_with("gpt-image")))
            .then_some("b64_json"),
        };
        let mut request = self.client.post(url.clone()).json(&body);
        if let Some(key) = &self.config.api_key {
            // bearer_auth marks the header sensitive, so it is masked in any
            // Debug output of the request.
            request = request.bearer_auth(key);
        }
        let response = send(backend, &url, request, self.config.timeout).await?;
        let json = read_capped(backend, response, self.envelope_limit()).await?;
        let answer: OpenAiResponse = parse_json(backend, &json)?;
        let Some(first) = answer.data.into_iter().next() else {
            return Err(malformed(backend, "`data` is empty"));
        };
        let bytes = match (first.b64_json, first.url) {
            (Some(b64), _) => decode_base64(backend, &b64, self.config.max_bytes)?,
            (None, Some(image_url)) => self.download(backend, &image_url).await?,
            (None, None) => {
                return Err(malformed(
                    backend,
                    "`data[0]` has neither `b64_json` nor `url`",
                ))
            }
        };
        into_image(backend, bytes)
    }

    /// Fetches a `url` answer. The key is NOT sent: the URL usually points at
    /// a storage host (signed blob URL) that must never see it.
    async fn download(&self, backend: &'static str, url: &str) -> Result<Vec<u8>, BackendError> {
        let url = reqwest::Url::parse(url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| malformed(backend, "`data[0].url` is not an http(s) URL"))?;
        let response = send(
            backend,
            &url,
            self.client.get(url.clone()),
            self.config.timeout,
        )
        .await?;
        read_capped(backend, response, self.config.max_bytes).await
    }

    async fn generate_a1111(&self, prompt: &str) -> Result<GeneratedImage, BackendError> {
        let backend = ImageApi::A1111.name();
        let (width, height) =
            parse_size(&self.config.size).ok_or_else(|| BackendError::InvalidConfig {
                backend,
                message: format!(
                    "image size {:?} is not WIDTHxHEIGHT (e.g. 1024x1024)",
                    self.config.size
                ),
            })?;
        let url = endpoint(&self.config.base_url, "sdapi/v1/txt2img");
        let url = parse_config_url(backend, &url)?;
        let body = A1111Request {
            prompt,
            width,
            height,
            override_settings: self.config.model.as_deref().map(|m| A1111Settings {
                sd_model_checkpoint: m,
            }),
        };
        let mut request = self.client.post(url.clone()).json(&body);
        if let Some(key) = &self.config.api_key {
            // Behind an authenticating reverse proxy; A1111 itself ignores it.
            request = request.bearer_auth(key);
        }
        let response = send(backend, &url, request, self.config.timeout).await?;
        let json = read_capped(backend, response, self.envelope_limit()).await?;
        let answer: A1111Response = parse_json(backend, &json)?;
        let Some(first) = answer.images.into_iter().next() else {
            return Err(malformed(backend, "`images` is empty"));
        };
        let bytes = decode_base64(backend, &first, self.config.max_bytes)?;
        into_image(backend, bytes)
    }

    /// Cap on a JSON answer carrying a base64 image of at most `max_bytes`:
    /// base64 is 4/3 the size, plus the envelope.
    fn envelope_limit(&self) -> u64 {
        (self.config.max_bytes / 3 + 1)
            .saturating_mul(4)
            .saturating_add(ENVELOPE_SLACK)
    }
}

/// `WIDTHxHEIGHT` with positive sides (`x` or `X`).
pub fn parse_size(size: &str) -> Option<(u32, u32)> {
    let (w, h) = size.trim().split_once(['x', 'X'])?;
    let w: u32 = w.trim().parse().ok()?;
    let h: u32 = h.trim().parse().ok()?;
    (w > 0 && h > 0).then_some((w, h))
}

fn malformed(backend: &'static str, message: &str) -> BackendError {
    BackendError::Malformed {
        backend,
        message: message.to_string(),
    }
}

/// Decodes standard base64, with or without a `data:...;base64,` prefix and
/// line breaks, refusing before decoding when the result would exceed
/// `limit`.
fn decode_base64(backend: &'static str, text: &str, limit: u64) -> Result<Vec<u8>, BackendError> {
    let text = text.trim();
    let payload = match text.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => return Err(malformed(backend, "data URL is not base64")),
        },
        None => text,
    };
    let payload: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let decoded_len = (payload.len() as u64 / 4).saturating_mul(3);
    if decoded_len > limit.saturating_add(2) {
        return Err(BackendError::TooLarge { backend, limit });
    }
    // Some servers drop the `=` padding; accept both.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(payload.as_bytes())
        .map_err(|e| malformed(backend, &format!("bad base64 image: {e}")))?;
    if bytes.len() as u64 > limit {
        return Err(BackendError::TooLarge { backend, limit });
    }
    Ok(bytes)
}

fn into_image(backend: &'static str, bytes: Vec<u8>) -> Result<GeneratedImage, BackendError> {
    let format = ImageFormat::sniff(&bytes).ok_or(BackendError::NotAnImage { backend })?;
    Ok(GeneratedImage { bytes, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_three_formats_and_nothing_else() {
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\n...."),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::sniff(&[0xff, 0xd8, 0xff, 0xe0]),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::Webp)
        );
        for bad in [&b""[..], b"RIFF", b"RIFF\0\0\0\0WAVE", b"<html>", b"\x89PN"] {
            assert_eq!(ImageFormat::sniff(bad), None);
        }
    }

    #[test]
    fn api_names_parse_case_insensitively() {
        assert_eq!("OpenAI".parse::<ImageApi>(), Ok(ImageApi::OpenAi));
        assert_eq!(" a1111 ".parse::<ImageApi>(), Ok(ImageApi::A1111));
        let err = "dalle".parse::<ImageApi>().unwrap_err().to_string();
        assert!(err.contains("openai") && err.contains("a1111"), "{err}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024x768"), Some((1024, 768)));
        assert_eq!(parse_size("512X512"), Some((512, 512)));
        for bad in ["", "1024", "0x5", "ax5", "5x", "-1x5"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn base64_accepts_data_urls_and_checks_size() {
        let b = "data:image/png;base64,aGVsbG8=";
        assert_eq!(decode_base64("t", b, 100).unwrap(), b"hello");
        assert_eq!(decode_base64("t", "aGVs\nbG8", 100).unwrap(), b"hello");
        assert!(matches!(
            decode_base64("t", "aGVsbG8=", 4),
            Err(BackendError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_base64("t", &"A".repeat(4000), 10),
            Err(BackendError::TooLarge { .. })
        ));
        assert!(matches!(
            decode_base64("t", "data:text/plain,hi", 100),
            Err(BackendError::Malformed { .. })
        ));
        assert!(matches!(
            decode_base64("t", "!!!!", 100),
            Err(BackendError::Malformed { .. })
        ));
    }

    #[test]
    fn debug_redacts_the_key() {
        let mut config = ImageConfig::new(ImageApi::OpenAi, "http://h");
        config.api_key = Some("sk-very-secret".into());
        let text = format!("{config:?}");
        assert!(!text.contains("sk-very-secret") && text.contains("[redacted]"));
    }
}
