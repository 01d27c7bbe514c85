//! Fused CUDA kernels for inference and training steps (`src/model/fused.cu`,
//! compiled to PTX by `build.rs` with the `cuda` feature; launched from
//! `cuda.rs`, and `stub.rs` answers with an error in a build without CUDA).
//!
//! A replayed decode step of Gemma-3-270M with candle's kernels is about
//! 550 kernels (some 30 per layer), and a kernel costs a few microseconds
//! however little it does: 2.3 ms a step against a 0.13 ms weight-read
//! floor on an H200. Each function here replaces a run of them, 8 per
//! layer in all (0.86 ms a step; docs/BENCHMARKS.md):
//! - [`add_rms_norm`]: the output norm, the residual add and the next
//!   block's input norm (3 kernels, twice per layer);
//! - [`qk_rope`]: the query and key norms, rotary embedding (angles from the
//!   positions, no tables) and the writes of keys and values into the cache
//!   (about 9);
//! - [`attention`]: scores, mask, softmax, weighted values and the heads'
//!   transpose back (about 7);
//! - [`matmul_t`] and [`gated_matmul_t`]: the projections of a step of a
//!   few rows, q/k/v in one kernel and gate/up with the activation in one;
//!   [`gated`] is the activation alone for wider steps;
//! - [`pick`]: the arg-max and one token's probability per row of logits,
//!   over many blocks per row (candle's arg-max reads a row with one block);
//! - [`masked_softmax`]: the probabilities of a step too wide for
//!   [`attention`], between candle's two matmuls; [`repeat_rows`]: the
//!   system prefix's keys and values for every message of a batch.
//!
//! Others serve training, inside `grad.rs`'s nodes (which record their
//! gradients), each where candle took several kernels:
//! - [`dropout_mask`] draws a LoRA dropout mask; [`cast_scaled`] casts a
//!   LoRA branch's input with its mask (backward: the gradient with the
//!   adapter's scaling); [`add_rounded`] adds the LoRA term to the frozen
//!   projection (backward: to the input gradient);
//! - [`rms_norm`] and [`rms_norm_grad`]: a norm and its backward;
//! - [`gated_grad`]: the MLP's activation and product backward;
//! - [`softmax_probs`] and [`softmax_probs_grad`]: the attention
//!   probabilities from the scores (scale, cap, mask, softmax) and their
//!   backward, where candle took some seven kernels each way;
//! - [`swap_axes12`]: the heads' transposes; [`add`]: residual adds and
//!   gradients meeting, eight elements per thread;
//! - [`nll_rows`] and [`nll_grad`]: the loss over the head's logits and
//!   its gradient;
//! - [`FusedAdamW`]: `train`'s optimizer update, three kernels over every
//!   variable (1.7 -> 0.1 ms a step for r 16 on every projection of
//!   Gemma-3-270M on an H200).
//!
//! Each rounds to the compute dtype where candle's kernels do, so a fused
//! step differs from an eager one only by the order of f32 sums
//! (`tests/fused_cuda.rs` compares them on the GPU). The decoder's inference
//! steps call them only after [`available`] said yes
//! (`Decoder::set_fused_kernels`), training wherever [`available`] says yes;
//! in a build without CUDA every function returns an error.

use candle_core::{DType, Device, Tensor};

use super::family::Activation;

/// Whether the kernels can run on `device` in `dtype`: a CUDA device of a
/// build with the `cuda` feature, in bf16, f16 or f32.
pub(crate) fn available(device: &Device, dtype: DType) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && matches!(dtype, DType::BF16 | DType::F16 | DType::F32)
}

/// One RMS norm's multiplier (in the compute dtype) and epsilon.
pub(crate) type Norm<'a> = (&'a Tensor, f64);

/// `h = residual + post(x)` (`residual + x` without `post`) and
/// `y = next(h)`, over the last axis of `x: [.., H]`; returns `(h, y)`.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    post: Option<Norm>,
    next: Norm,
) -> candle_core::Result<(Tensor, Tensor)> {
    imp::add_rms_norm(x, residual, post, next)
}

