//! What a forward pass appends and what it attends to: ragged batches
//! ([`Batch`]: per-row positions, `None` for padding), the key/value cache of
//! a batch ([`Cache`], growing; [`StaticCache`], preallocated), the device
//! buffers of a replayable step ([`StepInputs`]), and the attention masks
//! derived from them.
//!
//! Masks are derived from positions only, so left padding, a shared cached
//! prefix followed by padding, and steps that append a different number of
//! tokens per row all use the same code, for both kinds of cache.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;

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

    /// Key columns held by the tensors (what [`Cache::len`] counts from the
    /// recorded positions; a replayable pass records no positions).
    pub fn kv_len(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
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
        forget_last(&mut self.columns, row, n);
    }

    /// Repeats a batch-of-one cache (a shared prompt prefix) `n` times.
    ///
    /// One kernel per tensor (`fused::repeat_rows` on CUDA, a broadcast made
    /// contiguous elsewhere, and when gradients flow through it): candle's
    /// `repeat` concatenates `n` copies, one
    /// kernel each, which for 128 messages was 4,608 launches and most of a
    /// batched decision's time; candle's strided copy of the broadcast ran
    /// at about 130 GB/s on an H200. A copy is exact, so the kernel serves
    /// whatever `--fused-kernels` says.
    pub fn repeat(&self, n: usize) -> candle_core::Result<Self> {
        let kv = self.map_kv(|t| {
            let (b, h, s, d) = t.dims4()?;
            if b != 1 {
                candle_core::bail!("only a cache of one row can be repeated, this one has {b}");
            }
            // The kernel records no gradient: a training pass that
            // continues from the repeated keys and values broadcasts.
            if super::fused::available(t.device(), t.dtype()) && !t.track_op() {
                if let Some(r) = super::fused::repeat_rows(t, n)? {
                    return Ok(r);
                }
            }
            t.broadcast_as((n, h, s, d))?.contiguous()
        })?;
        let columns = (0..n)
            .map(|_| self.columns.first().cloned().unwrap_or_default())
            .collect();
        Ok(Self { kv, columns })
    }
}

/// Marks the last `n` real columns of `row` as `None` (see
/// [`Cache::forget_last`]).
fn forget_last(columns: &mut [Vec<Option<u32>>], row: usize, n: usize) {
    if let Some(cols) = columns.get_mut(row) {
        cols.iter_mut()
            .rev()
            .filter(|c| c.is_some())
            .take(n)
            .for_each(|c| *c = None);
    }
}

/// Additive attention mask (0 or -inf) for new columns `batch` after the
/// cached columns `past`: `[B, 1, T, keys]`, one row per query column,
/// broadcast on the device over the heads (see `Attention::forward`).
///
/// Key columns are laid out as both caches store them: the `P` cached
/// columns first, this step's `T` columns at `P..P+T`, then `keys - P - T`
/// columns nothing attends to. A growing [`Cache`] passes `keys = P + T`;
/// a [`StaticCache`] passes its capacity, so that its unwritten tail is
/// masked.
///
/// Only the positions go up to the device (`B·(keys + T)` numbers); the
/// mask itself is computed there by a handful of element-wise kernels. A
/// mask built on the host and uploaded took about 10 ms for 128 messages
/// of 48 tokens after the 240-token system prefix, per mask.
pub(crate) fn build_mask(
    past: &[Vec<Option<u32>>],
    batch: &Batch,
    keys: usize,
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let b = batch.rows.len();
    let t = batch.width();
    let p = past.first().map_or(0, Vec::len);
    let s = keys;
    if s < p + t {
        candle_core::bail!("a mask over {s} key columns cannot hold {p} cached and {t} new ones");
    }
    // Positions as f32 (exact below 2^24): a key nothing may attend to
    // (padding, the unwritten tail) at +inf, a padding query at -1, so
    // that `key <= query` already leaves them out.
    let key = |c: &Option<u32>| c.map_or(f32::INFINITY, |x| x as f32);
    let mut key_pos = Vec::with_capacity(b * s);
    let mut query_pos = Vec::with_capacity(b * t);
    for (row, new) in batch.rows.iter().enumerate() {
        let old = past.get(row).map(Vec::as_slice).unwrap_or(&[]);
        key_pos.extend((0..p).map(|j| old.get(j).map_or(f32::INFINITY, key)));
        key_pos.extend(new.iter().map(key));
        key_pos.extend(std::iter::repeat_n(f32::INFINITY, s - p - t));
        query_pos.extend(new.iter().map(|q| q.map_or(-1.0, |x| x as f32)));
    }
    let key_pos = Tensor::from_vec(key_pos, (b, 1, 1, s), dev)?;
    let query_pos = Tensor::from_vec(query_pos, (b, 1, t, 1), dev)?;
    let column = Tensor::arange(0u32, s as u32, dev)?.reshape((1, 1, 1, s))?;
    let own_column = Tensor::arange(p as u32, (p + t) as u32, dev)?.reshape((1, 1, t, 1))?;
    // A real query sees the keys at or before its position that are cached
    // or appended no later than itself, within the window.
    let mut visible = key_pos
        .broadcast_le(&query_pos)?
        .broadcast_mul(&column.broadcast_le(&own_column)?)?;
    if let Some(w) = window {
        let oldest = query_pos.affine(1.0, -(w as f64))?;
        visible = visible.mul(&key_pos.broadcast_gt(&oldest)?)?;
    }
    // A padding query sees only its own column.
    let padding = query_pos.lt(0f64)?;
    let own = column.broadcast_eq(&own_column)?.broadcast_mul(&padding)?;
    let visible = visible.add(&own)?;
    let shape = visible.shape();
    let zero = Tensor::zeros((), dtype, dev)?.broadcast_as(shape)?;
    let hidden = Tensor::new(f32::NEG_INFINITY, dev)?
        .to_dtype(dtype)?
        .broadcast_as(shape)?;
    visible.where_cond(&zero, &hidden)
}

