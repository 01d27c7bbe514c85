//! The decoder shared by every supported architecture.
//!
//! Gemma-3 and Llama-3 differ only in details (extra norms, activation,
//! embedding scale, sliding windows); those come from the [`Family`] that
//! `gemma3.rs` and `llama.rs` each describe. The same code runs inference
//! (KV cache, fused kernels) and training (no cache, composed ops so that
//! gradients reach the LoRA weights): see [`Mode`].
//!
//! Batches are ragged ([`Batch`]): every row carries its own token
//! positions, and masks are derived from them (`cache.rs`).
//!
//! Two entry points share the layer loop and the attention code and differ
//! only in where keys and values go (`Kv`): [`Decoder::forward_hidden`]
//! (no cache or a growing [`Cache`]; the CPU path and training) and
//! [`Decoder::forward_static`] (a preallocated [`StaticCache`] written in
//! place, every per-step input in fixed device buffers: a step that can be
//! captured as a CUDA graph and replayed).
//!
//! On CUDA, inference steps take the project's own kernels (`fused/`)
//! where they fit, each replacing a run of candle's
//! ([`Decoder::set_fused_kernels`]); the composed path stays for the CPU,
//! training and comparisons.
//!
//! The blocks are private: callers change adapters through the verbs of
//! [`Decoder`] and [`Linear`], never by editing fields.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};

use super::cache::{build_masks, local_window, Batch, Cache, StaticCache, StepInputs};
use super::config::{ModelConfig, RopeScaling};
use super::family::{Activation, Family};
use super::fused::{self, KvTarget, QkRope};
use super::grad;
use super::linear::{
    linear, q8_forward, q8_head_copy, Linear, Lora, Mode, Q8Copy, Q8_HEAD_MAX_ROWS,
};

/// Root-mean-square norm through candle's fused kernel (f32 inside) in
/// inference and in training alike. `alpha` is the effective multiplier in
/// the compute dtype: Gemma's `1 + w` folded in at load time, times a scale
/// where one is folded in (the query norm carries the attention scale).
#[derive(Debug, Clone)]
struct RmsNorm {
    alpha: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` `[size]` under `vb`, folding in `1 + w` when the family
    /// stores norms that way.
    fn new(
        family: &Family,
        vb: &candle_nn::VarBuilder,
        size: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        Self::scaled(family, vb, size, eps, 1.0)
    }

    /// The same times `scale`, folded in f32 before the cast (exact when
    /// `scale` is a power of two, as Gemma's `1/sqrt(256)` is).
    fn scaled(
        family: &Family,
        vb: &candle_nn::VarBuilder,
        size: usize,
        eps: f64,
        scale: f64,
    ) -> candle_core::Result<Self> {
        let w = vb.to_dtype(DType::F32).get(size, "weight")?;
        let alpha = if family.norm_plus_one { (w + 1.0)? } else { w };
        Ok(Self {
            alpha: alpha.affine(scale, 0.0)?.to_dtype(vb.dtype())?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        match mode {
            Mode::Infer => candle_nn::ops::rms_norm(&x.contiguous()?, &self.alpha, self.eps as f32),
            Mode::Train(_) => grad::rms_norm(x, &self.alpha, self.eps),
        }
    }
}

/// Rotary embedding parameters for one kind of layer.
#[derive(Debug, Clone)]
struct Rotary {
    /// Inverse frequencies, `[head_dim / 2]`, f32 (already rescaled).
    inv_freq: Tensor,
}

impl Rotary {
    fn new(
        head_dim: usize,
        base: f64,
        scaling: &RopeScaling,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f64 / head_dim as f64);
                let f = match *scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let old = original_max_position_embeddings as f64;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv, half, dev)?,
        })
    }

    /// cos and sin tables `[B, T, head_dim/2]` for the given positions,
    /// computed in f32 and cast at the end (bf16 tables lose phase).
    fn tables(&self, positions: &Tensor, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b * t, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let half = self.inv_freq.dim(0)?;
        let cos = freqs.cos()?.reshape((b, t, half))?.to_dtype(dtype)?;
        let sin = freqs.sin()?.reshape((b, t, half))?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Applies rotary embedding to `x: [B, T, H, D]` (non-interleaved halves),
/// with `cos`/`sin` `[B, T, D/2]`.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
    match mode {
        Mode::Infer => candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin),
        Mode::Train(_) => grad::rope(x, cos, sin),
    }
}

/// One layer's rotary embedding in one pass: its inverse frequencies, the
/// pass's positions `[B, T]` (u32) and, for candle's kernels, the cos/sin
/// tables computed from them once per pass (the fused kernel computes the
/// angles itself).
struct Rope<'a> {
    rotary: &'a Rotary,
    positions: &'a Tensor,
    tables: Option<&'a (Tensor, Tensor)>,
}

impl Rope<'_> {
    /// The cos/sin tables `[B, T, D/2]` in `dtype`, computed here when the
    /// pass has none.
    fn tables(&self, dtype: DType) -> candle_core::Result<Cow<'_, (Tensor, Tensor)>> {
        Ok(match self.tables {
            Some(t) => Cow::Borrowed(t),
            None => Cow::Owned(self.rotary.tables(self.positions, dtype)?),
        })
    }
}

/// `x` through each of `linears`, one output each. With `fused`, up to
/// three projections of a step of few rows are one kernel
/// ([`fused::matmul_t`]).
fn project(
    x: &Tensor,
    linears: &[&Linear],
    mode: Mode,
    fused: bool,
) -> candle_core::Result<Vec<Tensor>> {
    if fused {
        let weights: Option<Vec<&Tensor>> = linears.iter().map(|l| l.inference_weight()).collect();
        if let Some(weights) = weights {
            if let Some(out) = fused::matmul_t(x, &weights)? {
                return Ok(out);
            }
        }
    }
    linears.iter().map(|l| l.forward(x, mode)).collect()
}

/// [`project`] for one projection.
fn project_one(
    x: &Tensor,
    linear: &Linear,
    mode: Mode,
    fused: bool,
) -> candle_core::Result<Tensor> {
    match project(x, &[linear], mode, fused)?.pop() {
        Some(y) => Ok(y),
        None => candle_core::bail!("no output from {}", linear.name()),
    }
}

/// Where one layer's new keys and values go, and so which keys it attends
/// to.
enum Kv<'a> {
    /// Nowhere: attention covers this step's columns only (training,
    /// uncached forwards).
    None,
    /// A growing cache slot (`None` before the first step): the step's
    /// keys and values are concatenated after it, and attention covers
    /// both.
    Growing(&'a mut Option<(Tensor, Tensor)>),
    /// A static cache's keys and values `[B, kv_heads, C, D]`, written in
    /// place at the step's cache `columns` (`[T]` u32); attention covers all
    /// `C` columns and the mask hides the unwritten ones. `index` is
    /// [`scatter_index`] of the columns, made once per step for candle's
    /// `scatter_set` (`None` when the step takes the fused kernels, which
    /// write at the columns themselves).
    Static {
        k: &'a Tensor,
        v: &'a Tensor,
        columns: &'a Tensor,
        index: Option<&'a Tensor>,
    },
}

/// The masks of one forward pass, per kind of layer (`[B, 1, T, S]`).
struct Masks<'a> {
    global: &'a Tensor,
    /// Sliding layers' mask; `None` when the model has no window.
    local: Option<&'a Tensor>,
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// One decoder block. Norm names follow their role, not checkpoint names,
/// because Llama's `post_attention_layernorm` is Gemma's `pre_feedforward_layernorm`.
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    /// Gemma: norm on the attention output before the residual add.
    attn_out_norm: Option<RmsNorm>,
    mlp_norm: RmsNorm,
    /// Gemma: norm on the MLP output before the residual add.
    mlp_out_norm: Option<RmsNorm>,
    attn: Attention,
    mlp: Mlp,
    /// Uses the sliding window and the local rotary base.
    sliding: bool,
}

/// The whole decoder stack, architecture-neutral.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The shape it was built for; `cfg`, `dtype` and `device` stay public
    /// because callers (router, trainer, benchmarks) read them, never write.
    pub cfg: ModelConfig,
    /// `[vocab, hidden]` in the compute dtype.
    embed_tokens: Tensor,
    /// Multiplier applied to embeddings (Gemma: `sqrt(hidden)` in the compute dtype).
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// Separate output head; `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    /// Q8_0 copy of the head for CPU steps of a few rows (see
    /// [`Decoder::set_cpu_quantized`]).
    head_q8: Option<Q8Copy>,
    activation: Activation,
    rotary_global: Rotary,
    rotary_local: Rotary,
    /// Inference steps take the kernels of `fused/` (CUDA only; see
    /// [`Decoder::set_fused_kernels`]).
    fused: bool,
    pub dtype: DType,
    pub device: Device,
}

