//! diffusers' `KDPM2DiscreteScheduler` ("DPM2 Karras", with `use_karras_sigmas`): k-diffusion's DPM-Solver-2, a
//! midpoint method in σ — each step but the last evaluates the model at σ_t and at the log-midpoint between σ_t
//! and σ_{t+1} (2n − 1 evaluations for n steps). The ancestral variant (`KDPM2AncestralDiscreteScheduler`, "DPM2 a
//! Karras") steps down to σ_down instead and adds σ_up of fresh noise after each second evaluation.

use candle_core::{DType, Tensor};

use super::schedule::{
    interp, karras_sigmas, log_sigmas, sigma_to_t, Class, NoiseSchedule, Prediction, Spacing, BETA, EPSILON_OR_V,
    EXPONENTIAL,
};
use super::sigma::{ancestral_split, derivative, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "use_karras_sigmas use_exponential_sigmas use_beta_sigmas";

pub struct Kdpm2 {
    table: Timetable,
    /// σ per step plus the final 0.
    sigmas: Vec<f32>,
    /// Per step k: the log-midpoint level where the second evaluation happens.
    midpoints: Vec<f32>,
    /// Per step k: the level the second evaluation steps down to (σ_{k+1}, or σ_down for the ancestral variant).
    down: Vec<f32>,
    /// Per step k: the standard deviation of the noise added back (`None` for the deterministic variant).
    up: Option<Vec<f32>>,
    prediction: Prediction,
    /// The step's start sample between its two evaluations.
    pending: Option<Tensor>,
}

/// torch's `start.log().lerp(end.log(), 0.5).exp()`: lerp at weight ½ is computed as end − (end − start)·½.
fn log_midpoint(start: f32, end: f32) -> f32 {
    let (start, end) = (start.ln(), end.ln());
    (end - (end - start) * 0.5).exp()
}

/// The step (k) an evaluation belongs to, and whether it is the step's midpoint evaluation.
fn position(index: usize) -> (usize, bool) {
    if index == 0 {
        (0, false)
    } else {
        ((index - 1) / 2 + usize::from(index.is_multiple_of(2)), !index.is_multiple_of(2))
    }
}

impl Kdpm2 {
    /// "DPM2 Karras" (`KDPM2DiscreteScheduler`): Karras sigmas are part of the name.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, "DPM2 Karras", false)?))
    }

    /// "DPM2 a Karras" (`KDPM2AncestralDiscreteScheduler`): each step goes down to σ_down and adds σ_up of fresh
    /// noise, as k-diffusion's `sample_dpm_2_ancestral` does.
    pub fn ancestral_karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, "DPM2 a Karras", true)?))
    }

    fn new(config: &SchedulerConfig, steps: usize, name: &'static str, ancestral: bool) -> Result<Self> {
        let class = Class { name, default_spacing: Spacing::Linspace, predictions: EPSILON_OR_V };
        config.refuse_enabled(name, &[EXPONENTIAL, BETA])?;
        let schedule = NoiseSchedule::new(config, &class)?;
        let train = schedule.train_sigmas();
        let log_train = log_sigmas(&train);
        let interpolated: Vec<f64> = schedule.discrete_timesteps(steps).iter().map(|&t| interp(t, &train)).collect();
        let (min, max) = (interpolated[interpolated.len() - 1], interpolated[0]);
        let karras = karras_sigmas(config.f64_or("sigma_min", min), config.f64_or("sigma_max", max), steps);
        let step_timesteps: Vec<f64> = karras.iter().map(|&s| sigma_to_t(s, &log_train).round_ties_even()).collect();
        let mut sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        // Both classes compute these in float32 torch arithmetic; the last step's midpoint is 0 (a plain Euler step
        // to the final level, no second evaluation).
        let (midpoints, down, up) = if ancestral {
            let (down, up): (Vec<f32>, Vec<f32>) =
                (0..steps).map(|k| ancestral_split(sigmas[k], sigmas[k + 1])).unzip();
            let mut midpoints: Vec<f32> = (0..steps).map(|k| log_midpoint(sigmas[k], down[k])).collect();
            midpoints[steps - 1] = 0.0;
            (midpoints, down, Some(up))
        } else {
            let midpoints = (0..steps).map(|k| log_midpoint(sigmas[k + 1], sigmas[k])).collect();
            (midpoints, sigmas[1..].to_vec(), None)
        };
        let mut timesteps = vec![step_timesteps[0]];
        for k in 1..steps {
            timesteps.push(sigma_to_t(midpoints[k - 1] as f64, &log_train));
            timesteps.push(step_timesteps[k]);
        }
        let input_sigmas = (0..timesteps.len())
            .map(|index| match position(index) {
                (k, true) => midpoints[k],
                (k, false) => sigmas[k],
            })
            .collect();
        // diffusers' `scheduler.sigmas` layout: σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0, 0.
        let mut listed = vec![sigmas[0] as f64];
        listed.extend(sigmas[1..].iter().flat_map(|&s| [s as f64, s as f64]));
        listed.push(sigmas[steps] as f64);
        let table = Timetable {
            timesteps,
            num_inference_steps: steps,
            init_noise_sigma: schedule.init_noise_sigma(&sigmas) as f64,
            input_sigmas: Some(input_sigmas),
            sigmas: Some(listed),
            alphas_cumprod: None,
        };
        Ok(Self { table, sigmas, midpoints, down, up, prediction: schedule.prediction, pending: None })
    }
}

impl Scheduler for Kdpm2 {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn order(&self) -> usize {
        2
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let (k, _) = position(index);
        let (sigma, mid) = (self.sigmas[k], self.midpoints[k]);
        let prev = match self.pending.take() {
            None => {
                let d = derivative(sample, &self.prediction.x0_at_sigma(out, sample, sigma)?, sigma)?;
                if index + 1 < self.table.timesteps.len() {
                    self.pending = Some(sample.clone());
                }
                (sample + scale(&d, mid - sigma)?)?
            }
            Some(start) => {
                let d = derivative(sample, &self.prediction.x0_at_sigma(out, sample, mid)?, mid)?;
                let prev = (start + scale(&d, self.down[k] - sigma)?)?;
                match &self.up {
                    // diffusers draws the noise in the model output's shape and dtype.
                    Some(up) => {
                        let noise = rng.randn_tensor(out.dims(), out.device())?;
                        (prev + scale(&noise.to_dtype(DType::F32)?, up[k])?)?
                    }
                    None => prev,
                }
            }
        };
        Ok(prev)
    }
}
