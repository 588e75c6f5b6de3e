//! diffusers' `KDPM2DiscreteScheduler` ("DPM2 Karras", with `use_karras_sigmas`): k-diffusion's DPM-Solver-2, a
//! midpoint method in σ — each step but the last evaluates the model at σ_t and at the log-midpoint between σ_t
//! and σ_{t+1} (2n − 1 evaluations for n steps).

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::schedule::{
    alphas_cumprod, betas, interp, karras_sigmas, log_sigmas, numpy_linspace, sigma_to_t, spaced_timesteps,
    train_sigmas,
};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

pub struct Kdpm2 {
    /// t₀, t½₁, t₁, t½₂, t₂, … (one per model evaluation).
    timesteps: Vec<f64>,
    /// σ per step plus the final 0.
    sigmas: Vec<f32>,
    /// The log-midpoint levels: `midpoints[k]` lies between σ_{k−1} and σ_k (index 0 unused).
    midpoints: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: String,
    steps: usize,
    /// The step's start sample between its two evaluations.
    pending: Option<Tensor>,
}

impl Kdpm2 {
    /// "DPM2 Karras": Karras sigmas are part of the name.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let config = config.clone().with("use_karras_sigmas", true.into());
        let train = train_sigmas(&alphas_cumprod(&betas(&config)?));
        let log_train = log_sigmas(&train);
        let spacing = config.str_or("timestep_spacing", "linspace");
        let base: Vec<f64> = if spacing == "linspace" {
            let last = (config.usize_or("num_train_timesteps", 1000) - 1) as f64;
            numpy_linspace(0.0, last, steps).into_iter().rev().map(|t| t as f32 as f64).collect()
        } else {
            spaced_timesteps(&config, steps)?.into_iter().map(|t| t as f32 as f64).collect()
        };
        let interpolated: Vec<f64> = base.iter().map(|&t| interp(t, &train)).collect();
        let (min, max) = (interpolated[interpolated.len() - 1], interpolated[0]);
        let karras = karras_sigmas(config.f64_or("sigma_min", min), config.f64_or("sigma_max", max), steps);
        let step_timesteps: Vec<f64> = karras.iter().map(|&s| sigma_to_t(s, &log_train).round_ties_even()).collect();
        let mut sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        // torch: exp(lerp(ln σ_k, ln σ_{k−1}, 0.5)), lerp at weight ½ computed as end − (end − start)·½.
        let midpoints: Vec<f32> = (0..sigmas.len())
            .map(|k| {
                let (start, end) = (sigmas[k].ln(), sigmas[(k + sigmas.len() - 1) % sigmas.len()].ln());
                (end - (end - start) * 0.5).exp()
            })
            .collect();
        let mut timesteps = vec![step_timesteps[0]];
        for k in 1..steps {
            timesteps.push(sigma_to_t(midpoints[k] as f64, &log_train));
            timesteps.push(step_timesteps[k]);
        }
        let max_sigma = sigmas.iter().copied().fold(0f32, f32::max);
        let init_noise_sigma = match spacing {
            "linspace" | "trailing" => max_sigma,
            _ => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        let prediction_type = config.str_or("prediction_type", "epsilon").to_string();
        if !["epsilon", "v_prediction"].contains(&prediction_type.as_str()) {
            return Err(Error::Other(format!("DPM2: unsupported prediction_type {prediction_type:?}")));
        }
        Ok(Box::new(Self { timesteps, sigmas, midpoints, init_noise_sigma, prediction_type, steps, pending: None }))
    }

    /// The step (k) an evaluation belongs to, and whether it is the step's midpoint evaluation.
    fn position(index: usize) -> (usize, bool) {
        if index == 0 {
            (0, false)
        } else {
            ((index - 1) / 2 + usize::from(index.is_multiple_of(2)), !index.is_multiple_of(2))
        }
    }

    fn x0(&self, out: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        Ok(if self.prediction_type == "v_prediction" {
            let c = sigma * sigma + 1.0;
            (scale(out, -sigma / c.sqrt())? + divide(sample, c)?)?
        } else {
            (sample - scale(out, sigma)?)?
        })
    }
}

impl Scheduler for Kdpm2 {
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
        // diffusers' layout: σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0, 0.
        let n = self.sigmas.len();
        let mut v = vec![self.sigmas[0] as f64];
        v.extend(self.sigmas[1..].iter().flat_map(|&s| [s as f64, s as f64]));
        v.push(self.sigmas[n - 1] as f64);
        Some(v)
    }

    fn scale_model_input(&self, sample: Tensor, index: usize) -> Result<Tensor> {
        let (k, midpoint) = Self::position(index);
        let sigma = if midpoint { self.midpoints[k + 1] } else { self.sigmas[k] };
        Ok(divide(&sample, (sigma * sigma + 1.0).sqrt())?)
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let (k, midpoint) = Self::position(index);
        let (sigma, mid, next) = (self.sigmas[k], self.midpoints[k + 1], self.sigmas[k + 1]);
        let prev = match self.pending.take() {
            None => {
                let derivative = divide(&(&sample - self.x0(&out, &sample, sigma)?)?, sigma)?;
                if index + 1 < self.timesteps.len() {
                    self.pending = Some(sample.clone());
                }
                (&sample + scale(&derivative, mid - sigma)?)?
            }
            Some(start) => {
                debug_assert!(midpoint);
                let derivative = divide(&(&sample - self.x0(&out, &sample, mid)?)?, mid)?;
                (start + scale(&derivative, next - sigma)?)?
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
