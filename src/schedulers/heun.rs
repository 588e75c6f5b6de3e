//! diffusers' `HeunDiscreteScheduler`: Euler's step followed by a trapezoidal correction, so every step but the last
//! evaluates the model twice (2n − 1 evaluations for n steps; `timesteps()` lists each evaluation, as diffusers'
//! `scheduler.timesteps` does).

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::euler::SigmaTables;
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

pub struct Heun {
    /// One per model evaluation: t₀, t₁, t₁, …, t_{n−1}, t_{n−1}.
    timesteps: Vec<f64>,
    /// σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0: the level of each evaluation, then the end.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: String,
    clip_sample: Option<f32>,
    steps: usize,
    /// Between the two evaluations of a step: the first derivative, the step size and the step's start sample.
    pending: Option<(Tensor, f32, Tensor)>,
}

impl Heun {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let t = SigmaTables::new(config, steps, "Heun")?;
        let n = t.timesteps.len();
        let timesteps = std::iter::once(t.timesteps[0]).chain(t.timesteps[1..].iter().flat_map(|&x| [x, x])).collect();
        let sigmas = std::iter::once(t.sigmas[0])
            .chain(t.sigmas[1..n].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(t.sigmas[n]))
            .collect();
        let prediction_type = config.str_or("prediction_type", "epsilon").to_string();
        if !["epsilon", "v_prediction", "sample"].contains(&prediction_type.as_str()) {
            return Err(Error::Other(format!("Heun: unsupported prediction_type {prediction_type:?}")));
        }
        Ok(Box::new(Self {
            timesteps,
            sigmas,
            init_noise_sigma: t.init_noise_sigma,
            prediction_type,
            clip_sample: config.bool_or("clip_sample", false).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            steps,
            pending: None,
        }))
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn num_inference_steps(&self) -> usize {
        self.steps
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
        let first = self.pending.is_none();
        // The first evaluation of a step is at σ[index]; the second at σ[index], the first's target.
        let (sigma, sigma_next) = if first {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        let sigma_input = if first { sigma } else { sigma_next };
        let mut x0 = match self.prediction_type.as_str() {
            "epsilon" => (&sample - scale(&out, sigma_input)?)?,
            "v_prediction" => {
                let c = sigma_input * sigma_input + 1.0;
                (scale(&out, -sigma_input / c.sqrt())? + divide(&sample, c)?)?
            }
            _ => out.clone(),
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let prev = match self.pending.take() {
            None => {
                let derivative = divide(&(&sample - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&sample + scale(&derivative, dt)?)?;
                // The last step (σ_next = 0) has no second evaluation.
                if index + 1 < self.timesteps.len() {
                    self.pending = Some((derivative, dt, sample));
                }
                prev
            }
            Some((first_derivative, dt, start)) => {
                let derivative = divide(&(&sample - x0)?, sigma_next)?;
                let average = scale(&(first_derivative + derivative)?, 0.5)?;
                (start + scale(&average, dt)?)?
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
