//! diffusers' `LMSDiscreteScheduler`: linear multistep in σ over the last (up to 4) derivatives. The weights are
//! integrals of Lagrange basis polynomials over [σ_t, σ_{t+1}]; diffusers integrates them numerically (scipy `quad`),
//! we integrate the polynomial exactly (degree ≤ 3; quad's Gauss–Kronrod rule is exact for it up to rounding).

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::euler::SigmaTables;
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

const ORDER: usize = 4;

pub struct Lms {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: String,
    /// The last `ORDER` derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let SigmaTables { timesteps, sigmas, init_noise_sigma } = SigmaTables::new(config, steps, "LMS")?;
        let prediction_type = config.str_or("prediction_type", "epsilon").to_string();
        if !["epsilon", "v_prediction"].contains(&prediction_type.as_str()) {
            return Err(Error::Other(format!("LMS: unsupported prediction_type {prediction_type:?}")));
        }
        Ok(Box::new(Self { timesteps, sigmas, init_noise_sigma, prediction_type, derivatives: Vec::new() }))
    }

    /// ∫_{σ_t}^{σ_{t+1}} Π_{k≠j} (τ − σ_{t−k}) / (σ_{t−j} − σ_{t−k}) dτ, for the derivative `j` steps back.
    fn coefficient(&self, order: usize, t: usize, j: usize) -> f64 {
        let s = |k: usize| self.sigmas[t - k] as f64;
        // The basis polynomial's coefficients, lowest degree first.
        let mut poly = vec![1f64];
        for k in (0..order).filter(|&k| k != j) {
            let denominator = s(j) - s(k);
            let mut next = vec![0f64; poly.len() + 1];
            for (d, &c) in poly.iter().enumerate() {
                next[d + 1] += c / denominator;
                next[d] -= c * s(k) / denominator;
            }
            poly = next;
        }
        let antiderivative =
            |x: f64| poly.iter().enumerate().map(|(d, &c)| c * x.powi(d as i32 + 1) / (d + 1) as f64).sum::<f64>();
        antiderivative(self.sigmas[t + 1] as f64) - antiderivative(self.sigmas[t] as f64)
    }
}

impl Scheduler for Lms {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn sigmas(&self) -> Option<Vec<f64>> {
        Some(self.sigmas.iter().map(|&s| s as f64).collect())
    }

    fn scale_model_input(&self, sample: Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        Ok(divide(&sample, (sigma * sigma + 1.0).sqrt())?)
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let sigma = self.sigmas[index];
        let x0 = if self.prediction_type == "v_prediction" {
            let c = sigma * sigma + 1.0;
            (scale(&out, -sigma / c.sqrt())? + divide(&sample, c)?)?
        } else {
            (&sample - scale(&out, sigma)?)?
        };
        self.derivatives.push(divide(&(&sample - x0)?, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        let mut update: Option<Tensor> = None;
        for (j, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            let term = scale(derivative, self.coefficient(order, index, j) as f32)?;
            update = Some(match update {
                None => term,
                Some(u) => (u + term)?,
            });
        }
        let update = update.expect("at least one derivative");
        Ok((sample + update)?.to_dtype(dtype)?)
    }
}
