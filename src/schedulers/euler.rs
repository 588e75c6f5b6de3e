//! diffusers' Euler schedulers on sigmas interpolated from the training schedule: `EulerDiscreteScheduler` ("Euler",
//! no churn: deterministic) and `EulerAncestralDiscreteScheduler` ("Euler a": steps down to σ_down and adds fresh
//! noise of σ_up from the run's generator).

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::schedule::{alphas_cumprod, betas, interp, numpy_linspace, spaced_timesteps, train_sigmas};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

pub struct Euler {
    timesteps: Vec<f64>,
    /// One per timestep plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: String,
    ancestral: bool,
}

impl Euler {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, false)?))
    }

    /// "Euler a" (`EulerAncestralDiscreteScheduler`).
    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, true)?))
    }

    fn new(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        let SigmaTables { timesteps, sigmas, init_noise_sigma } = SigmaTables::new(config, steps, "Euler")?;
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: config.str_or("prediction_type", "epsilon").to_string(),
            ancestral,
        })
    }
}

/// The σ-space tables of the Euler-family schedulers (Euler, Euler a, Heun): timesteps by the spacing rule,
/// sigmas interpolated from the training schedule (numpy float64, stored as float32) plus a final 0, and the
/// initial noise scale.
pub(super) struct SigmaTables {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaTables {
    pub fn new(config: &SchedulerConfig, steps: usize, scheduler: &str) -> Result<Self> {
        let train = train_sigmas(&alphas_cumprod(&betas(config)?));
        let spacing = config.str_or("timestep_spacing", "linspace");
        // linspace keeps fractional timesteps (numpy float64 linspace stored as float32); the other rules are
        // integer-valued.
        let timesteps: Vec<f64> = if spacing == "linspace" {
            let last = (config.usize_or("num_train_timesteps", 1000) - 1) as f64;
            numpy_linspace(0.0, last, steps).into_iter().rev().map(|t| t as f32 as f64).collect()
        } else {
            spaced_timesteps(config, steps)?.into_iter().map(|t| t as f32 as f64).collect()
        };
        if config.bool_or("use_karras_sigmas", false) || config.str_or("interpolation_type", "linear") != "linear" {
            return Err(Error::Other(format!(
                "{scheduler}: Karras sigmas / log-linear interpolation are not supported yet"
            )));
        }
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, &train) as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0f32, f32::max);
        let init_noise_sigma = match spacing {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        };
        Ok(Self { timesteps, sigmas, init_noise_sigma })
    }
}

impl Scheduler for Euler {
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

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let sample32 = sample.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        let x0 = match self.prediction_type.as_str() {
            "epsilon" => (&sample32 - scale(&out, sigma)?)?,
            "v_prediction" => {
                let c = sigma * sigma + 1.0;
                (scale(&out, -sigma / c.sqrt())? + divide(&sample32, c)?)?
            }
            other => return Err(Error::Other(format!("Euler: unsupported prediction_type {other:?}"))),
        };
        let derivative = divide(&(&sample32 - x0)?, sigma)?;
        let next = self.sigmas[index + 1];
        let prev = if self.ancestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            let down = (next * next - up * up).sqrt();
            let prev = (&sample32 + scale(&derivative, down - sigma)?)?;
            let noise = rng.randn_tensor(model_output.dims(), model_output.device())?;
            (prev + scale(&noise, up)?)?
        } else {
            (&sample32 + scale(&derivative, next - sigma)?)?
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}
