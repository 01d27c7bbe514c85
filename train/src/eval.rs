//! The evaluator: routes every row of a test file, compares with the gold
//! label under the strict rule, and reports the confusion matrix, precision,
//! recall and F1 (overall, per language, per held-out situation), how much
//! of the reference prompts the extracted prompts keep, whether edits keep
//! their operation (remove stays remove, not "replace"), and the
//! precision/recall curve over the call-probability threshold.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use router::dataset::{Confusion, Example};
use router::router::{Route, Router};
use serde::{Deserialize, Serialize};

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
    /// Edit rows: does the extracted prompt name the reference's operations?
    pub edits: EditCheck,
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// One point of the precision/recall curve over the call threshold.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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

/// The threshold to ship, from the curve over the validation split's
/// `rows`: among the points whose precision reaches `min_precision` (all
/// points when none does), those whose F1 is within one row's worth
/// (`1 / rows`) of the best are equally good, and the middle of the longest
/// run of consecutive good thresholds wins (the upper middle of an even
/// run; the lower run of two equally long). A difference smaller than one
/// row is noise, and the edge of a plateau is exactly where the routes
/// start to move when the messages shift a little: the middle is the
/// choice that holds best on messages the split does not have.
pub fn choose_threshold(curve: &[CurvePoint], min_precision: f64, rows: usize) -> Option<f32> {
    let reaches = |p: &CurvePoint| p.precision >= min_precision;
    let floor = curve.iter().any(reaches);
    let eligible = |p: &CurvePoint| !floor || reaches(p);
    let best = curve
        .iter()
        .filter(|p| eligible(p))
        .map(|p| p.f1)
        .max_by(f64::total_cmp)?;
    let tolerance = 1.0 / rows.max(1) as f64;
    let good = |p: &CurvePoint| eligible(p) && p.f1 >= best - tolerance;
    let mut longest: &[CurvePoint] = &[];
    let mut rest = curve;
    while !rest.is_empty() {
        let skip = rest.iter().take_while(|p| !good(p)).count();
        rest = &rest[skip..];
        let run = rest.iter().take_while(|p| good(p)).count();
        if run > longest.len() {
            longest = &rest[..run];
        }
        rest = &rest[run..];
    }
    longest.get(longest.len() / 2).map(|p| p.threshold)
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
        edits: edit_check(&predictions),
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
    print_edit_check(&report.edits, out)?;
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

// ---------------------------------------------------------------------------
// "No edit turned into another operation": the edit operations a prompt
// names, by a small keyword lexicon per language, compared between the
// reference prompt and the extracted one.

/// An edit operation, as a prompt words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EditOp {
    /// remove / delete / 去掉 / 刪除 / 移除 / 拿掉 / P掉 / 剷走 / 唔要 ...
    Remove,
    /// add / put / give / 加 / 加上 / 添加 / 補上 / 戴上 ...
    Add,
    /// replace / swap / instead of / 替換 / 取代; and any other "change X to
    /// Y" (換成 / 改成 / 變成 / turn / make ...) that names no colour or style
    Replace,
    /// recolour / colorize / black and white / 顏色 / 配色 / 色調 / 上色, or a
    /// change to a colour (改成墨綠色, make the sky purple)
    Recolor,
    /// a change of style or medium (風格, 畫風, 質感, style; 改成水彩, turn
    /// into anime)
    Restyle,
    /// extend / outpaint / expand / zoom out / 延伸 / 擴展 / 擴闊
    Extend,
    /// crop / trim / 裁切
    Crop,
    /// blur / 模糊 / 虛化 / 打碼
    Blur,
    /// upscale / resolution / 4K / 解析度 / 畫質 / 放大兩倍
    Upscale,
    /// light, tone and sharpness: brighten / darken / sharpen / contrast /
    /// saturation / 調亮 / 提亮 / 銳利 / 對比 / 降噪 / 色溫
    Adjust,
    /// bigger / smaller / 放大 / 縮小
    Resize,
    /// move / straighten / rotate / 移到 / 挪 / 拉正
    Move,
    /// restore / repair / 修復 / 還原
    Restore,
    /// the constraint that goes with an edit: keep / leave / 保持 / 保留 / 不要動
    Keep,
}

