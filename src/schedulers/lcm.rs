//! diffusers' `LCMScheduler` ("LCM"): latent consistency sampling. Each step maps the sample straight to a
//! denoised estimate through the consistency boundary condition (c_skip, c_out), then re-noises it to the next
//! timestep with fresh noise from the run's generator; the last step returns the estimate itself. Its timesteps are
//! a subset of the `original_inference_steps` the model was distilled on (the spacing keys are not read).

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Spacing, ALL_PREDICTIONS, RESCALE, THRESHOLDING};
use super::sigma::scale;
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::{Error, Result};

const CLASS: Class = Class { name: "LCM", default_spacing: Spacing::Leading, predictions: ALL_PREDICTIONS };

/// The config keys `LCMScheduler` reads besides the shared schedule keys.
pub const KEYS: &str = "original_inference_steps clip_sample clip_sample_range set_alpha_to_one thresholding \
                        dynamic_thresholding_ratio sample_max_value timestep_scaling rescale_betas_zero_snr";

/// The timesteps of LCM's and TCD's `set_timesteps`: the `original_steps` evenly spaced training timesteps the model
/// was distilled on (`k·i − 1`, `k = train / original_steps`), noisiest first, of which `n` are taken at evenly
/// spaced (floored) indices.
pub(super) fn consistency_timesteps(
    config: &SchedulerConfig,
    schedule: &NoiseSchedule,
    n: usize,
    scheduler: &'static str,
) -> Result<Vec<f64>> {
    let train = schedule.num_train_timesteps;
    let original_steps = config.usize_in(scheduler, "original_inference_steps", 50, 1..=train)?;
    if n > original_steps {
        return Err(Error::invalid(
            "num_inference_steps",
            format!(
                "{scheduler} takes its steps from the {original_steps} steps the model was distilled on \
                 (original_inference_steps): at most {original_steps}, got {n}"
            ),
        ));
    }
    let k = train / original_steps;
    let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    // np.linspace(0, len, n, endpoint=False), floored: i · (len / n) in float64.
    let spacing = original_steps as f64 / n as f64;
    Ok((0..n).map(|i| origin[(i as f64 * spacing).floor() as usize] as f64).collect())
}

pub struct Lcm {
    schedule: NoiseSchedule,
    table: Timetable,
    /// The consistency parametrisation's time scale (`timestep_scaling`, default 10).
    timestep_scaling: f32,
    /// x₀ is clamped to ±this (`clip_sample`, off by default; `clip_sample_range`).
    clip_sample: Option<f32>,
}

impl Lcm {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &[THRESHOLDING, RESCALE])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let timesteps = consistency_timesteps(config, &schedule, steps, CLASS.name)?;
        Ok(Box::new(Self {
            table: Timetable::variance_preserving(timesteps, &schedule),
            timestep_scaling: config.f64_or("timestep_scaling", 10.0) as f32,
            clip_sample: config.bool_or("clip_sample", false).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            schedule,
        }))
    }

    /// The boundary-condition scalings `(c_skip, c_out)` at timestep `t` (σ_data = 0.5), float32 as diffusers
    /// computes them on the int64 timestep tensor.
    fn boundary_scalings(&self, t: f32) -> (f32, f32) {
        let scaled = t * self.timestep_scaling;
        let denominator = scaled * scaled + 0.25f32;
        (0.25f32 / denominator, scaled / denominator.sqrt())
    }
}

impl Scheduler for Lcm {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let timesteps = &self.table.timesteps;
        let t = timesteps[index];
        let (alpha_t, sigma_t) = self.schedule.alpha_sigma_at(t as usize);
        let mut x0 = self.schedule.prediction.x0_at_alpha(out, sample, alpha_t, sigma_t)?;
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let (c_skip, c_out) = self.boundary_scalings(t as f32);
        let denoised = (scale(&x0, c_out)? + scale(sample, c_skip)?)?;
        let Some(&next) = timesteps.get(index + 1) else {
            return Ok(denoised);
        };
        let noise = rng.randn_tensor(out.dims(), out.device())?;
        let (alpha_next, sigma_next) = self.schedule.alpha_sigma_at(next as usize);
        Ok((scale(&denoised, alpha_next)? + scale(&noise, sigma_next)?)?)
    }
}
