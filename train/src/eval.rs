//! The evaluator: routes every row of a test file, compares with the gold
//! label under the strict rule, and reports the confusion matrix, precision,
//! recall and F1 (overall, per language, per held-out situation), how much
//! of the reference prompts the extracted prompts keep, and the
//! precision/recall curve over the call-probability threshold.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use router::dataset::{Confusion, Example};
use router::router::{Route, Router};
use serde::Serialize;

use crate::progress_bar;

/// One routed row, as written by `--predictions`.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub text: String,
    pub gold: Route,
    pub pred: Route,
    pub output: String,
    pub prompt: Option<String>,
    pub gold_prompt: Option<String>,
    pub lang: Option<String>,
    /// The row's situation and intent (`meta.kind`, `meta.intent`), if any.
    pub kind: Option<String>,
    pub intent: Option<String>,
    /// Probability of the call opening at the first generated position.
    pub call_probability: f32,
}

/// Everything `train eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub confusion: Confusion,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub by_lang: BTreeMap<String, Confusion>,
    /// Over correctly routed calls: share of prompts equal to the gold one,
    /// and mean character-overlap F1 with it.
    pub prompt_exact: f64,
    pub prompt_char_f1: f64,
    /// Over correctly routed calls: mean share of the reference prompt's
    /// words (CJK: character bigrams) kept, overall and per language.
    pub prompt_recall: f64,
    pub prompt_recall_by_lang: BTreeMap<String, f64>,
    /// Rows of the situations kept out of training.
    pub held_out: Confusion,
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// One point of the precision/recall curve over the call threshold.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CurvePoint {
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// Thresholds the curve is drawn at.
pub const THRESHOLDS: [f32; 19] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9, 0.95,
];

/// Precision/recall/F1 if the route were "call when the first-position
/// call probability reaches t" (the threshold the router applies; a forced
/// call is counted as a call).
pub fn pr_curve(predictions: &[Prediction]) -> Vec<CurvePoint> {
    THRESHOLDS
        .iter()
        .map(|&t| {
            let mut c = Confusion::default();
            for p in predictions {
                c.add(p.gold == Route::Image, p.call_probability >= t);
            }
            CurvePoint {
                threshold: t,
                precision: c.precision(),
                recall: c.recall(),
                f1: c.f1(),
            }
        })
        .collect()
}

/// The threshold to ship: the best F1 among points with precision at least
/// `min_precision`, else the best F1. On a tie the lowest threshold wins:
/// equal F1 on the validation split, so keep the recall (a missed picture is
/// a visible failure; a false call can be flagged).
pub fn choose_threshold(curve: &[CurvePoint], min_precision: f64) -> Option<f32> {
    let best = |pts: Vec<&CurvePoint>| {
        pts.into_iter()
            .max_by(|a, b| {
                a.f1.total_cmp(&b.f1)
                    .then(b.threshold.total_cmp(&a.threshold))
            })
            .map(|p| p.threshold)
    };
    best(
        curve
            .iter()
            .filter(|p| p.precision >= min_precision)
            .collect(),
    )
    .or_else(|| best(curve.iter().collect()))
}

/// The units a prompt is compared by: lower-cased words of alphabetic
/// scripts, and character bigrams of CJK runs (a lone CJK character counts
/// as itself).
pub fn prompt_units(s: &str) -> Vec<String> {
    let is_cjk = |c: char| matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF | 0xAC00..=0xD7AF);
    let mut units = Vec::new();
    let (mut word, mut run) = (String::new(), Vec::<char>::new());
    let flush_run = |run: &mut Vec<char>, units: &mut Vec<String>| {
        match run.len() {
            0 => {}
            1 => units.push(run[0].to_string()),
            _ => units.extend(run.windows(2).map(|w| w.iter().collect())),
        }
        run.clear();
    };
    for c in s.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                units.push(std::mem::take(&mut word));
            }
            run.push(c);
        } else if c.is_alphanumeric() {
            flush_run(&mut run, &mut units);
            word.extend(c.to_lowercase());
        } else {
            flush_run(&mut run, &mut units);
            if !word.is_empty() {
                units.push(std::mem::take(&mut word));
            }
        }
    }
    flush_run(&mut run, &mut units);
    if !word.is_empty() {
        units.push(word);
    }
    units
}

