//! `bot export-hf`: a model written as a Hugging Face directory loads back
//! with the same logits (tiny random models of both families, and the real
//! default GGUF model, whose norms GGUF stores as `w + 1`).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::{max_diff, random_decoder, tiny_config, toy_tokenizer, RandomWeights};
use router::model::{self, dense_batch, Architecture, Decoder, Mode};

fn logits(dec: &Decoder, ids: &[u32]) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = dec
        .forward_hidden(&t, &dense_batch(1, 0, ids.len()), None, Mode::Infer)
        .unwrap();
    dec.logits(&h.squeeze(0).unwrap()).unwrap()
}

#[test]
fn tiny_random_models_export_and_load_back_with_the_same_logits() {
    for arch in [Architecture::Gemma3, Architecture::Llama] {
        let cfg = tiny_config(arch);
        let dir = tempfile::tempdir().unwrap();
        let backend: Box<dyn SimpleBackend> = Box::new(RandomWeights { seed: 5 });
        let vb = VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
        let done = router::export::write_hf_dir(&cfg, &vb, &toy_tokenizer(), dir.path()).unwrap();
        assert!(done.parameters > 0);

        let loaded = model::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(loaded.decoder.cfg, cfg, "{arch:?}: config.json round trip");
        let original = random_decoder(&cfg, 5, &Device::Cpu);
        let ids: Vec<u32> = (0..12).map(|i| (i * 13 + 3) % 97).collect();
        let d = max_diff(&logits(&original, &ids), &logits(&loaded.decoder, &ids));
        assert!(d < 1e-5, "{arch:?}: logits differ by {d}");

        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        let expected_type = match arch {
            Architecture::Gemma3 => "gemma3_text",
            Architecture::Llama => "llama",
        };
        assert_eq!(config["model_type"], expected_type);
    }
}

#[test]
fn default_gguf_model_exports_exactly_in_f32() {
    const MODEL: &str = "model/gemma-3-270m-q4_k_m.gguf";
    assert!(
        std::path::Path::new(MODEL).exists(),
        "{MODEL} is missing: run scripts/fetch-model.sh first"
    );
    let dir = tempfile::tempdir().unwrap();
    router::export::export_gguf(std::path::Path::new(MODEL), dir.path(), DType::F32).unwrap();
    let gguf = model::load(MODEL, &Device::Cpu).unwrap();
    let hf = model::load(dir.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let text = "Draw me a dragon sleeping on gold coins";
    let ids = gguf.format.user_ids(text).unwrap();
    assert_eq!(ids, hf.format.user_ids(text).unwrap(), "tokenizer.json");
    assert_eq!(
        gguf.format.prefix_ids().unwrap(),
        hf.format.prefix_ids().unwrap()
    );
    let d = max_diff(&logits(&gguf.decoder, &ids), &logits(&hf.decoder, &ids));
    assert!(d < 1e-4, "logits differ by {d}");
}
