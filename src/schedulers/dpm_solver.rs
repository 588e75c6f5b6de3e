//! DPM-Solver++: diffusers' `DPMSolverMultistepScheduler` (first, second and third order, midpoint or Heun, and its
//! SDE variant), registered as "DPM Multi", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras" and
//! "DPM++ 3M SDE Karras" (the same class with Karras sigmas, with `sde-dpmsolver++`, with `solver_order` 3); and `DPMSolverSinglestepScheduler` ("DPM Single"), which takes the same
//! first-order step and its own second-order step from the start of each two-step block.

use candle_core::Tensor;

use super::multistep::{FinalSigma, Multistep, UNSUPPORTED};
use super::schedule::{Class, Spacing, ALL_PREDICTIONS, RESCALE};
use super::sigma::{alpha_sigma, lambda, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

/// The config keys `DPMSolverMultistepScheduler` reads besides the shared schedule
/// keys and the multistep keys ([`super::multistep::KEYS`]).
pub const MULTISTEP_KEYS: &str = "algorithm_type euler_at_final use_lu_lambdas final_sigmas_type lambda_min_clipped \
                                  variance_type rescale_betas_zero_snr";

/// The config keys `DPMSolverSinglestepScheduler` reads besides the shared schedule
/// keys (it has no `timestep_spacing`) and the multistep keys ([`super::multistep::KEYS`]).
pub const SINGLESTEP_KEYS: &str = "algorithm_type final_sigmas_type lambda_min_clipped variance_type";

/// DPM-Solver++'s first-order step from σ[index] to σ[index + 1] on the x₀ prediction `m0` (with `noise`, the
/// SDE variant).
fn first_order(sigmas: &[f32], index: usize, m0: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
    let (s_t, s_s) = (sigmas[index + 1], sigmas[index]);
    let (alpha_t, sigma_t) = alpha_sigma(s_t);
    let (_, sigma_s) = alpha_sigma(s_s);
    let h = lambda(s_t) - lambda(s_s);
    Ok(match noise {
        None => (scale(sample, sigma_t / sigma_s)? - scale(m0, alpha_t * ((-h).exp() - 1f32))?)?,
        Some(noise) => {
            let decay = (-2f32 * h).exp();
            ((scale(sample, sigma_t / sigma_s * (-h).exp())? + scale(m0, alpha_t * (1f32 - decay))?)?
                + scale(noise, sigma_t * (1f32 - decay).sqrt())?)?
        }
    })
}

/// λ at the step's target σ[index + 1] and at the two latest evaluations, σ[index] and σ[index − 1].
fn lambdas(sigmas: &[f32], index: usize) -> (f32, f32, f32) {
    (lambda(sigmas[index + 1]), lambda(sigmas[index]), lambda(sigmas[index - 1]))
}

/// DPM-Solver++(2)'s first difference D₁ = (m₀ − m₁) / r₀ with r₀ = h₀ / h.
fn first_difference(m0: &Tensor, m1: &Tensor, h_0: f32, h: f32) -> Result<Tensor> {
    Ok(scale(&(m0 - m1)?, 1f32 / (h_0 / h))?)
}

/// DPM-Solver++(2)'s deterministic update over a step of length h in λ: `x·σ_t/σ_s − α_t(e^{−h} − 1)·m` plus the
/// midpoint or Heun correction of D₁.
fn second_order_ode(
    x: &Tensor,
    sigma_ratio: f32,
    alpha_t: f32,
    h: f32,
    m: &Tensor,
    d1: &Tensor,
    heun: bool,
) -> Result<Tensor> {
    let e = (-h).exp() - 1f32;
    let d1_coefficient = if heun { alpha_t * (e / h + 1f32) } else { -(0.5f32 * (alpha_t * e)) };
    Ok(((scale(x, sigma_ratio)? - scale(m, alpha_t * e)?)? + scale(d1, d1_coefficient)?)?)
}

/// `solver_type`: midpoint (default) or heun; the DEIS/UniPC names map to midpoint, as diffusers maps them.
fn heun_solver(config: &SchedulerConfig, scheduler: &'static str) -> Result<bool> {
    let choices = [("midpoint", false), ("heun", true), ("logrho", false), ("bh1", false), ("bh2", false)];
    config.choice(scheduler, "solver_type", "midpoint", &choices)
}

pub struct DpmSolverMultistep {
    /// Its history holds x₀ predictions.
    core: Multistep,
    sde: bool,
    heun: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
}

impl DpmSolverMultistep {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let class = Class { name: "DPM-Solver", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };
        config.refuse_enabled(class.name, UNSUPPORTED)?;
        config.refuse_enabled(class.name, &[RESCALE])?;
        config.refuse_set(class.name, &["variance_type", "lambda_min_clipped"])?;
        // diffusers maps DEIS's `deis` to dpmsolver++.
        let algorithms = [("dpmsolver++", false), ("deis", false), ("sde-dpmsolver++", true)];
        let sde = config.choice(class.name, "algorithm_type", "dpmsolver++", &algorithms)?;
        let solver_order = config.usize_in(class.name, "solver_order", 2, 1..=3)?;
        Ok(Box::new(Self {
            core: Multistep::new(config, &class, steps, FinalSigma::FromConfig, solver_order)?,
            sde,
            heun: heun_solver(config, class.name)?,
            euler_at_final: config.bool_or("euler_at_final", false),
            final_sigma_zero: config.str_or("final_sigmas_type", "zero") == "zero",
        }))
    }

    /// Karras sigmas (`use_karras_sigmas`), as the "… Karras" names build the class.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Self::boxed(&config.clone().with("use_karras_sigmas", true.into()), steps)
    }

    /// DPM++ 2M SDE: the stochastic `sde-dpmsolver++`.
    pub fn sde(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Self::boxed(&config.clone().with("algorithm_type", "sde-dpmsolver++".into()), steps)
    }

    /// DPM++ 2M SDE Karras: Karras sigmas and the stochastic `sde-dpmsolver++`.
    pub fn sde_karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Self::sde(&config.clone().with("use_karras_sigmas", true.into()), steps)
    }

    /// DPM++ 3M SDE Karras: the SDE variant of the third-order solver on Karras sigmas.
    pub fn sde_3m_karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Self::sde_karras(&config.clone().with("solver_order", 3.into()), steps)
    }

    fn second_order(&self, sample: &Tensor, index: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let sigmas = &self.core.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[index + 1]);
        let (_, sigma_s0) = alpha_sigma(sigmas[index]);
        let (lambda_t, lambda_s0, lambda_s1) = lambdas(sigmas, index);
        let (m0, m1) = (self.core.history.back(0), self.core.history.back(1));
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let d1 = first_difference(m0, m1, h_0, h)?;
        match noise {
            None => second_order_ode(sample, sigma_t / sigma_s0, alpha_t, h, m0, &d1, self.heun),
            Some(noise) => {
                let decay = (-2f32 * h).exp();
                let d1_coefficient = if self.heun {
                    alpha_t * ((1f32 - decay) / (-2f32 * h) + 1f32)
                } else {
                    0.5f32 * (alpha_t * (1f32 - decay))
                };
                Ok((((scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(m0, alpha_t * (1f32 - decay))?)?
                    + scale(&d1, d1_coefficient)?)?
                    + scale(noise, sigma_t * (1f32 - decay).sqrt())?)?)
            }
        }
    }

    /// DPM-Solver++(3) from the last three x₀ predictions (its ODE form, or the SDE form with `noise`).
    fn third_order(&self, sample: &Tensor, index: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let sigmas = &self.core.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[index + 1]);
        let (_, sigma_s0) = alpha_sigma(sigmas[index]);
        let (lambda_t, lambda_s0, lambda_s1) = lambdas(sigmas, index);
        let lambda_s2 = lambda(sigmas[index - 2]);
        let history = &self.core.history;
        let (m0, m1, m2) = (history.back(0), history.back(1), history.back(2));
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = scale(&(m0 - m1)?, 1f32 / r0)?;
        let d1_1 = scale(&(m1 - m2)?, 1f32 / r1)?;
        let d1_diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + scale(&d1_diff, r0 / (r0 + r1))?)?;
        let d2 = scale(&d1_diff, 1f32 / (r0 + r1))?;
        Ok(match noise {
            None => {
                let e = (-h).exp() - 1f32;
                (((scale(sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * e)?)?
                    + scale(&d1, alpha_t * (e / h + 1f32))?)?
                    - scale(&d2, alpha_t * ((e + h) / (h * h) - 0.5f32))?)?
            }
            Some(noise) => {
                let decay = (-2f32 * h).exp();
                let two_h = 2f32 * h;
                ((((scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(m0, alpha_t * (1f32 - decay))?)?
                    + scale(&d1, alpha_t * ((1f32 - decay) / (-2f32 * h) + 1f32))?)?
                    + scale(&d2, alpha_t * ((1f32 - decay - two_h) / (two_h * two_h) - 0.5f32))?)?
                    + scale(noise, sigma_t * (1f32 - decay).sqrt())?)?
            }
        })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timetable(&self) -> &Timetable {
        &self.core.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let n = self.core.table.timesteps.len();
        let last_step = index + 1 == n;
        let lower_order_final =
            last_step && (self.euler_at_final || (self.core.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = index + 2 == n && self.core.lower_order_final && n < 15;
        self.core.history.push(self.core.x0(out, sample, index)?);
        // The SDE variant draws fresh noise at every step, whatever the order used.
        let noise = if self.sde { Some(rng.randn_tensor(out.dims(), out.device())?) } else { None };
        let (order, warm) = (self.core.solver_order, self.core.history.warm_steps);
        let prev = if order == 1 || warm < 1 || lower_order_final {
            first_order(&self.core.sigmas, index, self.core.history.back(0), sample, noise.as_ref())?
        } else if order == 2 || warm < 2 || lower_order_second {
            self.second_order(sample, index, noise.as_ref())?
        } else {
            self.third_order(sample, index, noise.as_ref())?
        };
        self.core.history.step_done();
        Ok(prev)
    }
}

/// diffusers' `DPMSolverSinglestepScheduler` (DPM-Solver++; orders 1 and 2 alternate, `get_order_list`).
pub struct DpmSolverSinglestep {
    /// Its history holds the last two x₀ predictions.
    core: Multistep,
    heun: bool,
    orders: Vec<usize>,
    /// The sample at the start of the current block (diffusers' `self.sample`).
    block_sample: Option<Tensor>,
}

impl DpmSolverSinglestep {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let class = Class { name: "DPM Single", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };
        config.refuse_enabled(class.name, UNSUPPORTED)?;
        config.refuse_set(class.name, &["variance_type", "lambda_min_clipped"])?;
        config.choice(class.name, "algorithm_type", "dpmsolver++", &[("dpmsolver++", ()), ("deis", ())])?;
        let order = config.usize_in(class.name, "solver_order", 2, 1..=2)?;
        // The singlestep solver always spaces its timesteps with linspace.
        let linspace = config.clone().with("timestep_spacing", "linspace".into());
        let core = Multistep::new(&linspace, &class, steps, FinalSigma::FromConfig, 2)?;
        let final_zero = config.str_or("final_sigmas_type", "zero") == "zero";
        // diffusers forces lower_order_final for uneven step counts and for a zero final sigma.
        let lower_order_final =
            config.bool_or("lower_order_final", false) || !steps.is_multiple_of(order) || final_zero;
        let mut orders: Vec<usize> = match (order, lower_order_final) {
            (1, _) => vec![1; steps],
            (_, true) if steps.is_multiple_of(2) => [1, 2].repeat(steps / 2 - 1).into_iter().chain([1, 1]).collect(),
            (_, true) => [1, 2].repeat(steps / 2).into_iter().chain([1]).collect(),
            (_, false) => [1, 2].repeat(steps / 2),
        };
        if final_zero {
            if let Some(last) = orders.last_mut() {
                *last = 1;
            }
        }
        Ok(Box::new(Self { core, heun: heun_solver(config, class.name)?, orders, block_sample: None }))
    }
}

