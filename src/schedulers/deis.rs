//! diffusers' `DEISMultistepScheduler` (Dreamshaper XL's own scheduler config): exponential-integrator multistep
//! updates on ε predictions in ρ = σ_t/α_t (`logrho`), first and second order.

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::multistep::{alpha_sigma, lambda, reject_unsupported, tables, FinalSigma, Prediction};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

pub struct Deis {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_order: usize,
    lower_order_final: bool,
    /// The last ε predictions, oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl Deis {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        reject_unsupported(config, "DEIS")?;
        // diffusers turns dpmsolver/dpmsolver++ into deis, and midpoint/heun/bh1/bh2 into logrho.
        match config.str_or("algorithm_type", "deis") {
            "deis" | "dpmsolver" | "dpmsolver++" => {}
            other => return Err(Error::Other(format!("DEIS: algorithm_type {other:?} is not supported"))),
        }
        let solver_order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&solver_order) {
            return Err(Error::Other(format!("DEIS: solver_order {solver_order} is not supported (1 or 2)")));
        }
        let t = tables(config, steps, FinalSigma::Deis)?;
        Ok(Box::new(Self {
            timesteps: t.timesteps,
            sigmas: t.sigmas,
            prediction: Prediction::from_config(config, "DEIS")?,
            solver_order,
            lower_order_final: config.bool_or("lower_order_final", true),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        }))
    }

    fn first_order(&self, eps: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (s_t, s_s) = (self.sigmas[index + 1], self.sigmas[index]);
        let ((alpha_t, sigma_t), (alpha_s, _)) = (alpha_sigma(s_t), alpha_sigma(s_s));
        let h = lambda(s_t) - lambda(s_s);
        Ok((scale(sample, alpha_t / alpha_s)? - scale(eps, sigma_t * (h.exp() - 1f32))?)?)
    }

    fn second_order(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let rho = |s: f32| {
            let (a, s) = alpha_sigma(s);
            s / a
        };
        let (alpha_t, _) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, _) = alpha_sigma(self.sigmas[index]);
        let (rho_t, rho_s0, rho_s1) =
            (rho(self.sigmas[index + 1]), rho(self.sigmas[index]), rho(self.sigmas[index - 1]));
        // ∫ of the Lagrange basis in log ρ, as diffusers' `ind_fn`.
        let ind = |t: f32, b: f32, c: f32| t * (-c.ln() + t.ln() - 1f32) / (b.ln() - c.ln());
        let coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1);
        let coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0);
        let n = self.model_outputs.len();
        let (m0, m1) = (&self.model_outputs[n - 1], &self.model_outputs[n - 2]);
        let inner = ((divide(sample, alpha_s0)? + scale(m0, coef1)?)? + scale(m1, coef2)?)?;
        Ok(scale(&inner, alpha_t)?)
    }
}

impl Scheduler for Deis {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let n = self.timesteps.len();
        let lower_order_final = index + 1 == n && self.lower_order_final && n < 15;
        let sample = sample.to_dtype(DType::F32)?;
        let sigma = self.sigmas[index];
        let x0 = self.prediction.x0(&model_output.to_dtype(DType::F32)?, &sample, sigma)?;
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let eps = divide(&(&sample - scale(&x0, alpha_t)?)?, sigma_t)?;
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(eps);
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(self.model_outputs.last().expect("pushed"), &sample, index)?
        } else {
            self.second_order(&sample, index)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev.to_dtype(dtype)?)
    }
}
