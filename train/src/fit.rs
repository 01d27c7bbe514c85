//! The training run, top to bottom: data, model, optimizer, loop {lr,
//! forward, loss, backward, step; every N: validation loss, checkpoint},
//! then the adapter is written atomically, evaluated against the one in use
//! and promoted only when it is not worse.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use router::cli::Toggle;
use router::dataset::{read_merged, Example};
use router::lora::{self, Adapter, LoraConfig};
use router::model::{Decoder, Mode, TrainPass};
use router::prompt::PromptFormat;
use router::prompt::{parse_reply, Reply};
use router::rng::SplitMix64;
use router::router::{Router, RouterConfig};
use serde::{Deserialize, Serialize};

use crate::eval::{evaluate, print_report, Report};
use crate::optim::{learning_rate, AdamW, AdamWConfig};
use crate::progress_bar;
use crate::step::{batch_loss, ReplayedSteps, Tokenized};

/// Options of a training run (the original project's defaults).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct FitArgs {
    /// Base training data (JSONL conversations; repeatable) [default:
    /// datas/image_call_train.jsonl and datas/natural/train-*.jsonl under the home].
    #[arg(long = "train-file")]
    pub train_files: Vec<PathBuf>,
    /// Feedback files from the bot, applied after the base data (later rows win).
    /// Default: every *.jsonl in datas/feedback/.
    #[arg(long = "feedback")]
    pub feedback: Vec<PathBuf>,
    /// Held-out rows to evaluate the new and the current adapter on
    /// (repeatable) [default: both test files under the home]. The new
    /// adapter is promoted only if it is not worse on any of them.
    #[arg(long = "test-file")]
    pub test_files: Vec<PathBuf>,
    /// The call threshold recorded in the adapter is chosen on the
    /// validation split among thresholds reaching this precision (the middle
    /// of the run of thresholds within one row's worth of the best F1).
    #[arg(long, default_value_t = 0.97)]
    pub threshold_min_precision: f64,
    /// Where versioned adapter directories are written [default: model/adapters under the home].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Name of this run's directory (default: run-<UTC date and time>).
    #[arg(long)]
    pub name: Option<String>,
    /// The pointer the bot reads, moved to the new adapter on promotion
    /// [default: model/current under the home].
    #[arg(long)]
    pub current: Option<PathBuf>,

    /// LoRA rank.
    #[arg(long = "lora-r", default_value_t = 32)]
    pub r: usize,
    #[arg(long = "lora-alpha", default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long = "lora-dropout", default_value_t = 0.05)]
    pub dropout: f64,
    /// Projections that get LoRA weights.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj"
    )]
    pub targets: Vec<String>,
    #[arg(long)]
    pub use_rslora: bool,

    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Share of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 2)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4)]
    pub grad_accum: usize,
    /// Longer examples are cut to this many tokens.
    #[arg(long, default_value_t = 1536)]
    pub max_len: usize,
    /// Learn only the first N tokens of chat answers (0: all of them). The
    /// router needs only the start of a chat answer, the chat backend writes
    /// the rest; the free text after it is mostly memorised.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub chat_answer_tokens: usize,
    /// Pass the tokens all rows of a batch share (the system prefix) once
    /// and continue every row from its keys and values, or run every row in
    /// full. The loss and gradients are the same; only the speed differs.
    /// `auto`: on the CPU, where it halves a step (56 -> 109 tokens/s), and
    /// not on a GPU, where a step is bound by its number of kernels, not by
    /// its tokens (H200, replayed steps: 50.3 ms whole rows, 51.3 shared).
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    #[serde(default)]
    pub shared_prefix: Toggle,
    /// Run each step shape's forward and backward passes, and the optimizer
    /// update, from CUDA graphs captured once (`auto`: on CUDA). Steps are
    /// padded to a few shapes (widths rounded up to 32 columns); the loss
    /// and gradients are the eager ones. Eager steps only pass the shared
    /// prefix once.
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    #[serde(default)]
    pub graphs: Toggle,
    /// Let f32 matrix products on CUDA (the LoRA branches') use TF32
    /// tensor cores: a 10-bit mantissa in the products, f32 sums; still
    /// finer than bf16, in which PEFT computes LoRA on a bf16 model
    /// (`auto`: on CUDA; the CPU is always exact f32).
    #[arg(long, value_enum, default_value_t = Toggle::Auto)]
    #[serde(default)]
    pub tf32: Toggle,
    /// Group rows of similar length into each step (less padding; the
    /// steps' order stays random). Off by default: on the dev CPU it did not
    /// change tokens/s once the shared prefix is passed once (109 both).
    #[arg(long)]
    #[serde(default)]
    pub group_by_length: bool,
    /// Share of the data trained on; the rest gives the validation loss.
    #[arg(long, default_value_t = 0.9)]
    pub train_fraction: f64,
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
    /// Stop after this many optimizer steps (quick runs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: never).
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,

    /// Start from this adapter's weights instead of a fresh initialisation.
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Continue an interrupted run from one of its checkpoints.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Promote the new adapter even if it evaluates worse.
    #[arg(long)]
    pub force: bool,
    /// Train and evaluate, but leave the current adapter alone.
    #[arg(long)]
    pub no_promote: bool,
    /// Messages per batch when evaluating.
    #[arg(long, default_value_t = 32)]
    pub eval_batch: usize,
    /// Simulate an interruption after N steps (tests of --resume).
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

