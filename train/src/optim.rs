//! AdamW with decoupled weight decay and a warmup + cosine learning-rate
//! schedule. Written out (rather than `candle_nn::AdamW`) so that its
//! moments can be checkpointed and restored exactly.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use router::model::{FusedAdamW, Replay};

/// Hyper-parameters (PyTorch's defaults for the betas and epsilon).
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Optimizer state over a fixed list of variables (f32).
///
/// Variables of one shape (a LoRA pair's `A` of every layer, say) are
/// updated together as one stacked tensor: an update costs a few kernels per
/// shape instead of per variable, which on a GPU is most of its time (252
/// variables for r 16 on all projections of Gemma-3-270M, 14 shapes).
///
/// Gradients go into stacked buffers first ([`AdamW::store_grads`]), and
/// an update ([`AdamW::step`]) reads every value that changes from step to
/// step (learning rate, bias corrections) from a device buffer, so that on
/// CUDA the update is captured once as a graph and replayed
/// ([`AdamW::set_graphs`]); both are device work only. On CUDA the update
/// itself is three kernels over every variable at once ([`FusedAdamW`]).
pub struct AdamW {
    vars: Vec<Var>,
    groups: Vec<Group>,
    /// Updates applied so far (bias correction uses it).
    pub step: usize,
    cfg: AdamWConfig,
    /// `[lr / bc1, 1 - lr · weight_decay, 1 / bc2, max_norm]` (f32) of the
    /// next update, written before it.
    hyper: Tensor,
    /// The last update's gradient norm `[1]` (f32).
    norm: Tensor,
    /// The update as a CUDA graph, when asked for.
    replay: Option<Replay>,
    /// The update's kernels over every variable (CUDA).
    fused: Option<FusedAdamW>,
}

