//! The image and chat backends against a local fake server speaking the real
//! protocols (OpenAI images and chat, AUTOMATIC1111): well-formed requests,
//! every answer shape, and every failure mapped to the right
//! [`BackendError`] without leaking the API key.
#![cfg(feature = "bot")]

#[path = "support/backends.rs"]
mod backends_support;

use std::time::{Duration, Instant};

use backends_support::{client, refused_base_url, start, tiny_png, Fault, ImageMode};
use router::backends::chat::{ChatBackend, ChatConfig, ChatMessage};
use router::backends::image::{GeneratedImage, ImageApi, ImageBackend, ImageConfig, ImageFormat};
use router::backends::BackendError;

const KEY: &str = "sk-test-SECRET-0123456789";

fn image_backend(api: ImageApi, base_url: &str) -> ImageBackend {
    let mut config = ImageConfig::new(api, base_url);
    config.timeout = Duration::from_secs(10);
    ImageBackend::new(client(), config)
}

fn image_backend_with(config: ImageConfig) -> ImageBackend {
    ImageBackend::new(client(), config)
}

fn chat_config(base_url: &str) -> ChatConfig {
    let mut config = ChatConfig::new(base_url, "tiny-chat");
    config.timeout = Duration::from_secs(10);
    config
}

fn assert_tiny_png(image: &GeneratedImage) {
    assert_eq!(image.format, ImageFormat::Png);
    assert_eq!(image.bytes, tiny_png());
    assert_eq!(image.file_name(), "image.png");
}

/// The fixture is the PNG that Python's zlib decompressed and whose CRCs
/// `zlib.crc32` recomputed (`struct`-built, 82 bytes).
#[test]
fn tiny_png_is_the_checked_fixture() {
    let expected = "89504e470d0a1a0a0000000d4948445200000002000000020802000000fdd49a73\
                    00000019494441547801010e00f1ff00ff000000ff00000000ffffffff1fee05fb\
                    deddec2b0000000049454e44ae426082";
    let hex: String = tiny_png().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, expected);
    assert_eq!(ImageFormat::sniff(&tiny_png()), Some(ImageFormat::Png));
}

#[tokio::test]
async fn openai_b64_answer_and_request_shape() {
    let fake = start().await;
    let mut config = ImageConfig::new(ImageApi::OpenAi, fake.base_url());
    config.api_key = Some(KEY.into());
    config.model = Some("dall-e-3".into());
    config.size = "512x512".into();
    let image = image_backend_with(config)
        .generate("a red fox")
        .await
        .unwrap();
    assert_tiny_png(&image);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/images/generations")
    );
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.json,
        serde_json::json!({
            "model": "dall-e-3", "prompt": "a red fox", "n": 1,
            "size": "512x512", "response_format": "b64_json",
        })
    );
}

#[tokio::test]
async fn openai_without_key_or_model_sends_neither() {
    let fake = start().await;
    image_backend(ImageApi::OpenAi, &fake.base_url())
        .generate("x")
        .await
        .unwrap();
    let r = &fake.requests()[0];
    assert_eq!(r.header("authorization"), None);
    assert!(r.json.get("model").is_none(), "{}", r.json);
}

#[tokio::test]
async fn base_urls_with_slash_or_v1_are_not_doubled() {
    let fake = start().await;
    for suffix in ["/", "/v1", "/v1/"] {
        let base = format!("{}{suffix}", fake.base_url());
        image_backend(ImageApi::OpenAi, &base)
            .generate("x")
            .await
            .unwrap();
        ChatBackend::new(client(), chat_config(&base))
            .reply(&[], "hi")
            .await
            .unwrap();
    }
    let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/v1/images/generations", "/v1/chat/completions"].repeat(3)
    );
}

#[tokio::test]
async fn openai_url_answer_is_downloaded_without_the_key() {
    let fake = start().await;
    fake.set_image_mode(ImageMode::Url);
    let mut config = ImageConfig::new(ImageApi::OpenAi, fake.base_url());
    config.api_key = Some(KEY.into());
    let image = image_backend_with(config).generate("x").await.unwrap();
    assert_tiny_png(&image);

    let files = fake.requests_to("/files/image.png");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].method, "GET");
    // The download host may be a third party (signed storage URL).
    assert_eq!(files[0].header("authorization"), None);
}