/// What a checkpoint needs to continue.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    run_dir: PathBuf,
    args: FitArgs,
}

/// One JSON line of the training log.
#[derive(Serialize)]
struct LogLine {
    step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens_per_s: Option<f64>,
    /// Tokens of this step's rows and the step's wall time (benchmarks read
    /// a steady rate from these).
    #[serde(skip_serializing_if = "Option::is_none")]
    step_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_s: Option<f64>,
    elapsed_s: f64,
}

/// Counts printed before training: rows by source and label.
fn print_counts(rows: &[Example], out: &mut impl Write) -> Result<()> {
    let mut by_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in rows {
        let e = by_source.entry(r.source.display().to_string()).or_default();
        if r.is_call() {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    writeln!(out, "{:<44} {:>7} {:>7}", "source", "image", "chat")?;
    for (src, (c, n)) in &by_source {
        writeln!(out, "{src:<44} {c:>7} {n:>7}")?;
    }
    let calls = rows.iter().filter(|r| r.is_call()).count();
    writeln!(
        out,
        "{:<44} {:>7} {:>7}",
        "total",
        calls,
        rows.len() - calls
    )?;
    Ok(())
}

/// Feedback files: the ones given, else `datas/feedback/*.jsonl`.
fn feedback_files(args: &FitArgs) -> Result<Vec<PathBuf>> {
    if !args.feedback.is_empty() {
        return Ok(args.feedback.clone());
    }
    jsonl_files(&router::cli::default_path("datas/feedback"), "")
}

/// The `*.jsonl` files in `dir` whose names start with `prefix`, sorted;
/// none when `dir` does not exist.
fn jsonl_files(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "jsonl")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Deterministic shuffle (Fisher-Yates over SplitMix64).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// One epoch's order of the training rows, `per_step` rows a step.
///
/// Rows are shuffled, then sorted by length within windows of
/// [`LENGTH_WINDOW`] steps, so each step's rows are of similar length and
/// little of a padded batch is padding; the steps themselves are then
/// shuffled again, so long and short steps alternate at random. With
/// `by_length` off, the plain shuffle.
fn step_order(lengths: &[usize], per_step: usize, seed: u64, by_length: bool) -> Vec<usize> {
    let order = shuffled(lengths.len(), seed);
    let per_step = per_step.max(1);
    if !by_length || per_step == 1 {
        return order;
    }
    let mut steps: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(per_step * LENGTH_WINDOW) {
        let mut window = window.to_vec();
        window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        steps.extend(window.chunks(per_step).map(<[usize]>::to_vec));
    }
    // The last step may be short; it stays last, as without grouping.
    let last = steps.pop().unwrap_or_default();
    let mut out: Vec<usize> = shuffled(steps.len(), seed ^ 0x5EED_0F57_E9A1)
        .into_iter()
        .flat_map(|k| steps[k].clone())
        .collect();
    out.extend(last);
    out
}

/// Steps of rows sorted together by [`step_order`].
const LENGTH_WINDOW: usize = 32;

fn tokenize(
    format: &PromptFormat,
    rows: &[Example],
    max_len: usize,
    chat_answer_tokens: usize,
) -> Result<Vec<Tokenized>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let ex = format
            .example(&r.user, &r.assistant)
            .with_context(|| format!("tokenizing {}:{}", r.source.display(), r.line))?;
        let (mut ids, mut labels) = (ex.ids, ex.labels);
        let is_chat = matches!(parse_reply(&r.assistant), Reply::Chat(_));
        if is_chat && chat_answer_tokens > 0 {
            keep_first_labels(&mut labels, chat_answer_tokens);
        }
        ids.truncate(max_len);
        labels.truncate(max_len);
        if labels.iter().skip(1).any(|l| *l) {
            out.push(Tokenized { ids, labels });
        } else {
            tracing::warn!(
                "{}:{}: no answer tokens left within --max-len {max_len}; skipped",
                r.source.display(),
                r.line
            );
        }
    }
    Ok(out)
}

