//! diffusers' `DDPMScheduler`: the ancestral posterior step, with fresh noise from the run's generator at every step
//! but the last (variance `fixed_small` by default, `fixed_small_log` / `fixed_large` as the config says).

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Spacing, ALL_PREDICTIONS};
use super::sigma::scale;
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

const CLASS: Class = Class { name: "DDPM", default_spacing: Spacing::Leading, predictions: ALL_PREDICTIONS };

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FixedVariance {
    Small,
    SmallLog,
    Large,
}

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "variance_type clip_sample thresholding dynamic_thresholding_ratio clip_sample_range \
                        sample_max_value rescale_betas_zero_snr";

pub struct Ddpm {
    schedule: NoiseSchedule,
    table: Timetable,
    clip_sample: Option<f32>,
    variance: FixedVariance,
}

impl Ddpm {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &["thresholding", "rescale_betas_zero_snr"])?;
        let variances = [
            ("fixed_small", FixedVariance::Small),
            ("fixed_small_log", FixedVariance::SmallLog),
            ("fixed_large", FixedVariance::Large),
        ];
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        Ok(Box::new(Self {
            table: Timetable::variance_preserving(schedule.spaced_timesteps(steps), &schedule),
            clip_sample: config.bool_or("clip_sample", true).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            variance: config.choice(CLASS.name, "variance_type", "fixed_small", &variances)?,
            schedule,
        }))
    }
}

impl Scheduler for Ddpm {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let alphas_cumprod = &self.schedule.alphas_cumprod;
        let timesteps = &self.table.timesteps;
        let t = timesteps[index] as usize;
        let alpha_t = alphas_cumprod[t];
        // The previous timestep is the next entry of the table (-1 after the last: ᾱ = 1).
        let alpha_prev = timesteps.get(index + 1).map_or(1f32, |&p| alphas_cumprod[p as usize]);
        let (beta_t, beta_prev) = (1f32 - alpha_t, 1f32 - alpha_prev);
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1f32 - current_alpha;
        let mut x0 = self.schedule.prediction.x0_at_alpha(out, sample, alpha_t.sqrt(), beta_t.sqrt())?;
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let x0_coefficient = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coefficient = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = (scale(&x0, x0_coefficient)? + scale(sample, sample_coefficient)?)?;
        if t > 0 {
            let noise = rng.randn_tensor(out.dims(), out.device())?;
            let small = (beta_prev / beta_t * current_beta).max(1e-20);
            let std = match self.variance {
                FixedVariance::Small => small.sqrt(),
                FixedVariance::SmallLog => (0.5f32 * small.ln()).exp(),
                FixedVariance::Large => current_beta.sqrt(),
            };
            prev = (prev + scale(&noise, std)?)?;
        }
        Ok(prev)
    }
}
