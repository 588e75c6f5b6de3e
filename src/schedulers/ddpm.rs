//! diffusers' `DDPMScheduler`: the ancestral posterior step, with fresh noise from the run's generator at every step
//! but the last (variance `fixed_small` by default, `fixed_small_log` / `fixed_large` as the config says).

use candle_core::{DType, Tensor};

use super::ddim::{divide, scale};
use super::schedule::{alphas_cumprod, betas, spaced_timesteps};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FixedVariance {
    Small,
    SmallLog,
    Large,
}

pub struct Ddpm {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    prediction_type: String,
    clip_sample: Option<f32>,
    variance: FixedVariance,
}

impl Ddpm {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        if config.bool_or("thresholding", false) {
            return Err(Error::Other("DDPM: `thresholding` is not supported".into()));
        }
        let variance = match config.str_or("variance_type", "fixed_small") {
            "fixed_small" => FixedVariance::Small,
            "fixed_small_log" => FixedVariance::SmallLog,
            "fixed_large" => FixedVariance::Large,
            other => return Err(Error::Other(format!("DDPM: variance_type {other:?} is not supported"))),
        };
        let prediction_type = config.str_or("prediction_type", "epsilon").to_string();
        if !["epsilon", "v_prediction", "sample"].contains(&prediction_type.as_str()) {
            return Err(Error::Other(format!("DDPM: unsupported prediction_type {prediction_type:?}")));
        }
        Ok(Box::new(Self {
            alphas_cumprod: alphas_cumprod(&betas(config)?),
            timesteps: spaced_timesteps(config, steps)?,
            prediction_type,
            clip_sample: config.bool_or("clip_sample", true).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            variance,
        }))
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let dtype = model_output.dtype();
        let out = model_output.to_dtype(DType::F32)?;
        let sample = sample.to_dtype(DType::F32)?;
        let t = self.timesteps[index] as usize;
        let alpha_t = self.alphas_cumprod[t];
        // The previous timestep is the next entry of the table (-1 after the last: ᾱ = 1).
        let alpha_prev = self.timesteps.get(index + 1).map_or(1f32, |&p| self.alphas_cumprod[p as usize]);
        let (beta_t, beta_prev) = (1f32 - alpha_t, 1f32 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1f32 - current_alpha;
        let mut x0 = match self.prediction_type.as_str() {
            "epsilon" => divide(&(&sample - scale(&out, beta_t.sqrt())?)?, alpha_t.sqrt())?,
            "v_prediction" => (scale(&sample, alpha_t.sqrt())? - scale(&out, beta_t.sqrt())?)?,
            _ => out.clone(),
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let x0_coefficient = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coefficient = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = (scale(&x0, x0_coefficient)? + scale(&sample, sample_coefficient)?)?;
        if t > 0 {
            let noise = rng.randn_tensor(model_output.dims(), model_output.device())?;
            let small = (beta_prev / beta_t * current_beta).max(1e-20);
            let std = match self.variance {
                FixedVariance::Small => small.sqrt(),
                FixedVariance::SmallLog => (0.5f32 * small.ln()).exp(),
                FixedVariance::Large => current_beta.sqrt(),
            };
            prev = (prev + scale(&noise, std)?)?;
        }
        Ok(prev.to_dtype(dtype)?)
    }
}
