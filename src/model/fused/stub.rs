//! The fused kernels' API in a build without the `cuda` feature: every
//! function returns an error (callers ask [`super::available`] first).

use super::*;

fn unavailable<T>() -> candle_core::Result<T> {
    candle_core::bail!("the fused kernels need a build with the `cuda` feature")
}

/// Never built: [`AdamWTable::new`] answers `None` without CUDA.
pub(crate) struct AdamWTable;

impl AdamWTable {
    pub(super) fn new(
        _: &[Tensor],
        _: &[Tensor],
        _: &[Tensor],
        _: &[Tensor],
    ) -> candle_core::Result<Option<Self>> {
        Ok(None)
    }

    pub(super) fn apply(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: f64,
        _: f64,
    ) -> candle_core::Result<()> {
        unavailable()
    }
}

pub(super) fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn add(_: &Tensor, _: &Tensor) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

#[allow(clippy::type_complexity)]
pub(super) fn softmax_probs(
    _: &Tensor,
    _: &Tensor,
    _: Option<f64>,
    _: Option<f64>,
) -> candle_core::Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
    unavailable()
}

pub(super) fn softmax_probs_grad(
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: Option<f64>,
) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn swap_axes12(_: &Tensor) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

pub(super) fn add_rms_norm(
    _: &Tensor,
    _: &Tensor,
    _: Option<Norm>,
    _: Norm,
) -> candle_core::Result<(Tensor, Tensor)> {
    unavailable()
}

pub(super) fn rms_norm_grad(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn qk_rope(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &QkRope,
    _: KvTarget,
) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
    unavailable()
}

pub(super) fn attention(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Option<f64>,
    _: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

pub(super) fn gated(_: &Tensor, _: &Tensor, _: Activation) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn masked_softmax(
    _: &Tensor,
    _: &Tensor,
    _: usize,
    _: Option<f64>,
    _: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

pub(super) fn repeat_rows(_: &Tensor, _: usize) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

pub(super) fn dropout_mask(
    _: (usize, usize),
    _: f64,
    _: Option<&Tensor>,
    _: u64,
    _: &Device,
) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn add_rounded(
    _: &Tensor,
    _: &Tensor,
    _: Option<&Tensor>,
    _: f64,
) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn nll_rows(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    unavailable()
}

pub(super) fn nll_grad(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
) -> candle_core::Result<Tensor> {
    unavailable()
}

pub(super) fn matmul_t(_: &Tensor, _: &[&Tensor]) -> candle_core::Result<Option<Vec<Tensor>>> {
    unavailable()
}

pub(super) fn pick(_: &Tensor, _: Option<u32>) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    unavailable()
}

pub(super) fn gated_matmul_t(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Activation,
) -> candle_core::Result<Option<Tensor>> {
    unavailable()
}

pub(super) fn gated_grad(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: Activation,
) -> candle_core::Result<(Tensor, Tensor)> {
    unavailable()
}

pub(super) fn cast_scaled(_: &Tensor, _: Option<&Tensor>, _: f64) -> candle_core::Result<Tensor> {
    unavailable()
}
