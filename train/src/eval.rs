//! The evaluator: routes every row of a test file, compares with the gold
//! label under the strict rule, and reports the confusion matrix, precision,
//! recall and F1 (overall and per language) and how well image prompts were
//! extracted.

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
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
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
    for chunk in rows.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.user.as_str()).collect();
        let decisions = router.route_batch(&texts).context("routing a batch")?;
        for (row, d) in chunk.iter().zip(decisions) {
            let gold = row.is_call();
            let pred = d.route == Route::Image;
            confusion.add(gold, pred);
            let lang = row.lang().unwrap_or("-").to_string();
            by_lang.entry(lang).or_default().add(gold, pred);
            let gold_prompt = row.gold_prompt();
            if let (Some(p), Some(g)) = (&d.prompt, &gold_prompt) {
                tp += 1;
                exact += usize::from(p == g);
                overlap += char_f1(p, g);
            }
            predictions.push(Prediction {
                text: row.user.clone(),
                gold: route_of(gold),
                pred: d.route,
                output: d.output,
                prompt: d.prompt,
                gold_prompt,
                lang: row.lang().map(String::from),
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
    writeln!(
        out,
        "image prompts (correct calls): exact {:.3}, char-F1 {:.3}",
        report.prompt_exact, report.prompt_char_f1
    )?;
    writeln!(out, "{}", c.metrics_line())?;
    Ok(())
}

/// Writes one JSON line per routed row.
pub fn write_predictions(report: &Report, path: &Path) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    for p in &report.predictions {
        writeln!(f, "{}", serde_json::to_string(p)?)?;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_f1_ignores_spacing_and_case() {
        assert_eq!(char_f1("一隻貓", "一隻 貓"), 1.0);
        assert_eq!(char_f1("A cat", "a cat!"), 1.0);
        assert_eq!(char_f1("cat", "dog"), 0.0);
        assert!((char_f1("黑貓", "黑狗") - 0.5).abs() < 1e-9);
    }
}
