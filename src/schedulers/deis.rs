//! diffusers' `DEISMultistepScheduler` (Dreamshaper XL's own scheduler config): exponential-integrator multistep
//! updates on ε predictions in ρ = σ_t/α_t (`logrho`), first and second order.

use candle_core::Tensor;

use super::multistep::{FinalSigma, Multistep, UNSUPPORTED};
use super::schedule::{Class, Spacing, ALL_PREDICTIONS};
use super::sigma::{alpha_sigma, divide, lambda, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

const CLASS: Class = Class { name: "DEIS", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };

/// The config keys its diffusers class reads besides the shared schedule
/// keys ([`super::schedule::SCHEDULE_KEYS`]) and the multistep keys ([`super::multistep::KEYS`]).
pub const KEYS: &str = "algorithm_type";

pub struct Deis {
    /// Its history holds ε predictions.
    core: Multistep,
}

impl Deis {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, UNSUPPORTED)?;
        // diffusers turns dpmsolver/dpmsolver++ into deis, and midpoint/heun/bh1/bh2 into logrho.
        let algorithms = [("deis", ()), ("dpmsolver", ()), ("dpmsolver++", ())];
        config.choice(CLASS.name, "algorithm_type", "deis", &algorithms)?;
        let solvers = [("logrho", ()), ("midpoint", ()), ("heun", ()), ("bh1", ()), ("bh2", ())];
        config.choice(CLASS.name, "solver_type", "logrho", &solvers)?;
        let solver_order = config.usize_in(CLASS.name, "solver_order", 2, 1..=2)?;
        Ok(Box::new(Self { core: Multistep::new(config, &CLASS, steps, FinalSigma::Deis, solver_order)? }))
    }

    fn first_order(&self, eps: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (s_t, s_s) = (self.core.sigmas[index + 1], self.core.sigmas[index]);
        let ((alpha_t, sigma_t), (alpha_s, _)) = (alpha_sigma(s_t), alpha_sigma(s_s));
        let h = lambda(s_t) - lambda(s_s);
        Ok((scale(sample, alpha_t / alpha_s)? - scale(eps, sigma_t * (h.exp() - 1f32))?)?)
    }

    fn second_order(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let rho = |s: f32| {
            let (a, s) = alpha_sigma(s);
            s / a
        };
        let (alpha_t, _) = alpha_sigma(self.core.sigmas[index + 1]);
        let (alpha_s0, _) = alpha_sigma(self.core.sigmas[index]);
        let (rho_t, rho_s0, rho_s1) =
            (rho(self.core.sigmas[index + 1]), rho(self.core.sigmas[index]), rho(self.core.sigmas[index - 1]));
        // ∫ of the Lagrange basis in log ρ, as diffusers' `ind_fn`.
        let ind = |t: f32, b: f32, c: f32| t * (-c.ln() + t.ln() - 1f32) / (b.ln() - c.ln());
        let coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1);
        let coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0);
        let (m0, m1) = (self.core.history.back(0), self.core.history.back(1));
        let inner = ((divide(sample, alpha_s0)? + scale(m0, coef1)?)? + scale(m1, coef2)?)?;
        Ok(scale(&inner, alpha_t)?)
    }
}

impl Scheduler for Deis {
    fn timetable(&self) -> &Timetable {
        &self.core.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let n = self.core.table.timesteps.len();
        let lower_order_final = index + 1 == n && self.core.lower_order_final && n < 15;
        let x0 = self.core.x0(out, sample, index)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.core.sigmas[index]);
        // diffusers' DEIS converts every prediction to x₀ and back to ε.
        self.core.history.push(divide(&(sample - scale(&x0, alpha_t)?)?, sigma_t)?);
        let prev = if self.core.solver_order == 1 || self.core.history.warm_steps < 1 || lower_order_final {
            self.first_order(self.core.history.back(0), sample, index)?
        } else {
            self.second_order(sample, index)?
        };
        self.core.history.step_done();
        Ok(prev)
    }
}