/// Keeps the first `n` labelled positions, unlabelling the rest.
fn keep_first_labels(labels: &mut [bool], n: usize) {
    let mut seen = 0;
    for l in labels.iter_mut().filter(|l| **l) {
        seen += 1;
        if seen > n {
            *l = false;
        }
    }
}

/// Whether a training step on `device` passes the rows' shared prefix once
/// (`--shared-prefix`; `auto`: on the CPU only).
fn passes_shared_prefix(setting: Toggle, device: &Device) -> bool {
    setting.is_on(device.is_cpu())
}

fn validation_loss(dec: &Decoder, val: &[Tokenized], batch: usize) -> Result<f64> {
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in val.chunks(batch.max(1)) {
        let refs: Vec<&Tokenized> = chunk.iter().collect();
        let (loss, n) = batch_loss(dec, &refs, 1.0, Mode::Infer, true)?;
        total += loss.to_scalar::<f32>()? as f64;
        count += n;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    })
}

/// UTC `YYYYmmdd-HHMMSS` for run names.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn save_checkpoint(
    dir: &Path,
    dec: &Decoder,
    cfg: &LoraConfig,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    lora::save(dec, cfg, &tmp)?;
    opt.save(&tmp)?;
    std::fs::write(
        tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state)?,
    )?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

/// Points `link` at `target` atomically (a new link renamed over the old).
fn repoint(link: &Path, target: &Path) -> Result<()> {
    let parent = link.parent().unwrap_or(Path::new("."));
    let rel = pathdiff(target, parent);
    let tmp = parent.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    std::os::unix::fs::symlink(&rel, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    #[cfg(not(unix))]
    bail!("promotion needs symbolic links (unix)");
    if link.exists() && !link.is_symlink() {
        bail!(
            "{} is a directory, not a link; move it away to let train manage it",
            link.display()
        );
    }
    std::fs::rename(&tmp, link).with_context(|| format!("moving {}", link.display()))?;
    Ok(())
}

/// `target` relative to `base` when it lies below it, else absolute.
fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let t = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let b = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    t.strip_prefix(&b).map(Path::to_path_buf).unwrap_or(t)
}

/// Runs training, evaluation and promotion. Returns the new adapter's directory.
pub fn run(model: &router::cli::ModelArgs, args: FitArgs) -> Result<PathBuf> {
    let started = Instant::now();
    let (args, resume) = resume_args(args)?;
    let data = load_data(&args)?;
    let (mut router, sets) = load_model(model, &args, &data)?;
    let (lora_cfg, mut opt) = prepare_adapter(&mut router, &args)?;
    let mut run = RunDir::create(&args, resume.as_ref())?;
    let first_step = resume.as_ref().map_or(0, |s| s.step);
    let ctx = Loop {
        args: &args,
        sets: &sets,
        lora_cfg: &lora_cfg,
        started,
    };
    train_loop(&ctx, &mut router, &mut opt, &mut run, first_step)?;
    let run_dir = finish_run(&router, &lora_cfg, run, started)?;
    // Trained on the weights alone; the evaluations below route as the bot
    // does, so they take its CPU weights and CUDA kernels from here.
    model.apply_inference_kernels(&mut router.base_mut().decoder)?;
    record_threshold(&mut router, &args, &data.val, &run_dir)?;
    evaluate_and_promote(&mut router, &args, &data.test, &run_dir, started)?;
    Ok(run_dir)
}