impl Scheduler for DpmSolverSinglestep {
    fn timetable(&self) -> &Timetable {
        &self.core.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        self.core.history.push(self.core.x0(out, sample, index)?);
        let order = self.orders[index].min(self.core.history.len());
        if order == 1 {
            self.block_sample = Some(sample.clone());
        }
        let start = self.block_sample.as_ref().unwrap_or(sample);
        let prev = if order == 1 {
            first_order(&self.core.sigmas, index, self.core.history.back(0), start, None)?
        } else {
            // From the block's start (σ_{s1}) over both evaluations to σ_t.
            let sigmas = &self.core.sigmas;
            let (alpha_t, sigma_t) = alpha_sigma(sigmas[index + 1]);
            let (_, sigma_s1) = alpha_sigma(sigmas[index - 1]);
            let (lambda_t, lambda_s0, lambda_s1) = lambdas(sigmas, index);
            let (h, h_0) = (lambda_t - lambda_s1, lambda_s0 - lambda_s1);
            let (m0, m1) = (self.core.history.back(0), self.core.history.back(1));
            let d1 = first_difference(m0, m1, h_0, h)?;
            second_order_ode(start, sigma_t / sigma_s1, alpha_t, h, m1, &d1, self.heun)?
        };
        Ok(prev)
    }
}
