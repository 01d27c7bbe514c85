//! AdamW with decoupled weight decay and a warmup + cosine learning-rate
//! schedule. Written out (rather than `candle_nn::AdamW`) so that its
//! moments can be checkpointed and restored exactly.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

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
pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far (bias correction uses it).
    pub step: usize,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            cfg,
        })
    }

    /// The variables it updates, in the order `apply` expects gradients.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with gradients `grads[i]` for `vars[i]` at learning rate `lr`.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let g = &grads[i];
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Writes the moments and step to `dir/optimizer.safetensors`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for i in 0..self.vars.len() {
            map.insert(format!("m.{i}"), self.m[i].to_device(&Device::Cpu)?);
            map.insert(format!("v.{i}"), self.v[i].to_device(&Device::Cpu)?);
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
        for i in 0..self.vars.len() {
            let dev = self.vars[i].device();
            self.m[i] = get(&format!("m.{i}"))?.to_device(dev)?;
            self.v[i] = get(&format!("v.{i}"))?.to_device(dev)?;
        }
        let step = get("step")?.flatten_all()?.to_vec1::<u32>()?;
        self.step = *step
            .first()
            .with_context(|| format!("{}: `step` is empty", path.display()))?
            as usize;
        Ok(())
    }
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

/// Scales gradients so that their global L2 norm is at most `max_norm`;
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
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
            opt.apply(&[g], 0.05)?;
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

    #[test]
    fn clipping_bounds_the_global_norm() -> Result<()> {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu)?];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        let after = g[0].sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        assert!((after - 1.0).abs() < 1e-3);
        Ok(())
    }
}
