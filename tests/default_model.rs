//! Integration tests on the real default model (Gemma-3-270M, GGUF Q4_K_M)
//! against independent references recorded in
//! `tests/fixtures/gemma3_270m_reference.json` by `make_gguf_reference.py`:
//! token ids from Google's SentencePiece library, logits from Hugging Face
//! transformers' own GGUF loader fed those ids.
//!
//! The model is fetched by `scripts/fetch-model.sh` (`.ci/run` does it).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use router::model::{self, dense_batch, BaseModel, Batch, Cache, Mode};
use router::router::{Router, RouterConfig};
use serde::Deserialize;

const MODEL: &str = "model/gemma-3-270m-q4_k_m.gguf";

#[derive(Deserialize)]
struct Fixture {
    probe_ids: Vec<u32>,
    tokens: Vec<TokenCase>,
    logits: Vec<LogitCase>,
}

#[derive(Deserialize)]
struct TokenCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct LogitCase {
    text: String,
    ids: Vec<u32>,
    rows: Vec<LogitRow>,
}

#[derive(Deserialize)]
struct LogitRow {
    position: usize,
    top_ids: Vec<u32>,
    top_logits: Vec<f32>,
    probe_logits: Vec<f32>,
}

fn fixture() -> Fixture {
    let text = std::fs::read_to_string("tests/fixtures/gemma3_270m_reference.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn base() -> &'static BaseModel {
    static BASE: OnceLock<BaseModel> = OnceLock::new();
    BASE.get_or_init(|| {
        assert!(
            std::path::Path::new(MODEL).exists(),
            "{MODEL} is missing: run scripts/fetch-model.sh first"
        );
        model::load(MODEL, &Device::Cpu).unwrap()
    })
}

/// Final hidden states of one sequence, no cache.
fn hidden_of(dec: &router::model::Decoder, ids: &[u32]) -> Tensor {
    let tokens = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    dec.forward_hidden(&tokens, &dense_batch(1, 0, ids.len()), None, Mode::Infer)
        .unwrap()
}

/// Logits at `position`, checked to have the reference's top-1 token
/// (`ids[0]`); returns the largest difference from `want` over `ids`.
fn max_diff_at(
    dec: &router::model::Decoder,
    hidden: &Tensor,
    position: usize,
    ids: &[u32],
    want: &[f32],
) -> f32 {
    let logits = dec
        .logits_at(hidden, &[position])
        .unwrap()
        .squeeze(0)
        .unwrap();
    let top1 = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(top1, ids[0], "top-1 token at position {position}");
    let picked = Tensor::new(ids, &Device::Cpu).unwrap();
    let ours = logits
        .index_select(&picked, 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    ours.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn token_ids_match_sentencepiece() {
    let tok = base().format.tokenizer();
    for case in fixture().tokens {
        let ours = tok.encode(&case.text).unwrap();
        assert_eq!(
            ours,
            case.ids,
            "text {:?}: pieces {:?}",
            case.text,
            tok.pieces(&case.text).unwrap()
        );
        assert_eq!(tok.decode(&ours).unwrap(), case.text);
    }
}

#[test]
fn logits_match_transformers() {
    let fx = fixture();
    let dec = &base().decoder;
    let mut worst = 0f32;
    for case in &fx.logits {
        // The reference was fed the same ids we produce.
        let ours: Vec<u32> = std::iter::once(2)
            .chain(base().format.tokenizer().encode(&case.text).unwrap())
            .collect();
        assert_eq!(ours, case.ids, "{}", case.text);
        let hidden = hidden_of(dec, &case.ids);
        for row in &case.rows {
            let ids = [row.top_ids.as_slice(), &fx.probe_ids].concat();
            let want = [row.top_logits.as_slice(), &row.probe_logits].concat();
            worst = worst.max(max_diff_at(dec, &hidden, row.position, &ids, &want));
        }
    }
    println!("max |logit difference| vs transformers: {worst:.5}");
    assert!(worst < 2e-2, "max logit difference {worst}");
}

#[test]
fn cached_decoding_equals_full_recomputation() {
    let dec = &base().decoder;
    let ids = base()
        .format
        .tokenizer()
        .encode("幫我畫一隻戴墨鏡的貓 😎 please")
        .unwrap();
    let n = ids.len();
    let all = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = dec
        .forward_hidden(&all, &dense_batch(1, 0, n), None, Mode::Infer)
        .unwrap();
    let full = dec.logits_at(&full, &[n - 1]).unwrap();
    let mut cache = Cache::default();
    let split = n / 2;
    let head = all.narrow(1, 0, split).unwrap();
    dec.forward_hidden(
        &head,
        &dense_batch(1, 0, split),
        Some(&mut cache),
        Mode::Infer,
    )
    .unwrap();
    let mut last = None;
    for i in split..n {
        let t = all.narrow(1, i, 1).unwrap();
        let b = Batch {
            rows: vec![vec![Some(i as u32)]],
        };
        last = Some(
            dec.forward_hidden(&t, &b, Some(&mut cache), Mode::Infer)
                .unwrap(),
        );
    }
    let stepped = dec.logits_at(&last.unwrap(), &[0]).unwrap();
    let diff = (full - stepped)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-3, "cached vs full logits differ by {diff}");
}

#[test]
fn batched_routing_equals_one_at_a_time() {
    let base = model::load(MODEL, &Device::Cpu).unwrap();
    let mut router = Router::new(
        base,
        RouterConfig {
            stop_at_chat: false,
            max_new_tokens: 6,
            ..RouterConfig::default()
        },
    )
    .unwrap();
    let texts = [
        "Draw me a dragon",
        "幫我把這張照片調暗一點 🙏",
        "hi",
        "what is the capital of France?",
    ];
    let batched = router.route_batch(&texts).unwrap();
    for (t, b) in texts.iter().zip(&batched) {
        let single = router.route(t).unwrap();
        assert_eq!(&single, b, "{t}");
    }
}

#[test]
fn tokenizer_json_round_trip_keeps_the_tokenization() {
    let tok = base().format.tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let loaded = router::tokenizer::Tokenizer::from_file(&path).unwrap();
    assert_eq!(loaded.bos_id, Some(2));
    for case in fixture().tokens {
        assert_eq!(
            loaded.encode(&case.text).unwrap(),
            case.ids,
            "{}",
            case.text
        );
    }
    let format = router::prompt::PromptFormat::new(loaded).unwrap();
    assert_eq!(
        format.prefix_ids().unwrap(),
        base().format.prefix_ids().unwrap()
    );
}

#[derive(Deserialize)]
struct AdapterFixture {
    cases: Vec<AdapterCase>,
}

#[derive(Deserialize)]
struct AdapterCase {
    ids: Vec<u32>,
    rows: Vec<AdapterRow>,
}

#[derive(Deserialize)]
struct AdapterRow {
    position: usize,
    top_ids: Vec<u32>,
    top_logits: Vec<f32>,
}

/// The first shipped adapter (the one the fixture was made with), loaded by
/// Python PEFT onto transformers' own GGUF
/// load, gives the logits we compute with it merged into our weights.
#[test]
fn shipped_adapter_matches_python_peft() {
    let text = std::fs::read_to_string("tests/fixtures/adapter_reference.json").unwrap();
    let fx: AdapterFixture = serde_json::from_str(&text).unwrap();
    let mut base = model::load(MODEL, &Device::Cpu).unwrap();
    let adapter =
        router::lora::Adapter::load(std::path::Path::new("model/adapters/gemma3-270m-r16e3"))
            .unwrap();
    adapter.apply(&mut base.decoder, true).unwrap();
    let dec = &base.decoder;
    let mut worst = 0f32;
    for case in &fx.cases {
        let hidden = hidden_of(dec, &case.ids);
        for row in &case.rows {
            let d = max_diff_at(dec, &hidden, row.position, &row.top_ids, &row.top_logits);
            worst = worst.max(d);
        }
    }
    println!("max |logit difference| vs PEFT: {worst:.5}");
    assert!(worst < 2e-2, "max logit difference {worst}");
}

/// Prompt-lookup drafts change how many steps an image prompt takes, never
/// what the router writes: the same routes, prompts and outputs as one token
/// per step, with the shipped adapter on messages whose prompts copy the
/// user's words, and in a batch where rows accept different numbers of drafts.
/// A CPU router with the shipped adapter merged.
fn shipped_router(config: RouterConfig) -> Router {
    let mut base = model::load(MODEL, &Device::Cpu).unwrap();
    let adapter =
        router::lora::Adapter::load(std::path::Path::new("model/adapters/gemma3-270m-nat6c4s2"))
            .unwrap();
    adapter.apply(&mut base.decoder, true).unwrap();
    Router::new(base, config).unwrap()
}

#[test]
fn prompt_lookup_drafts_write_what_one_token_per_step_writes() {
    let mut router = shipped_router(RouterConfig::default());
    let texts = [
        "draw a red fox sleeping under a maple tree in watercolor",
        "幫我畫一隻在月光下彈吉他的狐狸",
        "can you make a picture of a tiny robot watering plants on a balcony, pixel art",
        "hi everyone",
    ];
    router.config.draft_tokens = Some(0);
    let plain = router.route_batch(&texts).unwrap();
    router.config.draft_tokens = Some(6);
    let drafted = router.route_batch(&texts).unwrap();
    assert_eq!(plain, drafted);
    assert!(
        plain.iter().filter(|d| d.prompt.is_some()).count() >= 2,
        "{plain:?}"
    );
    for t in texts {
        assert_eq!(
            router.route(t).unwrap(),
            plain[texts.iter().position(|x| *x == t).unwrap()],
            "{t}"
        );
    }
    // With the CPU's Q8_0 copies (the bot's default there) a message's
    // draft steps take the same kernels as its one-token steps.
    router.base_mut().decoder.set_cpu_quantized(true).unwrap();
    for t in texts {
        router.config.draft_tokens = Some(0);
        let plain = router.route(t).unwrap();
        router.config.draft_tokens = Some(6);
        assert_eq!(router.route(t).unwrap(), plain, "{t}");
    }
}

/// The replayed steps (the preallocated cache and fixed step shapes that
/// CUDA graphs replay, run eagerly on the CPU) route and write what the
/// growing cache does, with the shipped adapter: in a batch padded to the
/// next power of two, alone, and again with the prefix left in the cache.
#[test]
fn replayed_steps_route_and_write_as_eager_steps() {
    let mut router = shipped_router(RouterConfig {
        cuda_graphs: Some(false),
        ..RouterConfig::default()
    });
    let texts = [
        "draw a red fox sleeping under a maple tree in watercolor",
        "幫我畫一隻在月光下彈吉他的狐狸",
        "what is the capital of France?",
        "can you make a picture of a tiny robot watering plants on a balcony, pixel art",
        "把這張照片的背景換成海邊 然後調亮一點",
    ];
    let eager = router.route_batch(&texts).unwrap();
    assert!(
        eager.iter().filter(|d| d.prompt.is_some()).count() >= 3,
        "{eager:?}"
    );
    router.config.cuda_graphs = Some(true);
    for _ in 0..2 {
        assert_eq!(router.route_batch(&texts).unwrap(), eager);
    }
    for (t, want) in texts.iter().zip(&eager) {
        assert_eq!(&router.route(t).unwrap(), want, "{t}");
    }
}