/// What [`qk_rope`] applies besides the cache writes: the query and key
/// norms' multipliers when the model has them (`eps` for both) and the
/// rotary embedding's `positions` (`[B, T]` u32) and inverse frequencies
/// (`[D/2]` f32), from which the kernel computes the angles.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct QkRope<'a> {
    pub q_alpha: Option<&'a Tensor>,
    pub k_alpha: Option<&'a Tensor>,
    pub eps: f64,
    pub positions: &'a Tensor,
    pub inv_freq: &'a Tensor,
}

/// Where [`qk_rope`] writes keys and values.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) enum KvTarget<'a> {
    /// A static cache's `(keys, values)` `[B, nkv, C, D]`, written in place
    /// at the columns `[T]` (u32).
    Cache {
        k: &'a Tensor,
        v: &'a Tensor,
        columns: &'a Tensor,
    },
    /// New tensors `[B, nkv, T, D]`, returned.
    New,
}

/// Queries, keys and values after their projections (`q: [B, T, nh, D]`,
/// `k`, `v`: `[B, T, nkv, D]`): the norms and rotary embedding of
/// [`QkRope`], the keys and values written to `target`. Returns the
/// queries `[B, T, nh, D]` and, for [`KvTarget::New`], the keys and values.
pub(crate) fn qk_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    params: &QkRope,
    target: KvTarget,
) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
    imp::qk_rope(q, k, v, params, target)
}

/// `softmax(softcap(q kᵀ · scale) + mask) v` for `q: [B, T, nh, D]` over
/// `k`, `v`: `[B, nkv, S, D]` (query head `h` reads kv head
/// `h / (nh / nkv)`), `mask: [B, 1, T, S]` additive; returns `[B, T, nh·D]`.
/// `None` when the shape is beyond the kernel (`D` not a multiple of 8, or
/// the scores of a row do not fit in shared memory) or when the product is
/// large enough for candle's tensor-core matmuls to win (see
/// [`ATTENTION_MAX_WORK`]): compose instead.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    imp::attention(q, k, v, mask, scale, softcap)
}

/// Multiply-adds (`B·T·nh·S·D`) above which [`attention`] leaves the work
/// to candle's batched matmuls: the kernel scores each query row on CUDA
/// cores, reading its keys once per row, which wins while launches dominate
/// (decode steps, one message's prefill) and loses on wide prefills of
/// many rows.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const ATTENTION_MAX_WORK: usize = 1 << 26;

/// The probabilities of a wide step's attention from its scores
/// `[B, M, S]` (candle's batched matmul made them):
/// `softmax(softcap(scores · scale) + mask)` in one kernel instead of the
/// scale, cap, mask add, casts and softmax. Row `r` of batch `b` takes the
/// mask row of query column `t = (r / div) % T` of `mask: [B, 1, T, S]`.
/// `None` when a row does not fit in shared memory.
pub(crate) fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    div: usize,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    imp::masked_softmax(scores, mask, div, scale, softcap)
}

/// `n` copies of a tensor of one row (`[1, ..]` -> `[n, ..]`) by one
/// kernel: a shared prompt prefix's keys and values for every message of
/// a batch. candle's `repeat` concatenates `n` copies, one kernel each.
/// `None` when the row's bytes are not whole 16-byte words.
pub(crate) fn repeat_rows(t: &Tensor, n: usize) -> candle_core::Result<Option<Tensor>> {
    imp::repeat_rows(t, n)
}

/// Training: an inverted-dropout mask of `shape` (f32), 0 with
/// probability `p` and `1 / (1 - p)` otherwise, element `i` drawn from the
/// stream and `i` alone ([`super::linear::dropout_draw`] on the host draws
/// the same), in one kernel. The stream is `salt`, or `salt ^ seed[0]`
/// with a `seed` buffer (one u64 as two u32, read when the kernel runs:
/// what a captured step needs to draw new masks at every replay).
pub(crate) fn dropout_mask(
    shape: (usize, usize),
    p: f64,
    seed: Option<&Tensor>,
    salt: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    imp::dropout_mask(shape, p, seed, salt, device)
}