impl Attention {
    /// `mask` is `[B, 1, T, S]`, one row per query column, broadcast over
    /// the heads. `fused` (inference on CUDA only) takes the kernels of
    /// `fused/` from the projections to the output projection.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        rope: &Rope,
        mask: &Tensor,
        kv: Kv,
        mode: Mode,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        // Norms and rotary work on `[B, T, heads, D]` as the projections
        // write it; only the attention product needs heads first.
        let qkv = [&self.q_proj, &self.k_proj, &self.v_proj];
        let [q, k, v]: [Tensor; 3] = project(x, &qkv, mode, fused)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("expected three projections".into()))?;
        if let (Mode::Train(_), Kv::None) = (mode, &kv) {
            // A training pass over its own columns: one gradient node from
            // the projections to the heads' output.
            let (cos, sin) = &*rope.tables(q.dtype())?;
            let (scale, softcap) = self.score_scaling(cfg);
            let norm = self.q_norm.as_ref().or(self.k_norm.as_ref());
            let block = grad::AttentionBlock {
                heads: (nh, nkv, hd),
                q_alpha: self.q_norm.as_ref().map(|n| &n.alpha),
                k_alpha: self.k_norm.as_ref().map(|n| &n.alpha),
                eps: norm.map_or(0.0, |n| n.eps),
                cos,
                sin,
                mask,
                scale,
                softcap,
            };
            let out = grad::attention_block(&q, &k, &v, &block)?;
            return self.o_proj.forward(&out, mode);
        }
        let q = q.reshape((b, t, nh, hd))?;
        let k = k.reshape((b, t, nkv, hd))?;
        let v = v.reshape((b, t, nkv, hd))?;
        if fused {
            let out = self.attend_fused(&q, &k, &v, cfg, rope, mask, kv)?;
            return project_one(&out, &self.o_proj, mode, fused);
        }
        let cos_sin = rope.tables(q.dtype())?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q, mode)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k, mode)?,
            None => k,
        };
        let q = apply_rotary(&q, &cos_sin.0, &cos_sin.1, mode)?.transpose(1, 2)?;
        let k = apply_rotary(&k, &cos_sin.0, &cos_sin.1, mode)?.transpose(1, 2)?;
        let v = v.transpose(1, 2)?;
        let (k, v) = match kv {
            Kv::None => (k, v),
            Kv::Growing(slot) => grow(slot, k, v)?,
            Kv::Static {
                k: ck,
                v: cv,
                columns,
                index,
            } => {
                // The columns come from a device buffer, not from an offset
                // baked into the launch, so a replayed graph writes each
                // step where that step's inputs say. Scatter needs
                // contiguous sources.
                let index = match index {
                    Some(index) => Cow::Borrowed(index),
                    None => Cow::Owned(scatter_index(columns, k.dims())?),
                };
                ck.scatter_set(&index, &k.contiguous()?, 2)?;
                cv.scatter_set(&index, &v.contiguous()?, 2)?;
                (ck.clone(), cv.clone())
            }
        };
        let out = self.attend(&q, &k, &v, cfg, mask, mode)?;
        self.o_proj.forward(&out, mode)
    }

    /// The attention core with candle's kernels: `q: [B, nh, T, D]` (heads
    /// first), `k`, `v`: `[B, nkv, S, D]`; returns `[B, T, nh·D]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
        mask: &Tensor,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        // Grouped-query attention without copying keys/values: the query
        // heads that share a kv head are stacked along the time axis,
        // `[B, nkv, rep*T, D]` (head h = j*rep + r uses kv head j, as in
        // transformers' repeat_kv).
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let (scale, softcap) = self.score_scaling(cfg);
        let out = match mode {
            Mode::Infer => {
                let probs = grad::attention_probs(&q, &k, mask, scale, softcap)?;
                probs.matmul(&v)?
            }
            Mode::Train(_) => grad::attention(&q, &k, &v, mask, scale, softcap)?,
        };
        out.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))
    }

    /// The scores' scale (`None` when the query norm carries it) and soft
    /// cap.
    fn score_scaling(&self, cfg: &ModelConfig) -> (Option<f64>, Option<f64>) {
        let scale = match &self.q_norm {
            Some(_) => None,
            None => Some(1.0 / cfg.query_pre_attn_scalar.sqrt()),
        };
        (scale, cfg.attn_logit_softcapping)
    }

    /// From the projections (`[B, T, heads, D]`) to the attention output
    /// `[B, T, nh·D]` with the fused kernels: one for the norms, rotary
    /// embedding and the key/value writes, one for the attention itself
    /// (candle's kernels when a shape is beyond it).
    #[allow(clippy::too_many_arguments)]
    fn attend_fused(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
        rope: &Rope,
        mask: &Tensor,
        kv: Kv,
    ) -> candle_core::Result<Tensor> {
        let params = QkRope {
            q_alpha: self.q_norm.as_ref().map(|n| &n.alpha),
            k_alpha: self.k_norm.as_ref().map(|n| &n.alpha),
            eps: self
                .q_norm
                .as_ref()
                .or(self.k_norm.as_ref())
                .map_or(0.0, |n| n.eps),
            positions: rope.positions,
            inv_freq: &rope.rotary.inv_freq,
        };
        let new_kv = |q_out: Tensor, kv: Option<(Tensor, Tensor)>| match kv {
            Some((k, v)) => Ok((q_out, k, v)),
            None => candle_core::bail!("the fused rotary kernel returned no keys"),
        };
        let (q, k, v) = match kv {
            Kv::Static {
                k: ck,
                v: cv,
                columns,
                ..
            } => {
                let target = KvTarget::Cache {
                    k: ck,
                    v: cv,
                    columns,
                };
                let (q, _) = fused::qk_rope(q, k, v, &params, target)?;
                (q, ck.clone(), cv.clone())
            }
            Kv::None => {
                let (q, kv) = fused::qk_rope(q, k, v, &params, KvTarget::New)?;
                new_kv(q, kv)?
            }
            Kv::Growing(slot) => {
                let (q, kv) = fused::qk_rope(q, k, v, &params, KvTarget::New)?;
                let (q, k, v) = new_kv(q, kv)?;
                let (k, v) = grow(slot, k, v)?;
                (q, k, v)
            }
        };
        let (scale, softcap) = self.score_scaling(cfg);
        match fused::attention(&q, &k, &v, mask, scale, softcap)? {
            Some(out) => Ok(out),
            None => self.attend_wide(&q, &k, &v, cfg, mask),
        }
    }

    /// Attention of a step too wide for the fused attention kernel (the
    /// prefill of a batch of messages): candle's batched matmuls for the
    /// scores and the weighted values, one fused kernel for the
    /// probabilities between them (instead of the scale, cap, mask add,
    /// casts and softmax). With one kv head (Gemma-3 270M and 1B) the
    /// queries `[B, T, nh, D]` are read in place as `[B, T·nh, D]` rows and
    /// the output comes out as `[B, T, nh·D]`: nothing is transposed.
    /// Otherwise the query heads of a kv head are stacked as [`Self::attend`]
    /// stacks them.
    fn attend_wide(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cfg: &ModelConfig,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t, nh, d) = q.dims4()?;
        let (_, nkv, s, _) = k.dims4()?;
        let (scale, softcap) = self.score_scaling(cfg);
        let rep = nh / nkv;
        // Rows of queries per matmul batch, and how a row finds its query
        // column: t = (row / div) % T.
        let (qs, ks, vs, div) = if nkv == 1 {
            let q = q.contiguous()?.reshape((b, t * nh, d))?;
            (q, k.squeeze(1)?, v.squeeze(1)?, nh)
        } else {
            let q = q
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * nkv, rep * t, d))?;
            let (k, v) = (k.contiguous()?, v.contiguous()?);
            (
                q,
                k.reshape((b * nkv, s, d))?,
                v.reshape((b * nkv, s, d))?,
                1,
            )
        };
        let scores = qs.matmul(&ks.t()?)?.reshape((b, nh * t, s))?;
        let Some(probs) = fused::masked_softmax(&scores, mask, div, scale, softcap)? else {
            return self.attend(&q.transpose(1, 2)?, k, v, cfg, mask, Mode::Infer);
        };
        let (groups, rows, _) = qs.dims3()?;
        let out = probs.reshape((groups, rows, s))?.matmul(&vs)?;
        if nkv == 1 {
            out.reshape((b, t, nh * d))
        } else {
            out.reshape((b, nh, t, d))?
                .transpose(1, 2)?
                .reshape((b, t, nh * d))
        }
    }
}

