//! Training's fused graph nodes: a forward computed by candle's fused
//! kernels on detached inputs, recorded as one node of the gradient graph
//! with a backward written out by hand.
//!
//! candle records every composed op as a node, and its backward pass costs
//! several kernels per node: the gradient itself, and for every argument a
//! zeroed buffer and an add (with their allocations). A training step of
//! Gemma-3-270M's structure with LoRA on every projection had ~3,600 nodes
//! and well over 10,000 backward kernels, and on a GPU, where each kernel
//! costs its launch (a few µs even replayed from a CUDA graph), that
//! overhead was most of the step. Each function here replaces a chain of
//! composed ops by one node, and the nodes take as few arguments as the
//! structure allows:
//! - [`lora_linear`]: a projection with its LoRA pair, one argument (the
//!   pair's gradients go to the pass's [`GradSink`], not through candle's
//!   graph);
//! - [`attention_block`]: from the q/k/v projections to the heads' output
//!   (query/key norms, rotary embedding, transposes, attention);
//! - [`rms_norm`] (one kernel backward on CUDA), [`gated`] (the MLP's
//!   activation and product) and [`weighted_nll`] (the loss over the
//!   head's logits, one kernel each way on CUDA).
//!
//! The forward kernels are the ones inference runs, so training and
//! inference compute the same thing; the unit tests check every node's
//! output and gradients against the composed ops it replaces.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::family::Activation;
use super::fused;

/// A node's backward: from the gradient of its output to the gradients of
/// its (up to three) arguments, `None` where an argument needs none.
type Backward =
    Box<dyn Fn(&Tensor) -> candle_core::Result<[Option<Tensor>; 3]> + Send + Sync + 'static>;

/// A recorded node: its output, already computed, and its backward.
struct Node {
    name: &'static str,
    out: Tensor,
    backward: Backward,
}

/// Records `out`, computed from detached copies of `args`, as one node over
/// `args` whose backward is `backward`: on the current [`Tape`] while one is
/// open on this thread, else in candle's gradient graph. Returns `out`
/// itself when no argument records gradients (inference, or frozen inputs)
/// and no tape is open.
fn record(
    name: &'static str,
    args: &[&Tensor],
    out: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<[Option<Tensor>; 3]> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if let Some(tape) = Tape::current() {
        return tape.push(args, out, Box::new(backward));
    }
    if !args.iter().any(|a| a.track_op()) {
        return Ok(out);
    }
    // The node's forward hands over a copy of `out`'s buffer, which must
    // then be exactly `out`'s elements in order.
    let out = if out.is_contiguous() && out.layout().start_offset() == 0 {
        out
    } else {
        out.force_contiguous()?
    };
    let node = Node {
        name,
        out,
        backward: Box::new(backward),
    };
    match args {
        [a] => a.apply_op1(node),
        [a, b] => a.apply_op2(b, node),
        [a, b, c] => a.apply_op3(b, c, node),
        _ => candle_core::bail!("{name}: a node takes one to three arguments"),
    }
}

/// The nodes of one block of a training pass (a decoder layer), recorded
/// here instead of in candle's gradient graph, and the block as one node of
/// that graph ([`taped`]).
///
/// candle's backward pass gives every argument of every node a zeroed
/// buffer and an add, whatever the argument (an activation-sized memset
/// and add each): about twenty per layer, a sixth of a Gemma-3-270M
/// step's kernel time on an H200. A tape's backward walks its nodes in
/// reverse and keeps each gradient as its node returned it, adding only
/// where two nodes read the same tensor.
///
/// Every op inside a taped block must be one of this module's nodes: an op
/// of candle's on the block's (detached) tensors would record nothing, and
/// the gradient through it would be lost. The decoder's training blocks
/// are built from these nodes only (`tests/tiny_model.rs` checks their
/// gradients against finite differences).
#[derive(Default)]
pub(crate) struct Tape {
    entries: std::sync::Mutex<Vec<TapeEntry>>,
}

struct TapeEntry {
    out: candle_core::TensorId,
    args: Vec<candle_core::TensorId>,
    backward: Backward,
}

thread_local! {
    static CURRENT_TAPE: std::cell::RefCell<Option<std::sync::Arc<Tape>>> =
        const { std::cell::RefCell::new(None) };
}

impl Tape {
    fn current() -> Option<std::sync::Arc<Tape>> {
        CURRENT_TAPE.with(|t| t.borrow().clone())
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Vec<TapeEntry>>> {
        locked(&self.entries, "a gradient tape")
    }

    fn push(
        &self,
        args: &[&Tensor],
        out: Tensor,
        backward: Backward,
    ) -> candle_core::Result<Tensor> {
        self.lock()?.push(TapeEntry {
            out: out.id(),
            args: args.iter().map(|a| a.id()).collect(),
            backward,
        });
        Ok(out)
    }

    /// The gradient reaching `input` (the tensor the tape's nodes start
    /// from) from `grad`, the gradient of the tape's output `out`.
    fn backward(
        &self,
        input: candle_core::TensorId,
        out: candle_core::TensorId,
        grad: Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let entries = self.lock()?;
        let mut grads = std::collections::HashMap::new();
        grads.insert(out, grad);
        for entry in entries.iter().rev() {
            let Some(g) = grads.remove(&entry.out) else {
                continue;
            };
            let arg_grads = (entry.backward)(&g)?;
            for (id, ga) in entry.args.iter().zip(arg_grads) {
                let Some(ga) = ga else { continue };
                let sum = match grads.remove(id) {
                    Some(held) => plus(&held, &ga)?,
                    None => ga,
                };
                grads.insert(*id, sum);
            }
        }
        Ok(grads.remove(&input))
    }
}

/// `mutex` locked, or an error naming `what` when a thread panicked while
/// holding it.
fn locked<'a, T>(
    mutex: &'a std::sync::Mutex<T>,
    what: &str,
) -> candle_core::Result<std::sync::MutexGuard<'a, T>> {
    mutex
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{what} was poisoned")))
}

