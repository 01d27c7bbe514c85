//! The engine thread serves async callers: concurrent requests are batched,
//! answered like direct routing, and adapters swap at run time, all without
//! running model work on the async runtime.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use router::router::{Engine, Router, RouterConfig};

fn router() -> Router {
    let base =
        router::model::load(common::tiny_gemma3_dir().to_str().unwrap(), &Device::Cpu).unwrap();
    Router::new(
        base,
        RouterConfig {
            max_new_tokens: 6,
            ..RouterConfig::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_requests_match_direct_routing_and_adapters_swap() {
    let texts: Vec<String> = (0..12).map(|i| format!("draw a cat {i}")).collect();
    let mut direct = router();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = direct.route_batch(&refs).unwrap();

    let engine = Engine::spawn(router()).unwrap();
    // A single-threaded runtime: if model work ran on it, this test would
    // serialise; the ticker below proves the runtime stays free.
    let ticker = tokio::spawn(async {
        let mut ticks = 0u32;
        for _ in 0..5 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            ticks += 1;
        }
        ticks
    });
    let handles: Vec<_> = texts
        .iter()
        .map(|t| {
            let e = engine.clone();
            let t = t.clone();
            tokio::spawn(async move { e.route(t).await })
        })
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        let (got, ms) = h.await.unwrap().unwrap();
        assert_eq!(&got, w);
        assert!(ms >= 0.0);
    }
    assert_eq!(ticker.await.unwrap(), 5);

    // Swap in the PEFT fixture adapter, then back to the bare model.
    let adapter = PathBuf::from("tests/fixtures/tiny_gemma3/adapter");
    engine.set_adapter(Some(adapter.clone())).await.unwrap();
    let mut adapted = router();
    adapted
        .set_adapter(Some(&router::lora::Adapter::load(&adapter).unwrap()))
        .unwrap();
    let (got, _) = engine.route(texts[0].clone()).await.unwrap();
    assert_eq!(got, adapted.route(&texts[0]).unwrap());
    engine.set_adapter(None).await.unwrap();
    assert_eq!(engine.route(texts[0].clone()).await.unwrap().0, want[0]);

    // A bad adapter is refused and the engine keeps serving.
    let err = engine
        .set_adapter(Some(PathBuf::from("/nonexistent")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(engine.route(texts[1].clone()).await.unwrap().0, want[1]);
}