/// With `--resume`, the interrupted run's arguments and where it stopped.
fn resume_args(args: FitArgs) -> Result<(FitArgs, Option<TrainerState>)> {
    let Some(ckpt) = &args.resume else {
        return Ok((args, None));
    };
    let p = ckpt.join("trainer_state.json");
    let s: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
    )
    .with_context(|| format!("parsing {}", p.display()))?;
    let args = FitArgs {
        resume: args.resume.clone(),
        ..s.args.clone()
    };
    Ok((args, Some(s)))
}

/// The rows of a run: training and validation split from the merged data
/// (base file, then feedback), and the held-out test rows.
struct Data {
    train: Vec<Example>,
    val: Vec<Example>,
    /// Each test file with its rows.
    test: Vec<(PathBuf, Vec<Example>)>,
}

impl FitArgs {
    /// Where run directories go.
    pub fn out_dir(&self) -> PathBuf {
        self.out_dir
            .clone()
            .unwrap_or_else(|| router::cli::default_path("model/adapters"))
    }

    /// The link promotion moves.
    pub fn current(&self) -> PathBuf {
        self.current
            .clone()
            .unwrap_or_else(|| router::cli::default_path(router::cli::DEFAULT_ADAPTER))
    }
}

/// The base training files: the given ones, else the generator's file and
/// the hand-written natural files under the home.
fn train_files(args: &FitArgs) -> Result<Vec<PathBuf>> {
    if !args.train_files.is_empty() {
        return Ok(args.train_files.clone());
    }
    let mut files = vec![router::cli::default_path("datas/image_call_train.jsonl")];
    files.extend(jsonl_files(
        &router::cli::default_path("datas/natural"),
        "train-",
    )?);
    Ok(files)
}

/// The test files: the given ones, else those `train eval` uses by default.
fn test_files(args: &FitArgs) -> Vec<PathBuf> {
    if args.test_files.is_empty() {
        crate::eval::default_test_files()
    } else {
        args.test_files.clone()
    }
}

fn load_data(args: &FitArgs) -> Result<Data> {
    let mut files = train_files(args)?;
    files.extend(feedback_files(args)?);
    let rows = read_merged(&files).context("reading training data")?;
    let mut test = Vec::new();
    for f in test_files(args) {
        let rows = router::dataset::read_jsonl(&f)
            .with_context(|| format!("reading the test file {}", f.display()))?;
        test.push((f, rows));
    }
    print_counts(&rows, &mut std::io::stdout())?;
    if rows.len() < 2 {
        bail!("need at least two training rows, found {}", rows.len());
    }
    let order = shuffled(rows.len(), args.seed);
    let n_train = ((rows.len() as f64 * args.train_fraction).round() as usize).clamp(1, rows.len());
    let pick = |idx: &[usize]| idx.iter().map(|&i| rows[i].clone()).collect();
    Ok(Data {
        train: pick(&order[..n_train]),
        val: pick(&order[n_train..]),
        test,
    })
}

/// The training and validation rows, tokenized.
struct Sets {
    train: Vec<Tokenized>,
    val: Vec<Tokenized>,
}

/// Loads the base model (no adapter, no Q8_0 copies: training never reads
/// them) and tokenizes the rows with its format.
fn load_model(
    model: &router::cli::ModelArgs,
    args: &FitArgs,
    data: &Data,
) -> Result<(Router, Sets)> {
    let router = Router::new(model.load_base_for_training()?, RouterConfig::default())?;
    let format = router.base().format.clone();
    let (max_len, chat) = (args.max_len, args.chat_answer_tokens);
    let train = tokenize(&format, &data.train, max_len, chat)?;
    let val = tokenize(&format, &data.val, max_len, chat)?;
    println!(
        "train {} rows, validation {} rows, test {} rows; device {}",
        train.len(),
        val.len(),
        data.test.iter().map(|(_, r)| r.len()).sum::<usize>(),
        router::device::describe(&router.base().decoder.device)
    );
    if train.is_empty() {
        bail!(
            "no training rows left after tokenizing (all longer than --max-len {}?)",
            args.max_len
        );
    }
    Ok((router, Sets { train, val }))
}