/// Whether a sliding window of `window` positions hides anything from the
/// queries of `batch` after `past`: when it does not, the sliding layers
/// can use the global mask.
pub(crate) fn window_hides(past: &[Vec<Option<u32>>], batch: &Batch, window: usize) -> bool {
    batch.rows.iter().enumerate().any(|(row, new)| {
        let old = past.get(row).map(Vec::as_slice).unwrap_or(&[]);
        let real = || old.iter().chain(new).flatten().copied();
        match (real().min(), new.iter().flatten().max()) {
            (Some(first), Some(&last)) => (last - first.min(last)) as usize >= window,
            _ => false,
        }
    })
}

/// The masks of a step, global and (for models with a sliding window)
/// local; the local one is the global one again when the window hides
/// nothing, which is every step of a conversation shorter than the window.
pub(crate) fn build_masks(
    past: &[Vec<Option<u32>>],
    batch: &Batch,
    keys: usize,
    window: Option<usize>,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let global = build_mask(past, batch, keys, None, dtype, dev)?;
    let local = match window {
        None => None,
        Some(w) if window_hides(past, batch, w) => {
            Some(build_mask(past, batch, keys, Some(w), dtype, dev)?)
        }
        Some(_) => Some(global.clone()),
    };
    Ok((global, local))
}

/// The sliding window of the model's sliding layers, when it has any (only
/// then does a step need a second mask).
pub(crate) fn local_window(cfg: &ModelConfig) -> Option<usize> {
    let sliding = cfg
        .sliding_layers
        .iter()
        .take(cfg.num_hidden_layers)
        .any(|&s| s);
    cfg.sliding_window.filter(|_| sliding)
}

/// A key/value cache allocated once for `capacity` columns and written in
/// place: the cache of a step that can be captured as a CUDA graph and
/// replayed ([`Decoder::forward_static`](crate::model::Decoder::forward_static)).
///
/// A replayed graph runs the captured kernels on the captured addresses
/// with the captured shapes, so a replayable step may not allocate its
/// cache, change its shape or decide anything on the host. Keys and values
/// are therefore allocated at full capacity, a step writes its columns at
/// indices it reads from a device buffer ([`StepInputs`]), and attention
/// covers every column, the unwritten ones masked. The positions of the
/// cached columns (what masks are built from) stay on the host, as in
/// [`Cache`], and are advanced by a separate call ([`StaticCache::advance`])
/// because a replay runs no Rust code.
///
/// Per step: [`StepInputs::fill`], the forward pass (eager or replayed),
/// then [`StaticCache::advance`] with the same batch.
#[derive(Debug, Clone)]
pub struct StaticCache {
    /// Keys and values `[rows, kv_heads, capacity, head_dim]` per layer,
    /// zeros until written. Never replaced: a captured graph holds their
    /// addresses.
    kv: Vec<(Tensor, Tensor)>,
    /// Position of every written column per row (`None`: padding or
    /// forgotten); columns from `len()` on are unwritten.
    columns: Vec<Vec<Option<u32>>>,
    capacity: usize,
}

