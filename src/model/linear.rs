//! The adapted linear layer: a frozen base projection plus, optionally, its
//! LoRA pair, and everything LoRA does at run time (forward, weight delta,
//! merge, dropout). PEFT's files and config live in `lora.rs`; this is the
//! part the forward pass needs, so the model never imports the adapter code.
//!
//! `y = x Wᵀ + scaling · B(A(dropout(x)))`, scaling only the adapter term;
//! LoRA weights stay in f32 whatever the compute dtype.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};

use super::grad::GradSink;
use super::q8::Q8Matrix;
use super::{fused, grad};

/// Which kernels the forward pass may use.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Fused kernels (no gradients) and the KV cache.
    Infer,
    /// The same kernels, each block recorded as one gradient-graph node with
    /// its own backward (`grad.rs`); LoRA dropout draws its masks from the
    /// pass's generator and the LoRA pairs' gradients go to the pass's
    /// sink ([`TrainPass::backward`] collects them). The trainer owns the
    /// pass (one per micro-batch).
    Train(&'a TrainPass),
}

/// One training pass: the generator its LoRA dropout masks come from and
/// the sink its LoRA pairs' gradients go to.
///
/// LoRA nodes hand their pairs' gradients over directly rather than
/// through candle's gradient graph (see `grad::GradSink`), so a pass's
/// gradients are those of [`TrainPass::backward`], never of a bare
/// `loss.backward()` (which holds none for the LoRA variables).
#[derive(Debug)]
pub struct TrainPass {
    dropout: Dropout,
    grads: Arc<GradSink>,
}

impl TrainPass {
    /// A pass whose dropout masks are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with(Dropout::new(seed))
    }

    /// A pass whose CUDA dropout masks read the seed from `buffer` when
    /// their kernel runs (two u32, low word first: [`TrainPass::seed_words`]),
    /// as a step captured as a CUDA graph needs: its kernels replay with the
    /// arguments they were captured with, and the trainer rewrites the
    /// buffer before every replay. Draws the same masks as
    /// [`TrainPass::new`] with the same seed.
    pub fn with_seed_buffer(seed: u64, buffer: &Tensor) -> Self {
        Self::with(Dropout::with_seed_buffer(seed, buffer))
    }

    fn with(dropout: Dropout) -> Self {
        Self {
            dropout,
            grads: Arc::default(),
        }
    }

    /// `seed` as the two u32 words a seed buffer holds.
    pub fn seed_words(seed: u64) -> [u32; 2] {
        [seed as u32, (seed >> 32) as u32]
    }

    /// The gradients of `loss`, a scalar computed in this pass: candle's
    /// backward pass plus the LoRA gradients the pass's nodes handed over.
    pub fn backward(&self, loss: &Tensor) -> candle_core::Result<GradStore> {
        let mut store = loss.backward()?;
        self.grads.drain_into(&mut store)?;
        Ok(store)
    }
}

/// The dropout masks of one training step.
///
/// Element `i` of a mask is dropped when [`dropout_draw`] of the mask's
/// stream and `i` is below `p`: a counter-based draw, so every device drops
/// the same elements (CUDA computes it in one kernel, `fused::dropout_mask`;
/// candle's CPU generator cannot be seeded). Each mask draws the next
/// stream, so a step is reproducible from its seed alone and two trainings
/// never share a generator.
///
/// A step captured as a CUDA graph replays its kernels with the arguments
/// they were captured with; such a step's generator reads the seed from a
/// device buffer instead ([`Dropout::with_seed_buffer`]), which the trainer
/// rewrites before every replay.
#[derive(Debug)]
pub(crate) struct Dropout {
    seed: u64,
    /// `seed` on the device (a u64 as two u32), read by the CUDA kernel
    /// when it runs.
    buffer: Option<Tensor>,
    /// Masks drawn so far (a `Cell`: the forward pass only borrows the model).
    calls: Cell<u64>,
}

