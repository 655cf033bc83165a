//! Optimizers written on tensor ops rather than libtorch's opaque C++ ones,
//! so that their state (momentum, Adam moments) can be saved, restored and,
//! later, kept across outer steps by DiLoCo. Gradient clipping lives here too.
//!
//! Update rules follow `torch.optim.SGD` and `torch.optim.AdamW`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Which optimizer, with its hyper-parameters (the rate comes from the schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum OptimizerSpec {
    Sgd { momentum: f64, nesterov: bool, weight_decay: f64 },
    Adamw { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
}

/// An optimizer over a fixed, ordered list of parameters.
#[derive(Debug)]
pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<(String, Tensor)>,
    /// Per parameter: SGD's momentum buffer, or AdamW's (m, v).
    slots: Vec<Vec<Tensor>>,
    steps: u64,
}

/// Optimizer state that does not match the model it is loaded into.
#[derive(Debug, thiserror::Error)]
pub enum OptimStateError {
    #[error("optimizer state has no tensor {0:?}; it was saved for another model or optimizer")]
    Missing(String),
    #[error("optimizer state tensor {name:?} has shape {got:?}, the model needs {expected:?}")]
    Shape { name: String, expected: Vec<i64>, got: Vec<i64> },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Optimizer {
    pub fn new(spec: OptimizerSpec, params: Vec<(String, Tensor)>) -> Optimizer {
        let slots_per = match spec {
            OptimizerSpec::Sgd { momentum, .. } if momentum > 0.0 => 1,
            OptimizerSpec::Sgd { .. } => 0,
            OptimizerSpec::Adamw { .. } => 2,
        };
        let slots =
            params.iter().map(|(_, p)| (0..slots_per).map(|_| p.zeros_like()).collect()).collect();
        Optimizer { spec, params, slots, steps: 0 }
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> =
            self.params.iter().map(|(_, p)| p.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm()).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if total > max_norm {
            let scale = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
        total
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps as f64;
        let spec = self.spec.clone();
        tch::no_grad(|| {
            for ((_, p), slots) in self.params.iter_mut().zip(self.slots.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                match spec {
                    OptimizerSpec::Sgd { momentum, nesterov, weight_decay } => {
                        sgd(p, g, slots, lr, momentum, nesterov, weight_decay, t)
                    }
                    OptimizerSpec::Adamw { beta1, beta2, eps, weight_decay } => {
                        adamw(p, &g, slots, lr, (beta1, beta2), eps, weight_decay, t)
                    }
                }
            }
        });
    }

    /// State tensors named `<slot>/<parameter>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let names = self.slot_names();
        self.params
            .iter()
            .zip(&self.slots)
            .flat_map(|((pname, _), slots)| {
                slots
                    .iter()
                    .zip(names)
                    .map(move |(s, n)| (format!("{n}/{pname}"), s.shallow_clone()))
            })
            .collect()
    }

    /// Restores state saved by `state()` and the update count.
    pub fn load_state(
        &mut self,
        saved: &[(String, Tensor)],
        steps: u64,
    ) -> Result<(), OptimStateError> {
        let names = self.slot_names();
        tch::no_grad(|| {
            for ((pname, p), slots) in self.params.iter().zip(self.slots.iter_mut()) {
                for (slot, n) in slots.iter_mut().zip(names) {
                    let key = format!("{n}/{pname}");
                    let src = saved
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, t)| t)
                        .ok_or_else(|| OptimStateError::Missing(key.clone()))?;
                    if src.size() != p.size() {
                        return Err(OptimStateError::Shape {
                            name: key,
                            expected: p.size(),
                            got: src.size(),
                        });
                    }
                    slot.f_copy_(&src.f_to_kind(Kind::Float)?)?;
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }

    fn slot_names(&self) -> &'static [&'static str] {
        match self.spec {
            OptimizerSpec::Sgd { .. } => &["momentum"],
            OptimizerSpec::Adamw { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sgd(
    p: &mut Tensor,
    mut g: Tensor,
    slots: &mut [Tensor],
    lr: f64,
    momentum: f64,
    nesterov: bool,
    wd: f64,
    t: f64,
) {
    if wd != 0.0 {
        g = &g + &*p * wd;
    }
    if let Some(buf) = slots.first_mut() {
        if t == 1.0 {
            buf.copy_(&g);
        } else {
            let _ = buf.g_mul_scalar_(momentum);
            let _ = buf.g_add_(&g);
        }
        g = if nesterov { &g + &*buf * momentum } else { buf.shallow_clone() };
    }
    let _ = p.g_sub_(&(g * lr));
}

#[allow(clippy::too_many_arguments)]
fn adamw(
    p: &mut Tensor,
    g: &Tensor,
    slots: &mut [Tensor],
    lr: f64,
    (b1, b2): (f64, f64),
    eps: f64,
    wd: f64,
    t: f64,
) {
    let [m, v] = slots else { return };
    if wd != 0.0 {
        let _ = p.g_mul_scalar_(1.0 - lr * wd);
    }
    let _ = m.lerp_(g, 1.0 - b1);
    let _ = v.g_mul_scalar_(b2);
    let _ = v.addcmul_(&(g * (1.0 - b2)), g);
    let bias1 = 1.0 - b1.powf(t);
    let bias2 = 1.0 - b2.powf(t);
    let denom = (v.sqrt() / bias2.sqrt()).g_add_scalar_(eps);
    let _ = p.addcdiv_(&(&*m * (-lr / bias1)), &denom);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    /// Loss sum(p^2)/2 has gradient p, so each rule has a closed form.
    fn run(spec: OptimizerSpec, steps: usize, lr: f64) -> Vec<f32> {
        let p = param(&[1.0, -2.0]);
        let mut opt = Optimizer::new(spec, vec![("p".into(), p.shallow_clone())]);
        for _ in 0..steps {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
            opt.step(lr);
        }
        Vec::<f32>::try_from(&p.detach()).unwrap()
    }

    #[test]
    fn sgd_matches_closed_form() {
        let plain =
            run(OptimizerSpec::Sgd { momentum: 0.0, nesterov: false, weight_decay: 0.0 }, 3, 0.1);
        assert!((plain[0] - 0.9f32.powi(3)).abs() < 1e-6);
        // Momentum 0.5: p1 = 0.9, buf1 = 1; g2 = 0.9, buf2 = 1.4, p2 = 0.76.
        let mom =
            run(OptimizerSpec::Sgd { momentum: 0.5, nesterov: false, weight_decay: 0.0 }, 2, 0.1);
        assert!((mom[0] - 0.76).abs() < 1e-6, "{mom:?}");
        // Nesterov: step1 uses g + 0.5*buf = 1.5 -> p1 = 0.85.
        let nes =
            run(OptimizerSpec::Sgd { momentum: 0.5, nesterov: true, weight_decay: 0.0 }, 1, 0.1);
        assert!((nes[0] - 0.85).abs() < 1e-6, "{nes:?}");
    }

    #[test]
    fn adamw_first_step_is_lr_times_sign() {
        let spec = OptimizerSpec::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let p = run(spec, 1, 0.01);
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] + 1.99).abs() < 1e-6, "{p:?}");
        // Decoupled decay shrinks before the update: 1*(1-0.01*0.5) - 0.01.
        let spec = OptimizerSpec::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.5 };
        let p = run(spec, 1, 0.01);
        assert!((p[0] - 0.985).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let p = param(&[3.0, 4.0]);
        let opt = Optimizer::new(
            OptimizerSpec::Sgd { momentum: 0.0, nesterov: false, weight_decay: 0.0 },
            vec![("p".into(), p.shallow_clone())],
        );
        (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
        let before = opt.clip_grad_norm(1.0);
        assert!((before - 5.0).abs() < 1e-5);
        assert!((p.grad().norm().double_value(&[]) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips() {
        let spec = OptimizerSpec::Adamw { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 };
        let p = param(&[1.0, 2.0]);
        let mut a = Optimizer::new(spec.clone(), vec![("w".into(), p.shallow_clone())]);
        (&p * &p).sum(Kind::Float).backward();
        a.step(0.1);
        let q = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut b = Optimizer::new(spec, vec![("w".into(), q)]);
        b.load_state(&a.state(), a.steps()).unwrap();
        for ((na, ta), (nb, tb)) in a.state().iter().zip(b.state().iter()) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb));
        }
        assert_eq!(b.steps(), 1);
        assert!(b.load_state(&[], 1).is_err());
    }
}