/// The variables of one shape, their gradients and moments, stacked `[n,
/// ...shape]`.
struct Group {
    /// Indices into `AdamW::vars`, in order.
    members: Vec<usize>,
    grads: Tensor,
    m: Tensor,
    v: Tensor,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let mut by_shape: Vec<(candle_core::Shape, Vec<usize>)> = Vec::new();
        for (i, var) in vars.iter().enumerate() {
            match by_shape.iter_mut().find(|(s, _)| s == var.shape()) {
                Some((_, members)) => members.push(i),
                None => by_shape.push((var.shape().clone(), vec![i])),
            }
        }
        let dev = vars.first().map_or(Device::Cpu, |v| v.device().clone());
        let groups = by_shape
            .into_iter()
            .map(|(shape, members)| {
                let mut dims = vec![members.len()];
                dims.extend_from_slice(shape.dims());
                let zeros = || Tensor::zeros(dims.as_slice(), DType::F32, &dev);
                Ok(Group {
                    members,
                    grads: zeros()?,
                    m: zeros()?,
                    v: zeros()?,
                })
            })
            .collect::<Result<Vec<Group>>>()?;
        let fused = fused_update(&vars, &groups)?;
        Ok(Self {
            vars,
            groups,
            step: 0,
            cfg,
            hyper: Tensor::zeros(4, DType::F32, &dev)?,
            norm: Tensor::zeros(1, DType::F32, &dev)?,
            replay: None,
            fused,
        })
    }

    /// Whether updates on CUDA are captured once and replayed.
    pub fn set_graphs(&mut self, on: bool) {
        self.replay = on.then(Replay::new);
    }

    /// Writes every variable's gradient from `store` into the stacked
    /// buffers, or adds it to what they hold (`accumulate`: the second and
    /// later micro-batches of a step). Device work only, in place: a
    /// captured training step may end with it.
    pub fn store_grads(&self, store: &GradStore, accumulate: bool) -> candle_core::Result<()> {
        for group in &self.groups {
            for (j, &i) in group.members.iter().enumerate() {
                let Some(g) = store.get(self.vars[i].as_tensor()) else {
                    candle_core::bail!("no gradient for LoRA variable {i}");
                };
                Self::put_grad(group, j, g, accumulate)?;
            }
        }
        Ok(())
    }

    fn put_grad(group: &Group, j: usize, g: &Tensor, accumulate: bool) -> candle_core::Result<()> {
        let g = if accumulate {
            (group.grads.get(j)? + g)?
        } else {
            g.clone()
        };
        group.grads.slice_set(&g.unsqueeze(0)?.contiguous()?, 0, j)
    }

    /// The stored gradient of every variable, in `vars` order.
    #[cfg(test)]
    pub fn stored_grads(&self) -> Result<Vec<Tensor>> {
        let mut out = vec![None; self.vars.len()];
        for group in &self.groups {
            for (j, &i) in group.members.iter().enumerate() {
                out[i] = Some(group.grads.get(j)?);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One update with gradients `grads[i]` for `vars[i]`: [`AdamW::step`]
    /// after storing them.
    #[cfg(test)]
    pub fn update(&mut self, grads: &[Tensor], lr: f64, max_norm: f64) -> Result<f64> {
        if grads.len() != self.vars.len() {
            anyhow::bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        for group in &self.groups {
            for (j, &i) in group.members.iter().enumerate() {
                Self::put_grad(group, j, &grads[i], false)?;
            }
        }
        self.step(lr, max_norm)
    }

    /// One update from the stored gradients at learning rate `lr`, after
    /// scaling them so that their global L2 norm is at most `max_norm` (0:
    /// no clipping). Returns the norm before clipping, the update's only
    /// read-back to the host.
    pub fn step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let max_norm = if max_norm > 0.0 {
            max_norm
        } else {
            f64::INFINITY
        };
        let hyper = [lr / bc1, 1.0 - lr * c.weight_decay, 1.0 / bc2, max_norm];
        let hyper = hyper.map(|x| x as f32);
        let dev = self.hyper.device().clone();
        self.hyper.slice_set(&Tensor::new(&hyper, &dev)?, 0, 0)?;
        let (groups, vars, fused) = (&self.groups, &self.vars, self.fused.as_ref());
        let (hyper, norm) = (&self.hyper, &self.norm);
        let update = || match fused {
            Some(kernels) => kernels.apply(hyper, norm, c.beta1, c.beta2, c.eps),
            None => apply(groups, vars, c, hyper, norm),
        };
        match self.replay.as_mut() {
            Some(replay) => replay.run(&dev, "the optimizer update", update)?,
            None => update()?,
        }
        Ok(self.norm.to_vec1::<f32>()?[0] as f64)
    }

    /// Writes the moments and step to `dir/optimizer.safetensors`, one
    /// pair per variable (`m.{i}`, `v.{i}`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for g in &self.groups {
            for (j, &i) in g.members.iter().enumerate() {
                map.insert(format!("m.{i}"), g.m.get(j)?.to_device(&Device::Cpu)?);
                map.insert(format!("v.{i}"), g.v.get(j)?.to_device(&Device::Cpu)?);
            }
        }
        map.insert(
            "step".into(),
            Tensor::new(&[self.step as u32], &Device::Cpu)?,
        );
        candle_core::safetensors::save(&map, dir.join("optimizer.safetensors"))?;
        Ok(())
    }

    /// Restores what [`AdamW::save`] wrote (same variables, same order).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("optimizer.safetensors");
        let map = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}", path.display()))?;
        let get = |k: &str| {
            map.get(k)
                .with_context(|| format!("{}: no `{k}`", path.display()))
        };
        for g in &mut self.groups {
            let dev = self.vars[g.members[0]].device();
            let mut moments = [Vec::new(), Vec::new()];
            for &i in &g.members {
                let shape = self.vars[i].shape();
                for (name, list) in ["m", "v"].iter().zip(moments.iter_mut()) {
                    let t = get(&format!("{name}.{i}"))?;
                    if t.shape() != shape {
                        anyhow::bail!(
                            "{}: `{name}.{i}` is {:?}, its variable {:?}",
                            path.display(),
                            t.shape(),
                            shape
                        );
                    }
                    list.push(t.to_device(dev)?);
                }
            }
            let [m, v] = moments;
            // In place: a captured update keeps the buffers' addresses.
            g.m.slice_set(&Tensor::stack(&m, 0)?, 0, 0)?;
            g.v.slice_set(&Tensor::stack(&v, 0)?, 0, 0)?;
        }
        let step = get("step")?.flatten_all()?.to_vec1::<u32>()?;
        self.step = *step
            .first()
            .with_context(|| format!("{}: `step` is empty", path.display()))?
            as usize;
        Ok(())
    }
}