/// Attaches the adapter to train (fresh, or the one to start from) and
/// builds the optimizer over its variables (restored on `--resume`).
fn prepare_adapter(router: &mut Router, args: &FitArgs) -> Result<(LoraConfig, AdamW)> {
    let targets: Vec<&str> = args.targets.iter().map(String::as_str).collect();
    let mut lora_cfg = LoraConfig::new(args.r, args.alpha, args.dropout, &targets);
    lora_cfg.use_rslora = args.use_rslora;
    lora_cfg.base_model_name_or_path = Some(router.base().source.clone());
    let start_from = args.resume.clone().or(args.init_adapter.clone());
    let dec = &mut router.base_mut().decoder;
    match &start_from {
        Some(dir) => {
            let a = Adapter::load(dir)?;
            lora_cfg.r = a.config.r;
            lora_cfg.lora_alpha = a.config.lora_alpha;
            lora_cfg.target_modules = a.config.target_modules.clone();
            lora_cfg.use_rslora = a.config.use_rslora;
            a.apply(dec, false)?;
            dec.set_lora_dropout(args.dropout);
        }
        None => {
            lora::init(dec, &lora_cfg, args.seed)?;
        }
    }
    let vars = lora::trainable_vars(&router.base().decoder);
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    println!(
        "LoRA r={} alpha={} on {:?}: {n_params} trainable parameters",
        lora_cfg.r, lora_cfg.lora_alpha, args.targets
    );
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
    )?;
    if let Some(ckpt) = &args.resume {
        opt.load(ckpt)?;
    }
    Ok((lora_cfg, opt))
}

/// A run's directory: written under a `.partial` name (arguments, log,
/// checkpoints) and renamed when the adapter is complete.
struct RunDir {
    dir: PathBuf,
    partial: PathBuf,
    log: std::fs::File,
}

impl RunDir {
    fn create(args: &FitArgs, resume: Option<&TrainerState>) -> Result<Self> {
        let dir = match resume {
            Some(s) => s.run_dir.clone(),
            None => args.out_dir().join(
                args.name
                    .clone()
                    .unwrap_or_else(|| format!("run-{}", utc_stamp())),
            ),
        };
        if dir.exists() {
            bail!("{} already exists; pick another --name", dir.display());
        }
        let partial = dir.with_extension("partial");
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        std::fs::write(
            partial.join("train_args.json"),
            serde_json::to_string_pretty(args)?,
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(partial.join("training_log.jsonl"))?;
        Ok(Self { dir, partial, log })
    }
}

/// What the training loop reads and never changes.
struct Loop<'a> {
    args: &'a FitArgs,
    sets: &'a Sets,
    lora_cfg: &'a LoraConfig,
    /// Start of the whole run (log lines report time since then).
    started: Instant,
}