impl EditOp {
    pub fn name(self) -> &'static str {
        match self {
            EditOp::Remove => "remove",
            EditOp::Add => "add",
            EditOp::Replace => "replace",
            EditOp::Recolor => "recolor",
            EditOp::Restyle => "restyle",
            EditOp::Extend => "extend",
            EditOp::Crop => "crop",
            EditOp::Blur => "blur",
            EditOp::Upscale => "upscale",
            EditOp::Adjust => "adjust",
            EditOp::Resize => "resize",
            EditOp::Move => "move",
            EditOp::Restore => "restore",
            EditOp::Keep => "keep",
        }
    }
}

/// Words that name an operation by themselves. CJK entries match anywhere;
/// Latin ones as whole words (of the lower-cased text). `加`, `唔要`, `擴`,
/// `裁` and the colour/style rules are handled in [`clause_ops`].
const OP_WORDS: &[(EditOp, &str)] = &[
    (
        EditOp::Remove,
        "去掉|去除|去背|執走|执走|刪除|删除|刪掉|删掉|刪走|删走|移除|移掉|拿掉|拿走|p掉|p 掉|\
            p走|消掉|擦掉|清掉|清除|抹掉|除掉|搬走|剷走|铲走|拎走|攞走|摳走|抠走|\
            摳掉|抠掉|弄走|弄掉|修掉|去咗|remove|removed|removing|delete|deleted|\
            erase|erased|get rid of|take out|take away|take off|lose the|cut out",
    ),
    (
        EditOp::Add,
        "添加|添上|多放|放上|補上|补上|補一|补一|補個|补个|掛上|挂上|掛一|挂一|擺一|摆一|插入|貼上|贴上|戴上|戴一|戴個|戴个|戴副|\
            寫上|写上|多一|add|added|adding|put|insert|include|give|place|stick|\
            attach|write",
    ),
    (
        EditOp::Replace,
        "替換|替换|取代|換掉|换掉|改名|instead of|replace|replaced|swap|swapped|\
            rename|renamed",
    ),
    (
        EditOp::Extend,
        "延伸|拉闊|拉阔|outpaint|outpainting|extend|extended|expand|expanded|\
            widen|zoom out|uncrop",
    ),
    (EditOp::Crop, "crop|cropped|cropping|trim|zoom in"),
    (
        EditOp::Blur,
        "模糊|虛化|虚化|糊掉|打碼|打码|馬賽克|马赛克|矇|朦|blur|blurred|blurry|\
            defocus|out of focus|pixelate|censor",
    ),
    (
        EditOp::Upscale,
        "解析度|分辨率|畫質|画质|高清|超解析|2k|upscale|upscaled|upscaling|upres|\
            high res|hi-res|resolution|4k|8k",
    ),
    (
        EditOp::Adjust,
        "調亮|调亮|提亮|調光|调光|變亮|变亮|亮一點|亮一点|亮啲|光啲|調暗|调暗|變暗|变暗|\
            暗一點|暗一点|暗啲|壓暗|压暗|亮度|暗度|銳利|锐利|銳化|锐化|清楚|清晰|\
            對比|对比|飽和|饱和|曝光|降噪|噪點|噪点|雜訊|杂讯|色溫|色温|調暖|调暖|\
            調冷|调冷|暖一點|暖一点|冷一點|冷一点|加強|加强|加深|加重|顆粒|颗粒|\
            磨皮|鮮豔|鮮艷|鲜艳|brighten|brighter|lighten|darken|darker|dim|\
            sharpen|sharper|crisp|contrast|saturation|saturate|saturated|\
            desaturate|exposure|denoise|noise|grain|warmer|cooler|brightness|\
            vibrant|vivid|dehaze",
    ),
    (
        EditOp::Resize,
        "放大|縮小|缩小|大一點|大一点|小一點|小一点|大啲|細啲|加大|bigger|\
            smaller|larger|enlarge|shrink|resize",
    ),
    (
        EditOp::Move,
        "移到|移去|搬去|搬到|左移|右移|上移|下移|移一|移過|移过|移動|移动|拉正|\
            轉正|转正|旋轉|旋转|move|moved|shift|reposition|straighten|rotate|flip|\
            mirror",
    ),
    (
        EditOp::Restore,
        "修復|修复|還原|还原|修補|修补|restore|restored|repair",
    ),
    (
        EditOp::Keep,
        "保持|保留|不要動|不要动|不要改|别改|別改|不改|唔好改|不要換|不要换|不要跑掉|別動|别动|不動|不动|不要變|不要变|不變|不变|\
            唔好郁|唔好變|唔好变|維持|维持|留返|淨係留|keep|keeping|leave the|\
            untouched|don't change|don't touch|as is",
    ),
    (
        EditOp::Recolor,
        "上色|上返色|顏色|颜色|色彩|配色|色調|色调|調色|调色|底色|黑白|單色|单色|色系|\
            colorize|colourize|recolor|recolour|color|colour|colors|colours|\
            black and white|grayscale|greyscale|monochrome|sepia|tint|palette|hue",
    ),
    (
        EditOp::Restyle,
        "風格|风格|畫風|画风|筆觸|笔触|質感|质感|style|styled|restyle|aesthetic|\
            deep fry|deep fried|deep-fried",
    ),
];

