//! DPM-Solver++: diffusers' `DPMSolverMultistepScheduler` (first and second order, midpoint or Heun, and its SDE
//! variant), registered as "DPM Multi", "DPM++ 2M Karras" and "DPM++ 2M SDE Karras" (the same class with Karras
//! sigmas, and with `sde-dpmsolver++`); and `DPMSolverSinglestepScheduler` ("DPM Single"), which takes the same
//! first-order step and its own second-order step from the start of each two-step block.

use candle_core::{DType, Tensor};

use super::ddim::scale;
use super::multistep::{alpha_sigma, lambda, reject_unsupported, tables, FinalSigma, Prediction};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

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

pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    sde: bool,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The last converted (x₀) model outputs, oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        reject_unsupported(config, "DPM-Solver")?;
        // diffusers maps DEIS's `deis` to dpmsolver++ and `logrho`/`bh1`/`bh2` to midpoint.
        let sde = match config.str_or("algorithm_type", "dpmsolver++") {
            "dpmsolver++" | "deis" => false,
            "sde-dpmsolver++" => true,
            other => {
                return Err(Error::Other(format!(
                    "DPM-Solver: algorithm_type {other:?} is not supported (dpmsolver++, sde-dpmsolver++)"
                )))
            }
        };
        let solver_order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&solver_order) {
            return Err(Error::Other(format!("DPM-Solver: solver_order {solver_order} is not supported (1 or 2)")));
        }
        let t = tables(config, steps, FinalSigma::FromConfig)?;
        Ok(Box::new(Self {
            timesteps: t.timesteps,
            sigmas: t.sigmas,
            prediction: Prediction::from_config(config, "DPM-Solver")?,
            sde,
            heun: config.str_or("solver_type", "midpoint") == "heun",
            solver_order,
            lower_order_final: config.bool_or("lower_order_final", true),
            euler_at_final: config.bool_or("euler_at_final", false),
            final_sigma_zero: config.str_or("final_sigmas_type", "zero") == "zero",
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        }))
    }

    /// Karras sigmas (`use_karras_sigmas`), as the "… Karras" names build the class.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Self::boxed(&config.clone().with("use_karras_sigmas", true.into()), steps)
    }

    /// DPM++ 2M SDE Karras: Karras sigmas and the stochastic `sde-dpmsolver++`.
    pub fn sde_karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let config =
            config.clone().with("use_karras_sigmas", true.into()).with("algorithm_type", "sde-dpmsolver++".into());
        Self::boxed(&config, steps)
    }

    fn second_order(&self, sample: &Tensor, index: usize, noise: Option<&Tensor>) -> Result<Tensor> {
        let (s_t, s_s0, s_s1) = (self.sigmas[index + 1], self.sigmas[index], self.sigmas[index - 1]);
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (_, sigma_s0) = alpha_sigma(s_s0);
        let (lambda_t, lambda_s0, lambda_s1) = (lambda(s_t), lambda(s_s0), lambda(s_s1));
        let n = self.model_outputs.len();
        let (m0, m1) = (&self.model_outputs[n - 1], &self.model_outputs[n - 2]);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = scale(&(m0 - m1)?, 1f32 / r0)?;
        Ok(match noise {
            None => {
                let e = (-h).exp() - 1f32;
                let d1_coefficient = if self.heun { alpha_t * (e / h + 1f32) } else { -(0.5f32 * (alpha_t * e)) };
                ((scale(sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * e)?)? + scale(&d1, d1_coefficient)?)?
            }
            Some(noise) => {
                let decay = (-2f32 * h).exp();
                let d1_coefficient = if self.heun {
                    alpha_t * ((1f32 - decay) / (-2f32 * h) + 1f32)
                } else {
                    0.5f32 * (alpha_t * (1f32 - decay))
                };
                (((scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(m0, alpha_t * (1f32 - decay))?)?
                    + scale(&d1, d1_coefficient)?)?
                    + scale(noise, sigma_t * (1f32 - decay).sqrt())?)?
            }
        })
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let n = self.timesteps.len();
        let last_step = index + 1 == n;
        let lower_order_final =
            last_step && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let sample = sample.to_dtype(DType::F32)?;
        let x0 = self.prediction.x0(&model_output.to_dtype(DType::F32)?, &sample, self.sigmas[index])?;
        if self.model_outputs.len() == self.solver_order {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        // The SDE variant draws fresh noise at every step, whatever the order used.
        let noise = if self.sde { Some(rng.randn_tensor(model_output.dims(), model_output.device())?) } else { None };
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let m0 = self.model_outputs.last().expect("pushed");
            first_order(&self.sigmas, index, m0, &sample, noise.as_ref())?
        } else {
            self.second_order(&sample, index, noise.as_ref())?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(prev.to_dtype(dtype)?)
    }
}