/// `f(x)` with every node `f` records kept on its own [`Tape`], recorded
/// as one node over `x` in candle's graph (or on the enclosing tape): a
/// whole decoder layer costs candle's backward pass one argument.
pub(crate) fn taped(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let tape = std::sync::Arc::new(Tape::default());
    let input = x.detach();
    let outer = CURRENT_TAPE.with(|t| t.replace(Some(tape.clone())));
    let out = f(&input);
    CURRENT_TAPE.with(|t| *t.borrow_mut() = outer);
    let out = out?;
    let (input_id, out_id) = (input.id(), out.id());
    record("taped", &[x], out, move |g| {
        Ok([tape.backward(input_id, out_id, g.clone())?, None, None])
    })
}

/// `a + b` (same shapes), one node.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let out = plus(&a.detach(), &b.detach())?;
    record("add", &[a, b], out, |g| {
        Ok([Some(g.clone()), Some(g.clone()), None])
    })
}

/// `x Wᵀ` for a frozen `W` (`[out, in]`, never a training variable) and
/// `x` of any leading shape: the backward pass returns only the input's
/// gradient, `g W`. candle's matmul backward computes both operands'
/// gradients, which for a frozen weight is a whole extra matrix product per
/// projection and step, and for the tied 262k-row output head a gradient
/// buffer the size of the embedding.
///
/// On an open [`Tape`] the product is recorded there like every node of
/// the taped block; elsewhere it is a custom op of candle's graph, which
/// computes its output in place (a recorded node hands candle a copy, and
/// the head's output is the step's largest tensor).
pub(crate) fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&features, leading)) = dims.split_last() else {
        candle_core::bail!("a projection needs an input of rank >= 1");
    };
    let rows = leading.iter().product::<usize>();
    let mut out_dims = leading.to_vec();
    out_dims.push(w.dim(0)?);
    if Tape::current().is_none() {
        return x
            .reshape((rows, features))?
            .apply_op2(&w.contiguous()?, FrozenMatmulT)?
            .reshape(out_dims);
    }
    let w = w.clone();
    let out = x.detach().reshape((rows, features))?.matmul(&w.t()?)?;
    record("frozen-matmul-t", &[x], out.reshape(out_dims)?, move |g| {
        let g2 = g.reshape((rows, w.dim(0)?))?;
        Ok([Some(g2.matmul(&w)?.reshape(dims.as_slice())?), None, None])
    })
}

struct FrozenMatmulT;

impl FrozenMatmulT {
    /// `(m, k, n)` and the layout of `Wᵀ` for `x: [m, k]`, `w: [n, k]`.
    fn shapes(x: &Layout, w: &Layout) -> candle_core::Result<((usize, usize, usize), Layout)> {
        let (&[m, k], &[n, wk]) = (x.dims(), w.dims()) else {
            candle_core::bail!("frozen matmul: expected 2-D operands, got {x:?} and {w:?}");
        };
        if k != wk {
            candle_core::bail!("frozen matmul: input has {k} features, the weight {wk}");
        }
        Ok(((m, k, n), w.transpose(0, 1)?))
    }
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, k, n), wt) = Self::shapes(xl, wl)?;
        Ok((x.matmul(w, (1, m, n, k), xl, &wt)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let ((m, k, n), wt) = Self::shapes(xl, wl)?;
        Ok((x.matmul(w, (1, m, n, k), xl, &wt)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// Gradients of training variables that a node's backward hands over
/// directly instead of through candle's gradient graph.
///
/// candle's backward pass gives every argument of every node a zeroed
/// buffer and adds the node's gradient into it: for the 252 LoRA matrices
/// of a Gemma-3-270M step that is 252 memsets, 252 adds and their
/// allocations, a tenth of a captured step's graph. A LoRA node instead
/// records only its input as an argument and puts its pair's gradients
/// here; [`GradSink::drain_into`] moves them into the pass's `GradStore`.
#[derive(Debug, Default)]
pub(crate) struct GradSink {
    grads: std::sync::Mutex<Vec<(Tensor, Tensor)>>,
}

impl GradSink {
    /// Adds `grad` to the gradient held for `var` (a training variable's
    /// tensor), or holds it.
    fn put(&self, var: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        let mut grads = locked(&self.grads, "a gradient sink")?;
        match grads.iter_mut().find(|(v, _)| v.id() == var.id()) {
            Some((_, held)) => *held = (&*held + grad)?,
            None => grads.push((var.clone(), grad)),
        }
        Ok(())
    }

    /// Moves every held gradient into `store`, added to what it holds for
    /// the same variable.
    pub(crate) fn drain_into(
        &self,
        store: &mut candle_core::backprop::GradStore,
    ) -> candle_core::Result<()> {
        let held = std::mem::take(&mut *locked(&self.grads, "a gradient sink")?);
        for (var, grad) in held {
            let grad = match store.remove(&var) {
                Some(other) => (other + grad)?,
                None => grad,
            };
            store.insert(&var, grad);
        }
        Ok(())
    }
}

impl Node {
    fn cpu_out(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, _) = self.out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(s) => Ok((s.clone(), self.out.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the CPU", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_out(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.out.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(layout)?, self.out.shape().clone())),
            _ => candle_core::bail!("{}: output is not on a CUDA device", self.name),
        }
    }
}

impl CustomOp1 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let [a, _, _] = (self.backward)(grad)?;
        Ok(a)
    }
}

impl CustomOp2 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [a, b, _] = (self.backward)(grad)?;
        Ok((a, b))
    }
}

