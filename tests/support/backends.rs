//! A fake image/chat backend for integration tests: one local HTTP server on
//! `127.0.0.1:0` speaking the real wire protocols the bot's backends use:
//!
//! - `POST /v1/images/generations` (OpenAI images; `b64_json` or `url`
//!   answers, see [`ImageMode`]),
//! - `GET /files/{name}` (the image behind a `url` answer),
//! - `POST /sdapi/v1/txt2img` (AUTOMATIC1111),
//! - `POST /v1/chat/completions` (OpenAI chat, non-streaming).
//!
//! Every request is recorded ([`FakeBackend::requests`]) before any delay or
//! fault applies, so a test can assert on what a timed-out client sent.
//! Behaviour is changed at any time through `&self` setters, so one server
//! can be shared by a bot under test and the test body.
//!
//! Use it from a test crate with
//! `#[path = "support/backends.rs"] mod backends_support;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

/// What the chat endpoint answers until [`FakeBackend::set_reply`] is called.
pub const DEFAULT_REPLY: &str = "Hello from the fake chat backend.";

/// How the OpenAI images endpoint delivers the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageMode {
    /// `data[0].b64_json` holds the image (what `response_format:
    /// "b64_json"` asks for).
    B64Json,
    /// `data[0].url` points at this server's `/files/image.png`.
    Url,
}

/// A misbehaviour to replace the normal answer with.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This HTTP status with this body (as `application/json` if it parses,
    /// `text/plain` otherwise).
    Status { status: u16, body: String },
    /// Status 200 with these exact bytes as an `application/json` body
    /// (malformed JSON, a JSON of the wrong shape).
    Raw(Vec<u8>),
    /// Status 200 with `bytes` bytes of filler; with `content_length: false`
    /// the body is sent chunked, so a client only learns its size by reading.
    Oversize { bytes: usize, content_length: bool },
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Header names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; `Value::Null` when empty or not JSON.
    pub json: Value,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The knobs; one copy per server, read at the start of every request.
#[derive(Debug, Clone)]
struct Settings {
    reply: String,
    image_mode: ImageMode,
    data_prefix: bool,
    image: Vec<u8>,
    delay: Duration,
    fault: Option<Fault>,
    file_fault: Option<Fault>,
}

struct Shared {
    settings: Mutex<Settings>,
    requests: Mutex<Vec<RecordedRequest>>,
    base_url: String,
}

/// A running fake backend; the server stops when this is dropped.
pub struct FakeBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

/// Starts a fake backend on `127.0.0.1:0` answering normally: chat replies
/// [`DEFAULT_REPLY`], images are [`tiny_png`] delivered as `b64_json`
/// (OpenAI) or plain base64 (A1111), no delay, no fault.
pub async fn start() -> FakeBackend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let shared = Arc::new(Shared {
        settings: Mutex::new(Settings {
            reply: DEFAULT_REPLY.to_string(),
            image_mode: ImageMode::B64Json,
            data_prefix: false,
            image: tiny_png(),
            delay: Duration::ZERO,
            fault: None,
            file_fault: None,
        }),
        requests: Mutex::new(Vec::new()),
        base_url: format!("http://{addr}"),
    });
    let app = Router::new().fallback(handle).with_state(shared.clone());
    let server = tokio::spawn(async move {
        // Errors here mean the test is tearing down; nothing to report.
        let _ = axum::serve(listener, app).await;
    });
    FakeBackend {
        addr,
        shared,
        server,
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeBackend {
    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Requests received so far on `path` (query excluded).
    pub fn requests_to(&self, path: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.split('?').next() == Some(path))
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// The chat endpoint's answer text (`choices[0].message.content`).
    pub fn set_reply(&self, text: impl Into<String>) {
        self.settings().reply = text.into();
    }

    /// How the OpenAI images endpoint delivers the image.
    pub fn set_image_mode(&self, mode: ImageMode) {
        self.settings().image_mode = mode;
    }

    /// Whether A1111 answers carry a `data:image/png;base64,` prefix (some
    /// forks and proxies add one).
    pub fn set_data_prefix(&self, on: bool) {
        self.settings().data_prefix = on;
    }

    /// The bytes served as "the image" by all image routes; anything, e.g.
    /// HTML, to test image validation.
    pub fn set_image_bytes(&self, bytes: Vec<u8>) {
        self.settings().image = bytes;
    }

    /// Waits this long before answering any request (after recording it).
    pub fn set_delay(&self, delay: Duration) {
        self.settings().delay = delay;
    }

    /// Replaces the answer of the API routes (not `/files`); `None` restores
    /// normal behaviour.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.settings().fault = fault;
    }

    /// Replaces the answer of `/files/...` (the download behind a `url`
    /// answer); `None` restores normal behaviour.
    pub fn set_file_fault(&self, fault: Option<Fault>) {
        self.settings().file_fault = fault;
    }

    fn settings(&self) -> MutexGuard<'_, Settings> {
        lock(&self.shared.settings)
    }
}

