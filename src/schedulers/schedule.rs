//! The noise schedule, apart from any update rule: the keys every diffusers class reads alike (betas, prediction
//! type, timestep spacing, steps offset) parsed once with the class's defaults, the cumulative alphas, and the
//! tables built from them (spaced timesteps, interpolated and Karras sigmas). Precision follows diffusers to the bit:
//! betas and `alphas_cumprod` are torch float32 tensors (torch's `linspace` rounds once per element like a fused
//! multiply-add, its CPU `cumprod` accumulates in float64), timestep tables are numpy float64 arrays.

use super::SchedulerConfig;
use crate::Result;

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise ε (`"epsilon"`).
    Epsilon,
    /// The clean sample x₀ (`"sample"`).
    Sample,
    /// The velocity v = α·ε − σ·x₀ (`"v_prediction"`).
    VPrediction,
}

impl Prediction {
    fn config_name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::Sample => "sample",
            Prediction::VPrediction => "v_prediction",
        }
    }
}

/// How `set_timesteps` spaces the inference timesteps over the training ones (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// Multiples of `train / n` from 0, plus `steps_offset`.
    Leading,
    /// Counting down from the last training timestep by `train / n`.
    Trailing,
    /// Evenly over `[0, train − 1]`.
    Linspace,
}

/// The per-class facts [`NoiseSchedule::new`] needs: what the diffusers class defaults to and implements.
pub struct Class {
    /// The name errors use ("DDIM", "Euler", …).
    pub name: &'static str,
    /// `timestep_spacing` when the config has none (the class's `__init__` default).
    pub default_spacing: Spacing,
    /// The prediction types the class implements; others are refused when the scheduler is built.
    pub predictions: &'static [Prediction],
}

/// Every prediction type (the classes that implement all three).
pub const ALL_PREDICTIONS: &[Prediction] = &[Prediction::Epsilon, Prediction::Sample, Prediction::VPrediction];
/// ε and v (the classes without x₀ prediction).
pub const EPSILON_OR_V: &[Prediction] = &[Prediction::Epsilon, Prediction::VPrediction];

/// The config keys every class reads alike (`SINGLESTEP_KEYS` aside, which has no `timestep_spacing`).
pub const SCHEDULE_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];

/// Options of some diffusers classes that this crate does not implement; each class refuses those of its own
/// `__init__` keys (a key a class does not read is ignored, as diffusers ignores it).
pub const KARRAS: &str = "use_karras_sigmas";
pub const EXPONENTIAL: &str = "use_exponential_sigmas";
pub const BETA: &str = "use_beta_sigmas";
pub const RESCALE: &str = "rescale_betas_zero_snr";
pub const THRESHOLDING: &str = "thresholding";

/// The model's noise schedule as one scheduler class reads it.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub num_train_timesteps: usize,
    /// ᾱ_t for every training timestep (float32).
    pub alphas_cumprod: Vec<f32>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
}

impl NoiseSchedule {
    /// Reads the shared keys with `class`'s defaults, refusing values the class does not implement.
    pub fn new(config: &SchedulerConfig, class: &Class) -> Result<Self> {
        let predictions: Vec<(&str, Prediction)> = class.predictions.iter().map(|&p| (p.config_name(), p)).collect();
        let default_spacing = match class.default_spacing {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        };
        let spacings =
            [("leading", Spacing::Leading), ("trailing", Spacing::Trailing), ("linspace", Spacing::Linspace)];
        Ok(Self {
            num_train_timesteps: train_timesteps(config),
            alphas_cumprod: alphas_cumprod(&betas(config, class.name)?),
            prediction: config.choice(class.name, "prediction_type", "epsilon", &predictions)?,
            spacing: config.choice(class.name, "timestep_spacing", default_spacing, &spacings)?,
            steps_offset: config.usize_or("steps_offset", 0),
        })
    }