/// Share of the reference's units (multiset) found in the prediction.
pub fn prompt_recall(predicted: &str, reference: &str) -> f64 {
    let reference = prompt_units(reference);
    if reference.is_empty() {
        return 1.0;
    }
    let mut have: BTreeMap<String, usize> = BTreeMap::new();
    for u in prompt_units(predicted) {
        *have.entry(u).or_default() += 1;
    }
    let kept = reference
        .iter()
        .filter(|u| match have.get_mut(*u) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count();
    kept as f64 / reference.len() as f64
}

fn route_of(is_call: bool) -> Route {
    if is_call {
        Route::Image
    } else {
        Route::Chat
    }
}

/// Character-multiset F1 between two prompts, ignoring spaces and punctuation.
pub fn char_f1(a: &str, b: &str) -> f64 {
    let bag = |s: &str| {
        let mut m: BTreeMap<char, usize> = BTreeMap::new();
        for c in s.chars().filter(|c| c.is_alphanumeric()) {
            *m.entry(c.to_lowercase().next().unwrap_or(c)).or_default() += 1;
        }
        m
    };
    let (x, y) = (bag(a), bag(b));
    let common: usize = x
        .iter()
        .map(|(c, n)| (*n).min(*y.get(c).unwrap_or(&0)))
        .sum();
    let (nx, ny): (usize, usize) = (x.values().sum(), y.values().sum());
    if common == 0 || nx == 0 || ny == 0 {
        return 0.0;
    }
    let (p, r) = (common as f64 / nx as f64, common as f64 / ny as f64);
    2.0 * p * r / (p + r)
}

/// Routes `rows` in batches of `batch` with a progress bar.
pub fn evaluate(router: &mut Router, rows: &[Example], batch: usize) -> Result<Report> {
    let bar = progress_bar("eval", rows.len());
    let mut confusion = Confusion::default();
    let mut by_lang: BTreeMap<String, Confusion> = BTreeMap::new();
    let mut predictions = Vec::with_capacity(rows.len());
    let (mut exact, mut overlap, mut tp) = (0usize, 0f64, 0usize);
    let mut recall_sum = 0f64;
    let mut recall_by_lang: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut held_out = Confusion::default();
    for chunk in rows.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.user.as_str()).collect();
        let decisions = router.route_batch(&texts).context("routing a batch")?;
        for (row, d) in chunk.iter().zip(decisions) {
            let gold = row.is_call();
            let pred = d.route == Route::Image;
            confusion.add(gold, pred);
            let lang = row.lang().unwrap_or("-").to_string();
            by_lang.entry(lang.clone()).or_default().add(gold, pred);
            let kind = row.meta_str("kind");
            if kind.is_some_and(|k| router::dataset::HELD_OUT_KINDS.contains(&k)) {
                held_out.add(gold, pred);
            }
            let gold_prompt = row.gold_prompt();
            if let (Some(p), Some(g)) = (&d.prompt, &gold_prompt) {
                tp += 1;
                exact += usize::from(p == g);
                overlap += char_f1(p, g);
                let r = prompt_recall(p, g);
                recall_sum += r;
                let e = recall_by_lang.entry(lang).or_default();
                e.0 += r;
                e.1 += 1;
            }
            predictions.push(Prediction {
                text: row.user.clone(),
                gold: route_of(gold),
                pred: d.route,
                output: d.output,
                prompt: d.prompt,
                gold_prompt,
                lang: row.lang().map(String::from),
                kind: kind.map(String::from),
                intent: row.meta_str("intent").map(String::from),
                call_probability: d.call_probability,
            });
        }
        bar.inc(chunk.len() as u64);
        bar.set_message(format!("f1 {:.3}", confusion.f1()));
    }
    bar.finish_and_clear();
    let ratio = |a: f64| if tp == 0 { 0.0 } else { a / tp as f64 };
    Ok(Report {
        precision: confusion.precision(),
        recall: confusion.recall(),
        f1: confusion.f1(),
        confusion,
        by_lang,
        prompt_exact: ratio(exact as f64),
        prompt_char_f1: ratio(overlap),
        prompt_recall: ratio(recall_sum),
        prompt_recall_by_lang: recall_by_lang
            .into_iter()
            .map(|(l, (sum, n))| (l, sum / n as f64))
            .collect(),
        held_out,
        predictions,
    })
}

