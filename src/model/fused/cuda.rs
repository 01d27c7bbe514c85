//! The fused kernels' launches (`fused.cu`, compiled to PTX by `build.rs`).

use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage};

use super::*;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "llm_router_fused";
/// Threads of an attention block (16 warps).
const ATTENTION_THREADS: u32 = 512;
/// Columns of a row that one block of `row_stats_partial` reduces.
const PICK_CHUNK: usize = 4096;
/// Shared memory a block may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024 - 256;

fn cuda(t: &Tensor) -> candle_core::Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => candle_core::bail!("the fused kernels take CUDA tensors"),
    }
}

/// The device address of `t`'s first element; `t` must be contiguous
/// (a view with an offset is fine).
fn addr(t: &Tensor) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("the fused kernels take CUDA tensors");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("the fused kernels take contiguous tensors");
    };
    let stream = cs.device.cuda_stream();
    let base = match &cs.slice {
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::I64(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("the fused kernels do not take {:?} tensors", t.dtype()),
    };
    Ok(base + (start * t.dtype().size_in_bytes()) as u64)
}

/// [`addr`] of an optional tensor, 0 (a null pointer, which the kernels
/// skip) without one.
fn addr_or_null(t: Option<&Tensor>) -> candle_core::Result<u64> {
    t.map(addr).transpose().map(|a| a.unwrap_or(0))
}

/// An uninitialised tensor of `shape` (every element is written by the
/// kernel that receives it).
fn uninit(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    // SAFETY: the kernel given this buffer writes all of it before
    // anything reads it.
    let storage = unsafe {
        match dtype {
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::bf16>(n)?, dev.clone()),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            other => candle_core::bail!("the fused kernels do not run in {other:?}"),
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// Launches the kernel `name` for `dtype` (`<name>_bf16` ...) with
/// `args` pushed in order.
///
/// # Safety
/// As [`launch_named`].
unsafe fn launch(
    dev: &CudaDevice,
    name: &str,
    dtype: DType,
    cfg: LaunchConfig,
    args: &[&dyn Arg],
) -> candle_core::Result<()> {
    let suffix = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        other => candle_core::bail!("the fused kernels do not run in {other:?}"),
    };
    // SAFETY: as the caller promises.
    unsafe { launch_named(dev, &format!("{name}_{suffix}"), cfg, args) }
}

/// Launches the kernel named `name` with `args` pushed in order.
///
/// # Safety
/// `args` must be what the kernel takes, every pointer addressing a
/// live buffer of the extent the kernel reads or writes under `cfg`.
unsafe fn launch_named(
    dev: &CudaDevice,
    name: &str,
    cfg: LaunchConfig,
    args: &[&dyn Arg],
) -> candle_core::Result<()> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut builder = func.builder();
    for arg in args {
        arg.push(&mut builder);
    }
    // SAFETY: as the caller promises.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// A kernel argument passed by value (pointers travel as `u64`).
trait Arg {
    fn push<'a>(&'a self, builder: &mut LaunchArgs<'a>);
}

impl<T: DeviceRepr> Arg for T {
    fn push<'a>(&'a self, builder: &mut LaunchArgs<'a>) {
        builder.arg(self);
    }
}

/// A kernel's arguments: the buffers' addresses in order, then `rest`.
fn with_addresses<'a>(ptrs: &'a [u64], rest: &[&'a dyn Arg]) -> Vec<&'a dyn Arg> {
    ptrs.iter()
        .map(|p| p as &dyn Arg)
        .chain(rest.iter().copied())
        .collect()
}

fn same_dtype(dtype: DType, tensors: &[&Tensor]) -> candle_core::Result<()> {
    match tensors.iter().find(|t| t.dtype() != dtype) {
        Some(t) => candle_core::bail!("fused kernel inputs mix {dtype:?} and {:?}", t.dtype()),
        None => Ok(()),
    }
}

/// The kernels' code for an activation (`activate` in fused.cu).
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::GeluTanh => 0,
        Activation::Silu => 1,
    }
}

/// Threads for one row of `n` elements: a multiple of 32, at most 1024.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(2).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// One block per row of `rows` rows of `n` elements.
fn per_row(rows: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(n), 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    post: Option<Norm>,
    next: Norm,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = cuda(x)?;
    let dtype = x.dtype();
    let n = x.dims().last().copied().unwrap_or(1);
    if residual.shape() != x.shape() {
        candle_core::bail!(
            "residual {:?} and input {:?} differ",
            residual.shape(),
            x.shape()
        );
    }
    let mut checked = vec![residual, next.0];
    checked.extend(post.map(|p| p.0));
    same_dtype(dtype, &checked)?;
    let rows = x.elem_count() / n.max(1);
    let (x, residual) = (x.contiguous()?, residual.contiguous()?);
    let out = uninit(&dev, dtype, (2, rows, n))?;
    let (ax, ar) = (addr(&x)?, addr(&residual)?);
    let a_post = post.map(|p| addr(p.0)).transpose()?.unwrap_or(0);
    let a_next = addr(next.0)?;
    let (h_ptr, y_ptr) = (addr(&out.get(0)?)?, addr(&out.get(1)?)?);
    let (n32, eps_post, eps_next) = (n as i32, post.map_or(0.0, |p| p.1) as f32, next.1 as f32);
    let cfg = per_row(rows, n);
    let args: [&dyn Arg; 9] = [
        &ax, &ar, &a_post, &a_next, &h_ptr, &y_ptr, &n32, &eps_post, &eps_next,
    ];
    // SAFETY: every pointer addresses a live contiguous buffer of the
    // sizes the kernel reads and writes (rows x n, n for the alphas).
    unsafe { launch(&dev, "add_rms_norm", dtype, cfg, &args) }?;
    let shape = x.shape().clone();
    Ok((out.get(0)?.reshape(&shape)?, out.get(1)?.reshape(shape)?))
}