/// Verbs of a change whose kind is told by what follows (a colour, a style,
/// else a replacement).
const CHANGE_WORDS: &str = "換成|换成|改成|改為|改为|變成|变成|換做|换做|改做|變做|变做|轉成|转成|\
            轉做|转做|轉為|转为|做成|弄成|整成|p成|畫成|画成|調成|调成|換|换|改|變|\
            变|轉|转|change|changed|turn|turned|convert|converted|transform|make|\
            made|into|switch|set|as";

/// Styles and media a change can turn a picture into.
const STYLE_NOUNS: &str = "水彩|油畫|油画|水墨|素描|像素|漫畫|漫画|動漫|动漫|卡通|插畫|插画|手繪|\
            手绘|浮世繪|浮世绘|吉卜力|賽博|赛博|蒸汽|國畫|国画|版畫|版画|剪紙|剪纸|\
            梵谷|梵高|莫內|莫奈|ghibli|cyberpunk|steampunk|anime|cartoon|\
            watercolor|watercolour|oil painting|sketch|painting|illustration|comic|\
            pop art|pixel art|claymation|lego|8-bit|16-bit|vaporwave|ukiyo-e|\
            van gogh|noir|manga";

const COLOR_WORDS: &str = "red|blue|green|yellow|purple|pink|black|white|grey|gray|orange|gold|\
            silver|brown|teal|navy|beige|cyan|magenta|violet|turquoise|maroon|\
            cream";

/// First characters of a CJK colour name followed by 色 (紅色, 墨綠色 ...).
const COLOR_CHARS: &str = "紅红藍蓝綠绿黃黄紫粉黑白灰橙橘金銀银棕褐青米靛";

/// Separators between the clauses of a prompt (each clause is classified
/// on its own, so that "換成海邊，加上夕陽" is a replacement and an addition).
const CLAUSE_WORDS: &str = "然後|然后|順便|顺便|同埋|並且|并且|還有|还有|仲有|另外";
const CLAUSE_LATIN: &[&str] = &["and", "then", "also", "plus"];

fn is_latin_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// Does `hay` (lower-cased) contain `word`: anywhere for a word with CJK,
/// else as a whole Latin word or phrase.
fn has_word(hay: &str, word: &str) -> bool {
    if !word.is_ascii() {
        return hay.contains(word);
    }
    hay.match_indices(word).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + word.len()..].chars().next();
        !before.is_some_and(is_latin_word_char) && !after.is_some_and(is_latin_word_char)
    })
}

/// Does `hay` contain any of the `|`-separated `words`.
fn has_any(hay: &str, words: &str) -> bool {
    words.split('|').any(|w| has_word(hay, w))
}

/// Splits a lower-cased prompt into clauses. A space between two CJK
/// characters ends a clause as a comma would (Discord-style Chinese writes
/// `名字糊掉 角色換成皮卡丘 其他別動`).
fn clauses(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut t = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let between_cjk = c.is_whitespace()
            && chars[..i].last().is_some_and(|p| !p.is_ascii())
            && chars[i + 1..].first().is_some_and(|n| !n.is_ascii());
        t.push(if between_cjk { '|' } else { c });
    }
    for w in CLAUSE_WORDS.split('|') {
        t = t.replace(w, "|");
    }
    let mut out = Vec::new();
    for piece in t.split(|c: char| "|，,、;；。.!！?？:：\n/+&()（）「」“”\"".contains(c))
    {
        let mut cur: Vec<&str> = Vec::new();
        for w in piece.split_whitespace() {
            if CLAUSE_LATIN.contains(&w) {
                out.push(cur.join(" "));
                cur.clear();
            } else {
                cur.push(w);
            }
        }
        out.push(cur.join(" "));
    }
    out.retain(|c| !c.trim().is_empty());
    out
}

