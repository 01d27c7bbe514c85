//! Adapters made by Python PEFT load here and give PyTorch's logits; adapters
//! saved here have PEFT's layout. Fixtures: `tests/fixtures/tiny_{gemma3,llama}`
//! made by `make_peft_reference.py` (transformers + PEFT, random tiny models).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use router::lora::{self, Adapter};
use router::model::{decoder_from_safetensors, dense_batch, Decoder, Mode, ModelConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
    base_logits: Vec<Vec<Vec<f32>>>,
}

fn load(dir: &Path) -> (Decoder, Expected) {
    let cfg_path = dir.join("config.json");
    let cfg =
        ModelConfig::from_hf_json(&cfg_path, &std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let dec =
        decoder_from_safetensors(&cfg, &[dir.join("model.safetensors")], &Device::Cpu).unwrap();
    let expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dec, expected)
}

fn logits(dec: &Decoder, ids: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let (b, t) = (ids.len(), ids[0].len());
    let tokens = Tensor::from_vec(ids.concat(), (b, t), &Device::Cpu).unwrap();
    let h = dec
        .forward_hidden(&tokens, &dense_batch(b, 0, t), None, Mode::Infer)
        .unwrap();
    let l = dec.logits(&h.reshape((b * t, ())).unwrap()).unwrap();
    l.reshape((b, t, ())).unwrap().to_vec3().unwrap()
}

fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    a.iter()
        .flatten()
        .flatten()
        .zip(b.iter().flatten().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(name: &str) {
    let dir = Path::new("tests/fixtures").join(name);
    let (mut dec, exp) = load(&dir);
    let base = max_diff(&logits(&dec, &exp.ids), &exp.base_logits);
    assert!(
        base < 1e-4,
        "{name}: base model logits differ from PyTorch by {base}"
    );

    let adapter = Adapter::load(&dir.join("adapter")).unwrap();
    adapter.apply(&mut dec, false).unwrap();
    let unmerged = max_diff(&logits(&dec, &exp.ids), &exp.logits);
    adapter.apply(&mut dec, true).unwrap();
    let merged = max_diff(&logits(&dec, &exp.ids), &exp.logits);
    println!("{name}: base {base:.2e}, unmerged {unmerged:.2e}, merged {merged:.2e}");
    assert!(
        unmerged < 1e-4,
        "{name}: unmerged adapter logits differ by {unmerged}"
    );
    assert!(
        merged < 1e-4,
        "{name}: merged adapter logits differ by {merged}"
    );
    assert!(
        max_diff(&exp.logits, &exp.base_logits) > 1e-2,
        "fixture adapter is a no-op"
    );

    // Saving gives PEFT's key names and shapes.
    let out = tempfile::tempdir().unwrap();
    lora::save(&dec, &adapter.config, out.path()).unwrap();
    let shapes = |p: &Path| -> BTreeMap<String, Vec<usize>> {
        candle_core::safetensors::load(p.join(lora::WEIGHTS_FILE), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.dims().to_vec()))
            .collect()
    };
    assert_eq!(
        shapes(out.path()),
        shapes(&dir.join("adapter")),
        "{name}: saved keys differ from PEFT's"
    );
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join(lora::CONFIG_FILE)).unwrap()).unwrap()
    };
    let (saved, original) = (read(out.path()), read(&dir.join("adapter")));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&saved),
        keys(&original),
        "{name}: adapter_config.json loses fields"
    );
    let parsed = |v: serde_json::Value| serde_json::from_value::<lora::LoraConfig>(v).unwrap();
    assert_eq!(
        parsed(saved),
        parsed(original),
        "{name}: adapter_config.json does not round-trip"
    );
}

#[test]
fn peft_gemma3_adapter_gives_pytorch_logits() {
    check("tiny_gemma3");
}

#[test]
fn peft_llama_rslora_adapter_gives_pytorch_logits() {
    check("tiny_llama");
}