pub(super) fn rms_norm_grad(
    x: &Tensor,
    g: &Tensor,
    alpha: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let dev = cuda(x)?;
    let dtype = x.dtype();
    let n = x.dims().last().copied().unwrap_or(1);
    if g.shape() != x.shape() {
        candle_core::bail!(
            "rms_norm_grad: input {:?} and gradient {:?} differ",
            x.shape(),
            g.shape()
        );
    }
    if alpha.dims() != [n] {
        candle_core::bail!(
            "rms_norm_grad: multiplier {:?} for rows of {n}",
            alpha.dims()
        );
    }
    same_dtype(dtype, &[g, alpha])?;
    let (x, g, alpha) = (x.contiguous()?, g.contiguous()?, alpha.contiguous()?);
    let dx = uninit(&dev, dtype, x.shape().clone())?;
    let rows = x.elem_count() / n.max(1);
    if rows == 0 {
        return Ok(dx);
    }
    let ptrs = [addr(&x)?, addr(&g)?, addr(&alpha)?, addr(&dx)?];
    let (n32, eps) = (n as i32, eps as f32);
    let args = with_addresses(&ptrs, &[&n32, &eps]);
    let cfg = per_row(rows, n);
    // SAFETY: `x`, `g` and `dx` hold `rows x n` contiguous elements,
    // `alpha` `n`.
    unsafe { launch(&dev, "rms_norm_grad", dtype, cfg, &args) }?;
    Ok(dx)
}