/// `加` as "add" (not 加深/加強/加大/加油/參加/更加 ...).
fn has_add_char(c: &str) -> bool {
    let chars: Vec<char> = c.chars().collect();
    chars.iter().enumerate().any(|(i, &ch)| {
        ch == '加'
            && !chars
                .get(i + 1)
                .is_some_and(|n| "深強强重亮大快粗寬宽長长高熱热速工班油減减".contains(*n))
            && !(i > 0 && "參参更".contains(chars[i - 1]))
    })
}

/// 唔要 (Cantonese "don't want") as removal, not 唔要郁 ("don't move").
fn has_cantonese_drop(c: &str) -> bool {
    c.match_indices("唔要")
        .any(|(i, s)| !c[i + s.len()..].starts_with(['郁', '動', '动', '變', '变', '改']))
}

/// 風 as a style (賽博朋克風, 日系風), not 風景 / 風車 / 風褸 ...
fn has_style_char(c: &str) -> bool {
    c.match_indices(['風', '风']).any(|(i, s)| {
        !c[i + s.len()..].starts_with([
            '景', '車', '车', '扇', '箏', '筝', '雨', '暴', '吹', '褸', '褛', '衣', '格',
        ])
    })
}

fn clause_ops(c: &str) -> BTreeSet<EditOp> {
    let mut ops = BTreeSet::new();
    for (op, words) in OP_WORDS {
        if matches!(op, EditOp::Recolor | EditOp::Restyle) {
            continue;
        }
        if has_any(c, words) {
            ops.insert(*op);
        }
    }
    if has_add_char(c) {
        ops.insert(EditOp::Add);
    }
    if has_cantonese_drop(c) {
        ops.insert(EditOp::Remove);
    }
    if c.contains(['擴', '扩']) {
        ops.insert(EditOp::Extend);
    }
    if c.contains('裁') {
        ops.insert(EditOp::Crop);
    }
    if c.contains('挪') {
        ops.insert(EditOp::Move);
    }
    // 放大兩倍 / 2x: more pixels, not a bigger object.
    if c.contains("放大") && (c.contains('倍') || has_any(c, "2x|x2|4x|x4")) {
        ops.insert(EditOp::Upscale);
    }
    if ops.contains(&EditOp::Upscale) {
        ops.remove(&EditOp::Resize);
    }
    let change = has_any(c, CHANGE_WORDS);
    let words = |op: EditOp| {
        OP_WORDS
            .iter()
            .find(|(o, _)| *o == op)
            .map_or("", |(_, w)| *w)
    };
    let colour = c
        .char_indices()
        .any(|(i, ch)| COLOR_CHARS.contains(ch) && c[i + ch.len_utf8()..].starts_with('色'))
        || has_any(c, COLOR_WORDS);
    if has_any(c, words(EditOp::Recolor)) || (change && colour) {
        ops.insert(EditOp::Recolor);
    }
    if has_any(c, words(EditOp::Restyle))
        || (change && (has_any(c, STYLE_NOUNS) || has_style_char(c)))
    {
        ops.insert(EditOp::Restyle);
    }
    if change && ops.is_empty() {
        ops.insert(EditOp::Replace);
    }
    ops
}

/// The edit operations a prompt names (empty for a prompt that names none).
pub fn edit_ops(prompt: &str) -> BTreeSet<EditOp> {
    clauses(&prompt.to_lowercase())
        .iter()
        .flat_map(|c| clause_ops(c))
        .collect()
}

/// Words of a message that point at a picture that already exists.
const EDIT_MARKERS: &str = "這張|这张|呢張|呢张|嗰張|嗰张|張相|张相|幅相|呢幅|這幅|这幅|剛剛那|\
    刚刚那|刚才那|剛才那|上一張|上一张|修圖|修图|p圖|p图|修一下|p一下|edit|\
    photoshop|this photo|this pic|this image|my photo|my pic|the photo|\
    my selfie|this selfie|that one";

/// Is this gold call an edit: its `meta` says so (intent `edit` /
/// `edit-implicit`, or kind `edit` in the generator's files); a row with
/// other meta counts when its reference names an operation and the message
/// points at an existing picture; a row without meta when its reference
/// names an operation.
pub fn is_edit(p: &Prediction) -> bool {
    let Some(gold) = &p.gold_prompt else {
        return false;
    };
    if p.intent.as_deref().is_some_and(|i| i.starts_with("edit"))
        || p.kind.as_deref() == Some("edit")
    {
        return true;
    }
    if edit_ops(gold).is_empty() {
        return false;
    }
    if p.intent.is_none() && p.kind.is_none() {
        return true;
    }
    has_any(&p.text.to_lowercase(), EDIT_MARKERS)
}