impl Dropout {
    /// The generator of one step.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            buffer: None,
            calls: Cell::new(0),
        }
    }

    /// The generator of one step whose seed also lies in `buffer` (two u32,
    /// low word first: [`TrainPass::seed_words`]); CUDA masks read it from
    /// there when their kernel runs, host masks use `seed`. Both draw the
    /// same masks as [`Dropout::new`] with the same seed.
    pub fn with_seed_buffer(seed: u64, buffer: &Tensor) -> Self {
        Self {
            buffer: Some(buffer.clone()),
            ..Self::new(seed)
        }
    }

    /// An inverted-dropout mask of `shape` (f32): each element is 0 with
    /// probability `p` and `1 / (1 - p)` otherwise.
    pub(crate) fn keep_mask(
        &self,
        shape: (usize, usize),
        p: f64,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let call = self.calls.get();
        self.calls.set(call + 1);
        let salt = call.wrapping_mul(0xA24B_AED4_963E_E407);
        if fused::available(device, DType::F32) {
            return match &self.buffer {
                Some(seed) => fused::dropout_mask(shape, p, Some(seed), salt, device),
                None => fused::dropout_mask(shape, p, None, self.seed ^ salt, device),
            };
        }
        let stream = self.seed ^ salt;
        let (p, keep) = (p as f32, (1.0 / (1.0 - p)) as f32);
        let mask: Vec<f32> = (0..(shape.0 * shape.1) as u64)
            .map(|i| {
                if dropout_draw(stream, i) < p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        Tensor::from_vec(mask, shape, &Device::Cpu)?.to_device(device)
    }
}

/// The uniform draw in `[0, 1)` (24 bits) of element `i` of the dropout
/// stream `stream`: SplitMix64's finaliser over `stream + (i + 1)·φ`, the
/// function `fused.cu`'s `dropout_mask` computes on the GPU.
pub(crate) fn dropout_draw(stream: u64, i: u64) -> f32 {
    let mut z = stream.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// The trainable pair of one adapted projection.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `[r, in]`, f32.
    a: Var,
    /// `[out, r]`, f32.
    b: Var,
    scaling: f64,
    dropout: f64,
}

impl Lora {
    pub fn new(a: Var, b: Var, scaling: f64, dropout: f64) -> Self {
        Self {
            a,
            b,
            scaling,
            dropout,
        }
    }

    /// `A`, `[r, in]` (f32).
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// `B`, `[out, r]` (f32).
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// `scaling · B A`, the weight delta, `[out, in]` in f32.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling
    }
}

/// A linear projection `y = x W^T`, optionally adapted with LoRA.
///
/// `weight` is the pristine base weight; `merged` holds `W + s·BA` when an
/// adapter is merged for inference, so that swapping adapters never has to
/// undo a merge (which would drift in bf16). `q8` is an optional Q8_0 copy
/// of whichever of the two is in use, for CPU inference steps of a few rows
/// (see [`Q8_MAX_ROWS`]); it follows every merge and adapter change, and
/// there is none while an unmerged (trainable) pair is attached.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path in Hugging Face naming, e.g. `model.layers.3.self_attn.q_proj`.
    name: String,
    weight: Tensor,
    merged: Option<Tensor>,
    lora: Option<Lora>,
    quantize: bool,
    q8: Option<Q8Copy>,
}

/// CPU inference steps of at most this many rows use the projections' Q8_0
/// copies.
///
/// A step of a few rows is close to a matrix-vector product: it reads every
/// weight for a few multiply-adds, so memory bandwidth sets its speed, and
/// Q8_0 reads a quarter of f32's bytes. On the dev CPU (2 cores) the 18
/// layers of Gemma-3-270M take, in Q8_0 against f32: 32 against 56 ms for
/// one row, 53 against 103 for 7 (a step with drafts), 111 against 132 for
/// 16; level at about 25 rows (`examples/step_widths`, BENCHMARKS.md).
pub const Q8_MAX_ROWS: usize = 16;

/// The same bound for the output head (262k rows for Gemma), whose copy is
/// a [`Q8Matrix`]: on the dev CPU 17-18 ms against 45-69 ms in f32 at one
/// row, 125 against 167 ms at 25, level between 32 and 64 rows
/// (`examples/step_widths`).
pub const Q8_HEAD_MAX_ROWS: usize = 32;

/// A projection's Q8_0 copy, in whichever product is faster for its shape
/// (`examples/q8_matmul`): ours for short rows, where candle's kernel
/// spends its time per output and reads the weight once per input row;
/// candle's for long rows and few outputs (Gemma-3-270M's `o_proj` and
/// `down_proj`), where its four-column kernel is several times faster.
#[derive(Debug, Clone)]
pub(crate) enum Q8Copy {
    Candle(QMatMul),
    Ours(Q8Matrix),
}

/// Weights with rows of at most this many values take [`Q8Matrix`].
const SHORT_ROWS: usize = 640;