/// diffusers' `DPMSolverSinglestepScheduler` (DPM-Solver++; orders 1 and 2 alternate, `get_order_list`).
pub struct DpmSolverSinglestep {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    heun: bool,
    orders: Vec<usize>,
    /// The last two x₀ predictions, oldest first.
    model_outputs: Vec<Tensor>,
    /// The sample at the start of the current block (diffusers' `self.sample`).
    block_sample: Option<Tensor>,
}

impl DpmSolverSinglestep {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        reject_unsupported(config, "DPM Single")?;
        match config.str_or("algorithm_type", "dpmsolver++") {
            "dpmsolver++" | "deis" => {}
            other => {
                return Err(Error::Other(format!(
                    "DPM Single: algorithm_type {other:?} is not supported (dpmsolver++)"
                )))
            }
        }
        let order = config.usize_or("solver_order", 2);
        if !(1..=2).contains(&order) {
            return Err(Error::Other(format!("DPM Single: solver_order {order} is not supported (1 or 2)")));
        }
        // The singlestep solver always spaces its timesteps with linspace.
        let t = tables(&config.clone().with("timestep_spacing", "linspace".into()), steps, FinalSigma::FromConfig)?;
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
        Ok(Box::new(Self {
            timesteps: t.timesteps,
            sigmas: t.sigmas,
            prediction: Prediction::from_config(config, "DPM Single")?,
            heun: config.str_or("solver_type", "midpoint") == "heun",
            orders,
            model_outputs: Vec::new(),
            block_sample: None,
        }))
    }
}

impl Scheduler for DpmSolverSinglestep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let x0 = self.prediction.x0(&model_output.to_dtype(DType::F32)?, &sample, self.sigmas[index])?;
        if self.model_outputs.len() == 2 {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        let order = self.orders[index].min(self.model_outputs.len());
        if order == 1 {
            self.block_sample = Some(sample.clone());
        }
        let start = self.block_sample.as_ref().unwrap_or(&sample);
        let prev = if order == 1 {
            first_order(&self.sigmas, index, self.model_outputs.last().expect("pushed"), start, None)?
        } else {
            // From the block's start (σ_{s1}) over both evaluations to σ_t.
            let (s_t, s_s0, s_s1) = (self.sigmas[index + 1], self.sigmas[index], self.sigmas[index - 1]);
            let (alpha_t, sigma_t) = alpha_sigma(s_t);
            let (_, sigma_s1) = alpha_sigma(s_s1);
            let (lambda_t, lambda_s0, lambda_s1) = (lambda(s_t), lambda(s_s0), lambda(s_s1));
            let (m0, m1) = (&self.model_outputs[1], &self.model_outputs[0]);
            let (h, h_0) = (lambda_t - lambda_s1, lambda_s0 - lambda_s1);
            let d1 = scale(&(m0 - m1)?, 1f32 / (h_0 / h))?;
            let e = (-h).exp() - 1f32;
            let d1_coefficient = if self.heun { alpha_t * (e / h + 1f32) } else { -(0.5f32 * (alpha_t * e)) };
            ((scale(start, sigma_t / sigma_s1)? - scale(m1, alpha_t * e)?)? + scale(&d1, d1_coefficient)?)?
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