impl CustomOp3 for Node {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_out()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_out()
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [a, b, c] = (self.backward)(grad)?;
        Ok((a, b, c))
    }
}

/// `a + b` (same shapes, contiguous as a rule) without recording
/// anything: eight elements per thread on CUDA, candle's add elsewhere.
fn plus(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fused::available(a.device(), a.dtype()) {
        if let Some(sum) = fused::add(a, b)? {
            return Ok(sum);
        }
    }
    a + b
}

/// `x` viewed as `dims = [A, X, Y, D]` with axes 1 and 2 swapped,
/// contiguous (the heads' transposes around attention): one copy kernel
/// on CUDA, candle's strided copy elsewhere.
fn swap12(x: &Tensor, dims: (usize, usize, usize, usize)) -> candle_core::Result<Tensor> {
    let x = x.reshape(dims)?;
    if fused::available(x.device(), x.dtype()) {
        if let Some(out) = fused::swap_axes12(&x)? {
            return Ok(out);
        }
    }
    x.transpose(1, 2)?.contiguous()
}

/// `rms_norm(x) · alpha` over the last axis (f32 inside), unrecorded:
/// candle's kernel, or on CUDA the one that gives a row more threads.
fn norm_rows(x: &Tensor, alpha: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused::available(x.device(), x.dtype()) {
        return fused::rms_norm(x, alpha, eps);
    }
    candle_nn::ops::rms_norm(x, alpha, eps as f32)
}

/// `rms_norm(x) · alpha` over the last axis (f32 inside whatever `x`'s
/// dtype, as candle's kernel computes it), `alpha` frozen.
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let xs = x.detach().contiguous()?;
    let out = norm_rows(&xs, alpha, eps)?;
    let alpha = alpha.clone();
    record("rms-norm", &[x], out, move |g| {
        Ok([Some(rms_norm_backward(&xs, g, &alpha, eps)?), None, None])
    })
}

/// The gradient reaching `x` through `rms_norm(x) · alpha` for the
/// incoming `g`: one kernel on CUDA, else written out in f32. With
/// `y = a·x·r` and `r = (mean(x²) + eps)^-½`,
/// `dx = r·(g·a) - x·r³·mean(g·a·x)`.
fn rms_norm_backward(
    x: &Tensor,
    g: &Tensor,
    alpha: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if fused::available(x.device(), x.dtype()) {
        return fused::rms_norm_grad(x, g, alpha, eps);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let ga = g
        .to_dtype(DType::F32)?
        .broadcast_mul(&alpha.to_dtype(DType::F32)?)?;
    let r = x32
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    let dot = (&ga * &x32)?.mean_keepdim(D::Minus1)?;
    let c = (r.powf(3.0)? * dot)?;
    let dx = (ga.broadcast_mul(&r)? - x32.broadcast_mul(&c)?)?;
    dx.to_dtype(x.dtype())
}

/// Rotary embedding of `x: [B, T, H, D]` (non-interleaved halves) with
/// `cos`/`sin` `[B, T, D/2]`, through candle's fused kernel. A rotation's
/// transpose is the rotation by the opposite angle, so the backward is the
/// same kernel with `-sin`.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let out = candle_nn::rotary_emb::rope_thd(&x.detach().contiguous()?, cos, sin)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    record("rope", &[x], out, move |g| {
        let dx = candle_nn::rotary_emb::rope_thd(&g.contiguous()?, &cos, &sin.neg()?)?;
        Ok([Some(dx), None, None])
    })
}

/// The attention core for grouped queries:
/// `softmax(softcap(q kᵀ · scale) + mask) v` with `q: [B, nkv, R·T, D]`
/// (the `R` query heads of each kv head stacked along time), `k`, `v`:
/// `[B, nkv, S, D]`, `mask: [B, 1, T, S]` broadcast over the heads, and
/// `softcap(s) = cap · tanh(s / cap)` when a cap is given. Softmax in f32,
/// products in the inputs' dtype.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let qs = q.detach().contiguous()?;
    let (ks, vs) = (k.detach().contiguous()?, v.detach().contiguous()?);
    let kernels = fused::available(q.device(), q.dtype());
    let probs = Probs::new(&qs, &ks, mask, scale, softcap, kernels)?;
    let out = probs.p.matmul(&vs)?;
    record("attention", &[q, k, v], out, move |g| {
        let (dq, dk, dv) = probs.backward(&qs, &ks, &vs, g, scale)?;
        Ok([Some(dq), Some(dk), Some(dv)])
    })
}

