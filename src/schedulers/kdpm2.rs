//! diffusers' `KDPM2DiscreteScheduler` ("DPM2 Karras", with `use_karras_sigmas`): k-diffusion's DPM-Solver-2, a
//! midpoint method in σ — each step but the last evaluates the model at σ_t and at the log-midpoint between σ_t
//! and σ_{t+1} (2n − 1 evaluations for n steps). The ancestral variant (`KDPM2AncestralDiscreteScheduler`, "DPM2 a
//! Karras") steps down to σ_down instead and adds σ_up of fresh noise after each second evaluation.

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
    /// t₀, t½₀, t₁, t½₁, t₂, … (one per model evaluation).
    timesteps: Vec<f64>,
    /// σ per step plus the final 0.
    sigmas: Vec<f32>,
    /// Per step k: the log-midpoint level where the second evaluation happens.
    midpoints: Vec<f32>,
    /// Per step k: the level the second evaluation steps down to (σ_{k+1}, or σ_down for the ancestral variant).
    down: Vec<f32>,
    /// Per step k: the standard deviation of the noise added back (`None` for the deterministic variant).
    up: Option<Vec<f32>>,
    init_noise_sigma: f32,
    prediction_type: String,
    steps: usize,
    /// The step's start sample between its two evaluations.
    pending: Option<Tensor>,
}

/// torch's `start.log().lerp(end.log(), 0.5).exp()`: lerp at weight ½ is computed as end − (end − start)·½.
fn log_midpoint(start: f32, end: f32) -> f32 {
    let (start, end) = (start.ln(), end.ln());
    (end - (end - start) * 0.5).exp()
}

impl Kdpm2 {
    /// "DPM2 Karras" (`KDPM2DiscreteScheduler`): Karras sigmas are part of the name.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, false)?))
    }

    /// "DPM2 a Karras" (`KDPM2AncestralDiscreteScheduler`): each step goes down to σ_down and adds σ_up of fresh
    /// noise, as k-diffusion's `sample_dpm_2_ancestral` does.
    pub fn ancestral_karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, true)?))
    }

    fn new(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
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
        // Both classes compute these in float32 torch arithmetic; the last step's midpoint is 0 (a plain Euler step
        // to the final level, no second evaluation).
        let (midpoints, down, up) = if ancestral {
            let mut up = Vec::with_capacity(steps);
            let mut down = Vec::with_capacity(steps);
            for k in 0..steps {
                let (sigma, next) = (sigmas[k], sigmas[k + 1]);
                let u = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                up.push(u);
                down.push((next * next - u * u).sqrt());
            }
            let mut midpoints: Vec<f32> = (0..steps).map(|k| log_midpoint(sigmas[k], down[k])).collect();
            midpoints[steps - 1] = 0.0;
            (midpoints, down, Some(up))
        } else {
            let midpoints = (0..steps).map(|k| log_midpoint(sigmas[k + 1], sigmas[k])).collect();
            (midpoints, sigmas[1..].to_vec(), None)
        };
        let mut timesteps = vec![step_timesteps[0]];
        for k in 1..steps {
            timesteps.push(sigma_to_t(midpoints[k - 1] as f64, &log_train));
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
        Ok(Self { timesteps, sigmas, midpoints, down, up, init_noise_sigma, prediction_type, steps, pending: None })
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
        let sigma = if midpoint { self.midpoints[k] } else { self.sigmas[k] };
        Ok(divide(&sample, (sigma * sigma + 1.0).sqrt())?)
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let (k, midpoint) = Self::position(index);
        let (sigma, mid) = (self.sigmas[k], self.midpoints[k]);
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
                let prev = (start + scale(&derivative, self.down[k] - sigma)?)?;
                match &self.up {
                    // diffusers draws the noise in the model output's shape and dtype.
                    Some(up) => {
                        let noise = rng.randn_tensor(model_output.dims(), model_output.device())?;
                        (prev + scale(&noise.to_dtype(DType::F32)?, up[k])?)?
                    }
                    None => prev,
                }
            }
        };
        Ok(prev.to_dtype(dtype)?)
    }
}
