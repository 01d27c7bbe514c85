//! The tiny Gemma-3 fixture loads as a complete Hugging Face directory.

mod common;

use candle_core::Device;
use router::router::{Router, RouterConfig};

#[test]
fn tiny_directory_loads_and_routes() {
    let dir = common::tiny_gemma3_dir();
    let base = router::model::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    let mut router = Router::new(
        base,
        RouterConfig {
            max_new_tokens: 5,
            ..RouterConfig::default()
        },
    )
    .unwrap();
    let out = router
        .route_batch(&["draw a cat", "hello there", "x"])
        .unwrap();
    assert_eq!(out.len(), 3);
}