#[tokio::test]
async fn a1111_with_and_without_data_prefix() {
    let fake = start().await;
    let mut config = ImageConfig::new(ImageApi::A1111, format!("{}/", fake.base_url()));
    config.size = "768x512".into();
    let backend = image_backend_with(config);
    for prefix in [false, true] {
        fake.set_data_prefix(prefix);
        assert_tiny_png(&backend.generate("a castle").await.unwrap());
    }
    let requests = fake.requests_to("/sdapi/v1/txt2img");
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].json,
        serde_json::json!({ "prompt": "a castle", "width": 768, "height": 512 })
    );
}

#[tokio::test]
async fn a1111_model_switches_checkpoint_and_bad_size_is_config_error() {
    let fake = start().await;
    let mut config = ImageConfig::new(ImageApi::A1111, fake.base_url());
    config.model = Some("sdxl.safetensors".into());
    image_backend_with(config.clone())
        .generate("x")
        .await
        .unwrap();
    assert_eq!(
        fake.requests()[0].json["override_settings"]["sd_model_checkpoint"],
        "sdxl.safetensors"
    );

    config.size = "big".into();
    let err = image_backend_with(config).generate("x").await.unwrap_err();
    assert!(matches!(err, BackendError::InvalidConfig { .. }), "{err:?}");
    assert_eq!(fake.requests().len(), 1, "nothing sent with a bad size");
}

#[tokio::test]
async fn chat_sends_system_prompt_then_context_then_message() {
    let fake = start().await;
    fake.set_reply("  @everyone look at this!\n");
    let mut config = chat_config(&fake.base_url());
    config.api_key = Some(KEY.into());
    config.system_prompt = "You are terse.".into();
    config.max_tokens = Some(64);
    let context = [
        ChatMessage::user("first"),
        ChatMessage::assistant("second"),
        ChatMessage::user("third"),
    ];
    let reply = ChatBackend::new(client(), config)
        .reply(&context, "answer me")
        .await
        .unwrap();
    // Model text comes back verbatim (trimmed); mention safety is the
    // Discord layer's job.
    assert_eq!(reply, "@everyone look at this!");

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(
        r.json,
        serde_json::json!({
            "model": "tiny-chat",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "second"},
                {"role": "user", "content": "third"},
                {"role": "user", "content": "answer me"},
            ],
            "max_tokens": 64,
            "stream": false,
        })
    );
}

#[tokio::test]
async fn chat_blank_system_prompt_is_left_out_and_empty_reply_is_an_error() {
    let fake = start().await;
    fake.set_reply(" \n ");
    let err = ChatBackend::new(client(), chat_config(&fake.base_url()))
        .reply(&[], "hi")
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::EmptyReply { .. }), "{err:?}");
    let r = &fake.requests()[0];
    assert_eq!(
        r.json["messages"],
        serde_json::json!([{"role": "user", "content": "hi"}])
    );
    assert!(r.json.get("max_tokens").is_none());
    assert_eq!(r.header("authorization"), None);
}

