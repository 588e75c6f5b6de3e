//! diffusers' `DDIMScheduler` with η = 0 (as the SDXL pipeline runs it): deterministic, one model call per step.

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Spacing, ALL_PREDICTIONS};
use super::sigma::scale;
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

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
}

impl Ddim {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &["thresholding", "rescale_betas_zero_snr"])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let final_alpha_cumprod =
            if config.bool_or("set_alpha_to_one", true) { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Box::new(Self {
            table: Timetable::unscaled(schedule.spaced_timesteps(steps), None),
            final_alpha_cumprod,
            step_ratio: schedule.num_train_timesteps / steps,
            clip_sample: config.bool_or("clip_sample", true).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            schedule,
        }))
    }
}

impl Scheduler for Ddim {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
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
        let direction = scale(&eps, (1f32 - alpha_prev).sqrt())?;
        Ok((scale(&x0, alpha_prev.sqrt())? + direction)?)
    }
}
