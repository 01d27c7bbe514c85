//! Q8_0 weights for CPU steps of a few rows, read once per step.
//!
//! A CPU step of a few rows (a decode step, a step with prompt-lookup
//! drafts, a short message) is bound by memory bandwidth: it reads every
//! weight for a few multiply-adds. Q8_0 (blocks of 32 signed bytes sharing
//! one scale, the GGUF format) reads a quarter of f32's bytes. candle's own
//! quantized matmul streams the whole weight once per row of the input, so
//! a step of 7 rows costs 5x one row; [`Q8Matrix::matmul`] streams it once
//! for all rows (each weight row meets every input row while it is in L1),
//! so a few more rows cost little more than one.
//!
//! The arithmetic is ggml's Q8_0 x Q8_0 dot product: the inputs are
//! quantized to Q8_0 blocks per row, each block pair gives an exact integer
//! dot product, scaled by the two block scales and summed in f32. Every
//! input row is computed by the same sequence of operations whatever the
//! other rows, so a row's output does not depend on what it is batched with.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Values per block, as in GGUF's Q8_0.
pub const BLOCK: usize = 32;

/// Output features per parallel task.
const CHUNK: usize = 16;

/// A `[out, in]` weight in Q8_0: `qs` holds the signed bytes row by row,
/// `scales` one f32 per block (rounded through f16, as GGUF stores it).
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    out: usize,
    inp: usize,
    qs: Vec<i8>,
    scales: Vec<f32>,
}

/// Rows of an input quantized to Q8_0 blocks.
struct Q8Rows {
    qs: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes `src` (a multiple of [`BLOCK`] long) into `qs` and `scales`
/// the way ggml does: scale `max|x| / 127` (stored as f16), values
/// `round(x / scale)` computed with the unrounded scale.
fn quantize_into(src: &[f32], qs: &mut [i8], scales: &mut [f32]) {
    for ((block, q), s) in src
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in q.iter_mut().zip(block) {
            *q = (v * id).round() as i8;
        }
        *s = half::f16::from_f32(d).to_f32();
    }
}

impl Q8Matrix {
    /// Quantizes a `[out, in]` weight (any float dtype; `in` a multiple of
    /// [`BLOCK`]).
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (out, inp) = w.dims2()?;
        if inp % BLOCK != 0 {
            candle_core::bail!("Q8_0 needs rows of a multiple of {BLOCK} values, not {inp}");
        }
        let data = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut qs = vec![0i8; out * inp];
        let mut scales = vec![0f32; out * inp / BLOCK];
        data.par_chunks(inp)
            .zip(qs.par_chunks_mut(inp))
            .zip(scales.par_chunks_mut(inp / BLOCK))
            .for_each(|((src, q), s)| quantize_into(src, q, s));
        Ok(Self {
            out,
            inp,
            qs,
            scales,
        })
    }

    /// The weight back in f32, `[out, in]`.
    #[cfg(test)]
    fn dequantize(&self) -> candle_core::Result<Tensor> {
        let values: Vec<f32> = self
            .qs
            .chunks_exact(BLOCK)
            .zip(&self.scales)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect();
        Tensor::from_vec(values, (self.out, self.inp), &Device::Cpu)
    }

    /// `x Wᵀ` for an f32 `x` of shape `[.., in]` on the CPU.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&inp, lead)) = dims.split_last() else {
            candle_core::bail!("Q8_0 matmul of a scalar");
        };
        if inp != self.inp {
            candle_core::bail!(
                "Q8_0 matmul: input of {inp} features for a weight of {}",
                self.inp
            );
        }
        let rows = lead.iter().product::<usize>();
        let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let input = self.quantize_rows(&x, rows);
        let out = self.product(&input, rows);
        let mut shape = lead.to_vec();
        shape.push(self.out);
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    fn quantize_rows(&self, x: &[f32], rows: usize) -> Q8Rows {
        let mut qs = vec![0i8; rows * self.inp];
        let mut scales = vec![0f32; rows * self.inp / BLOCK];
        for ((src, q), s) in x
            .chunks_exact(self.inp)
            .zip(qs.chunks_exact_mut(self.inp))
            .zip(scales.chunks_exact_mut(self.inp / BLOCK))
        {
            quantize_into(src, q, s);
        }
        Q8Rows { qs, scales }
    }

    /// `[rows, out]`: chunks of output features in parallel, each weight
    /// row dotted with every input row while it is in cache.
    fn product(&self, x: &Q8Rows, rows: usize) -> Vec<f32> {
        let (inp, blocks, out) = (self.inp, self.inp / BLOCK, self.out);
        let kernel = Kernel::detect();
        let mut dst = vec![0f32; rows * out];
        let shared = SharedOut(dst.as_mut_ptr());
        (0..out.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
            let mut column = vec![0f32; rows];
            for j in c * CHUNK..((c + 1) * CHUNK).min(out) {
                let wq = &self.qs[j * inp..(j + 1) * inp];
                let wd = &self.scales[j * blocks..(j + 1) * blocks];
                kernel.dot_rows(wq, wd, x, inp, &mut column);
                for (i, v) in column.iter().enumerate() {
                    // SAFETY: `i * out + j` is within `dst` (`i < rows`,
                    // `j < out`), and feature `j` belongs to this task only.
                    unsafe { shared.write(i * out + j, *v) };
                }
            }
        });
        dst
    }
}

