//! diffusers' Euler schedulers on sigmas interpolated from the training schedule: `EulerDiscreteScheduler` ("Euler",
//! no churn: deterministic) and `EulerAncestralDiscreteScheduler` ("Euler a": steps down to σ_down and adds fresh
//! noise of σ_up from the run's generator).

use candle_core::Tensor;

use super::schedule::{
    Class, NoiseSchedule, Prediction, Spacing, ALL_PREDICTIONS, BETA, EPSILON_OR_V, EXPONENTIAL, KARRAS, RESCALE,
};
use super::sigma::{ancestral_split, derivative, scale};
use super::{widen, Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

/// The config keys `EulerDiscreteScheduler` reads besides the shared schedule keys.
pub const KEYS: &str = "interpolation_type use_karras_sigmas use_exponential_sigmas use_beta_sigmas sigma_min \
                        sigma_max timestep_type rescale_betas_zero_snr final_sigmas_type";

/// The config keys `EulerAncestralDiscreteScheduler` reads besides the shared schedule keys.
pub const ANCESTRAL_KEYS: &str = "rescale_betas_zero_snr";

pub struct Euler {
    table: Timetable,
    /// One per timestep plus the final 0.
    sigmas: Vec<f32>,
    prediction: Prediction,
    ancestral: bool,
}

impl Euler {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let class = Class { name: "Euler", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };
        config.refuse_enabled(class.name, &[KARRAS, EXPONENTIAL, BETA, RESCALE])?;
        config.choice(class.name, "interpolation_type", "linear", &[("linear", ())])?;
        config.choice(class.name, "timestep_type", "discrete", &[("discrete", ())])?;
        config.choice(class.name, "final_sigmas_type", "zero", &[("zero", ())])?;
        Ok(Box::new(Self::new(config, steps, &class, false)?))
    }

    /// "Euler a" (`EulerAncestralDiscreteScheduler`, which has no x₀ prediction and none of Euler's sigma options).
    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let class = Class { name: "Euler a", default_spacing: Spacing::Linspace, predictions: EPSILON_OR_V };
        config.refuse_enabled(class.name, &[RESCALE])?;
        Ok(Box::new(Self::new(config, steps, &class, true)?))
    }

    fn new(config: &SchedulerConfig, steps: usize, class: &Class, ancestral: bool) -> Result<Self> {
        let schedule = NoiseSchedule::new(config, class)?;
        let tables = schedule.sigma_tables(steps);
        Ok(Self {
            table: sigma_timetable(tables.timesteps, &tables.sigmas, tables.init_noise_sigma),
            sigmas: tables.sigmas,
            prediction: schedule.prediction,
            ancestral,
        })
    }
}

/// The timetable of a σ-space scheduler that evaluates the model once per σ (all but the final one).
pub(super) fn sigma_timetable(timesteps: Vec<f64>, sigmas: &[f32], init_noise_sigma: f32) -> Timetable {
    Timetable {
        num_inference_steps: timesteps.len(),
        timesteps,
        init_noise_sigma: init_noise_sigma as f64,
        input_sigmas: Some(sigmas.to_vec()),
        sigmas: Some(widen(sigmas)),
        alphas_cumprod: None,
    }
}

impl Scheduler for Euler {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[index], self.sigmas[index + 1]);
        let x0 = self.prediction.x0_at_sigma(out, sample, sigma)?;
        let d = derivative(sample, &x0, sigma)?;
        let prev = if self.ancestral {
            let (down, up) = ancestral_split(sigma, next);
            let prev = (sample + scale(&d, down - sigma)?)?;
            let noise = rng.randn_tensor(out.dims(), out.device())?;
            (prev + scale(&noise, up)?)?
        } else {
            (sample + scale(&d, next - sigma)?)?
        };
        Ok(prev)
    }
}