impl StaticCache {
    /// Zeroed keys and values for a model of shape `cfg`, in `dtype` on
    /// `dev` (the decoder's: see
    /// [`Decoder::static_cache`](crate::model::Decoder::static_cache)).
    pub fn new(
        cfg: &ModelConfig,
        rows: usize,
        capacity: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        if rows == 0 || capacity == 0 {
            candle_core::bail!(
                "a static KV cache needs rows and capacity, got {rows} x {capacity}"
            );
        }
        let shape = (rows, cfg.num_key_value_heads, capacity, cfg.head_dim);
        let kv = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, dev)?,
                    Tensor::zeros(shape, dtype, dev)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            kv,
            columns: vec![Vec::new(); rows],
            capacity,
        })
    }

    /// Columns written so far (the same for every row).
    pub fn len(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Columns allocated per row.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn rows(&self) -> usize {
        self.columns.len()
    }

    /// The keys and values `[rows, kv_heads, capacity, head_dim]` of every
    /// layer, read-only: they must keep their storage for graph replay.
    pub fn kv(&self) -> &[(Tensor, Tensor)] {
        &self.kv
    }

    /// Copies a growing cache of as many rows (a shared prefix, a prefill
    /// run eagerly) into columns `0..cache.len()`, in place, replacing what
    /// was cached. Columns after it keep stale values, masked until written.
    pub fn load(&mut self, cache: &Cache) -> candle_core::Result<()> {
        let len = cache.len();
        if len == 0 {
            self.reset();
            return Ok(());
        }
        if cache.columns.len() != self.rows() {
            candle_core::bail!(
                "cannot load a cache of {} rows into a static KV cache of {} rows",
                cache.columns.len(),
                self.rows()
            );
        }
        if len > self.capacity {
            candle_core::bail!(
                "cannot load {len} cached columns into a static KV cache of capacity {}",
                self.capacity
            );
        }
        if cache.kv.len() != self.kv.len() {
            candle_core::bail!(
                "the cache has {} layers, the static KV cache {}",
                cache.kv.len(),
                self.kv.len()
            );
        }
        for (i, (slot, (k, v))) in cache.kv.iter().zip(&self.kv).enumerate() {
            let Some((ck, cv)) = slot else {
                candle_core::bail!("layer {i} of the cache has no keys but {len} cached columns");
            };
            let (_, heads, _, head_dim) = k.dims4()?;
            if ck.dims() != [self.rows(), heads, len, head_dim] {
                candle_core::bail!(
                    "layer {i} of the cache has keys {:?}, expected [{}, {heads}, {len}, {head_dim}]",
                    ck.dims(),
                    self.rows()
                );
            }
            // `slice_set` copies into the existing storage (the tensors
            // keep their addresses); it needs contiguous sources.
            k.slice_set(&ck.contiguous()?, 2, 0)?;
            v.slice_set(&cv.contiguous()?, 2, 0)?;
        }
        self.columns = cache.columns.clone();
        Ok(())
    }

    /// Same as [`Cache::forget_last`]: the columns stay written (and take
    /// room) but nothing attends to them any more.
    pub fn forget_last(&mut self, row: usize, n: usize) {
        forget_last(&mut self.columns, row, n);
    }

    /// Empties the cache for a new batch; the buffers stay allocated and
    /// keep their stale values, masked until written.
    pub fn reset(&mut self) {
        self.columns.iter_mut().for_each(Vec::clear);
    }

    /// The written columns as a growing [`Cache`] (copies), for a batch
    /// that goes on without a fixed capacity.
    pub fn to_cache(&self) -> candle_core::Result<Cache> {
        let len = self.len();
        let kv = self
            .kv
            .iter()
            .map(|(k, v)| {
                Ok(Some((
                    k.narrow(2, 0, len)?.copy()?,
                    v.narrow(2, 0, len)?.copy()?,
                )))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Cache {
            kv,
            columns: self.columns.clone(),
        })
    }

    /// Keeps the first `len` columns of every row and forgets the rest, so
    /// that a batch can start again after a prefix every row shares: the
    /// prefix's keys and values stay where they were written, and nothing
    /// is copied. Host bookkeeping only; a no-op past the current length.
    pub fn truncate(&mut self, len: usize) {
        self.columns.iter_mut().for_each(|c| c.truncate(len));
    }

    /// Records the columns a step wrote (host bookkeeping only: the keys
    /// and values were written by the step itself). Call it once after each
    /// step, with the batch given to [`StepInputs::fill`].
    pub fn advance(&mut self, batch: &Batch) -> candle_core::Result<()> {
        self.check_step(batch)?;
        for (cols, new) in self.columns.iter_mut().zip(&batch.rows) {
            cols.extend_from_slice(new);
        }
        Ok(())
    }

    /// Errors unless `batch` has this cache's rows, one width, and fits.
    fn check_step(&self, batch: &Batch) -> candle_core::Result<()> {
        let t = batch.width();
        if batch.rows.len() != self.rows() {
            candle_core::bail!(
                "a step of {} rows for a static KV cache of {} rows",
                batch.rows.len(),
                self.rows()
            );
        }
        if batch.rows.iter().any(|r| r.len() != t) {
            candle_core::bail!("the rows of a step must all have {t} columns");
        }
        let len = self.len();
        if len + t > self.capacity {
            candle_core::bail!(
                "static KV cache capacity exceeded: {len} of {} columns used, a step of {t} needs {}",
                self.capacity,
                len + t
            );
        }
        Ok(())
    }
}

/// Everything a replayable step reads that changes from step to step, in
/// device buffers of fixed shape for `rows` B, `width` T and cache
/// `capacity` C, allocated once.
///
/// A captured graph keeps reading the addresses it was captured with, so
/// each step's values are written into these same buffers
/// ([`StepInputs::fill`]) instead of new tensors; the buffers are private
/// so that they cannot be replaced. Build one per (rows, width, capacity)
/// a graph is captured for.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// Token ids `[B, T]` u32 (anything, usually 0, at padding).
    tokens: Tensor,
    /// Positions `[B, T]` u32, 0 at padding (the rotary tables' input).
    positions: Tensor,
    /// Cache columns the step writes its keys and values to, `[T]` u32:
    /// `len..len+T`.
    columns: Tensor,
    /// Mask of global layers `[B, 1, T, C]` in the compute dtype.
    mask_global: Tensor,
    /// Mask of sliding layers, same shape; only for models with sliding
    /// layers and a window.
    mask_local: Option<Tensor>,
    /// The window `mask_local` is built for.
    window: Option<usize>,
}