/// The output of [`Q8Matrix::product`], written by its parallel tasks at
/// disjoint indices (each task owns a range of output features).
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements; the owner waits for all of them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `at` is in bounds and no other task writes it.
    unsafe fn write(&self, at: usize, v: f32) {
        *self.0.add(at) = v;
    }
}

/// The dot-product kernel this CPU runs.
#[derive(Clone, Copy)]
enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
        Kernel::Scalar
    }

    /// `dst[i] = w · x_i` for every input row `i`.
    fn dot_rows(self, wq: &[i8], wd: &[f32], x: &Q8Rows, inp: usize, dst: &mut [f32]) {
        let blocks = inp / BLOCK;
        let row = |i: usize| {
            (
                &x.qs[i * inp..(i + 1) * inp],
                &x.scales[i * blocks..(i + 1) * blocks],
            )
        };
        match self {
            Kernel::Scalar => {
                for (i, d) in dst.iter_mut().enumerate() {
                    let (xq, xd) = row(i);
                    *d = dot_scalar(wq, wd, xq, xd);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // Rows in groups of 4, 2 and 1: each weight block is loaded
                // once per group, and every row sees the same operations.
                let mut i = 0;
                while i < dst.len() {
                    let left = dst.len() - i;
                    // SAFETY: `detect` saw AVX2 and FMA on this CPU; every
                    // slice holds `blocks` whole blocks.
                    unsafe {
                        if left >= 4 {
                            let r = avx2::dot::<4>(wq, wd, std::array::from_fn(|k| row(i + k)));
                            dst[i..i + 4].copy_from_slice(&r);
                            i += 4;
                        } else if left >= 2 {
                            let r = avx2::dot::<2>(wq, wd, std::array::from_fn(|k| row(i + k)));
                            dst[i..i + 2].copy_from_slice(&r);
                            i += 2;
                        } else {
                            dst[i] = avx2::dot::<1>(wq, wd, [row(i)])[0];
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// The portable dot product of two Q8_0 rows.
fn dot_scalar(wq: &[i8], wd: &[f32], xq: &[i8], xd: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, (&dw, &dx)) in wd.iter().zip(xd).enumerate() {
        let w = &wq[b * BLOCK..(b + 1) * BLOCK];
        let x = &xq[b * BLOCK..(b + 1) * BLOCK];
        let sum: i32 = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
        acc += dw * dx * sum as f32;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// The exact integer dot product of one block pair, as 8 i32 lanes in f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(w: __m256i, x: *const i8) -> __m256 {
        let x = _mm256_loadu_si256(x as *const __m256i);
        // |w| · (x with w's sign): u8 x i8 pairs for maddubs. Q8_0 values
        // are within ±127, so a pair sum stays within i16.
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One weight row against `N` input rows, loading each weight block
    /// once. Every row goes through the same operations whatever `N`, so
    /// its result is the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const N: usize>(wq: &[i8], wd: &[f32], x: [(&[i8], &[f32]); N]) -> [f32; N] {
        // Two accumulators per row (even and odd blocks) keep two
        // multiply-add chains in flight.
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let blocks = wd.len();
        let (wp, pairs) = (wq.as_ptr(), blocks / 2);
        for p in 0..pairs {
            let b = 2 * p;
            let w0 = _mm256_loadu_si256(wp.add(b * BLOCK) as *const __m256i);
            let w1 = _mm256_loadu_si256(wp.add((b + 1) * BLOCK) as *const __m256i);
            let (d0, d1) = (*wd.get_unchecked(b), *wd.get_unchecked(b + 1));
            for k in 0..N {
                let (xq, xd) = x[k];
                let xp = xq.as_ptr();
                let s0 = _mm256_set1_ps(d0 * *xd.get_unchecked(b));
                let s1 = _mm256_set1_ps(d1 * *xd.get_unchecked(b + 1));
                even[k] = _mm256_fmadd_ps(s0, block(w0, xp.add(b * BLOCK)), even[k]);
                odd[k] = _mm256_fmadd_ps(s1, block(w1, xp.add((b + 1) * BLOCK)), odd[k]);
            }
        }
        if blocks % 2 == 1 {
            let b = blocks - 1;
            let w0 = _mm256_loadu_si256(wp.add(b * BLOCK) as *const __m256i);
            let d0 = *wd.get_unchecked(b);
            for k in 0..N {
                let (xq, xd) = x[k];
                let s0 = _mm256_set1_ps(d0 * *xd.get_unchecked(b));
                even[k] = _mm256_fmadd_ps(s0, block(w0, xq.as_ptr().add(b * BLOCK)), even[k]);
            }
        }
        let mut acc = [_mm256_setzero_ps(); N];
        for k in 0..N {
            acc[k] = _mm256_add_ps(even[k], odd[k]);
        }
        let mut out = [0f32; N];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = sum(a);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff, uniform};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        uniform(seed, &[rows, cols], 0.5)
    }

    #[test]
    fn equals_ggml_q8_0_as_candle_computes_it() {
        let w = random(200, 96, 1);
        let ours = Q8Matrix::quantize(&w).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        // The same quantized values.
        let deq = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(max_diff(&ours.dequantize().unwrap(), &deq), 0.0);
        let theirs = QMatMul::from_qtensor(q).unwrap();
        for rows in [1, 3, 4, 7, 13] {
            let x = random(rows, 96, 10 + rows as u64);
            let (a, b) = (ours.matmul(&x).unwrap(), theirs.forward(&x).unwrap());
            assert_eq!(a.dims(), &[rows, 200]);
            assert!(max_diff(&a, &b) < 1e-4, "rows {rows}: {}", max_diff(&a, &b));
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_with_others() {
        let w = Q8Matrix::quantize(&random(130, 64, 2)).unwrap();
        let x = random(9, 64, 3);
        let together = w.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in together.iter().enumerate() {
            let alone = w.matmul(&x.narrow(0, i, 1).unwrap()).unwrap();
            assert_eq!(&alone.to_vec2::<f32>().unwrap()[0], row, "row {i}");
        }
    }

    #[test]
    fn the_portable_kernel_agrees_with_the_simd_one() {
        let w = Q8Matrix::quantize(&random(70, 128, 4)).unwrap();
        let x = random(6, 128, 5);
        let fast = w.matmul(&x).unwrap().to_vec2::<f32>().unwrap();
        let input = w.quantize_rows(&x.flatten_all().unwrap().to_vec1().unwrap(), 6);
        for (j, col) in (0..70).map(|j| (j, fast.iter().map(|r| r[j]).collect::<Vec<_>>())) {
            let mut dst = vec![0f32; 6];
            Kernel::Scalar.dot_rows(
                &w.qs[j * 128..(j + 1) * 128],
                &w.scales[j * 4..(j + 1) * 4],
                &input,
                128,
                &mut dst,
            );
            for (a, b) in dst.iter().zip(&col) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn keeps_leading_dimensions_and_refuses_ragged_rows() {
        let w = Q8Matrix::quantize(&random(5, 32, 6)).unwrap();
        let x = random(6, 32, 7).reshape((2, 3, 32)).unwrap();
        assert_eq!(w.matmul(&x).unwrap().dims(), &[2, 3, 5]);
        assert!(w.matmul(&random(2, 64, 8)).is_err());
        assert!(Q8Matrix::quantize(&random(4, 40, 9)).is_err());
    }
}
