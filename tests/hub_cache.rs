//! Hub ids resolve through the local Hugging Face cache without the network.
//! (Own test binary: it sets HF_HOME and HF_HUB_OFFLINE for the process.)

use std::path::Path;

use candle_core::Device;
use router::router::{Router, RouterConfig};

mod common;
use common::toy_tokenizer;

fn write_snapshot(hub: &Path, id: &str, fixture: &Path) {
    let repo = hub.join(format!("models--{}", id.replace('/', "--")));
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), snap.join(f)).unwrap();
    }
    toy_tokenizer().save(&snap.join("tokenizer.json")).unwrap();
}

#[test]
fn hub_id_loads_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    write_snapshot(
        &home.path().join("hub"),
        "tiny-org/tiny-gemma3",
        Path::new("tests/fixtures/tiny_gemma3"),
    );
    // SAFETY: this test binary runs this one test; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("HF_HOME", home.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let base = router::model::load("tiny-org/tiny-gemma3", &Device::Cpu).unwrap();
    assert_eq!(base.source, "tiny-org/tiny-gemma3");
    assert_eq!(base.decoder.cfg.hidden_size, 32);
    let mut router = Router::new(
        base,
        RouterConfig {
            max_new_tokens: 4,
            ..RouterConfig::default()
        },
    )
    .unwrap();
    let d = router.route("draw a cat").unwrap();
    assert!(d.new_tokens <= 4 + 16, "{d:?}");

    let err = router::model::load("tiny-org/not-cached", &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tiny-org/not-cached") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