/// Cache `columns` (`[T]` u32) broadcast to a step's key shape
/// `[B, kv_heads, T, D]`, contiguous: the index `scatter_set` takes.
fn scatter_index(columns: &Tensor, key_dims: &[usize]) -> candle_core::Result<Tensor> {
    let t = columns.dim(0)?;
    columns
        .reshape((1, 1, t, 1))?
        .broadcast_as(key_dims)?
        .contiguous()
}

/// Appends a step's keys and values (`[B, nkv, T, D]`) to a growing cache
/// slot and returns the whole of it.
fn grow(
    slot: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        None => (k.contiguous()?, v.contiguous()?),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        act: Activation,
        mode: Mode,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        if fused {
            return self.forward_fused(x, act, mode);
        }
        let gate = self.gate_proj.forward(x, mode)?;
        let up = self.up_proj.forward(x, mode)?;
        let h = match mode {
            // One gradient-graph node (one kernel each way on CUDA).
            Mode::Train(_) => grad::gated(&gate, &up, act)?,
            Mode::Infer => (grad::activate(&gate, act)? * up)?,
        };
        self.down_proj.forward(&h, mode)
    }

    /// The same with the fused kernels: both input projections and the
    /// activation in one kernel for a step of few rows, else the
    /// projections and then one kernel for the activation and product.
    fn forward_fused(
        &self,
        x: &Tensor,
        act: Activation,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let weights = (
            self.gate_proj.inference_weight(),
            self.up_proj.inference_weight(),
        );
        let skinny = match weights {
            (Some(g), Some(u)) => fused::gated_matmul_t(x, g, u, act)?,
            _ => None,
        };
        let h = match skinny {
            Some(h) => h,
            None => {
                let [gate, up]: [Tensor; 2] =
                    project(x, &[&self.gate_proj, &self.up_proj], mode, true)?
                        .try_into()
                        .map_err(|_| candle_core::Error::Msg("expected two projections".into()))?;
                fused::gated(&gate, &up, act)?
            }
        };
        project_one(&h, &self.down_proj, mode, true)
    }
}