impl StepInputs {
    /// Zeroed buffers for a model of shape `cfg`, in `dtype` on `dev` (the
    /// decoder's: see
    /// [`Decoder::step_inputs`](crate::model::Decoder::step_inputs)).
    pub fn new(
        cfg: &ModelConfig,
        rows: usize,
        width: usize,
        capacity: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        if rows == 0 || width == 0 || width > capacity {
            candle_core::bail!(
                "step inputs need rows and a width within the capacity, got {rows} x {width} for {capacity}"
            );
        }
        let window = local_window(cfg);
        let mask = || Tensor::zeros((rows, 1, width, capacity), dtype, dev);
        Ok(Self {
            tokens: Tensor::zeros((rows, width), DType::U32, dev)?,
            positions: Tensor::zeros((rows, width), DType::U32, dev)?,
            columns: Tensor::zeros(width, DType::U32, dev)?,
            mask_global: mask()?,
            mask_local: window.map(|_| mask()).transpose()?,
            window,
        })
    }

    /// Writes the next step (row-major `tokens`, their `batch` of
    /// positions, appended after `cache`'s columns) into the buffers, in
    /// place. Runs on the host and uploads: call it before launching or
    /// replaying the step, never inside a capture, and outside
    /// `enable_cuda_graph_htod_cache` (which would keep every step's
    /// uploads, cached by content).
    pub fn fill(
        &mut self,
        tokens: &[u32],
        batch: &Batch,
        cache: &StaticCache,
    ) -> candle_core::Result<()> {
        let (b, t, c) = (self.rows(), self.width(), self.capacity());
        if batch.rows.len() != b || batch.width() != t || tokens.len() != b * t {
            candle_core::bail!(
                "step inputs are {b}x{t}, got {} tokens and {}x{} positions",
                tokens.len(),
                batch.rows.len(),
                batch.width()
            );
        }
        if cache.capacity() != c {
            candle_core::bail!(
                "step inputs are for a capacity of {c}, the static KV cache has {}",
                cache.capacity()
            );
        }
        cache.check_step(batch)?;
        self.write(tokens, batch, &cache.columns)
    }

