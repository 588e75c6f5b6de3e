//! diffusers' `TCDScheduler` ("TCD", trajectory consistency distillation): on LCM's timesteps, each step predicts x₀
//! and ε, moves the sample to an intermediate timestep s = ⌊(1 − γ)·t_next⌋ along the predicted trajectory, then
//! re-noises it from s up to t_next with fresh noise. γ (diffusers' `eta`, default 0.3) sets how stochastic: 0 is
//! deterministic, 1 re-noises all the way (LCM-like).

use candle_core::Tensor;

use super::lcm::consistency_timesteps;
use super::schedule::{Class, NoiseSchedule, Spacing, ALL_PREDICTIONS, RESCALE, THRESHOLDING};
use super::sigma::scale;
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::{Error, Result};

const CLASS: Class = Class { name: "TCD", default_spacing: Spacing::Leading, predictions: ALL_PREDICTIONS };

/// The config keys `TCDScheduler` reads besides the shared schedule keys (its `clip_sample` and
/// `timestep_scaling` are read but unused by its step).
pub const KEYS: &str = "original_inference_steps clip_sample clip_sample_range set_alpha_to_one thresholding \
                        dynamic_thresholding_ratio sample_max_value timestep_scaling rescale_betas_zero_snr";

/// diffusers' default γ (`TCDScheduler.step(eta=0.3)`).
pub const DEFAULT_ETA: f64 = 0.3;

pub struct Tcd {
    schedule: NoiseSchedule,
    table: Timetable,
    /// γ in [0, 1] (a Python float in diffusers).
    eta: f64,
}

impl Tcd {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &[THRESHOLDING, RESCALE])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let timesteps = consistency_timesteps(config, &schedule, steps, CLASS.name)?;
        Ok(Box::new(Self { table: Timetable::variance_preserving(timesteps, &schedule), schedule, eta: DEFAULT_ETA }))
    }
}

impl Scheduler for Tcd {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn set_eta(&mut self, eta: f64) -> Result<bool> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid("eta", format!("TCD's gamma must be between 0 and 1, got {eta}")));
        }
        self.eta = eta;
        Ok(true)
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let timesteps = &self.table.timesteps;
        let next = timesteps.get(index + 1).map_or(0, |&t| t as usize);
        // torch.floor((1 − η) · t_next) on the int64 timestep: a float32 product.
        let s = ((1f64 - self.eta) as f32 * next as f32).floor() as usize;
        let (alpha_t, sigma_t) = self.schedule.alpha_sigma_at(timesteps[index] as usize);
        let (alpha_s, sigma_s) = self.schedule.alpha_sigma_at(s);
        let prediction = self.schedule.prediction;
        let x0 = prediction.x0_at_alpha(out, sample, alpha_t, sigma_t)?;
        let eps = prediction.epsilon_at_alpha(out, sample, alpha_t, sigma_t)?;
        let noised = (scale(&x0, alpha_s)? + scale(&eps, sigma_s)?)?;
        if self.eta <= 0.0 || index + 1 == timesteps.len() {
            return Ok(noised);
        }
        let noise = rng.randn_tensor(out.dims(), out.device())?;
        let ratio = self.schedule.alphas_cumprod[next] / self.schedule.alphas_cumprod[s];
        Ok((scale(&noised, ratio.sqrt())? + scale(&noise, (1f32 - ratio).sqrt())?)?)
    }
}
