//! diffusers' `DPMSolverSDEScheduler` ("DPM++ SDE"; "DPM++ SDE Karras" with `use_karras_sigmas`): k-diffusion's
//! DPM-Solver++ SDE as diffusers writes it, a second-order σ-space method with ancestral noise. Each step but the
//! last evaluates the model at σ_k and at the midpoint in t = −ln σ between σ_k and σ_{k+1} (2n − 1 evaluations for
//! n steps, like Heun); each of those two evaluations steps (from the step's start sample) down to a σ_down and adds
//! σ_up of noise from a Brownian tree ([`super::brownian`]), the first to the midpoint, the second to σ_{k+1}. The
//! last step is a plain Euler step to σ = 0.
//!
//! The tree is seeded by the config's `noise_sampler_seed`. Where the config has none, diffusers seeds it from
//! torch's global generator (`torch.randint(0, 2**63 - 1, [])`); here that number is drawn the same way from the
//! generator passed to the first `update`, so the noise still follows the run's seed. The pipeline is meant to set
//! `noise_sampler_seed` to the request's seed.
//!
//! Precision: timesteps and the σ schedule are numpy float64 (timesteps are not rounded to float32, unlike Euler's);
//! σ is stored as float32 and every per-step quantity (t, the midpoint, σ_up, σ_down, the update's coefficients) is
//! float32 torch arithmetic on 0-d tensors. torch runs float32 `exp`, `log` and `sqrt` through Intel MKL on the CPU,
//! which is not always correctly rounded; these are the correctly rounded values (within the C library's accuracy),
//! which agree with MKL's about 19 times in 20. The tree rounds its query times to 1e-6, so where a query time
//! (σ = e^(−t)) differs by 1 ulp it can land on the other side of that grid, and that step's noise differs by about
//! √(1e-6) from diffusers' (see tests/schedulers.rs).

use candle_core::Tensor;

use super::brownian::BrownianTreeNoiseSampler;
use super::schedule::{
    interp, karras_sigmas, log_sigmas, numpy_linspace, sigma_to_t, Class, NoiseSchedule, Prediction, Spacing, BETA,
    EPSILON_OR_V, EXPONENTIAL, KARRAS,
};
use super::sigma::{ancestral_split, derivative, scale};
use super::{widen, Scheduler, SchedulerConfig, Timetable, NOISE_SAMPLER_SEED};
use crate::rng::TorchRng;
use crate::Result;

/// The config keys its diffusers class reads besides the shared schedule keys ([`super::schedule::SCHEDULE_KEYS`]).
pub const KEYS: &str = "use_karras_sigmas use_exponential_sigmas use_beta_sigmas noise_sampler_seed";

pub struct DpmSde {
    table: Timetable,
    /// σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0 (diffusers' `scheduler.sigmas`): the first evaluation at `index` steps from
    /// σ[index] to σ[index + 1], the second from σ[index − 1] to σ[index].
    sigmas: Vec<f32>,
    prediction: Prediction,
    /// The config's `noise_sampler_seed`.
    seed: Option<u64>,
    /// Built at the first `update`, as diffusers builds it at the first `step`.
    noise: Option<BrownianTreeNoiseSampler>,
    /// The step's start sample between its two evaluations.
    pending: Option<Tensor>,
}

/// t = −ln σ (torch's `sigma.log().neg()`).
fn t_of(sigma: f32) -> f32 {
    -sigma.ln()
}

/// σ = e^(−t) (torch's `t.neg().exp()`).
fn sigma_of(t: f32) -> f32 {
    (-t).exp()
}

/// torch's float32 `expm1` (Sleef's `expm1f8_u10` on the CPU): the correctly rounded value, computed in f64, agrees
/// with it far more often (99.8% of inputs) than the C library's `expm1f` (89%).
fn expm1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

/// The point halfway from t to t_next (`t + (t_next − t) · 0.5`).
fn midpoint(t: f32, t_next: f32) -> f32 {
    t + (t_next - t) * 0.5
}

