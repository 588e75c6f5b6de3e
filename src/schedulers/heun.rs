//! diffusers' `HeunDiscreteScheduler`: Euler's step followed by a trapezoidal correction, so every step but the last
//! evaluates the model twice (2n − 1 evaluations for n steps; `timesteps()` lists each evaluation, as diffusers'
//! `scheduler.timesteps` does).

use candle_core::Tensor;

use super::schedule::{Class, NoiseSchedule, Prediction, Spacing, ALL_PREDICTIONS, BETA, EXPONENTIAL, KARRAS};
use super::sigma::{derivative, scale};
use super::{widen, Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

const CLASS: Class = Class { name: "Heun", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "use_karras_sigmas use_exponential_sigmas use_beta_sigmas clip_sample clip_sample_range";

pub struct Heun {
    table: Timetable,
    /// σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0: the level of each evaluation, then the end.
    sigmas: Vec<f32>,
    prediction: Prediction,
    clip_sample: Option<f32>,
    /// Between the two evaluations of a step: the first derivative, the step size and the step's start sample.
    pending: Option<(Tensor, f32, Tensor)>,
}

impl Heun {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &[KARRAS, EXPONENTIAL, BETA])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let t = schedule.sigma_tables(steps);
        let n = t.timesteps.len();
        let timesteps = std::iter::once(t.timesteps[0]).chain(t.timesteps[1..].iter().flat_map(|&x| [x, x])).collect();
        let sigmas: Vec<f32> = std::iter::once(t.sigmas[0])
            .chain(t.sigmas[1..n].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(t.sigmas[n]))
            .collect();
        Ok(Box::new(Self {
            table: Timetable {
                timesteps,
                num_inference_steps: steps,
                init_noise_sigma: t.init_noise_sigma as f64,
                input_sigmas: Some(sigmas.clone()),
                sigmas: Some(widen(&sigmas)),
                alphas_cumprod: None,
            },
            sigmas,
            prediction: schedule.prediction,
            clip_sample: config.bool_or("clip_sample", false).then(|| config.f64_or("clip_sample_range", 1.0) as f32),
            pending: None,
        }))
    }
}

impl Scheduler for Heun {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn order(&self) -> usize {
        2
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let first = self.pending.is_none();
        // The first evaluation of a step is at σ[index]; the second at σ[index], the first's target.
        let (sigma, sigma_next) = if first {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        let mut x0 = self.prediction.x0_at_sigma(out, sample, if first { sigma } else { sigma_next })?;
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let prev = match self.pending.take() {
            None => {
                let d = derivative(sample, &x0, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + scale(&d, dt)?)?;
                // The last step (σ_next = 0) has no second evaluation.
                if index + 1 < self.table.timesteps.len() {
                    self.pending = Some((d, dt, sample.clone()));
                }
                prev
            }
            Some((first_derivative, dt, start)) => {
                let d = derivative(sample, &x0, sigma_next)?;
                let average = scale(&(first_derivative + d)?, 0.5)?;
                (start + scale(&average, dt)?)?
            }
        };
        Ok(prev)
    }
}
