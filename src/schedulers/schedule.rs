//! The noise schedule, apart from any update rule: betas and cumulative alphas from the model's config, and the
//! timestep spacing rules. Precision follows diffusers to the bit: betas and `alphas_cumprod` are torch float32
//! tensors (torch's `linspace` rounds once per element like a fused multiply-add, its CPU `cumprod` accumulates in
//! float64), timestep tables are numpy arrays.

use super::SchedulerConfig;
use crate::{Error, Result};

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

/// `betas` as the scheduler's `__init__` builds them.
pub fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = config.usize_or("num_train_timesteps", 1000);
    if let Some(trained) = config.f64_list("trained_betas") {
        return Ok(trained.into_iter().map(|b| b as f32).collect());
    }
    let start = config.f64_or("beta_start", 0.0001);
    let end = config.f64_or("beta_end", 0.02);
    match config.str_or("beta_schedule", "linear") {
        "linear" => Ok(linspace_f32(start, end, n)),
        "scaled_linear" => Ok(linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect()),
        "squaredcos_cap_v2" => Ok(cosine_betas(n)),
        other => Err(Error::Other(format!(
            "scheduler config: beta_schedule {other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        ))),
    }
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
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// The spacing rule of `set_timesteps` (`timestep_spacing` with `steps_offset`), as integer-valued timesteps from
/// noisiest to cleanest, the way DDIM/DDPM/PNDM/Euler-family schedulers build them (numpy float64 arithmetic).
pub fn spaced_timesteps(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Vec<f64>> {
    let train = config.usize_or("num_train_timesteps", 1000);
    let n = num_inference_steps;
    let offset = config.usize_or("steps_offset", 0) as f64;
    match config.str_or("timestep_spacing", "leading") {
        "linspace" => {
            Ok(numpy_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(f64::round_ties_even).collect())
        }
        "leading" => {
            let ratio = (train / n) as f64;
            Ok((0..n).rev().map(|i| (i as f64 * ratio).round_ties_even() + offset).collect())
        }
        "trailing" => {
            let ratio = train as f64 / n as f64;
            // np.round(np.arange(train, 0, -ratio)) - 1
            let count = (train as f64 / ratio).ceil() as usize;
            Ok((0..count).map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect())
        }
        other => Err(Error::Other(format!(
            "scheduler config: timestep_spacing {other:?} is not supported (leading, trailing, linspace)"
        ))),
    }
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

/// `sqrt((1 − ᾱ) / ᾱ)` for every training timestep (float32, as diffusers computes it from the tensor).
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1f32 - a) / a).sqrt()).collect()
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

/// Karras et al. (2022) noise levels between the ends of `sigmas` (diffusers' `_convert_to_karras`, ρ = 7, numpy
/// float64). The config's `sigma_min` / `sigma_max` override the ends when set.
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
