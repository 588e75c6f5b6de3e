//! diffusers' `LMSDiscreteScheduler`: linear multistep in σ over the last (up to 4) derivatives. The weights are
//! integrals of Lagrange basis polynomials over [σ_t, σ_{t+1}]; diffusers integrates them numerically (scipy `quad`),
//! we integrate the polynomial exactly (degree ≤ 3; quad's Gauss–Kronrod rule is exact for it up to rounding).

use candle_core::Tensor;

use super::euler::sigma_timetable;
use super::schedule::{Class, NoiseSchedule, Prediction, Spacing, ALL_PREDICTIONS, BETA, EXPONENTIAL, KARRAS};
use super::sigma::{derivative, scale};
use super::{Scheduler, SchedulerConfig, Timetable};
use crate::rng::TorchRng;
use crate::Result;

const CLASS: Class = Class { name: "LMS", default_spacing: Spacing::Linspace, predictions: ALL_PREDICTIONS };

const ORDER: usize = 4;

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "use_karras_sigmas use_exponential_sigmas use_beta_sigmas";

pub struct Lms {
    table: Timetable,
    sigmas: Vec<f32>,
    prediction: Prediction,
    /// The last `ORDER` derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        config.refuse_enabled(CLASS.name, &[KARRAS, EXPONENTIAL, BETA])?;
        let schedule = NoiseSchedule::new(config, &CLASS)?;
        let t = schedule.sigma_tables(steps);
        Ok(Box::new(Self {
            table: sigma_timetable(t.timesteps, &t.sigmas, t.init_noise_sigma),
            sigmas: t.sigmas,
            prediction: schedule.prediction,
            derivatives: Vec::new(),
        }))
    }

    /// ∫_{σ_t}^{σ_{t+1}} Π_{k≠j} (τ − σ_{t−k}) / (σ_{t−j} − σ_{t−k}) dτ, for the derivative `j` steps back.
    fn coefficient(&self, order: usize, t: usize, j: usize) -> f64 {
        let s = |k: usize| self.sigmas[t - k] as f64;
        // The basis polynomial's coefficients, lowest degree first.
        let mut poly = vec![1f64];
        for k in (0..order).filter(|&k| k != j) {
            let denominator = s(j) - s(k);
            let mut next = vec![0f64; poly.len() + 1];
            for (d, &c) in poly.iter().enumerate() {
                next[d + 1] += c / denominator;
                next[d] -= c * s(k) / denominator;
            }
            poly = next;
        }
        let antiderivative =
            |x: f64| poly.iter().enumerate().map(|(d, &c)| c * x.powi(d as i32 + 1) / (d + 1) as f64).sum::<f64>();
        antiderivative(self.sigmas[t + 1] as f64) - antiderivative(self.sigmas[t] as f64)
    }
}

impl Scheduler for Lms {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, _rng: &mut TorchRng) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let x0 = self.prediction.x0_at_sigma(out, sample, sigma)?;
        self.derivatives.push(derivative(sample, &x0, sigma)?);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        let mut update: Option<Tensor> = None;
        for (j, d) in self.derivatives.iter().rev().enumerate().take(order) {
            let term = scale(d, self.coefficient(order, index, j) as f32)?;
            update = Some(match update {
                None => term,
                Some(u) => (u + term)?,
            });
        }
        let update = update.expect("at least one derivative");
        Ok((sample + update)?)
    }
}