/// What [`attention_block`] applies between the projections and the
/// attention product.
pub(crate) struct AttentionBlock<'a> {
    /// `(query heads, kv heads, head dim)`.
    pub heads: (usize, usize, usize),
    /// The query and key norms' multipliers, when the model has them, and
    /// their epsilon.
    pub q_alpha: Option<&'a Tensor>,
    pub k_alpha: Option<&'a Tensor>,
    pub eps: f64,
    /// Rotary tables `[B, T, D/2]`.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// `[B, 1, T, T]`, additive.
    pub mask: &'a Tensor,
    pub scale: Option<f64>,
    pub softcap: Option<f64>,
}

/// A training pass's self-attention over its own columns, from the
/// projections `q: [B, T, nh·D]`, `k`, `v`: `[B, T, nkv·D]` to the heads'
/// output `[B, T, nh·D]`: the query and key norms, rotary embedding, the
/// heads' transposes and [`attention`], one node.
///
/// Composed, these are some twenty nodes per layer, and candle's backward
/// pass gives every node's input its own zeroed gradient buffer and an add
/// (two kernels each, over activation-sized tensors). Here the reshapes
/// and transposes are plain copies inside one backward.
pub(crate) fn attention_block(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &AttentionBlock,
) -> candle_core::Result<Tensor> {
    let (nh, nkv, hd) = p.heads;
    let (b, t, _) = q.dims3()?;
    let rep = nh / nkv.max(1);
    // `[B, T, n, D]` -> `[B, n, T, D]`.
    let heads_first = move |x: Tensor, n: usize| swap12(&x, (b, t, n, hd));
    let normed = |x: &Tensor, alpha: Option<&Tensor>| match alpha {
        Some(a) => norm_rows(x, a, p.eps),
        None => Ok(x.clone()),
    };
    let (q_in, k_in) = (
        q.detach().reshape((b, t, nh, hd))?.contiguous()?,
        k.detach().reshape((b, t, nkv, hd))?.contiguous()?,
    );
    let qr = candle_nn::rotary_emb::rope_thd(&normed(&q_in, p.q_alpha)?, p.cos, p.sin)?;
    let kr = candle_nn::rotary_emb::rope_thd(&normed(&k_in, p.k_alpha)?, p.cos, p.sin)?;
    // Grouped queries stacked along time, `[B, nkv, R·T, D]`, as in
    // [`attention`].
    let qh = heads_first(qr, nh)?.reshape((b, nkv, rep * t, hd))?;
    let kh = heads_first(kr, nkv)?;
    let vh = heads_first(v.detach(), nkv)?;
    let kernels = fused::available(q.device(), q.dtype());
    let probs = Probs::new(&qh, &kh, p.mask, p.scale, p.softcap, kernels)?;
    let out = swap12(&probs.p.matmul(&vh)?, (b, nh, t, hd))?.reshape((b, t, nh * hd))?;
    let (cos, sin, scale, eps) = (p.cos.clone(), p.sin.clone(), p.scale, p.eps);
    let (q_alpha, k_alpha) = (p.q_alpha.cloned(), p.k_alpha.cloned());
    record("attention-block", &[q, k, v], out, move |g| {
        let g = heads_first(g.clone(), nh)?.reshape((b, nkv, rep * t, hd))?;
        let (dq, dk, dv) = probs.backward(&qh, &kh, &vh, &g, scale)?;
        // Back to `[B, T, n, D]`, through the rotation (its transpose is
        // the rotation by the opposite angle) and the norm.
        let neg_sin = sin.neg()?;
        let back = |d: Tensor, n: usize, x: &Tensor, alpha: &Option<Tensor>| {
            let d = swap12(&d, (b, n, t, hd))?;
            let d = candle_nn::rotary_emb::rope_thd(&d, &cos, &neg_sin)?;
            let d = match alpha {
                Some(a) => rms_norm_backward(x, &d, a, eps)?,
                None => d,
            };
            d.reshape((b, t, n * hd))
        };
        let dq = back(dq, nh, &q_in, &q_alpha)?;
        let dk = back(dk, nkv, &k_in, &k_alpha)?;
        let dv = swap12(&dv, (b, nkv, t, hd))?.reshape((b, t, nkv * hd))?;
        Ok([Some(dq), Some(dk), Some(dv)])
    })
}

/// Attention probabilities, `[B, nkv, R·T, S]`, as [`attention`] computes
/// them, in `q`'s dtype (what inference multiplies by the values), from
/// candle's ops: inference's path without the fused kernels (with them it
/// takes `fused::masked_softmax`), the reference its tests compare with.
pub(crate) fn attention_probs(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    Ok(Probs::new(q, k, mask, scale, softcap, false)?.p)
}

/// What the attention backward keeps of the forward.
struct Probs {
    /// In f32, as the softmax computed them.
    p32: Tensor,
    /// In the inputs' dtype.
    p: Tensor,
    /// `tanh(scores / cap)` in f32 when the scores were capped.
    tanh: Option<Tensor>,
}

