//! The engine thread serves async callers: concurrent requests are batched,
//! answered like direct routing, and adapters swap at run time, all without
//! running model work on the async runtime.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use router::engine::Engine;
use router::router::{Router, RouterConfig};

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
        let routed = h.await.unwrap().unwrap();
        assert_eq!(&routed.decision, w);
        assert!(routed.batch_ms >= 0.0);
        assert_eq!(routed.adapter, None);
    }
    assert_eq!(ticker.await.unwrap(), 5);

    // Swap in the PEFT fixture adapter, then back to the bare model.
    let adapter = PathBuf::from("tests/fixtures/tiny_gemma3/adapter");
    engine.set_adapter(Some(adapter.clone())).await.unwrap();
    let mut adapted = router();
    adapted
        .set_adapter(Some(&router::lora::Adapter::load(&adapter).unwrap()))
        .unwrap();
    let routed = engine.route(texts[0].clone()).await.unwrap();
    assert_eq!(routed.decision, adapted.route(&texts[0]).unwrap());
    // The record names the resolved directory.
    assert_eq!(
        routed.adapter,
        Some(std::fs::canonicalize(&adapter).unwrap())
    );
    assert_eq!(engine.adapter(), routed.adapter);
    engine.set_adapter(None).await.unwrap();
    assert_eq!(
        engine.route(texts[0].clone()).await.unwrap().decision,
        want[0]
    );

    // A bad adapter is refused and the engine keeps serving.
    let err = engine
        .set_adapter(Some(PathBuf::from("/nonexistent")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(
        engine.route(texts[1].clone()).await.unwrap().decision,
        want[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_before_a_swap_are_decided_by_the_adapter_live_when_they_arrived() {
    let adapter = PathBuf::from("tests/fixtures/tiny_gemma3/adapter");
    let resolved = std::fs::canonicalize(&adapter).unwrap();
    let engine = Engine::spawn(router()).unwrap();
    // Queue messages, then a swap, then more messages, all before the engine
    // can finish the first batch.
    let before: Vec<_> = (0..6)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move { e.route(format!("draw a dog {i}")).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    engine.set_adapter(Some(adapter)).await.unwrap();
    let after = engine.route("draw a dog 7".into()).await.unwrap();
    for h in before {
        assert_eq!(h.await.unwrap().unwrap().adapter, None);
    }
    assert_eq!(after.adapter, Some(resolved));
}

#[tokio::test(flavor = "current_thread")]
async fn forced_prompt_extraction_and_call_threshold() {
    // Threshold 0: every message opens a call; threshold above 1: none does.
    let mut always = router();
    always.config.call_threshold = Some(0.0);
    let mut never = router();
    never.config.call_threshold = Some(1.01);
    let texts = ["hello there", "draw a cat", "what is a fox"];
    let free = router().route_batch(&texts).unwrap();
    for (d, f) in always.route_batch(&texts).unwrap().iter().zip(&free) {
        assert!(d.output.starts_with("call("), "{d:?}");
        assert!((d.call_probability - f.call_probability).abs() < 1e-6);
        assert!((0.0..=1.0).contains(&d.call_probability));
    }
    for d in never.route_batch(&texts).unwrap() {
        assert!(!d.output.starts_with("call"), "{d:?}");
    }
    // Forced extraction writes only the prompt; the engine serves it too.
    let mut r = router();
    let direct = r.extract_prompts(&texts).unwrap();
    let engine = Engine::spawn(router()).unwrap();
    for (t, want) in texts.iter().zip(direct) {
        assert_eq!(engine.extract_prompt(t.to_string()).await.unwrap(), want);
    }
}

#[test]
fn length_groups_keep_short_messages_apart_from_a_long_one() {
    let r = router();
    let long = "draw ".repeat(400);
    let mut texts = vec!["hi", "draw a cat", long.as_str(), "hello there"];
    let groups = r.length_groups(&texts).unwrap();
    assert_eq!(groups, vec![vec![0, 1, 3], vec![2]]);
    // Every message lands in exactly one group, at most max_batch per group.
    texts.extend(["a"; 40]);
    let groups = r.length_groups(&texts).unwrap();
    let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..texts.len()).collect::<Vec<_>>());
    assert!(groups.iter().all(|g| g.len() <= r.config.max_batch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_message_never_holds_up_the_short_ones_that_arrived_with_it() {
    let engine = Engine::spawn(router()).unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    // Keep the engine busy so that everything below queues up together.
    let warm = {
        let e = engine.clone();
        tokio::spawn(async move { e.route("warm up ".repeat(1000)).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    let long = "please draw this in detail ".repeat(150);
    let mut texts: Vec<String> = vec![long];
    texts.extend((0..11).map(|i| format!("short message {i}")));
    let handles: Vec<_> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let e = engine.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let r = e.route(t).await.unwrap();
                done.send(i).unwrap();
                r
            })
        })
        .collect();
    drop(done_tx);
    for h in handles {
        h.await.unwrap();
    }
    warm.await.unwrap().unwrap();
    let mut order = Vec::new();
    while let Some(i) = done_rx.recv().await {
        order.push(i);
    }
    // The long message (index 0) is answered after every short one.
    assert_eq!(order.last(), Some(&0), "{order:?}");
}

#[test]
fn a_long_message_read_in_chunks_is_decided_as_in_one_pass() {
    let text = "please draw a cat with a hat on a boat ".repeat(40);
    let mut r = router();
    let want = r.route(&text).unwrap();
    for chunk in [4, 16, 50] {
        r.config.prefill_chunk = chunk;
        let mut long = r.begin_long(&text).unwrap();
        assert!(r.is_long(long.len()), "{} tokens", long.len());
        let mut chunks = 0;
        while !r.advance(&mut long).unwrap() {
            chunks += 1;
        }
        assert!(
            chunks >= long.len() / chunk - 2,
            "{chunks} chunks of {chunk}"
        );
        assert_eq!(r.finish_long(long).unwrap(), want, "chunks of {chunk}");
    }
    // A swap in between would mix two adapters' keys and values: refused.
    let mut long = r.begin_long(&text).unwrap();
    r.set_adapter(None).unwrap();
    let err = r.advance(&mut long).unwrap_err().to_string();
    assert!(err.contains("adapter changed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_messages_arriving_during_a_long_prefill_are_answered_before_it() {
    let mut r = router();
    // Hundreds of small chunks: the long message takes a while to read even
    // with the tiny model; "hi N" stays short.
    r.config.prefill_chunk = 8;
    r.config.max_input_tokens = 2048;
    let engine = Engine::spawn(r).unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let send = |i: usize, text: String| {
        let e = engine.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let routed = e.route(text).await.unwrap();
            done.send(i).unwrap();
            routed
        })
    };
    let long = send(0, "draw a long story about a cat ".repeat(100));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let shorts: Vec<_> = (1..4).map(|i| send(i, format!("hi {i}"))).collect();
    let mut direct = router();
    assert!(direct.input_ids("hi 1").unwrap().len() <= 2 * 8);
    for (i, h) in shorts.into_iter().enumerate() {
        let routed = h.await.unwrap();
        assert_eq!(
            routed.decision,
            direct.route(&format!("hi {}", i + 1)).unwrap()
        );
    }
    assert!(long.await.unwrap().batch_ms > 0.0);
    drop(done_tx);
    let mut order = Vec::new();
    while let Some(i) = done_rx.recv().await {
        order.push(i);
    }
    // The shorts arrived after the long one had started and were answered first.
    assert_eq!(order.last(), Some(&0), "{order:?}");
}