/// Training: `base + (delta · scale · mul)` for `base` in the compute dtype
/// and `delta` (and `mul`) f32 of its shape, rounded as candle's composed
/// ops round (the f32 product, the compute dtype, the sum), in one kernel
/// instead of three or four.
pub(crate) fn add_rounded(
    base: &Tensor,
    delta: &Tensor,
    mul: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    imp::add_rounded(base, delta, mul, scale)
}

/// Training's loss rows over the head's `logits` `[rows, vocab]` (compute
/// dtype), `targets` `[rows]` u32 and `weights` `[rows]` f32: per row
/// `w · (logsumexp - logit[target])` and the log-sum-exp itself (f32
/// `[rows]` each; the backward pass reads the latter), in one kernel.
pub(crate) fn nll_rows(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    imp::nll_rows(logits, targets, weights)
}

/// The gradient of the summed [`nll_rows`] for an incoming gradient `g`
/// (f32, one element, read on the device): `g · w · (softmax - onehot)` in
/// the logits' dtype, in one kernel.
pub(crate) fn nll_grad(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    imp::nll_grad(logits, targets, weights, lse, g)
}

/// Training: the gradient of `rms_norm(x) · alpha` over the last axis for
/// the incoming gradient `g` (both `[.., n]`, `alpha` `[n]`, one dtype): one
/// kernel per call, where the composed backward is about fifteen.
pub(crate) fn rms_norm_grad(
    x: &Tensor,
    g: &Tensor,
    alpha: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    imp::rms_norm_grad(x, g, alpha, eps)
}

/// Training: `f32(x) · scale` (times `mul`, f32 of `x`'s shape, when
/// given), in one kernel: a LoRA branch's input with its dropout mask, or
/// an incoming gradient with the adapter's scaling.
pub(crate) fn cast_scaled(
    x: &Tensor,
    mul: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    imp::cast_scaled(x, mul, scale)
}

/// Training: the gradients of [`gated`] for the incoming gradient `g`:
/// `(g · up · act'(gate), g · act(gate))`, in one kernel.
pub(crate) fn gated_grad(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    act: Activation,
) -> candle_core::Result<(Tensor, Tensor)> {
    imp::gated_grad(gate, up, g, act)
}

/// `act(gate) · up`, elementwise.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    imp::gated(gate, up, act)
}

/// Per row of f32 `logits` `[rows, vocab]`: the arg-max (`[rows]` u32,
/// the first index of the maximum) and, with a `token`, that token's
/// probability under a softmax of the row (`[rows]` f32), from two kernels
/// that spread each row over many blocks.
pub(crate) fn pick(
    logits: &Tensor,
    token: Option<u32>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    imp::pick(logits, token)
}

/// Rows (`B·T`) up to which [`matmul_t`] and [`gated_matmul_t`] take a
/// step's projections: a matrix-vector kernel (one warp per output
/// feature) that reads each weight once for all rows. Wider steps go to
/// candle's matmuls (cuBLAS, tensor cores), which won at 16 rows on an
/// H200: a 16-column first step of one message took 6.3 ms with the
/// skinny kernels on the Gemma-3-1B shape against about 3 ms for 32
/// columns through cuBLAS (docs/BENCHMARKS.md).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const SKINNY_MAX_ROWS: usize = 8;

/// `x · W_iᵀ` for each of up to three weights `W_i: [N_i, K]` in one
/// kernel, for `x: [.., K]` of at most [`SKINNY_MAX_ROWS`] rows; returns
/// `[.., N_i]` each. `None` when the shapes are beyond the kernel.
pub(crate) fn matmul_t(
    x: &Tensor,
    weights: &[&Tensor],
) -> candle_core::Result<Option<Vec<Tensor>>> {
    imp::matmul_t(x, weights)
}