/// A Q8_0 copy of `w` (`[out, in]`, f32 on the CPU), or `None` where Q8_0
/// does not apply (another device, or rows not a whole number of blocks).
pub(crate) fn q8_copy(w: &Tensor) -> candle_core::Result<Option<Q8Copy>> {
    if !q8_applies(w)? {
        return Ok(None);
    }
    let (_, inp) = w.dims2()?;
    if inp <= SHORT_ROWS {
        return Ok(Some(Q8Copy::Ours(Q8Matrix::quantize(w)?)));
    }
    let w = w.to_dtype(DType::F32)?;
    Ok(Some(Q8Copy::Candle(QMatMul::from_qtensor(
        QTensor::quantize(&w, GgmlDType::Q8_0)?,
    )?)))
}

/// The same for the output head, always a [`Q8Matrix`]: it reads the
/// head's 262k rows once for all the rows of a step, where candle's product
/// reads them once per row (7 rows: 36-44 ms against 99-113 ms on the dev
/// CPU), which makes the head of a step with prompt-lookup drafts
/// affordable.
pub(crate) fn q8_head_copy(w: &Tensor) -> candle_core::Result<Option<Q8Copy>> {
    if !q8_applies(w)? {
        return Ok(None);
    }
    Ok(Some(Q8Copy::Ours(Q8Matrix::quantize(w)?)))
}

fn q8_applies(w: &Tensor) -> candle_core::Result<bool> {
    let (_, inp) = w.dims2()?;
    Ok(w.device().is_cpu() && inp % GgmlDType::Q8_0.block_size() == 0)
}

impl Q8Copy {
    /// `x Wᵀ` for an f32 `x` on the CPU.
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Q8Copy::Candle(q) => q.forward(&x.contiguous()?),
            Q8Copy::Ours(q) => q.matmul(x),
        }
    }
}

/// `x Wᵀ` through `q8` when the step has at most `max_rows` rows, else `None`.
///
/// Also `None` when `x` is part of a gradient graph (it derives from a
/// training variable): candle runs the Q8_0 product as an op without a
/// backward pass, so taking it there would silently cut every gradient
/// that flows through `x`. This is the one gate for the projections and
/// the output head alike, whatever mode or caller.
pub(crate) fn q8_forward(
    q8: Option<&Q8Copy>,
    x: &Tensor,
    max_rows: usize,
) -> candle_core::Result<Option<Tensor>> {
    let Some(q8) = q8 else { return Ok(None) };
    if x.track_op() {
        return Ok(None);
    }
    let features = x.dims().last().copied().unwrap_or(1).max(1);
    if x.elem_count() / features > max_rows || x.dtype() != DType::F32 {
        return Ok(None);
    }
    q8.product(x).map(Some)
}

impl Linear {
    pub fn new(name: String, weight: Tensor) -> Self {
        Self {
            name,
            weight,
            merged: None,
            lora: None,
            quantize: false,
            q8: None,
        }
    }

    /// Module path in Hugging Face naming (adapter keys are matched on it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The frozen base weight `[out, in]` (never changed by merging).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// The attached LoRA pair, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Attaches `lora` (or none) unmerged; any merged copy is dropped.
    pub fn set_lora(&mut self, lora: Option<Lora>) -> candle_core::Result<()> {
        self.adapt(lora, false)
    }

    /// Attaches `lora` (or none) and merges it when `merge` is set, making
    /// the Q8_0 copy (if any) once, of the weight that ends up in use.
    pub fn adapt(&mut self, lora: Option<Lora>, merge: bool) -> candle_core::Result<()> {
        self.lora = lora;
        self.merged = match (&self.lora, merge) {
            (Some(l), true) => Some(self.merged_weight(l)?),
            _ => None,
        };
        self.refresh_q8()
    }

    /// Keeps (or drops) a Q8_0 copy of the weight in use for CPU inference
    /// steps of at most [`Q8_MAX_ROWS`] rows. Training never reads it: no
    /// copy is made while an unmerged pair is attached (see `refresh_q8`).
    pub fn set_quantized(&mut self, on: bool) -> candle_core::Result<()> {
        self.quantize = on;
        self.refresh_q8()
    }

    /// The one weight `[out, in]` an inference step multiplies by (merged
    /// with its adapter when it has one); `None` while a trainable pair is
    /// attached unmerged (its adapter is a separate product).
    pub(crate) fn inference_weight(&self) -> Option<&Tensor> {
        match (&self.lora, &self.merged) {
            (Some(_), None) => None,
            (_, merged) => Some(merged.as_ref().unwrap_or(&self.weight)),
        }
    }

    /// Whether a Q8_0 copy is in use.
    pub fn is_quantized(&self) -> bool {
        self.q8.is_some()
    }