impl Decoder {
    /// Builds the decoder from Hugging Face-named weights; `vb` points at
    /// the checkpoint root (its `model.` and `lm_head.` children).
    pub fn new(cfg: &ModelConfig, vb: candle_nn::VarBuilder) -> candle_core::Result<Self> {
        let family = cfg.architecture.family();
        let dev = vb.device().clone();
        let dtype = vb.dtype();
        let m = vb.pp("model");
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let (nh, nkv, ff) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let scaled = |vb: &candle_nn::VarBuilder,
                      name: Option<&str>,
                      size: usize,
                      scale: f64|
         -> candle_core::Result<Option<RmsNorm>> {
            name.map(|n| RmsNorm::scaled(family, &vb.pp(n), size, eps, scale))
                .transpose()
        };
        let optional = |vb: &candle_nn::VarBuilder, name: Option<&str>, size: usize| {
            scaled(vb, name, size, 1.0)
        };
        let query_scale = 1.0 / cfg.query_pre_attn_scalar.sqrt();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let f = l.pp("mlp");
            layers.push(Layer {
                attn_norm: RmsNorm::new(family, &l.pp("input_layernorm"), h, eps)?,
                attn_out_norm: optional(&l, family.attn_out_norm, h)?,
                mlp_norm: RmsNorm::new(family, &l.pp(family.mlp_norm), h, eps)?,
                mlp_out_norm: optional(&l, family.mlp_out_norm, h)?,
                attn: Attention {
                    q_proj: linear(&a.pp("q_proj"), nh * hd, h)?,
                    k_proj: linear(&a.pp("k_proj"), nkv * hd, h)?,
                    v_proj: linear(&a.pp("v_proj"), nkv * hd, h)?,
                    o_proj: linear(&a.pp("o_proj"), h, nh * hd)?,
                    q_norm: scaled(&a, family.qk_norm.then_some("q_norm"), hd, query_scale)?,
                    k_norm: optional(&a, family.qk_norm.then_some("k_norm"), hd)?,
                },
                mlp: Mlp {
                    gate_proj: linear(&f.pp("gate_proj"), ff, h)?,
                    up_proj: linear(&f.pp("up_proj"), ff, h)?,
                    down_proj: linear(&f.pp("down_proj"), h, ff)?,
                },
                sliding: cfg.sliding_layers.get(i).copied().unwrap_or(false),
            });
        }
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(vb.get((cfg.vocab_size, h), "lm_head.weight")?)
        };
        let rotary_global = Rotary::new(hd, cfg.rope_theta, &cfg.rope_scaling, &dev)?;
        let rotary_local = if family.local_rope {
            Rotary::new(hd, cfg.rope_local_base_freq, &RopeScaling::None, &dev)?
        } else {
            rotary_global.clone()
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens: m.get((cfg.vocab_size, h), "embed_tokens.weight")?,
            embed_scale: family.embed_scale.then(|| (h as f64).sqrt()),
            layers,
            norm: RmsNorm::new(family, &m.pp("norm"), h, eps)?,
            lm_head,
            head_q8: None,
            activation: family.activation,
            rotary_global,
            rotary_local,
            fused: false,
            dtype,
            device: dev,
        })
    }

    /// Runs the stack over `tokens: [B, T]` (u32) and returns final-normed
    /// hidden states `[B, T, hidden]`. With a cache, new keys/values are
    /// appended to it and attention covers the cached columns too.
    pub fn forward_hidden(
        &self,
        tokens: &Tensor,
        batch: &Batch,
        mut cache: Option<&mut Cache>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if batch.rows.len() != b || batch.width() != t {
            candle_core::bail!(
                "batch positions are {}x{} but tokens are {b}x{t}",
                batch.rows.len(),
                batch.width()
            );
        }
        let dev = &self.device;
        let positions = batch.position_tensor(dev)?;
        let empty = Vec::new();
        let past = cache.as_ref().map(|c| &c.columns).unwrap_or(&empty);
        let keys = past.first().map_or(0, Vec::len) + t;
        let window = local_window(&self.cfg);
        let (mask_global, mask_local) = build_masks(past, batch, keys, window, self.dtype, dev)?;
        let masks = Masks {
            global: &mask_global,
            local: mask_local.as_ref(),
        };
        // Single-token steps repeat the same shapes every step: on CUDA,
        // reuse the kernels' uploaded dims/strides instead of copying them
        // from the host at every launch. Only small parameter vectors are
        // kept, one per shape; the step's data was uploaded above.
        let _launch_params = if t == 1 {
            crate::device::cached_launch_params(dev)
        } else {
            None
        };
        let h = match cache.as_deref_mut() {
            Some(c) => {
                c.kv.resize(self.layers.len(), None);
                let kv = c.kv.iter_mut().map(Kv::Growing);
                self.stack(tokens, &positions, &masks, kv, mode)?
            }
            None => {
                let kv = std::iter::repeat_with(|| Kv::None);
                self.stack(tokens, &positions, &masks, kv, mode)?
            }
        };
        if let Some(c) = cache {
            for (row, cols) in batch.rows.iter().enumerate() {
                if c.columns.len() <= row {
                    c.columns.push(Vec::new());
                }
                c.columns[row].extend_from_slice(cols);
            }
        }
        Ok(h)
    }

    /// One inference step over a [`StaticCache`], reading every per-step
    /// input from `inputs` (filled beforehand by [`StepInputs::fill`]);
    /// returns final-normed hidden states `[B, T, hidden]`.
    ///
    /// Built to be captured once as a CUDA graph and replayed for later
    /// steps: nothing here moves data between host and device or reads a
    /// value on the host (rotary tables come from the positions buffer, the
    /// new keys and values are scattered into the cache at the columns
    /// buffer, attention covers the whole capacity under the masks), and
    /// every shape depends only on (rows, width, capacity), so the same
    /// kernels on the same addresses serve every step. The host bookkeeping
    /// is [`StaticCache::advance`], called after each step; the capacity
    /// check is in [`StepInputs::fill`] (a replay runs neither).
    ///
    /// Numerically the same as [`Decoder::forward_hidden`] in
    /// [`Mode::Infer`] with a growing cache fed the same batches: the extra
    /// masked columns add exact zeros. On CUDA the kernels' dims/strides
    /// come from candle's parameter cache, uploaded once by an eager step
    /// of the same shapes (the warm-up before a capture).
    pub fn forward_static(
        &self,
        inputs: &StepInputs,
        cache: &StaticCache,
    ) -> candle_core::Result<Tensor> {
        let (b, t, c) = (inputs.rows(), inputs.width(), inputs.capacity());
        if cache.rows() != b || cache.capacity() != c {
            candle_core::bail!(
                "step inputs are for {b} rows and {c} columns, the static KV cache has {} and {}",
                cache.rows(),
                cache.capacity()
            );
        }
        if cache.kv().len() != self.layers.len() {
            candle_core::bail!(
                "the static KV cache has {} layers, the model {}",
                cache.kv().len(),
                self.layers.len()
            );
        }
        if inputs.mask_local().is_some() != local_window(&self.cfg).is_some() {
            candle_core::bail!("the step inputs were built for a model with other sliding layers");
        }
        let _launch_params = crate::device::cached_launch_params(&self.device);
        let (nkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        // One index serves every layer's `scatter_set`; the fused kernels
        // write at the columns themselves.
        let index = if self.fused {
            None
        } else {
            Some(scatter_index(inputs.columns(), &[b, nkv, t, hd])?)
        };
        let masks = Masks {
            global: inputs.mask_global(),
            local: inputs.mask_local(),
        };
        let kv = cache.kv().iter().map(|(k, v)| Kv::Static {
            k,
            v,
            columns: inputs.columns(),
            index: index.as_ref(),
        });
        self.stack(inputs.tokens(), inputs.positions(), &masks, kv, Mode::Infer)
    }

    /// A pass over rows, reading tokens, positions and masks from `inputs`
    /// (filled by [`StepInputs::fill_rows`]): the replayable form of
    /// [`Decoder::forward_hidden`], in either mode (a training step
    /// captured as a CUDA graph is one or two of these). With a `cache` the
    /// pass appends its keys and values to it and attends to what it held;
    /// it records no positions there (the masks come from `inputs`), so
    /// such a cache serves further `forward_rows` passes only.
    pub fn forward_rows(
        &self,
        inputs: &StepInputs,
        cache: Option<&mut Cache>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.kv_len());
        if inputs.capacity() != past + inputs.width() {
            candle_core::bail!(
                "step inputs over {} columns do not fit {past} cached and {} new ones",
                inputs.capacity(),
                inputs.width()
            );
        }
        if inputs.mask_local().is_some() != local_window(&self.cfg).is_some() {
            candle_core::bail!("the step inputs were built for a model with other sliding layers");
        }
        let masks = Masks {
            global: inputs.mask_global(),
            local: inputs.mask_local(),
        };
        let (tokens, positions) = (inputs.tokens(), inputs.positions());
        match cache {
            Some(c) => {
                c.kv.resize(self.layers.len(), None);
                let kv = c.kv.iter_mut().map(Kv::Growing);
                self.stack(tokens, positions, &masks, kv, mode)
            }
            None => {
                let kv = std::iter::repeat_with(|| Kv::None);
                self.stack(tokens, positions, &masks, kv, mode)
            }
        }
    }

    /// A [`StaticCache`] in this decoder's shapes, dtype and device.
    pub fn static_cache(&self, rows: usize, capacity: usize) -> candle_core::Result<StaticCache> {
        StaticCache::new(&self.cfg, rows, capacity, self.dtype, &self.device)
    }

    /// [`StepInputs`] in this decoder's shapes (heads, window), dtype and
    /// device.
    pub fn step_inputs(
        &self,
        rows: usize,
        width: usize,
        capacity: usize,
    ) -> candle_core::Result<StepInputs> {
        StepInputs::new(&self.cfg, rows, width, capacity, self.dtype, &self.device)
    }

    /// Whether any layer uses the sliding window (and so the local rotary
    /// tables; the local mask also needs a window: `local_window`).
    fn needs_local(&self) -> bool {
        self.layers.iter().any(|l| l.sliding)
    }

    /// The layer loop both entry points share: embeds `tokens: [B, T]`,
    /// runs every layer with its rotary tables (computed on the device from
    /// `positions`), its mask and its key/value slot from `kv` (one per
    /// layer, in order), and applies the final norm.
    fn stack<'a>(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        masks: &Masks,
        kv: impl IntoIterator<Item = Kv<'a>>,
        mode: Mode,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let fused = self.fused && matches!(mode, Mode::Infer);
        // candle's rotary kernel takes tables, computed once per pass; the
        // fused kernel computes the angles from the positions.
        let tables = if fused {
            None
        } else {
            let global = self.rotary_global.tables(positions, self.dtype)?;
            let local = if self.needs_local() {
                Some(self.rotary_local.tables(positions, self.dtype)?)
            } else {
                None
            };
            Some((global, local))
        };
        let mut h = self
            .embed_tokens
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, ()))?;
        if let Some(scale) = self.embed_scale {
            // In the compute dtype, as transformers rounds it.
            h = h.affine(scale, 0.0)?;
        }
        if let Mode::Train(_) = mode {
            // LoRA nodes record only their input (their pairs' gradients go
            // to the pass's sink), so every node must lie on a path from a
            // variable: the embedded input is made one (a copy; its own
            // gradient is computed and never read).
            h = candle_core::Var::from_tensor(&h)?.into_inner();
        }
        let layer_rope = |layer: &Layer| {
            let local = layer.sliding && self.needs_local();
            Rope {
                rotary: if local {
                    &self.rotary_local
                } else {
                    &self.rotary_global
                },
                positions,
                tables: tables
                    .as_ref()
                    .map(|(global, local_tables)| match local_tables {
                        Some(l) if local => l,
                        _ => global,
                    }),
            }
        };
        let layer_mask = |layer: &Layer| match (layer.sliding, masks.local) {
            (true, Some(m)) => m,
            _ => masks.global,
        };
        // A layer up to its MLP, from its normed input `x` and the residual
        // `h`: the residual after attention and the MLP's output (before the
        // MLP's output norm and the residual add that end the layer).
        let attention_and_mlp = |layer: &Layer, x: &Tensor, h: &Tensor, slot, fused| {
            let (rope, mask) = (layer_rope(layer), layer_mask(layer));
            let a = layer
                .attn
                .forward(x, &self.cfg, &rope, mask, slot, mode, fused)?;
            let post = layer.attn_out_norm.as_ref();
            let (h_mid, xm) = residual_norm(&a, h, post, &layer.mlp_norm, mode, fused)?;
            let m = layer.mlp.forward(&xm, self.activation, mode, fused)?;
            candle_core::Result::Ok((h_mid, m))
        };
        let mut kv = kv.into_iter().peekable();
        if let (Mode::Train(_), Some(Kv::None)) = (mode, kv.peek()) {
            // A training pass over its own columns: each layer is one node
            // of candle's gradient graph, its own nodes on a tape
            // (`grad::taped`), so candle's backward pass handles one
            // argument per layer. The same blocks as below, each layer's
            // input norm inside it.
            for layer in &self.layers {
                h = grad::taped(&h, |h| {
                    let x = layer.attn_norm.forward(h, mode)?;
                    let (h_mid, m) = attention_and_mlp(layer, &x, h, Kv::None, false)?;
                    let m = match &layer.mlp_out_norm {
                        Some(n) => n.forward(&m, mode)?,
                        None => m,
                    };
                    grad::add(&h_mid, &m)
                })?;
            }
            return self.norm.forward(&h, mode);
        }
        let Some(first) = self.layers.first() else {
            return self.norm.forward(&h, mode);
        };
        // `x` is each block's normed input; the fused kernels compute a
        // residual add together with the norm that follows it.
        let mut x = first.attn_norm.forward(&h, mode)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(slot) = kv.next() else {
                candle_core::bail!("no key/value slot for layer {i}");
            };
            let (h_mid, m) = attention_and_mlp(layer, &x, &h, slot, fused)?;
            let next = self.layers.get(i + 1).map_or(&self.norm, |l| &l.attn_norm);
            (h, x) = residual_norm(&m, &h_mid, layer.mlp_out_norm.as_ref(), next, mode, fused)?;
        }
        Ok(x)
    }

    /// Output logits (f32) for hidden states `[N, hidden]`. Hidden states
    /// that carry gradients (a training step) never take the head's Q8_0
    /// copy, which has no backward pass.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = match q8_forward(self.head_q8.as_ref(), hidden, Q8_HEAD_MAX_ROWS)? {
            Some(logits) => logits,
            None => head_matmul(hidden, self.head())?.to_dtype(DType::F32)?,
        };
        self.soft_capped(logits)
    }

    /// The output head `[vocab, hidden]`: its own weights or the tied
    /// embedding.
    fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// `logits` under the model's final soft cap, when it has one (f32
    /// logits: the cap is computed in their dtype).
    fn soft_capped(&self, logits: Tensor) -> candle_core::Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// Training's loss at answer columns: `Σ_i w_i · -log p(t_i)` for
    /// hidden states `[n, hidden]`, `targets` `[n]` u32 and `weights` `[n]`
    /// f32, a scalar f32 recorded for the backward pass. The head's logits
    /// stay in the compute dtype (never the Q8_0 copy, which has no
    /// backward) and go straight into one loss node. Without a final soft
    /// cap the head and the loss are one node of candle's graph (on a
    /// tape), so the logits' gradient, the step's largest tensor, is never
    /// added to a zeroed buffer.
    pub fn answer_loss(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if self.cfg.final_logit_softcapping.is_none() {
            return grad::taped(hidden, |h| {
                let logits = grad::frozen_matmul_t(h, self.head())?;
                grad::weighted_nll(&logits, targets, weights)
            });
        }
        let logits = head_matmul(hidden, self.head())?;
        let logits = self.soft_capped(logits.to_dtype(DType::F32)?)?;
        grad::weighted_nll(&logits, targets, weights)
    }

    /// The greedy choice in each row of f32 `logits` `[N, vocab]`: the
    /// arg-max token and, with a `token`, its probability under a softmax
    /// of the row, read back to the host. With the fused kernels on, two
    /// kernels over many blocks per row; otherwise candle's arg-max and
    /// [`token_probabilities`].
    pub fn pick(
        &self,
        logits: &Tensor,
        token: Option<u32>,
    ) -> candle_core::Result<(Vec<u32>, Option<Vec<f32>>)> {
        if self.picks_fused(logits) {
            let (argmax, prob) = fused::pick(logits, token)?;
            let prob = prob.map(|p| p.to_vec1::<f32>()).transpose()?;
            return Ok((argmax.to_vec1::<u32>()?, prob));
        }
        let prob = token.map(|t| token_probabilities(logits, t)).transpose()?;
        Ok((logits.argmax(1)?.to_vec1::<u32>()?, prob))
    }

    /// The arg-max of each row of f32 `logits` `[N, vocab]`, `[N]` u32 on
    /// the device (for a next step that reads it there), as [`Decoder::pick`]
    /// computes it.
    pub fn argmax(&self, logits: &Tensor) -> candle_core::Result<Tensor> {
        if self.picks_fused(logits) {
            return Ok(fused::pick(logits, None)?.0);
        }
        logits.argmax(1)
    }

    fn picks_fused(&self, logits: &Tensor) -> bool {
        self.fused && logits.device().is_cuda() && logits.dtype() == DType::F32
    }

    /// Logits of the last real column of every row after a cached step:
    /// `hidden: [B, T, H]`, `last[b]` the column index within this step.
    pub fn logits_at(&self, hidden: &Tensor, last: &[usize]) -> candle_core::Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let idx: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(row, &col)| (row * t + col.min(t - 1)) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, b, hidden.device())?;
        let picked = hidden.reshape((b * t, h))?.index_select(&idx, 0)?;
        self.logits(&picked)
    }

    /// Every adapted-or-adaptable projection, by module path.
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.attn.q_proj,
                &mut l.attn.k_proj,
                &mut l.attn.v_proj,
                &mut l.attn.o_proj,
                &mut l.mlp.gate_proj,
                &mut l.mlp.up_proj,
                &mut l.mlp.down_proj,
            ]
        })
    }

    /// Read-only view of [`Decoder::linears_mut`].
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|l| {
            [
                &l.attn.q_proj,
                &l.attn.k_proj,
                &l.attn.v_proj,
                &l.attn.o_proj,
                &l.mlp.gate_proj,
                &l.mlp.up_proj,
                &l.mlp.down_proj,
            ]
        })
    }

    /// Rows of the output head.
    pub fn vocab_size(&self) -> candle_core::Result<usize> {
        self.head().dim(0)
    }

    /// The token embedding `[vocab, hidden]` (frozen; the head when tied).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Back to the bare base model: every LoRA pair and merged copy dropped.
    pub fn clear_adapter(&mut self) -> candle_core::Result<()> {
        for l in self.linears_mut() {
            l.set_lora(None)?;
        }
        Ok(())
    }

    /// On the CPU, keeps Q8_0 copies of every projection and of the output
    /// head for inference steps of a few rows (`Q8_MAX_ROWS`,
    /// `Q8_HEAD_MAX_ROWS`): decode steps, short messages and each
    /// decision's head, which are memory-bound and read a quarter of the
    /// bytes in Q8_0. Longer prefills keep the f32 weights. Training never
    /// reads the copies: a projection with an unmerged (trainable) pair has
    /// none, and hidden states that carry gradients skip the head's (see
    /// `q8_forward`); the trainer loads without them anyway. A no-op on
    /// other devices. The copies follow adapter changes. Gemma's GGUF
    /// stores the head as Q8_0, so its copy holds exactly the file's values.
    pub fn set_cpu_quantized(&mut self, on: bool) -> candle_core::Result<()> {
        let on = on && self.device.is_cpu();
        for l in self.linears_mut() {
            l.set_quantized(on)?;
        }
        self.head_q8 = None;
        if on {
            self.head_q8 = q8_head_copy(self.head())?;
        }
        Ok(())
    }

    /// Whether Q8_0 copies serve CPU steps of a few rows.
    pub fn is_cpu_quantized(&self) -> bool {
        self.head_q8.is_some() || self.linears().any(Linear::is_quantized)
    }

    /// Inference steps on CUDA take the fused kernels of `fused/` (norms
    /// with the residual add, q/k norm with rotary embedding and the cache
    /// writes, attention, the gated activation) instead of candle's
    /// composed ones when `on`; returns whether they now do (never on other
    /// devices or dtypes: there the request is ignored). Training steps
    /// never take them (they record no gradients). Off when built.
    pub fn set_fused_kernels(&mut self, on: bool) -> bool {
        self.fused = on && fused::available(&self.device, self.dtype);
        self.fused
    }

    /// Whether inference steps take the fused kernels.
    pub fn fused_kernels(&self) -> bool {
        self.fused
    }

    /// Sets the dropout of every attached LoRA pair (training only uses it).
    pub fn set_lora_dropout(&mut self, p: f64) {
        for l in self.linears_mut() {
            l.set_lora_dropout(p);
        }
    }

    /// The trainable variables (A then B of every adapted module).
    pub fn lora_vars(&self) -> Vec<candle_core::Var> {
        self.linears()
            .filter_map(Linear::lora)
            .flat_map(|l| [l.a().clone(), l.b().clone()])
            .collect()
    }

    /// The LoRA pairs by module path, in layer order.
    pub fn loras(&self) -> impl Iterator<Item = (&str, &Lora)> {
        self.linears()
            .filter_map(|l| l.lora().map(|lora| (l.name(), lora)))
    }
}