/// A base URL where nothing listens, so connecting is refused: a port that
/// was just bound and released.
pub async fn refused_base_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// A client for tests: like the bot's, but never routed through a proxy
/// from the environment (which would turn "refused" into a proxy error).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// A valid 2x2 RGB PNG (red, green / blue, white), built byte by byte so the
/// fixture needs no image crate: signature, IHDR, one IDAT holding a zlib
/// stream with a single stored (uncompressed) deflate block, IEND, each chunk
/// with its CRC-32.
pub fn tiny_png() -> Vec<u8> {
    // Each scanline: filter type 0 (None), then RGB triples.
    let raw: [u8; 14] = [
        0, 255, 0, 0, 0, 255, 0, //
        0, 0, 0, 255, 255, 255, 255,
    ];
    let mut zlib = vec![0x78, 0x01]; // deflate, 32K window, no dict, check bits ok
    zlib.push(0x01); // BFINAL=1, BTYPE=00 (stored)
    let len = raw.len() as u16;
    zlib.extend_from_slice(&len.to_le_bytes());
    zlib.extend_from_slice(&(!len).to_le_bytes());
    zlib.extend_from_slice(&raw);
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());

    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&2u32.to_be_bytes()); // width
    ihdr.extend_from_slice(&2u32.to_be_bytes()); // height
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, filter 0, no interlace

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", &ihdr[..]),
        (b"IDAT", &zlib[..]),
        (b"IEND", &[][..]),
    ] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    png
}

/// CRC-32 (IEEE, reflected, as PNG uses), bit by bit: tiny inputs only.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in bytes {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// A poisoned lock only means another test thread panicked; the data is
/// still usable for the test reporting that panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string());
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body: body.to_vec(),
    };
    let json = recorded.json.clone();
    lock(&shared.requests).push(recorded);

    let settings = lock(&shared.settings).clone();
    if !settings.delay.is_zero() {
        tokio::time::sleep(settings.delay).await;
    }
    let route = parts.uri.path();
    let is_file = route.starts_with("/files/");
    let fault = if is_file {
        settings.file_fault.clone()
    } else {
        settings.fault.clone()
    };
    if let Some(fault) = fault {
        return fault_response(fault);
    }
    match (&parts.method, route) {
        (&Method::POST, "/v1/images/generations") => openai_images(&shared, &settings, &json),
        (&Method::POST, "/sdapi/v1/txt2img") => a1111(&settings, &json),
        (&Method::POST, "/v1/chat/completions") => chat(&settings, &json),
        (&Method::GET, _) if is_file => (
            [(header::CONTENT_TYPE, "image/png")],
            Bytes::from(settings.image.clone()),
        )
            .into_response(),
        _ => error(StatusCode::NOT_FOUND, &format!("no route for {path}")),
    }
}

fn openai_images(shared: &Shared, settings: &Settings, request: &Value) -> Response {
    if !request["prompt"].is_string() {
        return error(StatusCode::BAD_REQUEST, "'prompt' is a required property");
    }
    let item = match settings.image_mode {
        ImageMode::B64Json => json!({ "b64_json": b64(&settings.image) }),
        ImageMode::Url => json!({ "url": format!("{}/files/image.png", shared.base_url) }),
    };
    axum::Json(json!({ "created": 1_700_000_000, "data": [item] })).into_response()
}

fn a1111(settings: &Settings, request: &Value) -> Response {
    if !request["prompt"].is_string() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "field required: prompt");
    }
    let mut image = b64(&settings.image);
    if settings.data_prefix {
        image.insert_str(0, "data:image/png;base64,");
    }
    axum::Json(json!({
        "images": [image],
        "parameters": request,
        "info": "{\"seed\": 1}",
    }))
    .into_response()
}

fn chat(settings: &Settings, request: &Value) -> Response {
    if !request["messages"].is_array() || !request["model"].is_string() {
        return error(
            StatusCode::BAD_REQUEST,
            "'model' and 'messages' are required",
        );
    }
    axum::Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": request["model"],
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": settings.reply },
            "finish_reason": "stop",
        }],
        "usage": { "prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2 },
    }))
    .into_response()
}

fn fault_response(fault: Fault) -> Response {
    match fault {
        Fault::Status { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = if serde_json::from_str::<Value>(&body).is_ok() {
                "application/json"
            } else {
                "text/plain"
            };
            (status, [(header::CONTENT_TYPE, kind)], body).into_response()
        }
        Fault::Raw(bytes) => (
            [(header::CONTENT_TYPE, "application/json")],
            Bytes::from(bytes),
        )
            .into_response(),
        Fault::Oversize {
            bytes,
            content_length,
        } => {
            let filler = Body::from(vec![b'A'; bytes]);
            // A stream body has no size hint, so hyper sends it chunked.
            let body = if content_length {
                filler
            } else {
                Body::from_stream(filler.into_data_stream())
            };
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// An OpenAI-style error body.
fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "message": message, "type": "invalid_request_error" } })),
    )
        .into_response()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
