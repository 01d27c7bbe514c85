//! Helpers shared by integration tests.
#![allow(dead_code)]

use std::path::Path;

use router::tokenizer::Tokenizer;

/// A toy Gemma-style SentencePiece vocabulary that fits the tiny fixture
/// models' 97-row embedding: control tokens, ASCII letters, digits, the
/// call syntax's punctuation and a few merges.
pub fn toy_tokenizer() -> Tokenizer {
    let mut pieces: Vec<(String, f32, i32)> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|p| (p.to_string(), 0.0, if *p == "<unk>" { 2 } else { 3 }))
    .collect();
    pieces.push(("\n".into(), 0.0, 4));
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789▁\"(){}:,_.!?'";
    for (i, c) in chars.chars().enumerate() {
        pieces.push((c.to_string(), -(i as f32) - 100.0, 1));
    }
    for (i, p) in [
        "ca", "ll", "call", "ge", "im", "age", "▁a", "▁c", "▁d", "ra", "▁dra", "aw", "▁draw", "at",
        "▁cat", "pt", "om", "pr", "er", "at",
    ]
    .iter()
    .enumerate()
    {
        if !pieces.iter().any(|x| x.0 == *p) {
            pieces.push((p.to_string(), -(i as f32), 1));
        }
    }
    assert!(pieces.len() <= 97, "{} pieces", pieces.len());
    let tokens: Vec<String> = pieces.iter().map(|p| p.0.clone()).collect();
    let scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
    let types: Vec<i32> = pieces.iter().map(|p| p.2).collect();
    Tokenizer::from_sentencepiece(&tokens, &scores, &types, "<unk>", false, Some(2), Some(1))
        .unwrap()
}

/// The tiny Gemma-3 fixture is a complete Hugging Face directory once it has
/// a tokenizer.json; it is committed, and this keeps it in step with
/// [`toy_tokenizer`] (`UPDATE_FIXTURES=1` rewrites it).
pub fn tiny_gemma3_dir() -> &'static Path {
    let dir = Path::new("tests/fixtures/tiny_gemma3");
    let path = dir.join("tokenizer.json");
    if std::env::var_os("UPDATE_FIXTURES").is_some() {
        toy_tokenizer().save(&path).unwrap();
    }
    let committed =
        Tokenizer::from_file(&path).expect("tokenizer.json fixture (UPDATE_FIXTURES=1 writes it)");
    let probe = "draw a cat call(\"generate_image\", {\"prompt\": \"x\"})";
    assert_eq!(
        committed.encode(probe).unwrap(),
        toy_tokenizer().encode(probe).unwrap()
    );
    dir
}
