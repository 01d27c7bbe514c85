//! Helpers the model's unit tests share.

use candle_core::{Device, Tensor};

use crate::rng::SplitMix64;

/// A CPU f32 tensor of `dims` with values uniform in `[-half, half)`,
/// reproducible from `seed`.
pub(crate) fn uniform(seed: u64, dims: &[usize], half: f32) -> Tensor {
    let mut rng = SplitMix64(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * half)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The largest absolute element-wise difference of two tensors of one shape.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