/// The fused update's kernels over `vars` and their rows of the groups'
/// stacked buffers (`None` off CUDA).
fn fused_update(vars: &[Var], groups: &[Group]) -> Result<Option<FusedAdamW>> {
    let mut by_var = vec![None; vars.len()];
    for g in groups {
        for (j, &i) in g.members.iter().enumerate() {
            by_var[i] = Some((g.grads.get(j)?, g.m.get(j)?, g.v.get(j)?));
        }
    }
    let (mut grads, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for (gi, mi, vi) in by_var.into_iter().flatten() {
        grads.push(gi);
        m.push(mi);
        v.push(vi);
    }
    let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    Ok(FusedAdamW::new(&params, &grads, &m, &v)?)
}

/// The update itself, device work only: every value that changes between
/// steps comes from `hyper` (see `AdamW::hyper`), the gradient norm goes
/// to `norm`, the moments and variables are written in place.
fn apply(
    groups: &[Group],
    vars: &[Var],
    c: AdamWConfig,
    hyper: &Tensor,
    norm: &Tensor,
) -> candle_core::Result<()> {
    let dev = hyper.device();
    let sums = groups
        .iter()
        .map(|g| g.grads.sqr()?.sum_all()?.reshape(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = if sums.is_empty() {
        Tensor::zeros(1, DType::F32, dev)?
    } else {
        Tensor::cat(&sums, 0)?.sum_keepdim(0)?.sqrt()?
    };
    norm.slice_set(&total, 0, 0)?;
    let at = |k: usize| hyper.narrow(0, k, 1);
    let (lr_bc1, decay, inv_bc2, max_norm) = (at(0)?, at(1)?, at(2)?, at(3)?);
    // Clipping scales every gradient by `clip`; it is folded into the
    // moments' coefficients instead of being a pass of its own.
    let clip = total.gt(&max_norm)?.where_cond(
        &max_norm.div(&total.affine(1.0, 1e-6)?)?,
        &Tensor::ones(1, DType::F32, dev)?,
    )?;
    let g1 = clip.affine(1.0 - c.beta1, 0.0)?;
    let g2 = clip.sqr()?.affine(1.0 - c.beta2, 0.0)?;
    for group in groups {
        let rank = group.grads.rank();
        let scalar = |t: &Tensor| t.reshape(vec![1; rank]);
        let g = &group.grads;
        let m = (group.m.affine(c.beta1, 0.0)? + g.broadcast_mul(&scalar(&g1)?)?)?;
        let v = (group.v.affine(c.beta2, 0.0)? + g.sqr()?.broadcast_mul(&scalar(&g2)?)?)?;
        // lr · m̂ / (√v̂ + ε), with m̂ = m / bc1 and v̂ = v / bc2.
        let denom = v
            .broadcast_mul(&scalar(&inv_bc2)?)?
            .sqrt()?
            .affine(1.0, c.eps)?;
        let step = m.broadcast_mul(&scalar(&lr_bc1)?)?.div(&denom)?;
        group.m.slice_set(&m, 0, 0)?;
        group.v.slice_set(&v, 0, 0)?;
        let params: Vec<&Tensor> = group.members.iter().map(|&i| vars[i].as_tensor()).collect();
        let params = Tensor::stack(&params, 0)?;
        let next = (params.broadcast_mul(&scalar(&decay)?)? - step)?;
        for (j, &i) in group.members.iter().enumerate() {
            vars[i].set(&next.get(j)?)?;
        }
    }
    Ok(())
}

/// Linear warmup to `peak`, then cosine decay to zero at `total` steps.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((learning_rate(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!(learning_rate(55, 100, 10, 1.0) < 0.51 && learning_rate(55, 100, 10, 1.0) > 0.49);
        assert!(learning_rate(100, 100, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_round_trips_its_state() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[3f32, -2.0], &dev)?)?;
        let mut opt = AdamW::new(
            vec![x.clone()],
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        for _ in 0..300 {
            let loss = x.as_tensor().sqr()?.sum_all()?;
            let g = loss.backward()?.get(x.as_tensor()).unwrap().clone();
            opt.update(&[g], 0.05, 0.0)?;
        }
        let v = x.as_tensor().to_vec1::<f32>()?;
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
        let dir = tempfile::tempdir()?;
        opt.save(dir.path())?;
        let mut other = AdamW::new(vec![x.clone()], AdamWConfig::default())?;
        other.load(dir.path())?;
        assert_eq!(other.step, 300);
        Ok(())
    }

    /// The stacked update against AdamW written out per element on the
    /// host, for variables of two shapes (three of one, one of the other),
    /// with clipping active.
    #[test]
    fn stacked_updates_are_per_variable_adamw_with_clipping() -> Result<()> {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 4] = [&[2, 3], &[4], &[2, 3], &[2, 3]];
        let mut rng = router::rng::SplitMix64(9);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        let init: Vec<Vec<f32>> = shapes.iter().map(|s| draw(s.iter().product())).collect();
        let vars = init
            .iter()
            .zip(shapes)
            .map(|(v, s)| Var::from_tensor(&Tensor::from_vec(v.clone(), s, &dev)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(vars.clone(), cfg)?;
        let (mut p, mut m, mut v) = (
            init.clone(),
            init.iter().map(|x| vec![0f64; x.len()]).collect::<Vec<_>>(),
            init.iter().map(|x| vec![0f64; x.len()]).collect::<Vec<_>>(),
        );
        let (lr, max_norm) = (0.01, 0.5);
        for step in 1..=3 {
            let g: Vec<Vec<f32>> = shapes.iter().map(|s| draw(s.iter().product())).collect();
            let grads = g
                .iter()
                .zip(shapes)
                .map(|(x, s)| Tensor::from_vec(x.clone(), s, &dev))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let norm = opt.update(&grads, lr, max_norm)?;
            let want: f64 = g
                .iter()
                .flatten()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((norm - want).abs() < 1e-5 * want, "{norm} vs {want}");
            let clip = (max_norm / (want + 1e-6)).min(1.0);
            let bc1 = 1.0 - cfg.beta1.powi(step);
            let bc2 = 1.0 - cfg.beta2.powi(step);
            for k in 0..p.len() {
                for e in 0..p[k].len() {
                    let gi = g[k][e] as f64 * clip;
                    m[k][e] = cfg.beta1 * m[k][e] + (1.0 - cfg.beta1) * gi;
                    v[k][e] = cfg.beta2 * v[k][e] + (1.0 - cfg.beta2) * gi * gi;
                    let upd = (m[k][e] / bc1) / ((v[k][e] / bc2).sqrt() + cfg.eps);
                    let x = p[k][e] as f64 * (1.0 - lr * cfg.weight_decay) - lr * upd;
                    p[k][e] = x as f32;
                }
            }
        }
        for (var, want) in vars.iter().zip(&p) {
            let got = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for (a, b) in got.iter().zip(want) {
                assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        // The moments round-trip per variable.
        let dir = tempfile::tempdir()?;
        opt.save(dir.path())?;
        let mut other = AdamW::new(vars.clone(), cfg)?;
        other.load(dir.path())?;
        for (a, b) in opt.groups.iter().zip(&other.groups) {
            assert_eq!(a.members, b.members);
            assert_eq!(common_max_diff(&a.m, &b.m)?, 0.0);
            assert_eq!(common_max_diff(&a.v, &b.v)?, 0.0);
        }
        Ok(())
    }

    fn common_max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }
}
