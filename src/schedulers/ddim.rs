//! diffusers' `DDIMScheduler`, one model call per step: deterministic with η = 0 (the SDXL pipeline's default);
//! with η > 0 (the request's `eta`) it adds η·σ_t of fresh noise, DDPM-like at η = 1.

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Spacing, ALL_PREDICTIONS};
use super::sigma::scale;
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::{Error, Result};

const CLASS: Class = Class { name: "DDIM", default_spacing: Spacing::Leading, predictions: ALL_PREDICTIONS };

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "clip_sample set_alpha_to_one thresholding dynamic_thresholding_ratio clip_sample_range \
                        sample_max_value rescale_betas_zero_snr";

pub struct Ddim {
    schedule: NoiseSchedule,
    table: Timetable,
    /// ᾱ after the last step: 1 with `set_alpha_to_one` (the class default), else ᾱ₀.
    final_alpha_cumprod: f32,
    step_ratio: usize,
    /// x₀ is clamped to ±this (`clip_sample`, on by default in the class; `clip_sample_range`).
    clip_sample: Option<f32>,
    /// η (`step(eta=…)`, a Python float).
    eta: f64,
}

impl Ddim {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &["thresholding", "rescale_betas_zero_snr"])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let final_alpha_cumprod =
            if config.bool_or("set_alpha_to_one", true) { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Box::new(Self {
            table: Timetable::variance_preserving(schedule.spaced_timesteps(steps), &schedule),
            final_alpha_cumprod,
            step_ratio: schedule.num_train_timesteps / steps,
            clip_sample: config.bool_or("clip_sample", true).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            eta: 0.0,
            schedule,
        }))
    }
}

impl Scheduler for Ddim {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn set_eta(&mut self, eta: f64) -> Result<bool> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::invalid("eta", format!("DDIM's eta must be 0 or more, got {eta}")));
        }
        self.eta = eta;
        Ok(true)
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let t = self.table.timesteps[index] as i64;
        let prev = t - self.step_ratio as i64;
        let alpha_t = self.schedule.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 { self.schedule.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), (1f32 - alpha_t).sqrt());
        let prediction = self.schedule.prediction;
        let mut x0 = prediction.x0_at_alpha(out, sample, sqrt_a, sqrt_b)?;
        let eps = prediction.epsilon_at_alpha(out, sample, sqrt_a, sqrt_b)?;
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        // σ_t = η·√((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)) (`_get_variance`), float32 on 0-d tensors.
        let variance = ((1f32 - alpha_prev) / (1f32 - alpha_t)) * (1f32 - alpha_t / alpha_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = scale(&eps, (1f32 - alpha_prev - std_dev * std_dev).sqrt())?;
        let prev = (scale(&x0, alpha_prev.sqrt())? + direction)?;
        if self.eta <= 0.0 {
            return Ok(prev);
        }
        let noise = rng.randn_tensor(out.dims(), out.device())?;
        Ok((prev + scale(&noise, std_dev)?)?)
    }
}