/// The loop: lr schedule, forward, loss, backward, clip, step; every N
/// steps the validation loss and a checkpoint.
fn train_loop(
    ctx: &Loop,
    router: &mut Router,
    opt: &mut AdamW,
    run: &mut RunDir,
    first_step: usize,
) -> Result<()> {
    let (args, train) = (ctx.args, &ctx.sets.train);
    let device: Device = router.base().decoder.device.clone();
    let per_step = args.batch_size.max(1) * args.grad_accum.max(1);
    let steps_per_epoch = train.len().div_ceil(per_step);
    let mut total = steps_per_epoch * args.epochs.max(1);
    if let Some(m) = args.max_steps {
        total = total.min(m);
    }
    let warmup = (total as f64 * args.warmup_ratio).round() as usize;
    let bar = progress_bar("train", total);
    bar.set_position(first_step as u64);
    let mut tokens_seen = 0usize;
    let mut update_time = std::time::Duration::ZERO;
    let loop_started = Instant::now();
    let share_prefix = passes_shared_prefix(args.shared_prefix, &device);
    candle_core::cuda::set_gemm_reduced_precision_f32(args.tf32.is_on(device.is_cuda()));
    let mut replayed = if args.graphs.is_on(device.is_cuda()) {
        opt.set_graphs(true);
        Some(ReplayedSteps::new(
            &router.base().decoder,
            args.batch_size.max(1),
        )?)
    } else {
        None
    };
    // This epoch's order of the training rows (reshuffled once per epoch).
    let lengths: Vec<usize> = train.iter().map(|t| t.ids.len()).collect();
    let mut epoch_order: Option<(usize, Vec<usize>)> = None;
    for step in first_step..total {
        let epoch = step / steps_per_epoch;
        if epoch_order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let seed = args.seed.wrapping_add(1 + epoch as u64);
            let by_length = args.group_by_length;
            epoch_order = Some((epoch, step_order(&lengths, per_step, seed, by_length)));
        }
        let order = epoch_order
            .as_ref()
            .map(|(_, o)| o.as_slice())
            .unwrap_or_default();
        let begin = (step % steps_per_epoch) * per_step;
        let picked: Vec<&Tokenized> = order[begin..(begin + per_step).min(train.len())]
            .iter()
            .map(|&i| &train[i])
            .collect();
        let label_tokens: usize = picked.iter().map(|t| t.answer_tokens()).sum();
        let step_tokens: usize = picked.iter().map(|t| t.ids.len()).sum();
        let step_started = Instant::now();
        let lr = learning_rate(step, total, warmup, args.lr);
        let dec = &router.base().decoder;
        let norm = label_tokens.max(1) as f64;
        let mut loss_sum = 0f64;
        for (k, micro) in picked.chunks(args.batch_size.max(1)).enumerate() {
            // This pass's dropout masks: reproducible from the seed, the
            // step and the micro-batch.
            let seed = args
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(step as u64)
                .wrapping_add((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let accumulate = k > 0;
            loss_sum += match replayed.as_mut() {
                Some(steps) => steps.run(dec, micro, norm, seed, accumulate, share_prefix, opt)?,
                None => {
                    let pass = TrainPass::new(seed);
                    let (loss, _) = batch_loss(dec, micro, norm, Mode::Train(&pass), share_prefix)?;
                    opt.store_grads(&pass.backward(&loss)?, accumulate)?;
                    loss.to_scalar::<f32>()? as f64
                }
            };
            tokens_seen += micro.iter().map(|t| t.ids.len()).sum::<usize>();
        }
        let update_started = Instant::now();
        let grad_norm = opt.step(lr, args.max_grad_norm)?;
        update_time += update_started.elapsed();
        let elapsed = loop_started.elapsed().as_secs_f64();
        let tps = tokens_seen as f64 / elapsed.max(1e-9);
        bar.inc(1);
        bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));
        let mut line = LogLine {
            step: step + 1,
            loss: Some(loss_sum),
            val_loss: None,
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_s: Some(tps),
            step_tokens: Some(step_tokens),
            step_s: Some(step_started.elapsed().as_secs_f64()),
            elapsed_s: ctx.started.elapsed().as_secs_f64(),
        };
        let last = step + 1 == total;
        if (args.eval_every > 0 && (step + 1) % args.eval_every == 0) || last {
            let batch = args.batch_size.max(1) * 4;
            let v = validation_loss(&router.base().decoder, &ctx.sets.val, batch)?;
            line.val_loss = Some(v);
            bar.suspend(|| println!("step {} loss {loss_sum:.4} val_loss {v:.4}", step + 1));
        }
        writeln!(run.log, "{}", serde_json::to_string(&line)?)?;
        if args.save_every > 0 && (step + 1) % args.save_every == 0 && !last {
            let state = TrainerState {
                step: step + 1,
                run_dir: run.dir.clone(),
                args: args.clone(),
            };
            let ckpt = run.partial.join(format!("checkpoint-{}", step + 1));
            save_checkpoint(&ckpt, &router.base().decoder, ctx.lora_cfg, opt, &state)?;
        }
        if args.stop_after == Some(step + 1) {
            if let Some(steps) = &replayed {
                log_replay_timing(steps, update_time, step + 1 - first_step);
            }
            bail!(
                "stopped after {} steps (--stop-after); resume with --resume <checkpoint>",
                step + 1
            );
        }
    }
    bar.finish_and_clear();
    if let Some(steps) = &replayed {
        log_replay_timing(steps, update_time, total - first_step);
    }
    run.log.flush()?;
    Ok(())
}