/// Prints the report; the LAST line is exactly the metrics line.
pub fn print_report(report: &Report, out: &mut impl Write) -> Result<()> {
    let c = &report.confusion;
    writeln!(out, "rows: {}", c.total())?;
    writeln!(out, "                 pred image   pred chat")?;
    writeln!(out, "gold image       TP {:>7}   FN {:>7}", c.tp, c.fn_)?;
    writeln!(out, "gold chat        FP {:>7}   TN {:>7}", c.fp, c.tn)?;
    if report.by_lang.len() > 1 {
        writeln!(out, "by language:")?;
        for (lang, lc) in &report.by_lang {
            writeln!(
                out,
                "  {lang:<8} rows {:>4}  FN {:>3}  FP {:>3}  {}",
                lc.total(),
                lc.fn_,
                lc.fp,
                lc.metrics_line()
            )?;
        }
    }
    if report.held_out.total() > 0 {
        let h = &report.held_out;
        writeln!(
            out,
            "held-out situations ({}): rows {}  FN {}  FP {}  {}",
            router::dataset::HELD_OUT_KINDS.join(", "),
            h.total(),
            h.fn_,
            h.fp,
            h.metrics_line()
        )?;
    }
    print_errors(report, out)?;
    writeln!(
        out,
        "image prompts (correct calls): exact {:.3}, char-F1 {:.3}, recall {:.3} ({})",
        report.prompt_exact,
        report.prompt_char_f1,
        report.prompt_recall,
        report
            .prompt_recall_by_lang
            .iter()
            .map(|(l, r)| format!("{l} {r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "precision/recall over the call threshold (first-position probability):"
    )?;
    for p in pr_curve(&report.predictions) {
        writeln!(
            out,
            "  t={:.2}  precision {:.4}  recall {:.4}  f1 {:.4}",
            p.threshold, p.precision, p.recall, p.f1
        )?;
    }
    writeln!(out, "{}", c.metrics_line())?;
    Ok(())
}

/// Wrong routes counted by intent (what kind of message fooled the router).
fn print_errors(report: &Report, out: &mut impl Write) -> Result<()> {
    let mut by: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for p in report.predictions.iter().filter(|p| p.gold != p.pred) {
        let what = if p.gold == Route::Image {
            "missed call"
        } else {
            "false call"
        };
        *by.entry((what, p.intent.as_deref().unwrap_or("-")))
            .or_default() += 1;
    }
    if by.is_empty() || report.predictions.iter().all(|p| p.intent.is_none()) {
        return Ok(());
    }
    let list: Vec<String> = by
        .iter()
        .map(|((what, intent), n)| format!("{what}/{intent} {n}"))
        .collect();
    writeln!(out, "errors by intent: {}", list.join(", "))?;
    Ok(())
}

/// The test files evaluated by default: the generator's and the
/// hand-written natural one (those present under the home).
pub fn default_test_files() -> Vec<std::path::PathBuf> {
    [router::cli::DEFAULT_TEST_FILE, NATURAL_TEST_FILE]
        .iter()
        .map(|f| router::cli::default_path(f))
        .filter(|p| p.exists())
        .collect()
}

/// The hand-written test file, relative to the home.
pub const NATURAL_TEST_FILE: &str = "datas/image_call_natural_test.jsonl";

/// Writes one JSON line per routed row.
pub fn write_predictions(predictions: &[Prediction], path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for p in predictions {
        writeln!(f, "{}", serde_json::to_string(p)?)?;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_recall_counts_words_and_cjk_bigrams() {
        assert_eq!(
            prompt_units("一隻貓 in Space!"),
            vec!["一隻", "隻貓", "in", "space"]
        );
        assert_eq!(prompt_units("貓"), vec!["貓"]);
        assert_eq!(prompt_recall("戴墨鏡的橘貓", "戴墨鏡的橘貓"), 1.0);
        // The edit's second operation dropped: half the bigrams are gone.
        let r = prompt_recall("背景換成海邊", "背景換成海邊，加上夕陽");
        assert!(r > 0.5 && r < 0.8, "{r}");
        assert_eq!(prompt_recall("a cat", "a red cat"), 2.0 / 3.0);
        assert_eq!(prompt_recall("", ""), 1.0);
    }

    fn pred(gold: bool, p: f32) -> Prediction {
        Prediction {
            text: String::new(),
            gold: route_of(gold),
            pred: route_of(p >= 0.5),
            output: String::new(),
            prompt: None,
            gold_prompt: None,
            lang: None,
            kind: None,
            intent: None,
            call_probability: p,
        }
    }

    #[test]
    fn the_curve_trades_recall_for_precision_and_the_choice_respects_the_floor() {
        let preds = vec![
            pred(true, 0.99),
            pred(true, 0.8),
            pred(true, 0.3),
            pred(false, 0.6),
            pred(false, 0.1),
        ];
        let curve = pr_curve(&preds);
        let at = |t: f32| {
            *curve
                .iter()
                .find(|p| (p.threshold - t).abs() < 1e-6)
                .unwrap()
        };
        assert_eq!(at(0.25).recall, 1.0);
        assert_eq!(at(0.25).precision, 0.75);
        assert_eq!(at(0.7).precision, 1.0);
        assert!((at(0.7).recall - 2.0 / 3.0).abs() < 1e-9);
        // Precision 1.0 is reached from t=0.65 up to 0.8 with recall 2/3: the lowest such t.
        assert_eq!(choose_threshold(&curve, 0.97), Some(0.65));
        // Without a reachable floor, the best F1 (0.857 from 0.15 to 0.3) wins.
        assert_eq!(choose_threshold(&curve[..6], 1.1), Some(0.15));
    }

    #[test]
    fn char_f1_ignores_spacing_and_case() {
        assert_eq!(char_f1("一隻貓", "一隻 貓"), 1.0);
        assert_eq!(char_f1("A cat", "a cat!"), 1.0);
        assert_eq!(char_f1("cat", "dog"), 0.0);
        assert!((char_f1("黑貓", "黑狗") - 0.5).abs() < 1e-9);
    }
}