#[tokio::test]
async fn slow_backends_time_out_on_the_whole_call() {
    let fake = start().await;
    fake.set_delay(Duration::from_secs(30));
    let timeout = Duration::from_millis(300);

    let mut config = ImageConfig::new(ImageApi::OpenAi, fake.base_url());
    config.timeout = timeout;
    let started = Instant::now();
    let err = image_backend_with(config).generate("x").await.unwrap_err();
    assert!(
        matches!(err, BackendError::Timeout { backend: "openai-images", after } if after == timeout),
        "{err:?}"
    );

    let mut config = chat_config(&fake.base_url());
    config.timeout = timeout;
    let err = ChatBackend::new(client(), config)
        .reply(&[], "hi")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Timeout {
                backend: "chat",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(fake.requests().len(), 2, "both requests did arrive");
}

#[tokio::test]
async fn a_slow_download_counts_against_the_same_timeout() {
    let fake = start().await;
    fake.set_image_mode(ImageMode::Url);
    // Each request waits 200 ms: the API call fits in 300 ms, the two
    // together (API call, then download) do not.
    fake.set_delay(Duration::from_millis(200));
    let mut config = ImageConfig::new(ImageApi::OpenAi, fake.base_url());
    config.timeout = Duration::from_millis(300);
    let err = image_backend_with(config).generate("x").await.unwrap_err();
    assert!(matches!(err, BackendError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn refused_connection_is_unreachable() {
    let base = refused_base_url().await;
    let err = image_backend(ImageApi::A1111, &base)
        .generate("x")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::Unreachable {
                backend: "a1111",
                ..
            }
        ),
        "{err:?}"
    );
    let err = ChatBackend::new(client(), chat_config(&base))
        .reply(&[], "hi")
        .await
        .unwrap_err();
    let BackendError::Unreachable { url, message, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(url, &format!("{base}/v1/chat/completions"));
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

#[tokio::test]
async fn http_errors_carry_status_and_a_short_one_line_body() {
    let fake = start().await;
    fake.set_fault(Some(Fault::Status {
        status: 500,
        body: format!("CUDA out of memory\n{}", "x".repeat(5000)),
    }));
    let err = image_backend(ImageApi::OpenAi, &fake.base_url())
        .generate("x")
        .await
        .unwrap_err();
    let BackendError::Status { status, body, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*status, 500);
    assert!(body.starts_with("CUDA out of memory x"), "{body}");
    assert!(body.chars().count() <= 301);
    assert!(!err.to_string().contains('\n'));

    fake.set_fault(Some(Fault::Status {
        status: 429,
        body: r#"{"error":{"message":"rate limited"}}"#.into(),
    }));
    let err = ChatBackend::new(client(), chat_config(&fake.base_url()))
        .reply(&[], "hi")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BackendError::Status { status: 429, body, .. } if body.contains("rate limited")),
        "{err:?}"
    );
    assert!(err.user_message().contains("busy"));
}

#[tokio::test]
async fn oversize_answers_are_refused_with_or_without_content_length() {
    let fake = start().await;
    for content_length in [true, false] {
        fake.set_fault(Some(Fault::Oversize {
            bytes: 3 * 1024 * 1024,
            content_length,
        }));
        let mut config = chat_config(&fake.base_url());
        config.max_bytes = 64 * 1024;
        let err = ChatBackend::new(client(), config)
            .reply(&[], "hi")
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::TooLarge { limit: 65536, .. }),
            "content_length={content_length}: {err:?}"
        );

        let mut config = ImageConfig::new(ImageApi::A1111, fake.base_url());
        config.max_bytes = 64 * 1024;
        let err = image_backend_with(config).generate("x").await.unwrap_err();
        assert!(matches!(err, BackendError::TooLarge { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn the_chunked_fault_really_has_no_content_length() {
    // Guards the test above: without this, "chunked" could silently be a
    // second Content-Length test.
    let fake = start().await;
    fake.set_fault(Some(Fault::Oversize {
        bytes: 1000,
        content_length: false,
    }));
    let response = client()
        .post(format!("{}/v1/chat/completions", fake.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.content_length(), None);
    assert_eq!(
        response
            .headers()
            .get("transfer-encoding")
            .map(|v| v.as_bytes()),
        Some(&b"chunked"[..])
    );
}

#[tokio::test]
async fn oversize_images_are_refused_in_every_delivery() {
    let fake = start().await;
    let mut big = tiny_png();
    big.resize(5000, 0);
    fake.set_image_bytes(big);
    let mut config = ImageConfig::new(ImageApi::OpenAi, fake.base_url());
    config.max_bytes = 4096;

    // Base64 inside a JSON envelope that is itself within its cap.
    let err = image_backend_with(config.clone())
        .generate("x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::TooLarge { limit: 4096, .. }),
        "{err:?}"
    );

    // A URL download with Content-Length, then chunked.
    fake.set_image_mode(ImageMode::Url);
    let err = image_backend_with(config.clone())
        .generate("x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, BackendError::TooLarge { limit: 4096, .. }),
        "{err:?}"
    );
    fake.set_file_fault(Some(Fault::Oversize {
        bytes: 1 << 20,
        content_length: false,
    }));
    let err = image_backend_with(config).generate("x").await.unwrap_err();
    assert!(
        matches!(err, BackendError::TooLarge { limit: 4096, .. }),
        "{err:?}"
    );
    assert!(err.user_message().contains("too large"));
}

#[tokio::test]
async fn non_images_are_refused() {
    let fake = start().await;
    fake.set_image_bytes(b"<html>Server error</html>".to_vec());
    for api in [ImageApi::OpenAi, ImageApi::A1111] {
        let err = image_backend(api, &fake.base_url())
            .generate("x")
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::NotAnImage { .. }), "{err:?}");
    }
    fake.set_image_mode(ImageMode::Url);
    let err = image_backend(ImageApi::OpenAi, &fake.base_url())
        .generate("x")
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NotAnImage { .. }), "{err:?}");
}

#[tokio::test]
async fn malformed_answers_are_malformed_errors() {
    let fake = start().await;
    let bodies: [&[u8]; 5] = [
        b"{not json",
        b"",
        br#"{"data": []}"#,
        br#"{"data": [{"b64_json": "%%%not base64"}], "images": [], "choices": []}"#,
        br#"{"data": [{"url": "file:///etc/passwd"}], "images": ["!!"], "choices": [{"message": {}}]}"#,
    ];
    for body in bodies {
        fake.set_fault(Some(Fault::Raw(body.to_vec())));
        for api in [ImageApi::OpenAi, ImageApi::A1111] {
            let err = image_backend(api, &fake.base_url())
                .generate("x")
                .await
                .unwrap_err();
            assert!(
                matches!(err, BackendError::Malformed { .. }),
                "{api:?} {:?}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
        let err = ChatBackend::new(client(), chat_config(&fake.base_url()))
            .reply(&[], "hi")
            .await
            .unwrap_err();
        // A choice without content is an empty answer, not a malformed one.
        assert!(
            matches!(
                err,
                BackendError::Malformed { .. } | BackendError::EmptyReply { .. }
            ),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn the_key_never_appears_in_errors() {
    let fake = start().await;
    let refused = refused_base_url().await;
    let mut errors = Vec::new();

    let chat = |base: &str, timeout_ms: u64| {
        let mut config = chat_config(base);
        config.api_key = Some(KEY.into());
        config.timeout = Duration::from_millis(timeout_ms);
        ChatBackend::new(client(), config)
    };
    let image = |base: &str| {
        let mut config = ImageConfig::new(ImageApi::OpenAi, base);
        config.api_key = Some(KEY.into());
        config.timeout = Duration::from_millis(500);
        ImageBackend::new(client(), config)
    };

    // A server (or proxy) quoting the key back in its error body.
    fake.set_fault(Some(Fault::Status {
        status: 401,
        body: format!("Incorrect API key provided: {KEY}"),
    }));
    errors.push(
        chat(&fake.base_url(), 5000)
            .reply(&[], "hi")
            .await
            .unwrap_err(),
    );
    errors.push(image(&fake.base_url()).generate("x").await.unwrap_err());
    fake.set_fault(Some(Fault::Raw(format!("{{\"{KEY}\": 1").into_bytes())));
    errors.push(
        chat(&fake.base_url(), 5000)
            .reply(&[], "hi")
            .await
            .unwrap_err(),
    );
    errors.push(chat(&refused, 5000).reply(&[], "hi").await.unwrap_err());
    errors.push(image(&refused).generate("x").await.unwrap_err());
    fake.set_fault(None);
    fake.set_delay(Duration::from_secs(30));
    errors.push(
        chat(&fake.base_url(), 200)
            .reply(&[], "hi")
            .await
            .unwrap_err(),
    );

    assert!(matches!(
        errors[0],
        BackendError::Status { status: 401, .. }
    ));
    for err in &errors {
        for text in [err.to_string(), format!("{err:?}"), err.user_message()] {
            assert!(!text.contains(KEY), "key leaked: {text}");
        }
        let friendly = err.user_message();
        assert!(
            !friendly.contains("127.0.0.1") && !friendly.contains("http"),
            "{friendly}"
        );
    }

    // Nor in the configs' and backends' Debug.
    let debug = format!(
        "{:?} {:?}",
        chat(&fake.base_url(), 1),
        image(&fake.base_url())
    );
    assert!(
        !debug.contains(KEY) && debug.contains("[redacted]"),
        "{debug}"
    );
}
