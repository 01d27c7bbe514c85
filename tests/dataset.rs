//! The shipped dataset: parses, is balanced, and no user text repeats within
//! or across the files of `datas/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use router::dataset::{read_jsonl, Example, HELD_OUT_KINDS};

/// The generator's files, the seed rows and the natural test file.
const FIXED_FILES: [&str; 4] = [
    "datas/seed.jsonl",
    "datas/image_call_train.jsonl",
    "datas/image_call_test.jsonl",
    "datas/image_call_natural_test.jsonl",
];
const NATURAL_TEST: &str = "datas/image_call_natural_test.jsonl";

/// The hand-written training files, `datas/natural/train-*.jsonl` (as many
/// as there are: `train` reads them all).
fn natural_train() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir("datas/natural")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("train-") && n.ends_with(".jsonl"))
        .map(|n| format!("datas/natural/{n}"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

/// Every data file: the fixed ones and the natural training files.
fn all_files() -> Vec<String> {
    let mut files: Vec<String> = FIXED_FILES.iter().map(|f| f.to_string()).collect();
    files.extend(natural_train());
    files
}

fn rows<S: AsRef<str>>(files: &[S]) -> Vec<Example> {
    files
        .iter()
        .flat_map(|f| read_jsonl(f.as_ref().as_ref()).unwrap())
        .collect()
}

fn meta<'a>(r: &'a Example, field: &str) -> &'a str {
    r.meta_str(field).unwrap_or("")
}

#[test]
fn no_user_text_repeats_within_or_across_files() {
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for f in all_files() {
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
    for f in &FIXED_FILES[1..3] {
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
    for f in all_files() {
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

#[test]
fn natural_training_rows_cover_twenty_kinds_five_languages_about_half_calls() {
    let train = rows(&natural_train());
    assert!(train.len() >= 1500, "{} natural training rows", train.len());
    let calls = train.iter().filter(|r| r.is_call()).count();
    let share = calls as f64 / train.len() as f64;
    assert!(
        (0.45..=0.55).contains(&share),
        "{calls} calls of {}",
        train.len()
    );
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut langs: HashSet<&str> = HashSet::new();
    for r in &train {
        *kinds.entry(meta(r, "kind")).or_default() += 1;
        langs.insert(meta(r, "lang"));
        assert!(
            !meta(r, "intent").is_empty(),
            "{}:{}",
            r.source.display(),
            r.line
        );
    }
    assert!(kinds.len() >= 20, "{kinds:?}");
    for l in ["zh-TW", "zh-CN", "en", "mixed", "discord"] {
        assert!(langs.contains(l), "no {l} rows");
    }
}

#[test]
fn held_out_kinds_never_appear_in_training_and_are_in_the_natural_test() {
    let mut training = rows(&natural_train());
    training.extend(rows(&["datas/image_call_train.jsonl", "datas/seed.jsonl"]));
    for r in &training {
        assert!(
            !HELD_OUT_KINDS.contains(&meta(r, "kind")),
            "held-out kind in training: {}:{}",
            r.source.display(),
            r.line
        );
    }
    let test = rows(&[NATURAL_TEST]);
    for k in HELD_OUT_KINDS {
        let n = test.iter().filter(|r| meta(r, "kind") == k).count();
        assert!(n >= 24, "{k}: {n} test rows");
    }
}

#[test]
fn natural_test_is_half_calls_with_hard_negatives_and_hard_positives() {
    let test = rows(&[NATURAL_TEST]);
    assert!(test.len() >= 400, "{}", test.len());
    let (calls, chat): (Vec<&Example>, Vec<&Example>) = test.iter().partition(|r| r.is_call());
    assert!(calls.len().abs_diff(chat.len()) <= 10);
    let hard = |v: &[&Example]| {
        v.iter()
            .filter(|r| r.meta.as_ref().and_then(|m| m["hard"].as_bool()) == Some(true))
            .count()
    };
    assert!(
        hard(&chat) * 2 >= chat.len(),
        "hard negatives {}",
        hard(&chat)
    );
    assert!(
        hard(&calls) * 3 >= calls.len(),
        "hard positives {}",
        hard(&calls)
    );
}