/// `act(x · W_gateᵀ) · (x · W_upᵀ)` in one kernel, for `x` of at most
/// [`SKINNY_MAX_ROWS`] rows. `None` when the shapes are beyond the kernel.
pub(crate) fn gated_matmul_t(
    x: &Tensor,
    w_gate: &Tensor,
    w_up: &Tensor,
    act: Activation,
) -> candle_core::Result<Option<Tensor>> {
    imp::gated_matmul_t(x, w_gate, w_up, act)
}

/// Training: `rms_norm(x) · alpha` over the last axis, as candle's
/// kernel computes it, with a thread per pair of features (candle's kernel
/// gives a row one warp: 11 µs for 1,280 rows of 640 on an H200).
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    imp::rms_norm(x, alpha, eps)
}

/// Training: `a + b` (same shape and dtype) eight elements per thread;
/// `None` when the buffers are not laid out for it (unaligned, or a length
/// not a multiple of 8): the caller adds with candle.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    imp::add(a, b)
}

/// Training's attention probabilities from `scores: [B, M, S]` (rows laid
/// out as (kv head, group head, t), the mask row of column `r % T` from
/// `mask: [B, 1, T, S]`): the scale, the soft cap, the mask and a softmax in
/// f32, in one kernel; returns the probabilities in f32, in the scores'
/// dtype, and `tanh(s / cap)` (f32) with a cap. `None` when a row is too
/// long for the kernel's shared memory.
#[allow(clippy::type_complexity)]
pub(crate) fn softmax_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
    imp::softmax_probs(scores, mask, scale, softcap)
}

/// The gradient reaching the scores of [`softmax_probs`] from `dp` (the
/// gradient of the probabilities, `[.., S]`), in one kernel.
pub(crate) fn softmax_probs_grad(
    dp: &Tensor,
    p32: &Tensor,
    tanh: Option<&Tensor>,
    scale: Option<f64>,
) -> candle_core::Result<Tensor> {
    imp::softmax_probs_grad(dp, p32, tanh, scale)
}

/// `x: [A, X, Y, D]` with axes 1 and 2 swapped, contiguous, moving rows of
/// `D` elements as 16-byte words (candle's strided copy computes every
/// element's index: 16 µs for a Gemma-3-270M training pass's queries on an
/// H200). `None` when a row is not a whole number of aligned words.
pub(crate) fn swap_axes12(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    imp::swap_axes12(x)
}

/// Training's optimizer update as three kernels over every tensor at once
/// (`train`'s AdamW; candle's ops take a dozen kernels per tensor shape and
/// a copy per variable): the gradients' global norm, the clipping factor,
/// then AdamW with decoupled weight decay over every parameter in place.
pub struct FusedAdamW {
    inner: imp::AdamWTable,
}

impl FusedAdamW {
    /// The kernels' table for f32 tensors `params[k]` with gradients
    /// `grads[k]`, moments `m[k]` and `v[k]` (same shapes, contiguous, on
    /// one CUDA device; views into larger buffers are fine), updated in
    /// place; their addresses must stay those of these tensors (the table
    /// keeps them alive). `None` where the kernels cannot run (a CPU
    /// tensor, or a build without CUDA).
    pub fn new(
        params: &[Tensor],
        grads: &[Tensor],
        m: &[Tensor],
        v: &[Tensor],
    ) -> candle_core::Result<Option<Self>> {
        Ok(imp::AdamWTable::new(params, grads, m, v)?.map(|inner| Self { inner }))
    }

    /// One update: `hyper` is `[lr / bc1, 1 - lr · weight_decay, 1 / bc2,
    /// max_norm]` (f32, read on the device), the gradients' norm before
    /// clipping goes to `norm` (`[1]` f32). Device work only.
    pub fn apply(
        &self,
        hyper: &Tensor,
        norm: &Tensor,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> candle_core::Result<()> {
        self.inner.apply(hyper, norm, beta1, beta2, eps)
    }
}

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
use cuda as imp;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
use stub as imp;