/// One log line on where replayed steps spent their time: per replayed
/// pass the inputs' upload and the passes themselves (launch to loss read
/// back), per step the optimizer update.
fn log_replay_timing(steps: &ReplayedSteps, update: std::time::Duration, steps_run: usize) {
    let t = steps.timing;
    let ms = |d: std::time::Duration, n: usize| d.as_secs_f64() * 1e3 / n.max(1) as f64;
    let passes = t.passes as usize;
    let nodes = steps.nodes.clone().unwrap_or_default();
    tracing::info!(
        shapes = steps.shapes(),
        replayed_passes = passes,
        inputs_ms = format!("{:.2}", ms(t.inputs, passes)),
        passes_ms = format!("{:.2}", ms(t.replay, passes)),
        update_ms = format!("{:.2}", ms(update, steps_run)),
        captures_ms = format!(
            "{:.0} (warm-up {:.0}, record {:.0}, instantiate {:.0})",
            ms(t.captures.total(), 1),
            ms(t.captures.warm_up, 1),
            ms(t.captures.record, 1),
            ms(t.captures.instantiate, 1)
        ),
        largest_graph_nodes = nodes.total(),
        kernels = nodes.kernels,
        copies = nodes.copies,
        sets = nodes.sets,
        allocs = nodes.allocs,
        frees = nodes.frees,
        top_kernels = nodes
            .kernel_names
            .iter()
            .take(8)
            .map(|(name, n)| format!("{name}x{n}"))
            .collect::<Vec<_>>()
            .join(" "),
        "replayed training steps (mean host time per pass and per update)"
    );
}