impl DpmSde {
    /// "DPM++ SDE" (`DPMSolverSDEScheduler` as configured).
    pub fn boxed(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(config, steps, "DPM++ SDE")?))
    }

    /// "DPM++ SDE Karras": Karras sigmas are part of the name.
    pub fn karras(config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        Ok(Box::new(Self::new(&config.clone().with(KARRAS, true.into()), steps, "DPM++ SDE Karras")?))
    }

    fn new(config: &SchedulerConfig, steps: usize, name: &'static str) -> Result<Self> {
        // diffusers raises NotImplementedError for x₀ prediction (in `step`).
        let class = Class { name, default_spacing: Spacing::Linspace, predictions: EPSILON_OR_V };
        config.refuse_enabled(name, &[EXPONENTIAL, BETA])?;
        let seed = config.u64_opt(name, NOISE_SAMPLER_SEED)?;
        let schedule = NoiseSchedule::new(config, &class)?;
        let train = schedule.train_sigmas();
        let log_train = log_sigmas(&train);
        let mut timesteps: Vec<f64> = match schedule.spacing {
            // float64 linspace, not rounded.
            Spacing::Linspace => {
                numpy_linspace(0.0, (schedule.num_train_timesteps - 1) as f64, steps).into_iter().rev().collect()
            }
            Spacing::Leading | Spacing::Trailing => schedule.spaced_timesteps(steps),
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
        if config.bool_or(KARRAS, false) {
            sigmas = karras_sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps);
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_train)).collect();
        }
        // The timestep of each second evaluation: the float64 t-midpoint of the step.
        let midpoint_timesteps: Vec<f64> = sigmas
            .windows(2)
            .map(|w| {
                let (t, t_next) = (-w[0].ln(), -w[1].ln());
                sigma_to_t((-(t + (t_next - t) * 0.5)).exp(), &log_train)
            })
            .collect();

        // One σ per step (as many as the spacing rule gave timesteps), then 0.
        let n = sigmas.len();
        let step_sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain(std::iter::once(0.0)).collect();
        // The level of each second evaluation, as `step` computes it in float32 (`mid_point_sigma`).
        let midpoints: Vec<f32> =
            step_sigmas[..n].windows(2).map(|w| sigma_of(midpoint(t_of(w[0]), t_of(w[1])))).collect();
        let mut evaluation_timesteps = vec![timesteps[0]];
        let mut input_sigmas = vec![step_sigmas[0]];
        for k in 1..n {
            evaluation_timesteps.extend([midpoint_timesteps[k - 1], timesteps[k]]);
            input_sigmas.extend([midpoints[k - 1], step_sigmas[k]]);
        }
        let listed: Vec<f32> = std::iter::once(step_sigmas[0])
            .chain(step_sigmas[1..n].iter().flat_map(|&s| [s, s]))
            .chain(std::iter::once(0.0))
            .collect();
        let table = Timetable {
            timesteps: evaluation_timesteps,
            num_inference_steps: steps,
            init_noise_sigma: schedule.init_noise_sigma(&listed) as f64,
            input_sigmas: Some(input_sigmas),
            sigmas: Some(widen(&listed)),
            alphas_cumprod: None,
        };
        Ok(Self { table, sigmas: listed, prediction: schedule.prediction, seed, noise: None, pending: None })
    }

    /// diffusers' noise sampler over the schedule's smallest non-zero and largest σ, for samples of `len` values.
    fn noise_sampler(&mut self, len: usize, rng: &mut TorchRng) -> Result<&mut BrownianTreeNoiseSampler> {
        if self.noise.is_none() {
            let positive = self.sigmas.iter().copied().filter(|&s| s > 0.0);
            let min = positive.fold(f32::INFINITY, f32::min);
            let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let seed = self.seed.unwrap_or_else(|| rng.randint(0, i64::MAX) as u64);
            self.noise = Some(BrownianTreeNoiseSampler::new(len, min, max, seed)?);
        }
        Ok(self.noise.as_mut().expect("just built"))
    }
}

impl Scheduler for DpmSde {
    fn timetable(&self) -> &Timetable {
        &self.table
    }

    fn order(&self) -> usize {
        2
    }

    fn update(&mut self, out: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let first = self.pending.is_none();
        let (sigma, sigma_next) = if first {
            (self.sigmas[index], self.sigmas[index + 1])
        } else {
            (self.sigmas[index - 1], self.sigmas[index])
        };
        self.noise_sampler(sample.elem_count(), rng)?;
        let (t, t_next) = (t_of(sigma), t_of(sigma_next));
        let t_mid = midpoint(t, t_next);
        let x0 = self.prediction.x0_at_sigma(out, sample, if first { sigma } else { sigma_of(t_mid) })?;
        if sigma_next == 0.0 {
            // The last step: Euler to σ = 0, no noise.
            let d = derivative(sample, &x0, sigma)?;
            return Ok((sample + scale(&d, sigma_next - sigma)?)?);
        }
        // The first evaluation goes from σ_k to the midpoint, the second from σ_k to σ_{k+1}, both from the step's
        // start sample.
        let (t_to, start) = match self.pending.take() {
            None => (t_mid, sample.clone()),
            Some(start) => (t_next, start),
        };
        let (sigma_from, sigma_to) = (sigma_of(t), sigma_of(t_to));
        // diffusers: σ_up = min(σ_to, √(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = √(σ_to² − σ_up²); Python's `min`
        // keeps σ_to unless the root is smaller (also when it is NaN), and then σ_down = √(σ_to² − σ_to²) = 0.
        let (down, up) = match ancestral_split(sigma_from, sigma_to) {
            (down, up) if up < sigma_to => (down, up),
            _ => (0.0, sigma_to),
        };
        let t_down = t_of(down);
        let prev = (scale(&start, sigma_of(t_down) / sigma_of(t))? - scale(&x0, expm1(t - t_down))?)?;
        let noise = self.noise.as_mut().expect("built above").noise(sigma_from, sigma_to)?;
        let noise = Tensor::from_vec(noise, sample.dims(), sample.device())?;
        if first {
            self.pending = Some(sample.clone());
        }
        Ok((prev + scale(&noise, up)?)?)
    }
}