impl Probs {
    /// The probabilities of `q kᵀ` under the scale, cap and mask; with
    /// `kernels` (training on CUDA) from one kernel, else from candle's ops.
    fn new(
        q: &Tensor,
        k: &Tensor,
        mask: &Tensor,
        scale: Option<f64>,
        softcap: Option<f64>,
        kernels: bool,
    ) -> candle_core::Result<Self> {
        let (b, nkv, rt, _) = q.dims4()?;
        let (_, _, t, s) = mask.dims4()?;
        let scores = q.contiguous()?.matmul(&k.t()?)?;
        if kernels && mask.dtype() == q.dtype() {
            let rows = scores.reshape((b, nkv * rt, s))?;
            if let Some((p32, p, tanh)) = fused::softmax_probs(&rows, mask, scale, softcap)? {
                let dims = (b, nkv, rt, s);
                return Ok(Self {
                    p32: p32.reshape(dims)?,
                    p: p.reshape(dims)?,
                    tanh: tanh.map(|t| t.reshape(dims)).transpose()?,
                });
            }
        }
        let scores = match scale {
            Some(sc) => scores.affine(sc, 0.0)?,
            None => scores,
        };
        let (scores, tanh) = match softcap {
            Some(cap) => {
                let th = scores
                    .to_dtype(DType::F32)?
                    .affine(1.0 / cap, 0.0)?
                    .tanh()?;
                (th.affine(cap, 0.0)?.to_dtype(scores.dtype())?, Some(th))
            }
            None => (scores, None),
        };
        // The mask broadcasts over the kv heads and the stacked query heads
        // (a view of the scores as `[B, nkv, R, T, S]`).
        let scores = scores
            .reshape((b, nkv, rt / t, t, s))?
            .broadcast_add(&mask.unsqueeze(2)?)?
            .reshape((b, nkv, rt, s))?
            .to_dtype(DType::F32)?;
        let p32 = candle_nn::ops::softmax_last_dim(&scores)?;
        let p = p32.to_dtype(q.dtype())?;
        Ok(Self { p32, p, tanh })
    }

    /// The gradients of `p · v` for the incoming `g` (`[B, nkv, R·T, D]`)
    /// with respect to the `q`, `k` and `v` the probabilities came from
    /// (contiguous, as they were computed).
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
        scale: Option<f64>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let g = g.contiguous()?;
        let dv = self.p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        if fused::available(dp.device(), dp.dtype()) {
            let ds = fused::softmax_probs_grad(&dp, &self.p32, self.tanh.as_ref(), scale)?;
            return Ok((ds.matmul(k)?, ds.t()?.matmul(q)?, dv));
        }
        let dp = dp.to_dtype(DType::F32)?;
        // Softmax backward: p · (dp - Σ dp·p), row by row; the mask's
        // columns get exact zeros (their p is 0).
        let p32 = &self.p32;
        let dot = (&dp * p32)?.sum_keepdim(D::Minus1)?;
        let ds = (dp.broadcast_sub(&dot)? * p32)?;
        // Through the cap: d(cap·tanh(s/cap))/ds = 1 - tanh².
        let ds = match &self.tanh {
            Some(th) => (ds * th.sqr()?.affine(-1.0, 1.0)?)?,
            None => ds,
        };
        let ds = ds.to_dtype(q.dtype())?;
        let ds = match scale {
            Some(s) => ds.affine(s, 0.0)?,
            None => ds,
        };
        Ok((ds.matmul(k)?, ds.t()?.matmul(q)?, dv))
    }
}

/// `x Wᵀ + scaling · (dropout(x) Aᵀ) Bᵀ`: a frozen projection `W: [out, in]`
/// plus its LoRA pair `A: [r, in]`, `B: [out, r]` (f32 variables), for `x`
/// of any leading shape. `keep` is the dropout mask already scaled by
/// `1 / (1 - p)` (`[rows, in]`, f32), `None` without dropout. The adapter's
/// term is computed in f32 and added in `x`'s dtype.
///
/// The node's one argument is `x`: with a `sink`, its backward puts the
/// pair's gradients there (candle's graph never sees `A` and `B`, see
/// [`GradSink`]); without one nothing is recorded for them. A pass that
/// trains must make `x` record gradients (the decoder makes its embedded
/// input a variable), or the node is not part of the graph at all.
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
    keep: Option<Tensor>,
    sink: Option<&std::sync::Arc<GradSink>>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&features, leading)) = dims.split_last() else {
        candle_core::bail!("lora_linear needs an input of rank >= 1");
    };
    let rows = leading.iter().product::<usize>();
    let (w, a_s, b_s) = (w.clone(), a.detach(), b.detach());
    let x2 = x.detach().reshape((rows, features))?;
    let base = x2.matmul(&w.t()?)?;
    // On CUDA one kernel casts the input and applies the dropout mask (and,
    // backward, casts and scales the incoming gradient), and one scales,
    // rounds and adds the adapter's term (backward: masks, rounds and adds
    // its input gradient).
    let fused_add = fused::available(x.device(), x.dtype());
    let xd = if fused_add {
        fused::cast_scaled(&x2, keep.as_ref(), 1.0)?
    } else {
        let xd = x2.to_dtype(DType::F32)?;
        match &keep {
            Some(k) => (xd * k)?,
            None => xd,
        }
    };
    let h = xd.matmul(&a_s.t()?)?;
    let mut out_dims = leading.to_vec();
    out_dims.push(w.dim(0)?);
    let delta = h.matmul(&b_s.t()?)?;
    let out = if fused_add {
        fused::add_rounded(&base, &delta, None, scaling)?
    } else {
        (base + delta.affine(scaling, 0.0)?.to_dtype(x.dtype())?)?
    }
    .reshape(out_dims)?;
    let Some(sink) = sink.cloned() else {
        return Ok(out);
    };
    let (a, b) = (a.clone(), b.clone());
    let dtype = x.dtype();
    record("lora-linear", &[x], out, move |g| {
        let g2 = g.reshape((rows, w.dim(0)?))?;
        // The gradient reaching h: scaling · g B; B's: scaling · gᵀ h;
        // A's: (g B)ᵀ xd.
        let (gh, db) = if fused_add {
            let gs = fused::cast_scaled(&g2, None, scaling)?;
            (gs.matmul(&b_s)?, gs.t()?.matmul(&h)?)
        } else {
            let g32 = g2.to_dtype(DType::F32)?;
            (
                g32.matmul(&b_s)?.affine(scaling, 0.0)?,
                g32.t()?.matmul(&h)?.affine(scaling, 0.0)?,
            )
        };
        sink.put(&a, gh.t()?.matmul(&xd)?)?;
        sink.put(&b, db)?;
        let through_lora = gh.matmul(&a_s)?;
        let dx = if fused_add {
            fused::add_rounded(&g2.matmul(&w)?, &through_lora, keep.as_ref(), 1.0)?
        } else {
            let through_lora = match &keep {
                Some(k) => (through_lora * k)?,
                None => through_lora,
            };
            (g2.matmul(&w)? + through_lora.to_dtype(dtype)?)?
        };
        Ok([Some(dx.reshape(dims.as_slice())?), None, None])
    })
}

