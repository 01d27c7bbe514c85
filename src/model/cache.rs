//! What a forward pass appends and what it attends to: ragged batches
//! ([`Batch`]: per-row positions, `None` for padding), the key/value cache of
//! a batch ([`Cache`]), and the attention masks derived from both.
//!
//! Masks are derived from positions only, so left padding, a shared cached
//! prefix followed by padding, and steps that append a different number of
//! tokens per row all use the same code.

use candle_core::{DType, Device, Tensor};

/// Per-row positions of the columns a forward pass appends.
///
/// `None` marks a padding column: it attends only to itself and nothing
/// attends to it. Real columns attend to every earlier real column of their
/// row (by position), within the sliding window on sliding layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: Vec<Vec<Option<u32>>>,
}

impl Batch {
    /// Columns appended by this step (all rows have the same count).
    pub fn width(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    /// Positions with pads mapped to 0, `[B, T]`.
    pub(crate) fn position_tensor(&self, dev: &Device) -> candle_core::Result<Tensor> {
        let flat: Vec<u32> = self
            .rows
            .iter()
            .flat_map(|r| r.iter().map(|p| p.unwrap_or(0)))
            .collect();
        Tensor::from_vec(flat, (self.rows.len(), self.width()), dev)
    }
}

/// Key/value cache of one batch: tensors per layer plus the positions of
/// every cached column, which later masks are built from.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    /// Keys and values `[B, kv_heads, S, head_dim]` per layer (`None` until
    /// the first step writes it).
    pub(crate) kv: Vec<Option<(Tensor, Tensor)>>,
    /// Position of every cached column per row (`None`: padding).
    pub(crate) columns: Vec<Vec<Option<u32>>>,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `f` to every cached key and value tensor.
    fn map_kv(
        &self,
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Vec<Option<(Tensor, Tensor)>>> {
        self.kv
            .iter()
            .map(|e| e.as_ref().map(|(k, v)| Ok((f(k)?, f(v)?))).transpose())
            .collect()
    }

    /// Keeps only the given rows (by index), in that order.
    pub fn select(&self, rows: &[usize]) -> candle_core::Result<Self> {
        let dev = match self.kv.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => Device::Cpu,
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &dev,
        )?;
        // Concatenation can leave the cache strided.
        let kv = self.map_kv(|t| t.contiguous()?.index_select(&idx, 0))?;
        let columns = rows
            .iter()
            .map(|&r| self.columns.get(r).cloned().unwrap_or_default())
            .collect();
        Ok(Self { kv, columns })
    }

    /// Masks out the last `n` real columns of `row` (draft tokens that were
    /// not accepted): their keys and values stay, but nothing attends to
    /// them any more, and their positions can be written again.
    pub fn forget_last(&mut self, row: usize, n: usize) {
        if let Some(cols) = self.columns.get_mut(row) {
            cols.iter_mut()
                .rev()
                .filter(|c| c.is_some())
                .take(n)
                .for_each(|c| *c = None);
        }
    }

    /// Repeats a batch-of-one cache (a shared prompt prefix) `n` times.
    pub fn repeat(&self, n: usize) -> candle_core::Result<Self> {
        let kv = self.map_kv(|t| t.repeat((n, 1, 1, 1)))?;
        let columns = (0..n)
            .map(|_| self.columns.first().cloned().unwrap_or_default())
            .collect();
        Ok(Self { kv, columns })
    }
}

/// Additive attention mask (0 or -inf) for new columns `batch` after the
/// cached columns `past`, stacked `rep` times along the query axis for the
/// query heads that share a kv head: `[B, 1, rep*T, S]`. Built on the host
/// once per forward pass and uploaded once.
pub(crate) fn build_mask(
    past: &[Vec<Option<u32>>],
    batch: &Batch,
    window: Option<usize>,
    rep: usize,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let b = batch.rows.len();
    let t = batch.width();
    let p = past.first().map_or(0, Vec::len);
    let s = p + t;
    let mut data = vec![f32::NEG_INFINITY; b * t * s];
    for (row, new) in batch.rows.iter().enumerate() {
        let old = past.get(row).map(Vec::as_slice).unwrap_or(&[]);
        for (i, q) in new.iter().enumerate() {
            let base = (row * t + i) * s;
            match q {
                None => data[base + p + i] = 0.0,
                Some(qp) => {
                    for (j, k) in old.iter().chain(new.iter()).enumerate() {
                        if let Some(kp) = k {
                            let visible = kp <= qp
                                && (j < p || j <= p + i)
                                && window.is_none_or(|w| ((qp - kp) as usize) < w);
                            if visible {
                                data[base + j] = 0.0;
                            }
                        }
                    }
                }
            }
        }
    }
    let rep = rep.max(1);
    if rep > 1 {
        data = data
            .chunks(t * s)
            .flat_map(|row| std::iter::repeat_n(row, rep).flatten().copied())
            .collect();
    }
    Tensor::from_vec(data, (b, 1, rep * t, s), dev)?.to_dtype(dtype)
}

/// One dense batch (no padding) with positions `start..start+len`.
pub fn dense_batch(rows: usize, start: u32, len: usize) -> Batch {
    Batch {
        rows: (0..rows)
            .map(|_| (0..len as u32).map(|i| Some(start + i)).collect())
            .collect(),
    }
}
