//! diffusers' `DDIMScheduler` with η = 0 (as the SDXL pipeline runs it): deterministic, one model call per step.

use candle_core::{DType, Tensor};

use super::schedule::{alphas_cumprod, betas, spaced_timesteps};
use super::{Scheduler, SchedulerConfig};
use crate::rng::TorchRng;
use crate::{Error, Result};

pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    step_ratio: usize,
    prediction_type: String,
    clip_sample: Option<f32>,
}

impl Ddim {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let alphas_cumprod = alphas_cumprod(&betas(config)?);
        let final_alpha_cumprod = if config.bool_or("set_alpha_to_one", true) { 1.0 } else { alphas_cumprod[0] };
        if config.bool_or("thresholding", false) {
            return Err(Error::Other("DDIM: `thresholding` is not supported".into()));
        }
        Ok(Box::new(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: spaced_timesteps(config, steps)?,
            step_ratio: config.usize_or("num_train_timesteps", 1000) / steps,
            prediction_type: config.str_or("prediction_type", "epsilon").to_string(),
            clip_sample: config.bool_or("clip_sample", true).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
        }))
    }
}

/// `tensor * scalar` with the scalar rounded to f32 first, as torch multiplies a float32 tensor by a 0-d float32
/// tensor.
pub(super) fn scale(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `tensor / scalar` as an exact division (not a multiplication by the reciprocal).
pub(super) fn divide(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?.to_dtype(t.dtype())?)
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let t = self.timesteps[index] as i64;
        let prev = t - self.step_ratio as i64;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1f32 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let sample = &sample.to_dtype(DType::F32)?;
        let out = &model_output.to_dtype(DType::F32)?;
        let (mut x0, eps) = match self.prediction_type.as_str() {
            "epsilon" => (divide(&(sample - scale(out, sqrt_b)?)?, sqrt_a)?, out.clone()),
            "sample" => (out.clone(), divide(&(sample - scale(out, sqrt_a)?)?, sqrt_b)?),
            "v_prediction" => {
                (scale(sample, sqrt_a)?.sub(&scale(out, sqrt_b)?)?, scale(out, sqrt_a)?.add(&scale(sample, sqrt_b)?)?)
            }
            other => return Err(Error::Other(format!("DDIM: unsupported prediction_type {other:?}"))),
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let direction = scale(&eps, (1f32 - alpha_prev).sqrt())?;
        Ok((scale(&x0, alpha_prev.sqrt())? + direction)?.to_dtype(model_output.dtype())?)
    }
}