/// The gated MLP's `act(gate) · up`, one node: on CUDA one kernel forward
/// (inference's) and one backward, where candle's GELU backward alone is
/// about fifteen kernels over `[rows, intermediate]`. Elsewhere candle's
/// activation and product forward, and the derivative written out in f32
/// backward.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    let (gate_d, up_d) = (gate.detach(), up.detach());
    let fused = fused::available(gate.device(), gate.dtype());
    let out = if fused {
        fused::gated(&gate_d, &up_d, act)?
    } else {
        (activate(&gate_d, act)? * &up_d)?
    };
    record("gated", &[gate, up], out, move |g| {
        let (d_gate, d_up) = if fused {
            fused::gated_grad(&gate_d, &up_d, g, act)?
        } else {
            let dtype = gate_d.dtype();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let (x, u, g32) = (f32(&gate_d)?, f32(&up_d)?, f32(g)?);
            let slope = match act {
                Activation::GeluTanh => {
                    let k = (2.0 / std::f64::consts::PI).sqrt();
                    let t = ((&x + x.powf(3.0)?.affine(0.044715, 0.0)?)? * k)?.tanh()?;
                    let left = t.affine(0.5, 0.5)?;
                    let dt =
                        (t.sqr()?.affine(-1.0, 1.0)? * (x.sqr()?.affine(3.0 * 0.044715 * k, k))?)?;
                    (left + (&x * dt)?.affine(0.5, 0.0)?)?
                }
                Activation::Silu => {
                    let sig = candle_nn::ops::sigmoid(&x)?;
                    (&sig * (&x * sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?
                }
            };
            let d_gate = (&g32 * &u)?.mul(&slope)?.to_dtype(dtype)?;
            let d_up = (&g32 * f32(&activate(&gate_d, act)?)?)?.to_dtype(dtype)?;
            (d_gate, d_up)
        };
        Ok([Some(d_gate), Some(d_up), None])
    })
}

/// `act(x)` as inference computes it without the fused kernels.
pub(crate) fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::GeluTanh => x.gelu(),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

/// Training's loss: `Σ_i w_i · -log softmax(logits_i)[t_i]` over the
/// head's `logits` `[n, vocab]` (any float dtype; f32 arithmetic), with
/// `targets` `[n]` u32 and `weights` `[n]` f32 (say `1 / norm`, 0 for a
/// padded slot); a scalar f32.
///
/// On CUDA one kernel computes each row's log-sum-exp and loss in one pass
/// over the logits, and one kernel their gradient, `w · (softmax - onehot)`
/// in the logits' dtype: candle's composed log-softmax, gather and their
/// backward were about twenty passes over the `[n, 262k]` logits, a fifth of
/// a training step's GPU time for Gemma-3-270M.
pub(crate) fn weighted_nll(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<Tensor> {
    let detached = logits.detach();
    let (targets, weights) = (targets.detach(), weights.detach());
    let fused = fused::available(logits.device(), logits.dtype());
    let (rows, lse) = if fused {
        fused::nll_rows(&detached, &targets, &weights)?
    } else {
        let x = detached.to_dtype(DType::F32)?;
        let lse = x.log_sum_exp(D::Minus1)?;
        let picked = x.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
        ((&lse - picked)?.mul(&weights)?, lse)
    };
    let loss = rows.sum_all()?;
    let dtype = logits.dtype();
    record("weighted-nll", &[logits], loss, move |g| {
        let grad = if fused {
            fused::nll_grad(&detached, &targets, &weights, &lse, g)?
        } else {
            let x = detached.to_dtype(DType::F32)?;
            let p = x.broadcast_sub(&lse.unsqueeze(1)?)?.exp()?;
            let vocab = x.dim(1)? as u32;
            let onehot = Tensor::arange(0u32, vocab, x.device())?
                .unsqueeze(0)?
                .broadcast_eq(&targets.unsqueeze(1)?)?
                .to_dtype(DType::F32)?;
            let scale = weights.broadcast_mul(g)?.unsqueeze(1)?;
            (p - onehot)?.broadcast_mul(&scale)?.to_dtype(dtype)?
        };
        Ok([Some(grad), None, None])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff, uniform};
    use candle_core::{Device, Var};

    fn randn(seed: u64, dims: &[usize]) -> Tensor {
        uniform(seed, dims, 1.0)
    }

    /// Runs `f` over fresh variables made of `inputs` and returns its output
    /// and each input's gradient of `sum(out · probe)`, taking what `sink`
    /// (which `f` may fill) holds too.
    fn value_and_grads(
        inputs: &[Tensor],
        probe: &Tensor,
        sink: Option<&GradSink>,
        f: impl Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let loss = (&out * probe).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        if let Some(sink) = sink {
            sink.drain_into(&mut grads).unwrap();
        }
        let g = vars
            .iter()
            .map(|v| grads.get(v).expect("a gradient for every input").clone())
            .collect();
        (out, g)
    }

    /// The fused node and the composed ops agree on the output and on every
    /// input's gradient.
    fn assert_same(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        assert_same_with_sink(inputs, None, fused, composed)
    }

    /// [`assert_same`] for a node that puts gradients in `sink`.
    fn assert_same_with_sink(
        inputs: &[Tensor],
        sink: Option<&GradSink>,
        fused: impl Fn(&[Tensor]) -> Tensor,
        composed: impl Fn(&[Tensor]) -> Tensor,
    ) {
        let shape = composed(inputs).dims().to_vec();
        let probe = randn(99, &shape);
        let (a, ga) = value_and_grads(inputs, &probe, sink, fused);
        let (b, gb) = value_and_grads(inputs, &probe, None, composed);
        assert!(
            max_diff(&a, &b) < 1e-5,
            "outputs differ by {}",
            max_diff(&a, &b)
        );
        for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
            let d = max_diff(x, y);
            assert!(d < 1e-4, "input {i}: gradients differ by {d}");
        }
    }

    #[test]
    fn rms_norm_matches_the_composed_norm() {
        let alpha = randn(2, &[8]);
        assert_same(
            &[randn(1, &[2, 3, 8])],
            |t| rms_norm(&t[0], &alpha, 1e-6).unwrap(),
            |t| composed_norm(&t[0], &alpha),
        );
    }

    #[test]
    fn rope_matches_the_composed_rotation() {
        let angles = randn(3, &[2, 5, 4]);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        assert_same(
            &[randn(4, &[2, 5, 3, 8])],
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| composed_rope(&t[0], &cos, &sin),
        );
    }

    #[test]
    fn attention_matches_the_composed_attention() {
        // Two kv heads with three query heads each, four query columns
        // against six keys, a causal-looking mask with -inf entries.
        let (b, nkv, rep, t, s, d) = (2, 2, 3, 4, 6, 8);
        let mask = test_mask(b, t, s);
        for (scale, softcap) in [(None, None), (Some(0.3), None), (Some(0.3), Some(1.5))] {
            assert_same(
                &[
                    randn(5, &[b, nkv, rep * t, d]),
                    randn(6, &[b, nkv, s, d]),
                    randn(7, &[b, nkv, s, d]),
                ],
                |x| attention(&x[0], &x[1], &x[2], &mask, scale, softcap).unwrap(),
                |x| {
                    let scores =
                        scaled_and_capped(x[0].matmul(&x[1].t().unwrap()).unwrap(), scale, softcap);
                    let scores = scores
                        .reshape((b, nkv, rep, t, s))
                        .unwrap()
                        .broadcast_add(&mask.unsqueeze(2).unwrap())
                        .unwrap()
                        .reshape((b, nkv, rep * t, s))
                        .unwrap();
                    candle_nn::ops::softmax(&scores, D::Minus1)
                        .unwrap()
                        .matmul(&x[2])
                        .unwrap()
                },
            );
        }
    }

    /// `rms_norm(x) · alpha` over the last axis, composed.
    fn composed_norm(x: &Tensor, alpha: &Tensor) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(alpha)
            .unwrap()
    }

    /// Rotary embedding of `x: [B, T, H, D]` with tables `[B, T, D/2]`,
    /// composed (non-interleaved halves).
    fn composed_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let c = Tensor::cat(&[cos, cos], D::Minus1)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let s = Tensor::cat(&[sin, sin], D::Minus1)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&c).unwrap() + rotated.broadcast_mul(&s).unwrap()).unwrap()
    }

    /// Attention scores times `scale` and under `cap · tanh(s / cap)`, when
    /// given, composed.
    fn scaled_and_capped(scores: Tensor, scale: Option<f64>, softcap: Option<f64>) -> Tensor {
        let scores = match scale {
            Some(sc) => (scores * sc).unwrap(),
            None => scores,
        };
        match softcap {
            Some(cap) => ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap(),
            None => scores,
        }
    }

    /// A causal-looking additive mask `[B, 1, T, S]` with -inf entries.
    fn test_mask(b: usize, t: usize, s: usize) -> Tensor {
        let mask: Vec<f32> = (0..b * t * s)
            .map(|i| {
                let (q, k) = ((i / s) % t, i % s);
                if k > q + 2 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(mask, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_block_matches_norms_rotary_and_attention_composed() {
        // Four query heads over two kv heads, five columns.
        let (b, t, nh, nkv, hd) = (2, 5, 4, 2, 8);
        let angles = randn(40, &[b, t, hd / 2]);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let mask = test_mask(b, t, t);
        let (q_alpha, k_alpha) = (randn(41, &[hd]), randn(42, &[hd]));
        for (norms, scale, softcap) in [(true, None, None), (false, Some(0.3), Some(1.5))] {
            let block = AttentionBlock {
                heads: (nh, nkv, hd),
                q_alpha: norms.then_some(&q_alpha),
                k_alpha: norms.then_some(&k_alpha),
                eps: 1e-6,
                cos: &cos,
                sin: &sin,
                mask: &mask,
                scale,
                softcap,
            };
            assert_same(
                &[
                    randn(43, &[b, t, nh * hd]),
                    randn(44, &[b, t, nkv * hd]),
                    randn(45, &[b, t, nkv * hd]),
                ],
                |x| attention_block(&x[0], &x[1], &x[2], &block).unwrap(),
                |x| {
                    let heads = |x: &Tensor, n: usize, alpha: Option<&Tensor>| {
                        let x = x.reshape((b, t, n, hd)).unwrap();
                        let x = match alpha {
                            Some(a) => composed_norm(&x, a),
                            None => x,
                        };
                        composed_rope(&x, &cos, &sin).transpose(1, 2).unwrap()
                    };
                    let q = heads(&x[0], nh, block.q_alpha);
                    let k = heads(&x[1], nkv, block.k_alpha);
                    let v = x[2]
                        .reshape((b, t, nkv, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap();
                    // Query head h reads kv head h / (nh / nkv).
                    let rep = nh / nkv;
                    let k = Tensor::cat(&vec![&k.unsqueeze(2).unwrap(); rep], 2)
                        .unwrap()
                        .reshape((b, nh, t, hd))
                        .unwrap();
                    let v = Tensor::cat(&vec![&v.unsqueeze(2).unwrap(); rep], 2)
                        .unwrap()
                        .reshape((b, nh, t, hd))
                        .unwrap();
                    let scores = scaled_and_capped(
                        q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap(),
                        scale,
                        softcap,
                    );
                    let probs =
                        candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1)
                            .unwrap();
                    probs
                        .matmul(&v.contiguous().unwrap())
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b, t, nh * hd))
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn lora_linear_matches_the_composed_projection() {
        let w = randn(8, &[5, 8]);
        let keep = (randn(9, &[6, 8])
            .ge(-0.6)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            / 0.8)
            .unwrap();
        let sink = std::sync::Arc::new(GradSink::default());
        for mask in [None, Some(keep)] {
            assert_same_with_sink(
                &[
                    randn(10, &[2, 3, 8]),
                    randn(11, &[4, 8]),
                    randn(12, &[5, 4]),
                ],
                Some(&sink),
                |t| lora_linear(&t[0], &w, &t[1], &t[2], 0.7, mask.clone(), Some(&sink)).unwrap(),
                |t| {
                    let x2 = t[0].reshape((6, 8)).unwrap();
                    let xd = match &mask {
                        Some(k) => (&x2 * k).unwrap(),
                        None => x2.clone(),
                    };
                    let base = x2.matmul(&w.t().unwrap()).unwrap();
                    let lora = xd
                        .matmul(&t[1].t().unwrap())
                        .unwrap()
                        .matmul(&t[2].t().unwrap())
                        .unwrap();
                    (base + (lora * 0.7).unwrap())
                        .unwrap()
                        .reshape((2, 3, 5))
                        .unwrap()
                },
            );
        }
    }

    #[test]
    fn gated_matches_the_composed_activation_and_product() {
        for act in [Activation::GeluTanh, Activation::Silu] {
            assert_same(
                &[
                    randn(30, &[3, 5, 8]).affine(2.0, 0.0).unwrap(),
                    randn(31, &[3, 5, 8]),
                ],
                |t| gated(&t[0], &t[1], act).unwrap(),
                |t| (activate(&t[0], act).unwrap() * &t[1]).unwrap(),
            );
        }
    }

    #[test]
    fn weighted_nll_matches_log_softmax_and_gather() {
        let targets = Tensor::new(&[3u32, 0, 6, 3], &Device::Cpu).unwrap();
        let weights = Tensor::new(&[0.5f32, 1.0, 0.25, 0.0], &Device::Cpu).unwrap();
        assert_same(
            &[randn(20, &[4, 7]).affine(4.0, 0.0).unwrap()],
            |t| weighted_nll(&t[0], &targets, &weights).unwrap(),
            |t| {
                let logp = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
                let picked = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
                (picked.squeeze(1).unwrap() * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .neg()
                    .unwrap()
            },
        );
    }

    #[test]
    fn nothing_is_recorded_without_gradients() {
        let x = randn(1, &[2, 8]);
        let y = rms_norm(&x, &randn(2, &[8]), 1e-6).unwrap();
        assert!(!y.track_op());
    }
}