/// The probability of `token` in each row of `logits` `[N, vocab]`:
/// `exp(l_token - max) / sum(exp(l - max))`, from whole-row reductions
/// (a softmax over the vocabulary costs one slow pass per row on CUDA) and
/// one read back of N values.
pub fn token_probabilities(logits: &Tensor, token: u32) -> candle_core::Result<Vec<f32>> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(1)?;
    let sum = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?;
    let picked = logits.narrow(1, token as usize, 1)?;
    let p = (picked - max)?.exp()?.div(&sum)?;
    p.squeeze(1)?.to_vec1::<f32>()
}

/// A block's output `x` added to the `residual` stream, after the block's
/// output norm when it has one (`post`, Gemma), and the `next` norm of the
/// sum; returns `(sum, next(sum))`: the new residual stream and the next
/// block's input. One kernel when `fused`.
fn residual_norm(
    x: &Tensor,
    residual: &Tensor,
    post: Option<&RmsNorm>,
    next: &RmsNorm,
    mode: Mode,
    fused: bool,
) -> candle_core::Result<(Tensor, Tensor)> {
    if fused {
        let post = post.map(|n| (&n.alpha, n.eps));
        return fused::add_rms_norm(x, residual, post, (&next.alpha, next.eps));
    }
    let x = match post {
        Some(n) => n.forward(x, mode)?,
        None => x.clone(),
    };
    let h = match mode {
        Mode::Train(_) => grad::add(residual, &x)?,
        Mode::Infer => (residual + x)?,
    };
    let y = next.forward(&h, mode)?;
    Ok((h, y))
}

