//! The shipped dataset: parses, is balanced, and no user text repeats within
//! or across the files of `datas/`.

use std::collections::HashMap;
use std::path::PathBuf;

use router::dataset::read_jsonl;

const FILES: [&str; 3] = [
    "datas/seed.jsonl",
    "datas/image_call_train.jsonl",
    "datas/image_call_test.jsonl",
];

#[test]
fn no_user_text_repeats_within_or_across_files() {
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for f in FILES {
        for ex in read_jsonl(f.as_ref()).unwrap() {
            let key: String = ex
                .user
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase();
            if let Some((p, l)) = seen.insert(key, (ex.source.clone(), ex.line)) {
                panic!(
                    "{:?} repeats: {}:{} and {}:{}",
                    ex.user,
                    p.display(),
                    l,
                    ex.source.display(),
                    ex.line
                );
            }
        }
    }
}

#[test]
fn files_are_large_enough_and_about_half_calls() {
    let mut total = 0;
    for f in &FILES[1..] {
        let rows = read_jsonl(f.as_ref()).unwrap();
        let calls = rows.iter().filter(|r| r.is_call()).count();
        let share = calls as f64 / rows.len() as f64;
        assert!(
            (0.45..=0.55).contains(&share),
            "{f}: {calls} calls of {}",
            rows.len()
        );
        for r in rows.iter().filter(|r| r.is_call()) {
            assert!(!r.gold_prompt().unwrap().is_empty());
        }
        total += rows.len();
    }
    assert!(total >= 3000, "{total} rows");
}

#[test]
fn every_call_in_the_data_is_canonical() {
    // The model learns exactly the format the router's fast path expects.
    for f in FILES {
        for ex in read_jsonl(f.as_ref()).unwrap() {
            if let Some(p) = ex.gold_prompt() {
                assert_eq!(
                    ex.assistant,
                    router::prompt::render_call(&p),
                    "{}:{}",
                    f,
                    ex.line
                );
            }
        }
    }
}