/// An edit whose extracted prompt names other operations than the reference.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedEdit {
    pub text: String,
    pub lang: Option<String>,
    pub gold_prompt: String,
    pub prompt: String,
    pub expected: Vec<EditOp>,
    pub got: Vec<EditOp>,
}

impl ChangedEdit {
    /// `dropped` (some operation missing, nothing else), `added` (all kept,
    /// another one added) or `turned` (into another operation).
    pub fn how(&self) -> &'static str {
        let missing = self.expected.iter().any(|o| !self.got.contains(o));
        let extra = self.got.iter().any(|o| !self.expected.contains(o));
        match (missing, extra) {
            (true, false) => "dropped",
            (false, true) => "added",
            _ => "turned",
        }
    }
}

/// "No edit turned into another operation", over the edit rows of a file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EditCheck {
    /// Edit rows routed to a call whose reference names an operation.
    pub rows: usize,
    /// Those whose extracted prompt names exactly the reference's operations.
    pub kept: usize,
    pub changed: Vec<ChangedEdit>,
    /// Edit rows routed to chat (counted as missed calls, not here).
    pub routed_to_chat: usize,
    /// Edit rows whose reference names no operation the lexicon knows.
    pub unrecognised: usize,
}

/// Compares the operations of every edit row's reference and extracted prompt.
pub fn edit_check(predictions: &[Prediction]) -> EditCheck {
    let mut check = EditCheck::default();
    for p in predictions.iter().filter(|p| is_edit(p)) {
        let Some(gold) = &p.gold_prompt else { continue };
        let expected = edit_ops(gold);
        if expected.is_empty() {
            check.unrecognised += 1;
            continue;
        }
        let Some(prompt) = p.prompt.as_deref().filter(|_| p.pred == Route::Image) else {
            check.routed_to_chat += 1;
            continue;
        };
        check.rows += 1;
        let got = edit_ops(prompt);
        if got == expected {
            check.kept += 1;
        } else {
            check.changed.push(ChangedEdit {
                text: p.text.clone(),
                lang: p.lang.clone(),
                gold_prompt: gold.clone(),
                prompt: prompt.to_string(),
                expected: expected.into_iter().collect(),
                got: got.into_iter().collect(),
            });
        }
    }
    check
}

fn op_list(ops: &[EditOp]) -> String {
    if ops.is_empty() {
        return "(none)".into();
    }
    ops.iter().map(|o| o.name()).collect::<Vec<_>>().join("+")
}

