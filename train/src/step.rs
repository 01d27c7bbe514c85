//! One training step's forward and backward passes: the loss of a batch of
//! tokenized rows and the gradients it leaves in the optimizer.
//!
//! Two ways to run them compute the same loss and gradients:
//! - eagerly ([`batch_loss`]), optionally passing the system prefix that
//!   every row shares once and continuing each row from its keys and
//!   values (fewer tokens; on the CPU half the time of a step);
//! - replayed ([`ReplayedSteps`]): each step is padded to one of a few
//!   shapes (width rounded up, answer slots rounded up, rows padded to the
//!   batch size) whose passes are captured as a CUDA graph the first time
//!   and replayed after. A step of the 270M model is a few thousand small
//!   kernels; issued one by one from the host they cost several times what
//!   the GPU needs to run them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use router::model::{
    dense_batch, Batch, Cache, CaptureTiming, Decoder, GraphNodes, Mode, Replay, StepInputs,
    TrainPass,
};

use crate::optim::AdamW;

/// A tokenized example: ids, and which of them are answer tokens (the loss
/// covers those).
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub labels: Vec<bool>,
}

impl Tokenized {
    /// Answer tokens the loss covers (the first token is never predicted).
    pub fn answer_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|l| **l).count()
    }
}

/// How many leading tokens every row of `batch` shares and no loss position
/// needs (0 when sharing would not pay): the system prefix, as a rule.
pub fn shared_prefix_len(batch: &[&Tokenized]) -> usize {
    let [first, rest @ ..] = batch else { return 0 };
    if rest.is_empty() {
        return 0;
    }
    let mut len = first.ids.len();
    for row in rest {
        len = len.min(
            first
                .ids
                .iter()
                .zip(&row.ids)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    // The position that predicts a row's first answer token, and at least
    // one token of every row, stay in the per-row pass.
    for row in batch {
        let first_label = row.labels.iter().position(|&l| l).unwrap_or(row.ids.len());
        len = len
            .min(first_label.saturating_sub(1))
            .min(row.ids.len().saturating_sub(1));
    }
    if len < MIN_SHARED_PREFIX {
        0
    } else {
        len
    }
}

/// Below this many shared tokens the extra pass is not worth it.
const MIN_SHARED_PREFIX: usize = 8;

/// A batch laid out for one pass: the tokens from `start` of every row,
/// padded to a common width, and the answer positions the loss reads.
struct Layout {
    /// Row-major `[rows, width]`, 0 at padding.
    tokens: Vec<u32>,
    /// Positions (`start + i`), `None` at padding.
    batch: Batch,
    /// Flat column (`row * width + i`) of every position predicting an
    /// answer token, and that token.
    answers: Vec<u32>,
    targets: Vec<u32>,
}

impl Layout {
    /// `rows` rows of at least `width` columns (more when a row is longer),
    /// the first `batch.len()` of them `batch`'s tokens from `start`, the
    /// rest padding.
    fn new(batch: &[&Tokenized], start: usize, rows: usize, width: usize) -> Self {
        let own = batch.iter().map(|r| r.ids.len() - start).max().unwrap_or(1);
        let width = width.max(own).max(1);
        let rows = rows.max(batch.len());
        let mut out = Self {
            tokens: Vec::with_capacity(rows * width),
            batch: Batch {
                rows: Vec::with_capacity(rows),
            },
            answers: Vec::new(),
            targets: Vec::new(),
        };
        for (b, ex) in batch.iter().enumerate() {
            let own = ex.ids.len() - start;
            out.tokens.extend_from_slice(&ex.ids[start..]);
            out.tokens.extend(std::iter::repeat_n(0, width - own));
            out.batch.rows.push(
                (0..width)
                    .map(|i| (i < own).then_some((start + i) as u32))
                    .collect(),
            );
            for i in start..ex.ids.len() - 1 {
                if ex.labels[i + 1] {
                    out.answers.push((b * width + i - start) as u32);
                    out.targets.push(ex.ids[i + 1]);
                }
            }
        }
        for _ in batch.len()..rows {
            out.tokens.extend(std::iter::repeat_n(0, width));
            out.batch.rows.push(vec![None; width]);
        }
        out
    }

    fn width(&self) -> usize {
        self.batch.width()
    }
}

/// Sum of the answer tokens' negative log-likelihood, divided by `norm`,
/// and the number of answer tokens.
///
/// With `share`, the leading tokens every row shares (the system prefix,
/// most of each row) go through the model once, batch of one, and the rows
/// continue from its keys and values; gradients flow back through the
/// shared pass. The result equals running every row in full.
pub fn batch_loss(
    dec: &Decoder,
    batch: &[&Tokenized],
    norm: f64,
    mode: Mode,
    share: bool,
) -> candle_core::Result<(Tensor, usize)> {
    let dev = &dec.device;
    let start = if share { shared_prefix_len(batch) } else { 0 };
    let mut cache = None;
    if start > 0 {
        let mut shared = Cache::default();
        let t = Tensor::from_vec(batch[0].ids[..start].to_vec(), (1, start), dev)?;
        dec.forward_hidden(&t, &dense_batch(1, 0, start), Some(&mut shared), mode)?;
        cache = Some(shared.repeat(batch.len())?);
    }
    let layout = Layout::new(batch, start, batch.len(), 1);
    let (b, t) = (batch.len(), layout.width());
    let tokens = Tensor::from_vec(layout.tokens, (b, t), dev)?;
    let hidden = dec.forward_hidden(&tokens, &layout.batch, cache.as_mut(), mode)?;
    let n = layout.answers.len();
    let answers = Tensor::from_vec(layout.answers, n, dev)?;
    let targets = Tensor::from_vec(layout.targets, n, dev)?;
    let weights = Tensor::full((1.0 / norm) as f32, n, dev)?;
    Ok((answer_loss(dec, &hidden, &answers, &targets, &weights)?, n))
}

/// The loss (`Decoder::answer_loss`) of the answer tokens `targets` at the
/// flat columns `answers` of `hidden` (`[B, T, H]`): the head runs on those
/// columns only.
fn answer_loss(
    dec: &Decoder,
    hidden: &Tensor,
    answers: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let picked = hidden.reshape((b * t, h))?.index_select(answers, 0)?;
    dec.answer_loss(&picked, targets, weights)
}

/// Step widths are rounded up to a multiple of this many columns.
const WIDTH_STEP: usize = 32;
/// Answer slots are rounded up to a multiple of this many. Padded slots
/// cost little (a row of the head's product each, weighted 0), a new shape
/// a capture (about 0.15 s on an H200): with 64, an epoch of the shipped
/// recipe took 15 shapes, 8 of them for fewer than 5 steps each; with 128
/// it takes 11 (docs/BENCHMARKS.md).
const ANSWER_STEP: usize = 128;

/// Training steps replayed from CUDA graphs, one per step shape.
///
/// A shape is (shared prefix length, width after it, answer slots, whether
/// the gradients add to the stored ones); every shape has the batch size's
/// rows, shorter batches padded. Its buffers hold the step's inputs: the
/// shared prefix's tokens, positions and mask, the rows' tokens, positions and
/// masks ([`StepInputs`]), the answer columns, their targets and weights
/// (`1 / norm`, 0 in unused slots). The dropout seed and the loss live in
/// buffers every shape shares, the gradients in the optimizer's. Padding
/// changes nothing: padded columns and rows are masked out of attention and
/// weigh nothing in the loss. The dropout masks differ from an eager
/// step's (they are drawn over the padded shape) but are drawn the same
/// way.
pub struct ReplayedSteps {
    rows: usize,
    shapes: HashMap<Shape, ShapeStep>,
    /// The step's dropout seed (a u64 as two u32).
    seed: Tensor,
    /// The last pass's loss `[1]` (f32).
    loss: Tensor,
    /// Where the time of runs that replayed a captured graph went.
    pub timing: PassTiming,
    /// The nodes of the largest graph captured so far.
    pub nodes: Option<GraphNodes>,
}

/// Host time of replayed passes, captures left out.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassTiming {
    pub passes: u32,
    /// Laying the batch out and uploading it into the buffers.
    pub inputs: std::time::Duration,
    /// From the launch until the loss is read back: the passes' GPU time.
    pub replay: std::time::Duration,
    /// The runs that captured a new shape, summed.
    pub captures: CaptureTiming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Shape {
    /// Tokens every row shares, passed once (0: whole rows).
    prefix: usize,
    /// Columns per row after the prefix.
    width: usize,
    answers: usize,
    accumulate: bool,
}

struct ShapeStep {
    /// The shared prefix's pass (one row), when the shape has one.
    prefix: Option<StepInputs>,
    /// The rows' pass, after the prefix's columns.
    inputs: StepInputs,
    /// Flat answer columns `[n]` u32 (0 in unused slots).
    answers: Tensor,
    /// `[n]` u32.
    targets: Tensor,
    /// `[n]` f32: `1 / norm`, 0 in unused slots.
    weights: Tensor,
    replay: Replay,
}

impl ReplayedSteps {
    /// Steps of `rows` rows (the batch size; shorter batches are padded)
    /// for `dec`.
    pub fn new(dec: &Decoder, rows: usize) -> candle_core::Result<Self> {
        let dev = &dec.device;
        Ok(Self {
            rows: rows.max(1),
            shapes: HashMap::new(),
            seed: Tensor::zeros(2, DType::U32, dev)?,
            loss: Tensor::zeros(1, DType::F32, dev)?,
            timing: PassTiming::default(),
            nodes: None,
        })
    }

    /// Step shapes seen so far (each is one captured graph on CUDA).
    pub fn shapes(&self) -> usize {
        self.shapes.len()
    }

    /// Runs the forward and backward passes of `batch` (at most the batch
    /// size of rows) with dropout drawn from `seed`, storing the gradients
    /// of the loss (answer tokens' negative log-likelihood over `norm`) in
    /// `opt`, added to what it holds with `accumulate`. With `share`, the
    /// tokens every row shares go through the model once, as in
    /// [`batch_loss`]. Returns the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        dec: &Decoder,
        batch: &[&Tokenized],
        norm: f64,
        seed: u64,
        accumulate: bool,
        share: bool,
        opt: &AdamW,
    ) -> candle_core::Result<f64> {
        if batch.is_empty() || batch.len() > self.rows {
            candle_core::bail!(
                "a replayed step takes 1 to {} rows, got {}",
                self.rows,
                batch.len()
            );
        }
        let started = std::time::Instant::now();
        let start = if share { shared_prefix_len(batch) } else { 0 };
        let longest = batch.iter().map(|r| r.ids.len() - start).max().unwrap_or(1);
        let layout = Layout::new(
            batch,
            start,
            self.rows,
            longest.next_multiple_of(WIDTH_STEP),
        );
        let n = layout.answers.len();
        let shape = Shape {
            prefix: start,
            width: layout.width(),
            answers: n.max(1).next_multiple_of(ANSWER_STEP),
            accumulate,
        };
        let dev = dec.device.clone();
        tracing::trace!(?shape, "training step shape");
        if !self.shapes.contains_key(&shape) {
            tracing::debug!(?shape, "new training step shape");
            let step = ShapeStep::new(dec, self.rows, shape)?;
            self.shapes.insert(shape, step);
        }
        let Some(step) = self.shapes.get_mut(&shape) else {
            candle_core::bail!("no buffers for step shape {shape:?}");
        };
        // Uploads, outside the replay: this step's values into the buffers.
        let mut past = Vec::new();
        if let Some(prefix) = step.prefix.as_mut() {
            let shared = dense_batch(1, 0, start);
            prefix.fill_rows(&batch[0].ids[..start], &shared, &[])?;
            past = vec![shared.rows[0].clone(); self.rows];
        }
        step.inputs
            .fill_rows(&layout.tokens, &layout.batch, &past)?;
        let slots = shape.answers;
        let mut answers = layout.answers;
        let mut targets = layout.targets;
        let mut weights = vec![(1.0 / norm) as f32; n];
        answers.resize(slots, 0);
        targets.resize(slots, 0);
        weights.resize(slots, 0.0);
        step.answers
            .slice_set(&Tensor::from_vec(answers, slots, &dev)?, 0, 0)?;
        step.targets
            .slice_set(&Tensor::from_vec(targets, slots, &dev)?, 0, 0)?;
        step.weights
            .slice_set(&Tensor::from_vec(weights, slots, &dev)?, 0, 0)?;
        let words = TrainPass::seed_words(seed);
        self.seed.slice_set(&Tensor::new(&words, &dev)?, 0, 0)?;
        let ShapeStep {
            prefix,
            inputs,
            answers,
            targets,
            weights,
            replay,
        } = step;
        let (seed_buffer, loss_buffer, rows) = (&self.seed, &self.loss, self.rows);
        let replayed = replay.is_captured();
        let launched = std::time::Instant::now();
        replay.run(&dev, "this training step shape", || {
            let pass = TrainPass::with_seed_buffer(seed, seed_buffer);
            let mode = Mode::Train(&pass);
            let mut cache = match prefix.as_ref() {
                Some(prefix) => {
                    let mut shared = Cache::default();
                    dec.forward_rows(prefix, Some(&mut shared), mode)?;
                    Some(shared.repeat(rows)?)
                }
                None => None,
            };
            let hidden = dec.forward_rows(inputs, cache.as_mut(), mode)?;
            let loss = answer_loss(dec, &hidden, answers, targets, weights)?;
            opt.store_grads(&pass.backward(&loss)?, accumulate)?;
            loss_buffer.slice_set(&loss.reshape(1)?, 0, 0)
        })?;
        let loss = self.loss.to_vec1::<f32>()?[0] as f64;
        if replayed {
            self.timing.passes += 1;
            self.timing.inputs += launched - started;
            self.timing.replay += launched.elapsed();
        } else {
            if let Some(c) = replay.capture_timing() {
                self.timing.captures += c;
            }
            // Diagnostics only: a failed count never stops training.
            match replay.nodes() {
                Ok(Some(nodes)) => {
                    tracing::debug!(?shape, ?nodes, "captured a training step shape");
                    if self
                        .nodes
                        .as_ref()
                        .is_none_or(|n| n.total() < nodes.total())
                    {
                        self.nodes = Some(nodes);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "could not count the graph's nodes"),
            }
        }
        Ok(loss)
    }
}

impl ShapeStep {
    fn new(dec: &Decoder, rows: usize, shape: Shape) -> candle_core::Result<Self> {
        let dev: &Device = &dec.device;
        let n = shape.answers;
        let p = shape.prefix;
        Ok(Self {
            prefix: (p > 0).then(|| dec.step_inputs(1, p, p)).transpose()?,
            inputs: dec.step_inputs(rows, shape.width, p + shape.width)?,
            answers: Tensor::zeros(n, DType::U32, dev)?,
            targets: Tensor::zeros(n, DType::U32, dev)?,
            weights: Tensor::zeros(n, DType::F32, dev)?,
            replay: Replay::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use crate::test_common as common;
    use router::lora::{self, LoraConfig};
    use router::model::Architecture;
    use router::rng::SplitMix64;

    fn row(prefix: &[u32], own: &[u32], answer_from: usize) -> Tokenized {
        let ids: Vec<u32> = prefix.iter().chain(own).copied().collect();
        let labels = (0..ids.len()).map(|i| i >= answer_from).collect();
        Tokenized { ids, labels }
    }

    /// A tiny Gemma-3 with every projection adapted and random LoRA
    /// weights (B too, so every variable has a gradient).
    fn adapted_decoder() -> Decoder {
        let cfg = common::tiny_config(Architecture::Gemma3);
        let mut dec = common::random_decoder(&cfg, 7, &Device::Cpu);
        let all = LoraConfig::new(4, 8.0, 0.0, &common::PROJECTIONS);
        lora::init(&mut dec, &all, 3).unwrap();
        let mut rng = SplitMix64(5);
        for var in dec.lora_vars() {
            let shape = var.as_tensor().shape().clone();
            let v: Vec<f32> = (0..shape.elem_count())
                .map(|_| (rng.next_f64() as f32 - 0.5) * 0.5)
                .collect();
            var.set(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
                .unwrap();
        }
        dec
    }

    /// Ten shared tokens (longer than the tiny sliding window of 4), then
    /// rows of different lengths with answers at their ends.
    fn rows() -> Vec<Tokenized> {
        let prefix: Vec<u32> = (0..10).map(|i| (i * 13 + 3) % 97).collect();
        vec![
            row(&prefix, &[40, 41, 42], 11),
            row(&prefix, &[50, 51, 52, 53, 54, 55], 13),
            row(&prefix, &[60, 61, 62, 63, 64, 65, 66, 67, 68], 12),
        ]
    }

    #[test]
    fn a_shared_prefix_gives_the_loss_and_gradients_of_whole_rows() {
        let dec = adapted_decoder();
        let rows = rows();
        let refs: Vec<&Tokenized> = rows.iter().collect();
        // The position predicting the earliest answer (11) stays per row.
        assert_eq!(shared_prefix_len(&refs), 10);
        assert_eq!(shared_prefix_len(&refs[..1]), 0);

        // One pass each: a pass's sink holds every LoRA gradient it made.
        let (shared_pass, whole_pass) = (TrainPass::new(0), TrainPass::new(0));
        let (shared, n) = batch_loss(&dec, &refs, 1.0, Mode::Train(&shared_pass), true).unwrap();
        let mut whole = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        let mut count = 0;
        for r in &refs {
            let one = std::slice::from_ref(r);
            let (loss, k) = batch_loss(&dec, one, 1.0, Mode::Train(&whole_pass), true).unwrap();
            whole = (whole + loss).unwrap();
            count += k;
        }
        assert_eq!(n, count);
        let (a, b) = (
            shared.to_scalar::<f32>().unwrap(),
            whole.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-4 * b.abs(), "{a} vs {b}");
        let (ga, gb) = (
            shared_pass.backward(&shared).unwrap(),
            whole_pass.backward(&whole).unwrap(),
        );
        for var in dec.lora_vars() {
            let (x, y) = (ga.get(&var).unwrap(), gb.get(&var).unwrap());
            let scale = common::max_abs(y);
            assert!(scale > 0.0);
            assert!(common::max_diff(x, y) < 1e-4 * scale.max(1.0));
        }
    }

    /// The loss and the gradients an optimizer holds after one step of
    /// `batch`: eager whole rows, or replayed (passing the shared prefix
    /// once with `share`).
    fn stored(
        dec: &Decoder,
        batch: &[&Tokenized],
        norm: f64,
        eager: bool,
        share: bool,
    ) -> (f64, Vec<Tensor>) {
        let vars = dec.lora_vars();
        let opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let loss = if eager {
            let pass = TrainPass::new(0);
            let (loss, _) = batch_loss(dec, batch, norm, Mode::Train(&pass), false).unwrap();
            opt.store_grads(&pass.backward(&loss).unwrap(), false)
                .unwrap();
            loss.to_scalar::<f32>().unwrap() as f64
        } else {
            let mut steps = ReplayedSteps::new(dec, 4).unwrap();
            // Twice: the second run must not read anything the first left.
            let (first, second) = (&batch[1..], &batch[..2]);
            steps.run(dec, first, 1.0, 1, false, share, &opt).unwrap();
            steps.run(dec, second, 1.0, 1, false, share, &opt).unwrap();
            assert_eq!(steps.shapes(), 1, "both batches fit one padded shape");
            steps.run(dec, batch, norm, 2, false, share, &opt).unwrap()
        };
        (loss, opt.stored_grads().unwrap())
    }

    /// A replayed step pads rows, columns and answer slots, and may pass
    /// the shared prefix once: the loss and every gradient are those of the
    /// eager step of the whole rows.
    #[test]
    fn a_padded_replayed_step_gives_the_loss_and_gradients_of_the_eager_one() {
        let dec = adapted_decoder();
        let rows = rows();
        let refs: Vec<&Tokenized> = rows.iter().collect();
        let norm = 7.0;
        let (eager_loss, eager) = stored(&dec, &refs, norm, true, false);
        for share in [false, true] {
            let (replayed_loss, replayed) = stored(&dec, &refs, norm, false, share);
            assert!(
                (eager_loss - replayed_loss).abs() < 1e-5 * eager_loss.abs(),
                "shared prefix {share}: {eager_loss} vs {replayed_loss}"
            );
            for (x, y) in replayed.iter().zip(&eager) {
                let scale = common::max_abs(y);
                assert!(scale > 0.0);
                assert!(
                    common::max_diff(x, y) < 1e-4 * scale.max(1.0),
                    "shared prefix {share}"
                );
            }
        }
    }

    /// Regression: with CPU Q8_0 copies on, a step of at most
    /// `Q8_HEAD_MAX_ROWS` answer tokens took the output head's Q8_0 path,
    /// which records no backward, so no LoRA variable got a gradient ("no
    /// gradient for LoRA variable 0" on the CPU only).
    #[test]
    fn a_short_step_with_cpu_q8_copies_gives_every_lora_variable_a_gradient() {
        let cfg = common::tiny_config(Architecture::Gemma3);
        let mut dec = common::random_decoder(&cfg, 7, &Device::Cpu);
        dec.set_cpu_quantized(true).unwrap();
        assert!(dec.is_cpu_quantized());
        lora::init(
            &mut dec,
            &LoraConfig::new(4, 8.0, 0.0, &["q_proj", "v_proj"]),
            3,
        )
        .unwrap();
        // B starts at zero, which leaves A without a gradient: set them all.
        for var in dec.lora_vars() {
            let shape = var.as_tensor().shape().clone();
            var.set(&Tensor::full(0.1f32, shape, &Device::Cpu).unwrap())
                .unwrap();
        }
        // Six tokens, two of them answers: fewer rows than either Q8 bound.
        let rows = [row(&[], &[5, 9, 14, 20, 33, 41], 4)];
        let refs: Vec<&Tokenized> = rows.iter().collect();
        let pass = TrainPass::new(0);
        let (loss, n) = batch_loss(&dec, &refs, 1.0, Mode::Train(&pass), true).unwrap();
        assert_eq!(n, 2);
        let grads = pass.backward(&loss).unwrap();
        for (i, var) in dec.lora_vars().iter().enumerate() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for LoRA variable {i}"));
            assert!(common::max_abs(g) > 0.0, "variable {i}: zero gradient");
        }
    }
}