pub(super) fn qk_rope(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &QkRope,
    target: KvTarget,
) -> candle_core::Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let dev = cuda(q)?;
    let dtype = q.dtype();
    let (b, t, nh, d) = q.dims4()?;
    let (_, _, nkv, _) = k.dims4()?;
    if k.dims() != v.dims() || k.dims() != [b, t, nkv, d] || d % 2 != 0 {
        candle_core::bail!(
            "queries {:?}, keys {:?} and values {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if p.positions.dims() != [b, t] || p.inv_freq.dims() != [d / 2] {
        candle_core::bail!(
            "rotary positions {:?} and frequencies {:?} for queries {:?}",
            p.positions.dims(),
            p.inv_freq.dims(),
            q.dims()
        );
    }
    let mut checked = vec![k, v];
    checked.extend(p.q_alpha);
    checked.extend(p.k_alpha);
    same_dtype(dtype, &checked)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let positions = p.positions.to_dtype(DType::U32)?.contiguous()?;
    let inv_freq = p.inv_freq.to_dtype(DType::F32)?.contiguous()?;
    let q_out = uninit(&dev, dtype, (b, t, nh, d))?;
    let (k_cache, v_cache, cols, cap, new) = match target {
        KvTarget::Cache {
            k: kc,
            v: vc,
            columns,
        } => {
            let (_, _, cap, _) = kc.dims4()?;
            if kc.dims() != [b, nkv, cap, d] || vc.dims() != kc.dims() || columns.dims() != [t] {
                candle_core::bail!(
                    "a static cache {:?} with columns {:?} for keys {:?}",
                    kc.dims(),
                    columns.dims(),
                    k.dims()
                );
            }
            if columns.dtype() != DType::U32 {
                candle_core::bail!("cache columns must be u32, not {:?}", columns.dtype());
            }
            same_dtype(dtype, &[kc, vc])?;
            (kc.clone(), vc.clone(), addr(columns)?, cap, false)
        }
        KvTarget::New => (
            uninit(&dev, dtype, (b, nkv, t, d))?,
            uninit(&dev, dtype, (b, nkv, t, d))?,
            0,
            t,
            true,
        ),
    };
    let ptrs = [
        addr(&q)?,
        addr(&k)?,
        addr(&v)?,
        addr_or_null(p.q_alpha)?,
        addr_or_null(p.k_alpha)?,
    ];
    let eps = p.eps as f32;
    let tables = [
        addr(&positions)?,
        addr(&inv_freq)?,
        cols,
        addr(&k_cache)?,
        addr(&v_cache)?,
        addr(&q_out)?,
    ];
    let dims = [t as i32, nh as i32, nkv as i32, d as i32, cap as i32];
    let cfg = LaunchConfig {
        grid_dim: ((b * t) as u32, (nh + 2 * nkv) as u32, 1),
        block_dim: (row_threads(d), 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = with_addresses(&ptrs, &[&eps]);
    args.extend(tables.iter().map(|p| p as &dyn Arg));
    args.extend(dims.iter().map(|d| d as &dyn Arg));
    // SAFETY: the shapes were checked above; the cache columns are
    // within the capacity (the caller's bookkeeping: `StepInputs::fill`
    // checks them), and every buffer is live and contiguous.
    unsafe { launch(&dev, "qk_rope_store", dtype, cfg, &args) }?;
    Ok((q_out, new.then_some((k_cache, v_cache))))
}

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    let dev = cuda(q)?;
    let dtype = q.dtype();
    let (b, t, nh, d) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if k.dims() != [b, nkv, s, d]
        || v.dims() != k.dims()
        || mask.dims() != [b, 1, t, s]
        || nh % nkv != 0
    {
        candle_core::bail!(
            "attention over queries {:?}, keys {:?}, values {:?}, mask {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    let warps = (ATTENTION_THREADS / 32) as usize;
    let shared = (d + s + warps * d) * 4;
    if d % 8 != 0 || shared > SHARED_LIMIT || b * t * nh * s * d > ATTENTION_MAX_WORK {
        return Ok(None);
    }
    same_dtype(dtype, &[k, v, mask])?;
    let (q, k, v, mask) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        mask.contiguous()?,
    );
    let (kp, vp) = (addr(&k)?, addr(&v)?);
    // The kernel reads keys and values 8 elements (16 or 32 bytes) at a time.
    if kp % 16 != 0 || vp % 16 != 0 {
        return Ok(None);
    }
    let out = uninit(&dev, dtype, (b, t, nh * d))?;
    let ptrs = [addr(&q)?, kp, vp, addr(&mask)?, addr(&out)?];
    let dims = [t as i32, nh as i32, nkv as i32, s as i32, d as i32];
    let (scale, softcap) = (scale.unwrap_or(0.0) as f32, softcap.unwrap_or(0.0) as f32);
    let cfg = LaunchConfig {
        grid_dim: ((b * t * nh) as u32, 1, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    let mut args = with_addresses(&ptrs, &[]);
    args.extend(dims.iter().map(|d| d as &dyn Arg));
    args.extend([&scale as &dyn Arg, &softcap]);
    // SAFETY: shapes checked above, buffers live and contiguous, the
    // shared memory within the default limit.
    unsafe { launch(&dev, "attention", dtype, cfg, &args) }?;
    Ok(Some(out))
}

pub(super) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    let dev = cuda(gate)?;
    let dtype = gate.dtype();
    if gate.shape() != up.shape() {
        candle_core::bail!("gate {:?} and up {:?} differ", gate.shape(), up.shape());
    }
    same_dtype(dtype, &[up])?;
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = uninit(&dev, dtype, gate.shape().clone())?;
    let n = gate.elem_count();
    let ptrs = [addr(&gate)?, addr(&up)?, addr(&out)?];
    let n64 = n as u64;
    let act = act_code(act);
    let args = with_addresses(&ptrs, &[&n64, &act]);
    // SAFETY: three live contiguous buffers of `n` elements.
    unsafe { launch(&dev, "gated", dtype, elementwise(n), &args) }?;
    Ok(out)
}

pub(super) fn gated_grad(
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
    act: Activation,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = cuda(gate)?;
    let dtype = gate.dtype();
    if gate.shape() != up.shape() || gate.shape() != g.shape() {
        candle_core::bail!(
            "gate {:?}, up {:?} and their gradient {:?} differ",
            gate.shape(),
            up.shape(),
            g.shape()
        );
    }
    same_dtype(dtype, &[up, g])?;
    let (gate, up, g) = (gate.contiguous()?, up.contiguous()?, g.contiguous()?);
    let d_gate = uninit(&dev, dtype, gate.shape().clone())?;
    let d_up = uninit(&dev, dtype, gate.shape().clone())?;
    let n = gate.elem_count();
    if n == 0 {
        return Ok((d_gate, d_up));
    }
    let ptrs = [
        addr(&gate)?,
        addr(&up)?,
        addr(&g)?,
        addr(&d_gate)?,
        addr(&d_up)?,
    ];
    let n64 = n as u64;
    let act = act_code(act);
    let args = with_addresses(&ptrs, &[&n64, &act]);
    // SAFETY: five live contiguous buffers of `n` elements.
    unsafe { launch(&dev, "gated_grad", dtype, elementwise(n), &args) }?;
    Ok((d_gate, d_up))
}

pub(super) fn cast_scaled(
    x: &Tensor,
    mul: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dev = cuda(x)?;
    if mul.is_some_and(|m| m.dims() != x.dims() || m.dtype() != DType::F32) {
        candle_core::bail!(
            "cast_scaled: the multiplier {:?} is not f32 of the input's shape {:?}",
            mul.map(Tensor::dims),
            x.dims()
        );
    }
    let x = x.contiguous()?;
    let mul = mul.map(Tensor::contiguous).transpose()?;
    let out = uninit(&dev, DType::F32, x.shape().clone())?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let ptrs = [addr(&x)?, addr_or_null(mul.as_ref())?, addr(&out)?];
    let (n64, scale) = (n as u64, scale as f32);
    let args = with_addresses(&ptrs, &[&n64, &scale]);
    // SAFETY: `x`, `out` (and `mul`, checked) hold `n` contiguous
    // elements; a null `mul` is skipped by the kernel.
    unsafe { launch(&dev, "cast_scaled", x.dtype(), elementwise(n), &args) }?;
    Ok(out)
}

/// `x` as `[rows, K]` with its address, when the skinny kernels take it.
fn skinny_input(x: &Tensor) -> candle_core::Result<Option<(Tensor, usize, usize, u64)>> {
    let k = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / k.max(1);
    if k == 0 || k % 8 != 0 || rows == 0 || rows > SKINNY_MAX_ROWS {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let ptr = addr(&x)?;
    // The kernels read 8 elements (16 or 32 bytes) at a time.
    Ok((ptr % 16 == 0).then_some((x, rows, k, ptr)))
}

/// A weight `[N, K]` the skinny kernels can read: its address.
fn skinny_weight(w: &Tensor, k: usize, dtype: DType) -> candle_core::Result<Option<u64>> {
    if w.rank() != 2 || w.dim(1)? != k || w.dtype() != dtype || !w.is_contiguous() {
        return Ok(None);
    }
    let ptr = addr(w)?;
    Ok((ptr % 16 == 0).then_some(ptr))
}

/// The compiled row bound (1, 2, 4 or 8) for a step of `rows` rows:
/// each variant keeps registers for its bound only, so a single row
/// runs at full occupancy.
fn skinny_bound(rows: usize) -> usize {
    rows.next_power_of_two().min(SKINNY_MAX_ROWS)
}

/// Blocks for a grid-stride loop over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let threads = 256u32;
    LaunchConfig {
        grid_dim: (n.div_ceil(threads as usize).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of 8 warps for `warps` output features.
fn warp_grid(warps: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (warps.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn matmul_t(
    x: &Tensor,
    weights: &[&Tensor],
) -> candle_core::Result<Option<Vec<Tensor>>> {
    if weights.is_empty() || weights.len() > 3 {
        return Ok(None);
    }
    let dtype = x.dtype();
    let Some((x, rows, k, xp)) = skinny_input(x)? else {
        return Ok(None);
    };
    let dev = cuda(&x)?;
    let mut ptrs = Vec::with_capacity(3);
    for w in weights {
        let Some(p) = skinny_weight(w, k, dtype)? else {
            return Ok(None);
        };
        ptrs.push(p);
    }
    let lead = &x.dims()[..x.rank() - 1];
    let mut outs = Vec::with_capacity(weights.len());
    for w in weights {
        let mut dims = lead.to_vec();
        dims.push(w.dim(0)?);
        outs.push(uninit(&dev, dtype, dims)?);
    }
    // (weight, output, features) for three slots, unused ones empty.
    let mut slots = [(0u64, 0u64, 0i32); 3];
    for (i, (w, out)) in weights.iter().zip(&outs).enumerate() {
        slots[i] = (ptrs[i], addr(out)?, w.dim(0)? as i32);
    }
    let total: usize = weights.iter().map(|w| w.dim(0).unwrap_or(0)).sum();
    let (rows32, k32) = (rows as i32, k as i32);
    let args: [&dyn Arg; 12] = [
        &xp,
        &rows32,
        &k32,
        &slots[0].0,
        &slots[0].1,
        &slots[0].2,
        &slots[1].0,
        &slots[1].1,
        &slots[1].2,
        &slots[2].0,
        &slots[2].1,
        &slots[2].2,
    ];
    let name = format!("skinny_matmul_m{}", skinny_bound(rows));
    // SAFETY: `x` holds rows x K elements, each weight N_i x K and each
    // output rows x N_i, all live, contiguous and 16-byte aligned.
    unsafe { launch(&dev, &name, dtype, warp_grid(total), &args) }?;
    Ok(Some(outs))
}

pub(super) fn gated_matmul_t(
    x: &Tensor,
    w_gate: &Tensor,
    w_up: &Tensor,
    act: Activation,
) -> candle_core::Result<Option<Tensor>> {
    let dtype = x.dtype();
    let Some((x, rows, k, xp)) = skinny_input(x)? else {
        return Ok(None);
    };
    let (Some(gp), Some(up)) = (
        skinny_weight(w_gate, k, dtype)?,
        skinny_weight(w_up, k, dtype)?,
    ) else {
        return Ok(None);
    };
    let n = w_gate.dim(0)?;
    if w_up.dim(0)? != n {
        return Ok(None);
    }
    let dev = cuda(&x)?;
    let mut dims = x.dims()[..x.rank() - 1].to_vec();
    dims.push(n);
    let out = uninit(&dev, dtype, dims)?;
    let op = addr(&out)?;
    let (rows32, k32, n32) = (rows as i32, k as i32, n as i32);
    let act = act_code(act);
    let args: [&dyn Arg; 8] = [&xp, &rows32, &k32, &gp, &up, &op, &n32, &act];
    let name = format!("skinny_gated_m{}", skinny_bound(rows));
    // SAFETY: `x` holds rows x K elements, both weights N x K, the output
    // rows x N, all live, contiguous and 16-byte aligned.
    unsafe { launch(&dev, &name, dtype, warp_grid(n), &args) }?;
    Ok(Some(out))
}

pub(super) fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    div: usize,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    let probs = softmax_rows(scores, mask, div, scale, softcap, false)?;
    Ok(probs.map(|(p, _, _)| p))
}

/// The `masked_softmax` kernel: the probabilities in the scores' dtype
/// and, for `training`, in f32 and the cap's tanh (when capped).
#[allow(clippy::type_complexity)]
fn softmax_rows(
    scores: &Tensor,
    mask: &Tensor,
    div: usize,
    scale: Option<f64>,
    softcap: Option<f64>,
    training: bool,
) -> candle_core::Result<Option<(Tensor, Option<Tensor>, Option<Tensor>)>> {
    let dev = cuda(scores)?;
    let dtype = scores.dtype();
    let (b, m, s) = scores.dims3()?;
    let (mb, one, t, ms) = mask.dims4()?;
    if mb != b || one != 1 || ms != s || div == 0 || t == 0 {
        candle_core::bail!(
            "masked softmax: scores {:?} and mask {:?} do not go together",
            scores.dims(),
            mask.dims()
        );
    }
    if s * 4 > SHARED_LIMIT {
        return Ok(None);
    }
    same_dtype(dtype, &[mask])?;
    let (scores, mask) = (scores.contiguous()?, mask.contiguous()?);
    let out = uninit(&dev, dtype, (b, m, s))?;
    let f32_out = |wanted: bool| {
        wanted
            .then(|| uninit(&dev, DType::F32, (b, m, s)))
            .transpose()
    };
    let (out32, th) = (f32_out(training)?, f32_out(training && softcap.is_some())?);
    let ptrs = [
        addr(&scores)?,
        addr(&mask)?,
        addr(&out)?,
        addr_or_null(out32.as_ref())?,
        addr_or_null(th.as_ref())?,
    ];
    let dims = [m as i32, t as i32, div as i32, s as i32];
    let (scale, softcap) = (scale.unwrap_or(0.0) as f32, softcap.unwrap_or(0.0) as f32);
    let cfg = LaunchConfig {
        grid_dim: ((b * m) as u32, 1, 1),
        block_dim: (row_threads(s).min(256), 1, 1),
        shared_mem_bytes: (s * 4) as u32,
    };
    let mut args = with_addresses(&ptrs, &[]);
    args.extend(dims.iter().map(|d| d as &dyn Arg));
    args.extend([&scale as &dyn Arg, &softcap]);
    // SAFETY: shapes checked above; every output holds b x m x s
    // elements (the mask b x t x s), all contiguous and live; the null
    // f32 outputs are skipped by the kernel (`th` is written only with a
    // cap); a row of scores fits the shared memory.
    unsafe { launch(&dev, "masked_softmax", dtype, cfg, &args) }?;
    Ok(Some((out, out32, th)))
}

pub(super) fn repeat_rows(t: &Tensor, n: usize) -> candle_core::Result<Option<Tensor>> {
    let dev = cuda(t)?;
    let dims = t.dims();
    if dims.first() != Some(&1) {
        candle_core::bail!("only a tensor of one row can be repeated, got {dims:?}");
    }
    let bytes = t.elem_count() * t.dtype().size_in_bytes();
    let t = t.contiguous()?;
    let src = addr(&t)?;
    if n == 0 || bytes == 0 || !bytes.is_multiple_of(16) || !src.is_multiple_of(16) {
        return Ok(None);
    }
    let mut shape = dims.to_vec();
    shape[0] = n;
    let out = uninit(&dev, t.dtype(), shape)?;
    let (len, total) = (bytes / 16, n * bytes / 16);
    let dst = addr(&out)?;
    let args: [&dyn Arg; 4] = [&src, &dst, &len, &total];
    // SAFETY: `src` holds `len` 16-byte words (checked multiple and
    // alignment), `out` was allocated for `n` copies of them.
    unsafe { launch_named(&dev, "repeat_rows", elementwise(total), &args) }?;
    Ok(Some(out))
}

pub(super) fn dropout_mask(
    shape: (usize, usize),
    p: f64,
    seed: Option<&Tensor>,
    salt: u64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let Device::Cuda(dev) = device else {
        candle_core::bail!("the fused kernels take CUDA tensors");
    };
    if let Some(s) = seed.filter(|s| s.dtype() != DType::U32 || s.elem_count() != 2) {
        candle_core::bail!(
            "a dropout seed buffer is two u32, got {:?} {:?}",
            s.dtype(),
            s.dims()
        );
    }
    let n = shape.0 * shape.1;
    let keep = uninit(dev, DType::F32, shape)?;
    if n == 0 {
        return Ok(keep);
    }
    let ptr = addr(&keep)?;
    let seed = addr_or_null(seed)?;
    let (p32, scale) = (p as f32, (1.0 / (1.0 - p)) as f32);
    let args: [&dyn Arg; 6] = [&ptr, &n, &seed, &salt, &p32, &scale];
    // SAFETY: `keep` holds the `n` f32 the kernel writes; a seed buffer
    // holds the 8 bytes it reads (checked), a null one is not read.
    unsafe { launch_named(dev, "dropout_mask", elementwise(n), &args) }?;
    Ok(keep)
}

pub(super) fn add_rounded(
    base: &Tensor,
    delta: &Tensor,
    mul: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let dev = cuda(base)?;
    let dtype = base.dtype();
    let n = base.elem_count();
    if delta.dims() != base.dims() || mul.is_some_and(|m| m.dims() != base.dims()) {
        candle_core::bail!(
            "add_rounded: base {:?}, delta {:?} and mul {:?} differ",
            base.dims(),
            delta.dims(),
            mul.map(Tensor::dims)
        );
    }
    if delta.dtype() != DType::F32 || mul.is_some_and(|m| m.dtype() != DType::F32) {
        candle_core::bail!("add_rounded takes an f32 delta and multiplier");
    }
    let (base, delta) = (base.contiguous()?, delta.contiguous()?);
    let mul = mul.map(Tensor::contiguous).transpose()?;
    let out = uninit(&dev, dtype, base.shape().clone())?;
    if n == 0 {
        return Ok(out);
    }
    let ptrs = [
        addr(&base)?,
        addr(&delta)?,
        addr_or_null(mul.as_ref())?,
        addr(&out)?,
    ];
    let scale = scale as f32;
    let args = with_addresses(&ptrs, &[&n, &scale]);
    // SAFETY: every buffer holds the `n` elements of `base`'s shape
    // (checked), contiguous; a null `mul` is skipped by the kernel.
    unsafe { launch(&dev, "add_rounded", dtype, elementwise(n), &args) }?;
    Ok(out)
}

/// Checks the loss kernels' operands: logits `[rows, vocab]`, and per
/// row a u32 target below `vocab` (not checked: read on the device) and
/// an f32 weight.
fn nll_operands(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<(usize, usize)> {
    let (rows, vocab) = logits.dims2()?;
    if targets.dims() != [rows] || targets.dtype() != DType::U32 {
        candle_core::bail!(
            "the loss takes one u32 target per row of {rows}, got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    if weights.dims() != [rows] || weights.dtype() != DType::F32 {
        candle_core::bail!(
            "the loss takes one f32 weight per row of {rows}, got {:?} {:?}",
            weights.dtype(),
            weights.dims()
        );
    }
    if vocab == 0 || vocab > i32::MAX as usize {
        candle_core::bail!("the loss cannot take {vocab} logits per row");
    }
    Ok((rows, vocab))
}

pub(super) fn nll_rows(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = cuda(logits)?;
    let (rows, vocab) = nll_operands(logits, targets, weights)?;
    let (logits, targets, weights) = (
        logits.contiguous()?,
        targets.contiguous()?,
        weights.contiguous()?,
    );
    let lse = uninit(&dev, DType::F32, rows)?;
    let loss = uninit(&dev, DType::F32, rows)?;
    if rows == 0 {
        return Ok((loss, lse));
    }
    let ptrs = [
        addr(&logits)?,
        addr(&targets)?,
        addr(&weights)?,
        addr(&lse)?,
        addr(&loss)?,
    ];
    let vocab = vocab as i32;
    let args = with_addresses(&ptrs, &[&vocab]);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `logits` holds `rows · vocab` elements, `targets` and
    // `weights` `rows` (checked; targets index inside a row, which the
    // model's tokenizer guarantees); `lse` and `loss` `rows` f32.
    unsafe { launch(&dev, "nll_rows", logits.dtype(), cfg, &args) }?;
    Ok((loss, lse))
}

pub(super) fn nll_grad(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    let dev = cuda(logits)?;
    let (rows, vocab) = nll_operands(logits, targets, weights)?;
    if lse.dims() != [rows] || lse.dtype() != DType::F32 {
        candle_core::bail!("the loss's backward takes its f32 log-sum-exp per row");
    }
    if g.elem_count() != 1 || g.dtype() != DType::F32 {
        candle_core::bail!("the loss's backward takes one f32 incoming gradient");
    }
    let (logits, targets, weights, lse, g) = (
        logits.contiguous()?,
        targets.contiguous()?,
        weights.contiguous()?,
        lse.contiguous()?,
        g.contiguous()?,
    );
    let out = uninit(&dev, logits.dtype(), (rows, vocab))?;
    if rows == 0 {
        return Ok(out);
    }
    let ptrs = [
        addr(&logits)?,
        addr(&targets)?,
        addr(&weights)?,
        addr(&lse)?,
        addr(&g)?,
        addr(&out)?,
    ];
    let vocab = vocab as i32;
    let args = with_addresses(&ptrs, &[&vocab]);
    let threads = 256usize;
    let cfg = LaunchConfig {
        grid_dim: (
            (vocab as usize).div_ceil(threads * 8).clamp(1, 65_535) as u32,
            rows as u32,
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as in `nll_rows`; `out` holds `rows · vocab` elements,
    // `lse` `rows` and `g` one (checked).
    unsafe { launch(&dev, "nll_grad", logits.dtype(), cfg, &args) }?;
    Ok(out)
}

pub(super) fn pick(
    logits: &Tensor,
    token: Option<u32>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let dev = cuda(logits)?;
    let (rows, n) = logits.dims2()?;
    if logits.dtype() != DType::F32 || n == 0 || n > i32::MAX as usize {
        candle_core::bail!(
            "picking takes f32 logits [rows, vocab], got {:?} {:?}",
            logits.dtype(),
            logits.dims()
        );
    }
    if let Some(t) = token.filter(|&t| t as usize >= n) {
        candle_core::bail!("token {t} is beyond the {n} logits of a row");
    }
    let logits = logits.contiguous()?;
    let parts = n.div_ceil(PICK_CHUNK);
    let (p_max, p_sum) = (
        uninit(&dev, DType::F32, rows * parts)?,
        uninit(&dev, DType::F32, rows * parts)?,
    );
    // The partial arg-maxes are i32, held in a u32 buffer.
    let p_arg = uninit(&dev, DType::U32, rows * parts)?;
    let argmax = uninit(&dev, DType::U32, rows)?;
    let prob = token.map(|_| uninit(&dev, DType::F32, rows)).transpose()?;
    let (x, pm, pa, ps) = (addr(&logits)?, addr(&p_max)?, addr(&p_arg)?, addr(&p_sum)?);
    let (n32, chunk32, parts32) = (n as i32, PICK_CHUNK as i32, parts as i32);
    let cfg = LaunchConfig {
        grid_dim: (parts as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let args: [&dyn Arg; 6] = [&x, &n32, &chunk32, &pm, &pa, &ps];
    // SAFETY: the logits are rows x n f32; each partial buffer holds
    // rows x parts values.
    unsafe { launch_named(&dev, "row_stats_partial", cfg, &args) }?;
    let (tok, am) = (token.unwrap_or(0) as i32, addr(&argmax)?);
    let pp = addr_or_null(prob.as_ref())?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let args: [&dyn Arg; 9] = [&x, &n32, &parts32, &pm, &pa, &ps, &tok, &am, &pp];
    // SAFETY: as above; the token is within the row, the outputs hold
    // one value per row (no probability is written without a token).
    unsafe { launch_named(&dev, "row_stats_final", cfg, &args) }?;
    Ok((argmax, prob))
}

pub(super) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dev = cuda(x)?;
    let dtype = x.dtype();
    let n = x.dims().last().copied().unwrap_or(1);
    if alpha.dims() != [n] {
        candle_core::bail!("rms_norm: multiplier {:?} for rows of {n}", alpha.dims());
    }
    same_dtype(dtype, &[alpha])?;
    let (x, alpha) = (x.contiguous()?, alpha.contiguous()?);
    let rows = x.elem_count() / n.max(1);
    let out = uninit(&dev, dtype, x.shape().clone())?;
    if rows == 0 {
        return Ok(out);
    }
    let ptrs = [addr(&x)?, addr(&alpha)?, addr(&out)?];
    let (n32, eps) = (n as i32, eps as f32);
    let args = with_addresses(&ptrs, &[&n32, &eps]);
    // SAFETY: `x` and `out` hold rows x n elements, `alpha` n, all
    // contiguous and live.
    unsafe { launch(&dev, "rms_norm_rows", dtype, per_row(rows, n), &args) }?;
    Ok(out)
}

pub(super) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dev = cuda(a)?;
    let dtype = a.dtype();
    if a.shape() != b.shape() {
        candle_core::bail!("add: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    same_dtype(dtype, &[b])?;
    let n = a.elem_count();
    if n == 0 || !n.is_multiple_of(8) || !a.is_contiguous() || !b.is_contiguous() {
        return Ok(None);
    }
    let out = uninit(&dev, dtype, a.shape().clone())?;
    let ptrs = [addr(a)?, addr(b)?, addr(&out)?];
    if ptrs.iter().any(|p| !p.is_multiple_of(16)) {
        return Ok(None);
    }
    let n8 = n / 8;
    let args = with_addresses(&ptrs, &[&n8]);
    // SAFETY: three live contiguous buffers of `n` elements, 16-byte
    // aligned (checked), read and written as `n / 8` groups of eight.
    unsafe { launch(&dev, "add8", dtype, elementwise(n8), &args) }?;
    Ok(Some(out))
}

pub(super) fn softmax_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: Option<f64>,
    softcap: Option<f64>,
) -> candle_core::Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
    let (_, m, _) = scores.dims3()?;
    let (_, _, t, _) = mask.dims4()?;
    if t == 0 || !m.is_multiple_of(t) {
        candle_core::bail!(
            "attention probabilities: scores {:?} and mask {:?} do not go together",
            scores.dims(),
            mask.dims()
        );
    }
    let Some((p, p32, th)) = softmax_rows(scores, mask, 1, scale, softcap, true)? else {
        return Ok(None);
    };
    let Some(p32) = p32 else {
        candle_core::bail!("the training softmax wrote no f32 probabilities");
    };
    Ok(Some((p32, p, th)))
}

pub(super) fn softmax_probs_grad(
    dp: &Tensor,
    p32: &Tensor,
    tanh: Option<&Tensor>,
    scale: Option<f64>,
) -> candle_core::Result<Tensor> {
    let dev = cuda(dp)?;
    let dtype = dp.dtype();
    let s = dp.dims().last().copied().unwrap_or(1);
    let mut f32s = vec![p32];
    f32s.extend(tanh);
    if let Some(t) = f32s
        .iter()
        .find(|t| t.shape() != dp.shape() || t.dtype() != DType::F32)
    {
        candle_core::bail!(
            "attention backward: f32 {:?} for a gradient {:?}",
            t.dims(),
            dp.dims()
        );
    }
    let (dp, p32) = (dp.contiguous()?, p32.contiguous()?);
    let tanh = tanh.map(|t| t.contiguous()).transpose()?;
    let rows = dp.elem_count() / s.max(1);
    let ds = uninit(&dev, dtype, dp.shape().clone())?;
    if rows == 0 {
        return Ok(ds);
    }
    let ptrs = [
        addr(&dp)?,
        addr(&p32)?,
        addr_or_null(tanh.as_ref())?,
        addr(&ds)?,
    ];
    let (s32, scale) = (s as i32, scale.unwrap_or(0.0) as f32);
    let args = with_addresses(&ptrs, &[&s32, &scale]);
    let cfg = LaunchConfig {
        block_dim: (row_threads(s).min(256), 1, 1),
        ..per_row(rows, s)
    };
    // SAFETY: every buffer holds rows x s elements (checked), contiguous
    // and live; a null `tanh` is skipped by the kernel.
    unsafe { launch(&dev, "softmax_probs_grad", dtype, cfg, &args) }?;
    Ok(ds)
}

pub(super) fn swap_axes12(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let dev = cuda(x)?;
    let (a, xl, yl, d) = x.dims4()?;
    let row_bytes = d * x.dtype().size_in_bytes();
    if !x.is_contiguous() || row_bytes == 0 || !row_bytes.is_multiple_of(16) {
        return Ok(None);
    }
    let src = addr(x)?;
    if !src.is_multiple_of(16) {
        return Ok(None);
    }
    let out = uninit(&dev, x.dtype(), (a, yl, xl, d))?;
    let total = x.elem_count() * x.dtype().size_in_bytes() / 16;
    if total == 0 {
        return Ok(Some(out));
    }
    let dst = addr(&out)?;
    let (x32, y32, words) = (xl as i32, yl as i32, (row_bytes / 16) as i32);
    let args: [&dyn Arg; 6] = [&src, &dst, &x32, &y32, &words, &total];
    // SAFETY: `x` is contiguous and 16-byte aligned with rows of whole
    // words (checked); `out` holds as many words.
    unsafe { launch_named(&dev, "swap_axes12", elementwise(total), &args) }?;
    Ok(Some(out))
}

/// Elements of a tensor one block of the AdamW kernels takes
/// (`ADAM_CHUNK` in fused.cu).
const ADAM_CHUNK: usize = 2048;

/// The device tables [`FusedAdamW`]'s kernels read.
pub(crate) struct AdamWTable {
    /// `[4, n]` addresses (as i64) of the parameters, gradients, first
    /// and second moments.
    table: Tensor,
    /// `[n]` u32 element counts.
    lens: Tensor,
    /// Blocks per tensor (the longest's chunks).
    chunks: usize,
    /// `[n · chunks]` f32: the norm's partial sums.
    partial: Tensor,
    /// `[2]` f32: the moments' coefficients.
    coef: Tensor,
    /// The tensors whose addresses the table holds, kept alive.
    _tensors: Vec<Tensor>,
}

impl AdamWTable {
    pub(super) fn new(
        params: &[Tensor],
        grads: &[Tensor],
        m: &[Tensor],
        v: &[Tensor],
    ) -> candle_core::Result<Option<Self>> {
        let Some(first) = params.first() else {
            return Ok(None);
        };
        let Device::Cuda(dev) = first.device() else {
            return Ok(None);
        };
        let n = params.len();
        if [grads.len(), m.len(), v.len()] != [n; 3] {
            candle_core::bail!("AdamW kernels: one gradient and two moments per parameter");
        }
        let mut table = Vec::with_capacity(4 * n);
        let mut lens = Vec::with_capacity(n);
        for list in [params, grads, m, v] {
            for (t, p) in list.iter().zip(params) {
                if t.shape() != p.shape() || t.dtype() != DType::F32 || !t.device().is_cuda() {
                    candle_core::bail!(
                        "AdamW kernels: {:?} {:?} beside a parameter {:?}",
                        t.dtype(),
                        t.dims(),
                        p.dims()
                    );
                }
                table.push(addr(t)? as i64);
            }
        }
        for p in params {
            lens.push(u32::try_from(p.elem_count()).map_err(|_| {
                candle_core::Error::Msg("AdamW kernels: a tensor over 2^32 elements".into())
            })?);
        }
        let chunks = lens
            .iter()
            .map(|&l| (l as usize).div_ceil(ADAM_CHUNK))
            .max()
            .unwrap_or(1)
            .max(1);
        let device = Device::Cuda(dev.clone());
        let mut kept = Vec::with_capacity(4 * n);
        for list in [params, grads, m, v] {
            kept.extend(list.iter().cloned());
        }
        Ok(Some(Self {
            table: Tensor::from_vec(table, (4, n), &device)?,
            lens: Tensor::from_vec(lens, n, &device)?,
            chunks,
            partial: Tensor::zeros(n * chunks, DType::F32, &device)?,
            coef: Tensor::zeros(2, DType::F32, &device)?,
            _tensors: kept,
        }))
    }

    pub(super) fn apply(
        &self,
        hyper: &Tensor,
        norm: &Tensor,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> candle_core::Result<()> {
        let dev = cuda(hyper)?;
        for (t, len) in [(hyper, 4), (norm, 1)] {
            if t.dims() != [len] || t.dtype() != DType::F32 {
                candle_core::bail!("AdamW kernels: {:?} where [{len}] f32 goes", t.dims());
            }
        }
        let n = self.lens.dim(0)?;
        let row = |k: usize| addr(&self.table.get(k)?);
        let (params, grads, ms, vs) = (row(0)?, row(1)?, row(2)?, row(3)?);
        let (lens, partial, coef) = (addr(&self.lens)?, addr(&self.partial)?, addr(&self.coef)?);
        let (hyper, norm) = (addr(hyper)?, addr(norm)?);
        let grid = LaunchConfig {
            grid_dim: (self.chunks as u32, n as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let args: [&dyn Arg; 3] = [&grads, &lens, &partial];
        // SAFETY: the table holds `n` live f32 tensors of `lens[k]`
        // elements each (checked when it was built, kept alive);
        // `partial` holds n x chunks values.
        unsafe { launch_named(&dev, "adamw_sq_partial", grid, &args) }?;
        let parts = (n * self.chunks) as i32;
        let (b1, b2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
        let args: [&dyn Arg; 7] = [&partial, &parts, &hyper, &norm, &coef, &b1, &b2];
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `partial` holds `parts` values, `hyper` 4, `norm` 1,
        // `coef` 2 (checked).
        unsafe { launch_named(&dev, "adamw_clip", one, &args) }?;
        let (beta1, beta2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
        let args: [&dyn Arg; 10] = [
            &params, &grads, &ms, &vs, &lens, &hyper, &coef, &beta1, &beta2, &eps,
        ];
        // SAFETY: as for the first kernel; the four tables address
        // tensors of the same lengths.
        unsafe { launch_named(&dev, "adamw_apply", grid, &args) }?;
        Ok(())
    }
}