/// Writes the adapter, drops the checkpoints and renames the run directory
/// into place, so a run directory without `.partial` is always complete.
fn finish_run(
    router: &Router,
    lora_cfg: &LoraConfig,
    run: RunDir,
    started: Instant,
) -> Result<PathBuf> {
    let RunDir { dir, partial, .. } = run;
    lora::save(&router.base().decoder, lora_cfg, &partial)?;
    for entry in std::fs::read_dir(&partial)?.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("checkpoint-")
        {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
    println!(
        "adapter written to {} in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// Chooses the call threshold on the validation rows (the middle of the
/// plateau of best F1 among thresholds reaching `--threshold-min-precision`,
/// see `eval::choose_threshold`) and records it in the adapter's
/// `router.json`, where the router reads it.
fn record_threshold(
    router: &mut Router,
    args: &FitArgs,
    val_rows: &[Example],
    run_dir: &Path,
) -> Result<()> {
    if val_rows.is_empty() {
        return Ok(());
    }
    router.set_adapter(Some(&Adapter::load(run_dir)?))?;
    tracing::info!(
        rows = val_rows.len(),
        "choosing the call threshold on the validation split"
    );
    let report = evaluate(router, val_rows, args.eval_batch)?;
    let curve = crate::eval::pr_curve(&report.predictions);
    let Some(threshold) =
        crate::eval::choose_threshold(&curve, args.threshold_min_precision, val_rows.len())
    else {
        return Ok(());
    };
    let meta = router::router::AdapterMeta {
        call_threshold: Some(threshold),
    };
    meta.save(run_dir)?;
    std::fs::write(
        run_dir.join("threshold_curve.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "chosen_on": "validation split",
            "rows": val_rows.len(),
            "min_precision": args.threshold_min_precision,
            "call_threshold": threshold,
            "curve": curve,
        }))?,
    )?;
    println!(
        "call threshold {threshold:.2} (validation split, {} rows; argmax F1 {:.4})",
        val_rows.len(),
        report.f1
    );
    Ok(())
}

/// Evaluates the new adapter and the current one on every test file,
/// records both in `metrics.json`, and moves the `current` link when the new
/// one is not worse on any file (or `--force`), unless `--no-promote`.
fn evaluate_and_promote(
    router: &mut Router,
    args: &FitArgs,
    tests: &[(PathBuf, Vec<Example>)],
    run_dir: &Path,
    started: Instant,
) -> Result<()> {
    let new_adapter = Adapter::load(run_dir)?;
    router.set_adapter(Some(&new_adapter))?;
    let mut new_reports = Vec::new();
    for (file, rows) in tests {
        tracing::info!(file = %file.display(), rows = rows.len(), "evaluating the new adapter");
        let r = evaluate(router, rows, args.eval_batch)?;
        println!("new adapter on {}:", file.display());
        print_report(&r, &mut std::io::stdout())?;
        new_reports.push(r);
    }
    let current = args.current();
    let current_dir = std::fs::canonicalize(&current).ok();
    let mut current_reports: Option<Vec<Report>> = None;
    if let Some(dir) = current_dir.filter(|d| d.join(lora::CONFIG_FILE).exists()) {
        match Adapter::load(&dir).and_then(|a| router.set_adapter(Some(&a))) {
            Ok(()) => {
                let mut reports = Vec::new();
                for (file, rows) in tests {
                    let r = evaluate(router, rows, args.eval_batch)?;
                    println!("current adapter ({}) on {}:", dir.display(), file.display());
                    print_report(&r, &mut std::io::stdout())?;
                    reports.push(r);
                }
                current_reports = Some(reports);
            }
            Err(e) => {
                println!("current adapter {} cannot be used with this base model ({e}); it will be replaced", dir.display());
            }
        }
    }
    let files: Vec<&PathBuf> = tests.iter().map(|(f, _)| f).collect();
    std::fs::write(
        run_dir.join("metrics.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "test_files": files,
            "new": new_reports,
            "current": current_reports,
            "train_seconds": started.elapsed().as_secs_f64(),
        }))?,
    )?;
    let worse: Vec<String> = match &current_reports {
        None => Vec::new(),
        Some(current) => files
            .iter()
            .zip(new_reports.iter().zip(current))
            .filter(|(_, (n, c))| n.f1 < c.f1)
            .map(|(f, (n, c))| {
                format!(
                    "{}: new F1 {:.4} < current F1 {:.4}",
                    f.display(),
                    n.f1,
                    c.f1
                )
            })
            .collect(),
    };
    if args.no_promote {
        println!("--no-promote: {} left as it is", current.display());
    } else if worse.is_empty() || args.force {
        repoint(&current, run_dir)?;
        println!(
            "promoted: {} -> {}{}",
            current.display(),
            run_dir.display(),
            if worse.is_empty() { "" } else { " (forced)" }
        );
    } else {
        println!(
            "kept the current adapter: {} (use --force to promote anyway)",
            worse.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_prefix_is_passed_once_on_the_cpu_unless_told_otherwise() {
        assert!(passes_shared_prefix(Toggle::Auto, &Device::Cpu));
        assert!(!passes_shared_prefix(Toggle::Off, &Device::Cpu));
        assert!(passes_shared_prefix(Toggle::On, &Device::Cpu));
        // `train_args.json` records the setting by its command-line name.
        assert_eq!(
            serde_json::to_value(Toggle::Auto).unwrap(),
            serde_json::json!("auto")
        );
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let a = shuffled(50, 7);
        assert_eq!(a, shuffled(50, 7));
        assert_ne!(a, shuffled(50, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn steps_group_rows_of_similar_length_in_a_random_order() {
        let mut rng = SplitMix64(9);
        let lengths: Vec<usize> = (0..1000)
            .map(|_| 20 + (rng.next_u64() % 200) as usize)
            .collect();
        let padding = |order: &[usize]| -> usize {
            order
                .chunks(8)
                .map(|s| {
                    let max = s.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                    s.iter().map(|&i| max - lengths[i]).sum::<usize>()
                })
                .sum()
        };
        let grouped = step_order(&lengths, 8, 3, true);
        let plain = step_order(&lengths, 8, 3, false);
        assert_eq!(plain, shuffled(1000, 3));
        assert_eq!(grouped, step_order(&lengths, 8, 3, true));
        let mut sorted = grouped.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // Far less padding than random batches...
        assert!(
            padding(&grouped) * 10 < padding(&plain),
            "{} vs {}",
            padding(&grouped),
            padding(&plain)
        );
        // ...and the steps do not run from longest to shortest.
        let first_rows: Vec<usize> = grouped.chunks(8).map(|s| lengths[s[0]]).collect();
        assert!(first_rows.windows(2).any(|w| w[0] < w[1]));
        assert_ne!(
            first_rows[..10],
            first_rows[first_rows.len() - 11..first_rows.len() - 1]
        );
    }

    #[test]
    fn keep_first_labels_unlabels_the_rest_of_the_answer() {
        let mut labels = vec![false, false, true, true, true, true, false];
        keep_first_labels(&mut labels, 2);
        assert_eq!(labels, [false, false, true, true, false, false, false]);
        let mut all = vec![false, true, true];
        keep_first_labels(&mut all, 5);
        assert_eq!(all, [false, true, true]);
    }

    #[test]
    fn utc_stamp_looks_like_a_date() {
        let s = utc_stamp();
        assert_eq!(s.len(), 15, "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