    /// Writes a pass over whole rows, or over rows that continue the
    /// columns `past` of a growing [`Cache`] (one list per row, all of one
    /// length; empty without a cache): a training step's passes. The
    /// buffers' capacity must be the past columns plus their width. Same
    /// rules as [`StepInputs::fill`].
    pub fn fill_rows(
        &mut self,
        tokens: &[u32],
        batch: &Batch,
        past: &[Vec<Option<u32>>],
    ) -> candle_core::Result<()> {
        let (b, t, c) = (self.rows(), self.width(), self.capacity());
        let p = past.first().map_or(0, Vec::len);
        let ragged = past.iter().any(|r| r.len() != p) || !(past.is_empty() || past.len() == b);
        if batch.rows.len() != b || batch.width() != t || tokens.len() != b * t || ragged {
            candle_core::bail!(
                "step inputs are {b}x{t}, got {} tokens and {}x{} positions after {} rows of past columns",
                tokens.len(),
                batch.rows.len(),
                batch.width(),
                past.len()
            );
        }
        if c != p + t {
            candle_core::bail!(
                "step inputs over {c} columns cannot hold {p} past and {t} new ones"
            );
        }
        self.write(tokens, batch, past)
    }

    /// Uploads the step after the columns `past` into the buffers.
    fn write(
        &mut self,
        tokens: &[u32],
        batch: &Batch,
        past: &[Vec<Option<u32>>],
    ) -> candle_core::Result<()> {
        let (b, t, c) = (self.rows(), self.width(), self.capacity());
        let dev = self.tokens.device().clone();
        let dtype = self.mask_global.dtype();
        let len = past.first().map_or(0, Vec::len) as u32;
        // `slice_set` at offset 0 copies into the existing storage.
        self.tokens
            .slice_set(&Tensor::from_slice(tokens, (b, t), &dev)?, 0, 0)?;
        self.positions
            .slice_set(&batch.position_tensor(&dev)?, 0, 0)?;
        self.columns
            .slice_set(&Tensor::arange(len, len + t as u32, &dev)?, 0, 0)?;
        let (global, local) = build_masks(past, batch, c, self.window, dtype, &dev)?;
        self.mask_global.slice_set(&global, 0, 0)?;
        if let (Some(buffer), Some(local)) = (&self.mask_local, local) {
            buffer.slice_set(&local, 0, 0)?;
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.tokens.dims()[0]
    }

    /// Columns per row of the step.
    pub fn width(&self) -> usize {
        self.tokens.dims()[1]
    }

    /// Key columns the masks cover (the static cache's capacity).
    pub fn capacity(&self) -> usize {
        self.mask_global.dims()[3]
    }

    /// Token ids `[B, T]` u32.
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    /// Positions `[B, T]` u32, 0 at padding.
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// The cache columns written by the step, `[T]` u32.
    pub fn columns(&self) -> &Tensor {
        &self.columns
    }

    /// The global layers' mask `[B, 1, T, C]`.
    pub fn mask_global(&self) -> &Tensor {
        &self.mask_global
    }

    /// The sliding layers' mask, when the model has a window.
    pub fn mask_local(&self) -> Option<&Tensor> {
        self.mask_local.as_ref()
    }
}

/// One dense batch (no padding) with positions `start..start+len`.
pub fn dense_batch(rows: usize, start: u32, len: usize) -> Batch {
    Batch {
        rows: (0..rows)
            .map(|_| (0..len as u32).map(|i| Some(start + i)).collect())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_rows(m: &Tensor) -> Vec<Vec<f32>> {
        let (b, _, q, s) = m.dims4().unwrap();
        m.reshape((b * q, s)).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn growing_and_static_layouts_share_one_mask() {
        // Two rows, a padded cached column and a forgotten one, a left-padded
        // step; window 3.
        let past = vec![
            vec![Some(0), Some(1), Some(2), None],
            vec![None, Some(0), None, None],
        ];
        let batch = Batch {
            rows: vec![vec![Some(3), Some(4)], vec![None, Some(1)]],
        };
        let (p, t, capacity) = (4, 2, 9);
        for window in [None, Some(3)] {
            let dev = &Device::Cpu;
            let grow = build_mask(&past, &batch, p + t, window, DType::F32, dev).unwrap();
            let fixed = build_mask(&past, &batch, capacity, window, DType::F32, dev).unwrap();
            assert_eq!(grow.dims(), &[2, 1, t, p + t]);
            assert_eq!(fixed.dims(), &[2, 1, t, capacity]);
            for (g, f) in mask_rows(&grow).iter().zip(mask_rows(&fixed)) {
                assert_eq!(g.as_slice(), &f[..p + t]);
                assert!(f[p + t..].iter().all(|x| *x == f32::NEG_INFINITY));
            }
            let rows = mask_rows(&fixed);
            // Row 1's padding query sees only itself (column p); its real
            // query sees position 0 (column 1) and itself (column p + 1).
            let seen =
                |r: &[f32]| -> Vec<usize> { (0..r.len()).filter(|&j| r[j] == 0.0).collect() };
            assert_eq!(seen(&rows[2]), vec![p]);
            assert_eq!(seen(&rows[3]), vec![1, p + 1]);
            // Row 0, position 4: positions 2..=4 in the window, 0..=4 without.
            let want = if window.is_some() {
                vec![2, p, p + 1]
            } else {
                vec![0, 1, 2, p, p + 1]
            };
            assert_eq!(seen(&rows[1]), want);
        }
        let err = build_mask(&past, &batch, p + t - 1, None, DType::F32, &Device::Cpu);
        assert!(err.is_err());
    }

    /// The visibility rule written out one key at a time.
    fn visible_by_rule(
        past: &[Vec<Option<u32>>],
        batch: &Batch,
        keys: usize,
        window: Option<usize>,
    ) -> Vec<Vec<bool>> {
        let p = past[0].len();
        let mut out = Vec::new();
        for (row, new) in batch.rows.iter().enumerate() {
            let cols: Vec<Option<u32>> = past[row].iter().chain(new).copied().collect();
            for (i, q) in new.iter().enumerate() {
                out.push(
                    (0..keys)
                        .map(|j| match (q, cols.get(j).copied().flatten()) {
                            (None, _) => j == p + i,
                            (Some(q), Some(k)) => {
                                k <= *q
                                    && j <= p + i
                                    && window.is_none_or(|w| ((q - k) as usize) < w)
                            }
                            (Some(_), None) => false,
                        })
                        .collect(),
                );
            }
        }
        out
    }

    #[test]
    fn masks_follow_the_rule_on_ragged_batches() {
        // Left padding, forgotten cached columns, a shared prefix, a step
        // that appends drafts, repeated positions of a rejected draft.
        let past = vec![
            (0..12).map(Some).collect::<Vec<_>>(),
            (0..12)
                .map(|i| (i % 5 != 3).then_some(i))
                .collect::<Vec<_>>(),
            (0..12).map(|i| (i >= 4).then_some(i - 4)).collect(),
        ];
        let batch = Batch {
            rows: vec![
                vec![Some(12), Some(13), Some(14), Some(15)],
                vec![None, None, Some(12), Some(13)],
                vec![Some(8), Some(9), Some(8), None],
            ],
        };
        for (keys, window) in [(16, None), (16, Some(5)), (21, Some(9)), (21, None)] {
            let mask = build_mask(&past, &batch, keys, window, DType::F32, &Device::Cpu).unwrap();
            let seen: Vec<Vec<bool>> = mask_rows(&mask)
                .iter()
                .map(|r| r.iter().map(|x| *x == 0.0).collect())
                .collect();
            assert_eq!(
                seen,
                visible_by_rule(&past, &batch, keys, window),
                "{keys} {window:?}"
            );
            assert!(mask_rows(&mask)
                .iter()
                .flatten()
                .all(|x| *x == 0.0 || *x == f32::NEG_INFINITY));
        }
    }

    #[test]
    fn the_local_mask_is_the_global_one_until_the_window_hides_a_key() {
        let past = vec![(0..6).map(Some).collect::<Vec<_>>(); 2];
        let batch = Batch {
            rows: vec![vec![Some(6), Some(7)], vec![None, Some(6)]],
        };
        let dev = &Device::Cpu;
        // Positions 0..=7 are within a window of 8: one mask serves both.
        assert!(!window_hides(&past, &batch, 8));
        let (global, local) = build_masks(&past, &batch, 8, Some(8), DType::F32, dev).unwrap();
        assert_eq!(mask_rows(&global), mask_rows(&local.unwrap()));
        // A window of 7 hides position 0 from position 7.
        assert!(window_hides(&past, &batch, 7));
        let (global, local) = build_masks(&past, &batch, 8, Some(7), DType::F32, dev).unwrap();
        let local = local.unwrap();
        assert_ne!(mask_rows(&global), mask_rows(&local));
        let want = build_mask(&past, &batch, 8, Some(7), DType::F32, dev).unwrap();
        assert_eq!(mask_rows(&local), mask_rows(&want));
        // No window, no local mask.
        let (_, none) = build_masks(&past, &batch, 8, None, DType::F32, dev).unwrap();
        assert!(none.is_none());
    }
}