    /// `(√ᾱ_t, √(1 − ᾱ_t))` of training timestep `t` (float32): the variance-preserving sample's scalings.
    pub fn alpha_sigma_at(&self, t: usize) -> (f32, f32) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1f32 - a).sqrt())
    }

    /// `sqrt((1 − ᾱ) / ᾱ)` for every training timestep (float32, as diffusers computes it from the tensor).
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod.iter().map(|&a| ((1f32 - a) / a).sqrt()).collect()
    }

    /// The spacing rule of DDIM/DDPM/PNDM's `set_timesteps`: integer-valued timesteps from noisiest to cleanest.
    pub fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let train = self.num_train_timesteps;
        match self.spacing {
            Spacing::Linspace => {
                numpy_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(f64::round_ties_even).collect()
            }
            Spacing::Leading => {
                let ratio = (train / n) as f64;
                (0..n).rev().map(|i| (i as f64 * ratio).round_ties_even() + self.steps_offset as f64).collect()
            }
            Spacing::Trailing => trailing(train, n),
        }
    }

    /// The Euler-family timesteps (Euler, Heun, LMS, DPM2): linspace keeps fractional timesteps, the other rules
    /// are the integer ones; numpy float64 stored as float32.
    pub fn discrete_timesteps(&self, n: usize) -> Vec<f64> {
        let timesteps = match self.spacing {
            Spacing::Linspace => {
                numpy_linspace(0.0, (self.num_train_timesteps - 1) as f64, n).into_iter().rev().collect()
            }
            _ => self.spaced_timesteps(n),
        };
        timesteps.into_iter().map(|t| t as f32 as f64).collect()
    }

    /// The multistep solvers' timesteps (UniPC, DPM-Solver, DEIS): `n + 1` points for linspace and leading with the
    /// last dropped.
    pub fn multistep_timesteps(&self, n: usize) -> Vec<f64> {
        let train = self.num_train_timesteps;
        match self.spacing {
            Spacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .rev()
                .take(n)
                .collect(),
            Spacing::Leading => {
                let ratio = (train / (n + 1)) as f64;
                (1..=n).rev().map(|i| (i as f64 * ratio).round_ties_even() + self.steps_offset as f64).collect()
            }
            Spacing::Trailing => trailing(train, n),
        }
    }

    /// The σ-space tables of the Euler-family schedulers: [`Self::discrete_timesteps`], σ interpolated from the
    /// training schedule (numpy float64, stored as float32) plus a final 0, and the initial noise scale.
    pub fn sigma_tables(&self, n: usize) -> SigmaTables {
        let train = self.train_sigmas();
        let timesteps = self.discrete_timesteps(n);
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t, &train) as f32).collect();
        sigmas.push(0.0);
        let init_noise_sigma = self.init_noise_sigma(&sigmas);
        SigmaTables { timesteps, sigmas, init_noise_sigma }
    }

    /// The initial noise scale of a σ-space scheduler: its largest σ, or `√(σ_max² + 1)` for leading spacing
    /// (diffusers' rule, which treats the latents as variance-preserving there).
    pub fn init_noise_sigma(&self, sigmas: &[f32]) -> f32 {
        let max = sigmas.iter().copied().fold(0f32, f32::max);
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }
}

/// Timesteps, σ per timestep plus the final 0, and the initial noise scale (see [`NoiseSchedule::sigma_tables`]).
pub struct SigmaTables {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// `np.round(np.arange(train, 0, -train / n)) - 1`.
fn trailing(train: usize, n: usize) -> Vec<f64> {
    let ratio = train as f64 / n as f64;
    let count = (train as f64 / ratio).ceil() as usize;
    (0..count).map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
}

/// torch's float32 `linspace(start, end, n)`: the first half counts up from `start`, the second half down from
/// `end`, each element rounded once.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { step.mul_add(i as f32, s) } else { (-step).mul_add((n - 1 - i) as f32, e) }).collect()
}

/// The number of training timesteps (`num_train_timesteps`, 1000 in every class).
pub fn train_timesteps(config: &SchedulerConfig) -> usize {
    config.usize_or("num_train_timesteps", 1000)
}

/// `betas` as the scheduler's `__init__` builds them.
fn betas(config: &SchedulerConfig, scheduler: &'static str) -> Result<Vec<f32>> {
    let n = train_timesteps(config);
    if let Some(trained) = config.f64_list("trained_betas") {
        return Ok(trained.into_iter().map(|b| b as f32).collect());
    }
    #[derive(Clone, Copy)]
    enum Rule {
        Linear,
        ScaledLinear,
        Cosine,
    }
    let rules = [("linear", Rule::Linear), ("scaled_linear", Rule::ScaledLinear), ("squaredcos_cap_v2", Rule::Cosine)];
    let start = config.f64_or("beta_start", 0.0001);
    let end = config.f64_or("beta_end", 0.02);
    Ok(match config.choice(scheduler, "beta_schedule", "linear", &rules)? {
        Rule::Linear => linspace_f32(start, end, n),
        Rule::ScaledLinear => linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect(),
        Rule::Cosine => cosine_betas(n),
    })
}

/// diffusers' `betas_for_alpha_bar` with the cosine alpha-bar (computed in float64, stored as float32).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1 - betas)`: float32 values, float64 running product.
fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// numpy's float64 `linspace(start, stop, n)` (`start + i·step`, the last element exactly `stop`).
pub fn numpy_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = stop;
    v
}

/// `np.interp(x, arange(len(ys)), ys)` in float64.
pub fn interp(x: f64, ys: &[f32]) -> f64 {
    if x <= 0.0 {
        return ys[0] as f64;
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let i = x.floor() as usize;
    let (y0, y1) = (ys[i] as f64, ys[i + 1] as f64);
    let frac = x - i as f64;
    // numpy: slope * (x - xp[j]) + fp[j]
    (y1 - y0) * frac + y0
}

/// Karras et al. (2022) noise levels from `sigma_max` down to `sigma_min` (diffusers' `_convert_to_karras`, ρ = 7,
/// numpy float64).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    numpy_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO)).collect()
}

/// The (fractional) training timestep of a noise level: diffusers' `_sigma_to_t`, interpolating linearly in
/// log-sigma between the two neighbouring training sigmas. `log_sigmas` are `ln` of the float32 training sigmas
/// (float32, as numpy computes them).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // The last index whose log-sigma is ≤ ours (0 if none), at most n − 2.
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `np.log` of the float32 training sigmas (float32 results).
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}