/// `edits: N rows, operation kept K, changed: C (...)` and one line per
/// changed edit.
pub fn print_edit_check(check: &EditCheck, out: &mut impl Write) -> Result<()> {
    if check.rows + check.routed_to_chat + check.unrecognised == 0 {
        return Ok(());
    }
    let count = |how: &str| check.changed.iter().filter(|c| c.how() == how).count();
    writeln!(
        out,
        "edits: {} rows, operation kept {}, changed: {} ({} dropped an operation, {} turned into another, {} added one); not counted: {} routed to chat, {} without a known operation",
        check.rows,
        check.kept,
        check.changed.len(),
        count("dropped"),
        count("turned"),
        count("added"),
        check.routed_to_chat,
        check.unrecognised,
    )?;
    for c in &check.changed {
        writeln!(
            out,
            "  {} [{}] {} -> {}: {:?} => {:?}",
            c.how(),
            c.lang.as_deref().unwrap_or("-"),
            op_list(&c.expected),
            op_list(&c.got),
            c.gold_prompt,
            c.prompt
        )?;
    }
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
        // Precision 1.0 with recall 2/3 (F1 0.8) from t=0.65 to 0.8; above
        // it recall 1/3 (F1 0.5) is more than a row's worth (1/5) worse:
        // the upper middle of 0.65 0.7 0.75 0.8.
        assert_eq!(choose_threshold(&curve, 0.97, preds.len()), Some(0.75));
        // Without a reachable floor, the best F1 (0.857 from 0.15 to 0.3,
        // within a row of 0.75 at 0.05 and 0.1 and at 0.35 to 0.6) from
        // the middle of the longest run.
        let loose = choose_threshold(&curve[..6], 1.1, preds.len());
        assert_eq!(loose, Some(0.2));
        // With many rows only the best F1 counts: the upper middle of
        // 0.15 0.2 0.25 0.3.
        assert_eq!(choose_threshold(&curve[..6], 1.1, 1_000_000), Some(0.25));
    }

    fn point(threshold: f32, precision: f64, recall: f64) -> CurvePoint {
        CurvePoint {
            threshold,
            precision,
            recall,
            f1: 2.0 * precision * recall / (precision + recall),
        }
    }

    /// The shipped adapter's validation curve (529 rows): 0.10 has the best
    /// F1 by 2e-6 (one false call instead of one missed call) at the edge
    /// of a plateau that runs to 0.65.
    #[test]
    fn a_near_tie_at_the_edge_of_a_plateau_gives_way_to_its_middle() {
        let mut curve = vec![point(0.05, 0.9802, 1.0), point(0.1, 0.99197, 1.0)];
        curve.extend((3..=13).map(|i| point(i as f32 * 0.05, 0.99595, 0.99595)));
        curve.extend((14..=18).map(|i| point(i as f32 * 0.05, 0.99592, 0.98785)));
        curve.push(point(0.95, 0.9959, 0.98381));
        let chosen = choose_threshold(&curve, 0.97, 529).unwrap();
        assert!((chosen - 0.4).abs() < 1e-6, "{chosen}");
        // Only the exact best with a tolerance too small to matter.
        assert_eq!(choose_threshold(&curve, 0.97, usize::MAX), Some(0.1));
    }

    /// The threshold recorded next to the shipped adapter is the one this
    /// rule picks from the validation curve recorded with it.
    #[test]
    fn the_shipped_threshold_follows_from_its_recorded_curve() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/current");
        let read = |name: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let recorded = read("threshold_curve.json");
        let curve: Vec<CurvePoint> = serde_json::from_value(recorded["curve"].clone()).unwrap();
        let rows = recorded["rows"].as_u64().unwrap() as usize;
        let min_precision = recorded["min_precision"].as_f64().unwrap();
        let chosen = choose_threshold(&curve, min_precision, rows).unwrap();
        let shipped = read("router.json")["call_threshold"].as_f64().unwrap() as f32;
        assert_eq!(chosen, shipped);
    }

    #[test]
    fn char_f1_ignores_spacing_and_case() {
        assert_eq!(char_f1("一隻貓", "一隻 貓"), 1.0);
        assert_eq!(char_f1("A cat", "a cat!"), 1.0);
        assert_eq!(char_f1("cat", "dog"), 0.0);
        assert!((char_f1("黑貓", "黑狗") - 0.5).abs() < 1e-9);
    }
    fn ops(s: &str) -> Vec<EditOp> {
        edit_ops(s).into_iter().collect()
    }

    #[test]
    fn edit_operations_in_traditional_chinese() {
        use EditOp::*;
        assert_eq!(
            ops("拿掉左下角的垃圾桶，整體色調改成暖橘色"),
            vec![Remove, Recolor]
        );
        assert_eq!(ops("背景換成一整片薰衣草田"), vec![Replace]);
        assert_eq!(ops("延伸成 21:9，兩邊補上更多稻田"), vec![Add, Extend]);
        assert_eq!(ops("把這張自拍改成水墨畫的質感"), vec![Restyle]);
        assert_eq!(ops("後面的車流全部模糊掉"), vec![Blur]);
        assert_eq!(ops("解析度放大三倍"), vec![Upscale]);
        assert_eq!(ops("帽子放大一點"), vec![Resize]);
        assert_eq!(ops("陰影加深，其他地方都不要動"), vec![Adjust, Keep]);
        // Spaces between CJK clauses split them as commas do.
        assert_eq!(
            ops("名字糊掉 然後角色換成皮卡丘 其他別動"),
            ops("名字糊掉，然後角色換成皮卡丘，其他別動")
        );
        assert_eq!(ops("角色換成皮卡丘 其他別動"), vec![Replace, Keep]);
        // Not edits: a plain scene, and 加 in 加油.
        assert_eq!(ops("一隻在屋頂上彈烏克麗麗的浣熊，水彩風"), vec![]);
        assert_eq!(ops("看台上的人揮著加油棒"), vec![]);
    }

    #[test]
    fn edit_operations_in_simplified_chinese() {
        use EditOp::*;
        assert_eq!(ops("把桌上的外卖盒删掉，再加两只小猫"), vec![Remove, Add]);
        assert_eq!(ops("外套从白色改成藏青色"), vec![Recolor]);
        assert_eq!(ops("往上下扩成竖版 9:16"), vec![Extend]);
        assert_eq!(ops("背景虚化一点"), vec![Blur]);
        assert_eq!(ops("照片调暗"), vec![Adjust]);
        assert_eq!(ops("把头像改成赛博朋克风"), vec![Restyle]);
        assert_eq!(ops("裁成 1:1 的正方形"), vec![Crop]);
        assert_eq!(ops("把台灯挪到桌子右边"), vec![Move]);
        assert_eq!(ops("老照片修复，然后上色"), vec![Recolor, Restore]);
    }

    #[test]
    fn edit_operations_in_cantonese() {
        use EditOp::*;
        assert_eq!(ops("將門口嗰架單車剷走"), vec![Remove]);
        assert_eq!(ops("唔要後面啲遊客"), vec![Remove]);
        assert_eq!(ops("唔要郁佢塊面"), vec![]);
        assert_eq!(ops("件裙改做酒紅色"), vec![Recolor]);
        assert_eq!(ops("擴闊少少變做橫向"), vec![Extend]);
        assert_eq!(ops("加啲煙花喺天上"), vec![Add]);
        assert_eq!(ops("成張相轉做黑白"), vec![Recolor]);
        assert_eq!(ops("張梳化移去窗邊"), vec![Move]);
        assert_eq!(ops("個天換做星空"), vec![Replace]);
    }

    #[test]
    fn edit_operations_in_english_and_mixed() {
        use EditOp::*;
        assert_eq!(ops("remove the bin on the right"), vec![Remove]);
        assert_eq!(ops("get rid of the glare on his glasses"), vec![Remove]);
        assert_eq!(ops("swap the sneakers for rain boots"), vec![Replace]);
        assert_eq!(ops("make the background a snowy forest"), vec![Replace]);
        assert_eq!(ops("make the car bright purple"), vec![Recolor]);
        assert_eq!(ops("turn it into a watercolor painting"), vec![Restyle]);
        assert_eq!(ops("extend the canvas to 16:9"), vec![Extend]);
        assert_eq!(ops("blur the crowd behind her"), vec![Blur]);
        assert_eq!(ops("upscale to 4k"), vec![Upscale]);
        assert_eq!(ops("make it darker and sharpen the text"), vec![Adjust]);
        assert_eq!(ops("colorize this old family photo"), vec![Recolor]);
        assert_eq!(ops("add a scarf, keep her face the same"), vec![Add, Keep]);
        assert_eq!(ops("crop out the timestamp"), vec![Crop]);
        assert_eq!(ops("a raccoon playing the ukulele on a roof"), vec![]);
        assert_eq!(ops("outpaint 成 3:2，左邊多一點山"), vec![Add, Extend]);
        assert_eq!(ops("把 sky 換成 sunset"), vec![Replace]);
        // "remove" is a word, not a part of one; "sunset" is not "set".
        assert_eq!(ops("removal company van at sunset"), vec![]);
    }

    fn edit_row(intent: Option<&str>, gold: &str, pred: Option<&str>) -> Prediction {
        Prediction {
            text: format!("edit this: {gold}"),
            gold: Route::Image,
            pred: route_of(pred.is_some()),
            output: String::new(),
            prompt: pred.map(String::from),
            gold_prompt: Some(gold.to_string()),
            lang: Some("en".into()),
            kind: Some("pets".into()),
            intent: intent.map(String::from),
            call_probability: 0.9,
        }
    }

    #[test]
    fn edit_check_counts_kept_dropped_turned_and_added_operations() {
        let e = Some("edit-implicit");
        let mut chat_row = edit_row(Some("create"), "a cat", None);
        chat_row.gold = Route::Chat;
        chat_row.gold_prompt = None;
        let mut generator_row = edit_row(None, "背景換成海邊", Some("背景改成海邊"));
        generator_row.kind = Some("edit".into());
        generator_row.text = "幫我把背景換成海邊".into();
        let mut no_meta = edit_row(None, "remove the bird", Some("a bird"));
        no_meta.kind = None;
        let preds = vec![
            // kept, whatever the wording
            edit_row(
                e,
                "remove the lamp and add a plant",
                Some("get rid of the lamp, add a plant"),
            ),
            generator_row,
            // dropped the second operation
            edit_row(
                e,
                "remove the lamp and add a plant",
                Some("remove the lamp"),
            ),
            // turned a removal into a replacement
            edit_row(e, "remove the lamp", Some("replace the lamp with a plant")),
            // added an operation nobody asked for
            edit_row(
                Some("edit"),
                "blur the background",
                Some("blur the background, remove the people"),
            ),
            // without meta: an edit because the reference names one; its operation is gone
            no_meta,
            // other meta, but the message points at an existing picture
            {
                let mut r = edit_row(Some("mention"), "天空換成晚霞", Some("天空換成晚霞"));
                r.text = "<@123456789012345678> 這張天空換成晚霞".into();
                r
            },
            // not counted: routed to chat; no known operation; a create row; a chat row
            edit_row(e, "crop to a square", None),
            edit_row(e, "the same cat but sleepier", Some("the same cat")),
            {
                let mut r = edit_row(
                    Some("create"),
                    "a red barn turned into a cafe",
                    Some("a red barn"),
                );
                r.text = "draw a red barn turned into a cafe".into();
                r
            },
            chat_row,
        ];
        let c = edit_check(&preds);
        assert_eq!(c.rows, 7, "{c:?}");
        assert_eq!(c.kept, 3);
        assert_eq!(c.routed_to_chat, 1);
        assert_eq!(c.unrecognised, 1);
        let hows: Vec<&str> = c.changed.iter().map(|x| x.how()).collect();
        assert_eq!(hows, vec!["dropped", "turned", "added", "dropped"]);
        assert_eq!(c.changed[1].expected, vec![EditOp::Remove]);
        assert_eq!(c.changed[1].got, vec![EditOp::Replace]);
        let mut out = Vec::new();
        print_edit_check(&c, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("edits: 7 rows, operation kept 3, changed: 4 (2 dropped an operation, 1 turned into another, 1 added one)"),
            "{out}"
        );
        assert!(out.contains("turned [en] remove -> replace: \"remove the lamp\" => \"replace the lamp with a plant\""), "{out}");
        assert_eq!(out.lines().count(), 5);
    }
    /// A line written by `--predictions` (the router's `Route` has no
    /// `Deserialize`, so this reads the fields by hand).
    fn prediction_from_json(line: &str) -> Prediction {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = |k: &str| v[k].as_str().map(String::from);
        Prediction {
            text: s("text").unwrap_or_default(),
            gold: route_of(v["gold"] == "image"),
            pred: route_of(v["pred"] == "image"),
            output: s("output").unwrap_or_default(),
            prompt: s("prompt"),
            gold_prompt: s("gold_prompt"),
            lang: s("lang"),
            kind: s("kind"),
            intent: s("intent"),
            call_probability: v["call_probability"].as_f64().unwrap_or(0.0) as f32,
        }
    }

    #[test]
    fn edit_check_on_rows_the_shipped_adapter_answered() {
        // Four edits of the natural test file as the adapter shipped before, gemma3-270m-nat-mlp-r16e3, answered
        // them (train eval --predictions, CPU).
        let preds: Vec<Prediction> =
            include_str!("../tests/fixtures/shipped_edit_predictions.jsonl")
                .lines()
                .map(prediction_from_json)
                .collect();
        let c = edit_check(&preds);
        assert_eq!((c.rows, c.kept), (4, 1), "{c:?}");
        let summary: Vec<(&str, String, String)> = c
            .changed
            .iter()
            .map(|x| (x.how(), op_list(&x.expected), op_list(&x.got)))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("dropped", "add+extend".to_string(), "add".to_string()),
                ("dropped", "replace+keep".to_string(), "replace".to_string()),
                (
                    "dropped",
                    "remove+replace".to_string(),
                    "replace".to_string()
                ),
            ]
        );
    }

    /// `EDIT_CHECK_PREDICTIONS=a.jsonl:b.jsonl cargo test --release -p train
    /// edit_check_on_prediction_files -- --ignored --nocapture` prints the
    /// edit check of files written by `train eval --predictions` (one test
    /// file each), without a model.
    #[test]
    #[ignore = "a tool, not a check: reads the files named in EDIT_CHECK_PREDICTIONS (run as above)"]
    fn edit_check_on_prediction_files() {
        let files = std::env::var("EDIT_CHECK_PREDICTIONS").unwrap_or_default();
        for f in files.split(':').filter(|f| !f.is_empty()) {
            let text = std::fs::read_to_string(f).unwrap();
            let preds: Vec<Prediction> = text.lines().map(prediction_from_json).collect();
            println!("== {f}");
            print_edit_check(&edit_check(&preds), &mut std::io::stdout()).unwrap();
        }
    }
}