/// `hidden · headᵀ` in the weights' dtype. On the CPU a single row is a
/// matrix-vector product, which candle's gemm runs on one thread: the
/// vocabulary is split over the CPU threads instead (the tied 262k x 640
/// f32 head: 70 -> 35 ms on two cores). Everything else goes through
/// [`grad::frozen_matmul_t`] unchanged.
fn head_matmul(hidden: &Tensor, head: &Tensor) -> candle_core::Result<Tensor> {
    let threads = candle_core::utils::get_num_threads();
    let (vocab, features) = head.dims2()?;
    let single_row = hidden.elem_count() == features;
    if !hidden.device().is_cpu() || !single_row || threads < 2 || vocab * features < (1 << 22) {
        return grad::frozen_matmul_t(hidden, head);
    }
    let chunk = vocab.div_ceil(threads);
    let parts =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (chunk..vocab)
                .step_by(chunk)
                .map(|start| {
                    let len = chunk.min(vocab - start);
                    scope.spawn(move || grad::frozen_matmul_t(hidden, &head.narrow(0, start, len)?))
                })
                .collect();
            let mut parts = vec![grad::frozen_matmul_t(hidden, &head.narrow(0, 0, chunk)?)?];
            for worker in workers {
                parts.push(worker.join().map_err(|_| {
                    candle_core::Error::Msg("a head matmul thread panicked".into())
                })??);
            }
            Ok::<_, candle_core::Error>(parts)
        })?;
    Tensor::cat(&parts, candle_core::D::Minus1)
}