    /// Re-makes the Q8_0 copy of the weight in use. An unmerged pair is a
    /// trainable one (the trainer attaches its variables unmerged; the
    /// router always merges): its projection keeps the f32 path, which
    /// records gradients, and costs no copy until it is merged.
    fn refresh_q8(&mut self) -> candle_core::Result<()> {
        self.q8 = None;
        let trainable = self.lora.is_some() && self.merged.is_none();
        if self.quantize && !trainable {
            self.q8 = q8_copy(self.merged.as_ref().unwrap_or(&self.weight))?;
        }
        Ok(())
    }

    /// Dropout probability of the attached pair (a no-op without one).
    pub fn set_lora_dropout(&mut self, p: f64) {
        if let Some(l) = &mut self.lora {
            l.dropout = p;
        }
    }

    /// Folds the adapter into `merged` (base weight untouched).
    pub fn merge(&mut self) -> candle_core::Result<()> {
        let lora = self.lora.take();
        self.adapt(lora, true)
    }

    /// `W + s·BA` in the weight's dtype, detached from the pair's
    /// variables: a merged weight serves inference only, and attached it
    /// would make every activation after it record a backward graph (which
    /// also keeps those steps off the Q8_0 copies, see [`q8_forward`]).
    fn merged_weight(&self, lora: &Lora) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dtype(DType::F32)?;
        let delta = lora.delta()?.to_device(w.device())?;
        Ok((w + delta)?.to_dtype(self.weight.dtype())?.detach())
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let w = self.merged.as_ref().unwrap_or(&self.weight);
        match (&self.lora, &self.merged, mode) {
            // An unmerged (trainable) pair: one node for the projection and
            // its adapter, its dropout mask drawn and its gradients
            // collected in training only.
            (Some(lora), None, _) => {
                let pass = match mode {
                    Mode::Train(pass) => Some(pass),
                    Mode::Infer => None,
                };
                let keep = match pass {
                    Some(pass) if lora.dropout > 0.0 => {
                        let features = x.dims().last().copied().unwrap_or(1).max(1);
                        let rows = x.elem_count() / features;
                        let dropout = &pass.dropout;
                        Some(dropout.keep_mask((rows, features), lora.dropout, x.device())?)
                    }
                    _ => None,
                };
                grad::lora_linear(
                    x,
                    w,
                    lora.a.as_tensor(),
                    lora.b.as_tensor(),
                    lora.scaling,
                    keep,
                    pass.map(|p| &p.grads),
                )
            }
            (_, _, Mode::Infer) => match q8_forward(self.q8.as_ref(), x, Q8_MAX_ROWS)? {
                Some(y) => Ok(y),
                None => matmul_t(x, w),
            },
            (_, _, Mode::Train(_)) => grad::frozen_matmul_t(x, w),
        }
    }
}

/// Loads the `weight` `[out, inp]` under `vb` as a (not yet adapted) projection
/// named by its module path.
pub(crate) fn linear(
    vb: &candle_nn::VarBuilder,
    out: usize,
    inp: usize,
) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.prefix(), vb.get((out, inp), "weight")?))
}

/// `x W^T` for `x` of any rank, flattening leading dims into one matmul.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&in_features, leading)) = dims.split_last() else {
        candle_core::bail!("matmul_t needs an input of rank >= 1");
    };
    let rows = leading.iter().product::<usize>();
    let y = x.reshape((rows, in_features))?.matmul(&w.t()?)?;
    let mut out_dims = leading.to_vec();
    out_dims.push(w.dim(0)?);
    y.reshape(out_dims)
}

#[cfg(test)]
mod dropout_tests {
    use super::*;

    #[test]
    fn dropout_masks_drop_p_of_the_elements_reproducibly() {
        let p = 0.1;
        let (a, b) = (Dropout::new(5), Dropout::new(5));
        let first = a.keep_mask((200, 500), p, &Device::Cpu).unwrap();
        let again = b.keep_mask((200, 500), p, &Device::Cpu).unwrap();
        let second = a.keep_mask((200, 500), p, &Device::Cpu).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = values(&first);
        // The same seed draws the same masks; the next mask of a step differs.
        assert_eq!(v, values(&again));
        assert_ne!(v, values(&second));
        let keep = (1.0 / (1.0 - p)) as f32;
        assert!(v.iter().all(|&x| x == 0.0 || x == keep));
        let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
        assert!((dropped - p).abs() < 0.005, "{dropped}");
        // Draws are uniform over [0, 1): the mean of many is about a half.
        let mean = (0..100_000u64)
            .map(|i| dropout_draw(9, i) as f64)
            .sum::<f64>()
            / 1e5;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
    }
}
