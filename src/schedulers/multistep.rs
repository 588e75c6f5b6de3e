//! What diffusers' multistep solvers (UniPC, DPM-Solver, DEIS) share: their timestep/sigma tables and the
//! conversions between a noise level σ and (α_t, σ_t, λ_t). All scalar arithmetic is float32, as diffusers does it
//! on 0-d float32 tensors.

use candle_core::Tensor;

use super::ddim::{divide, scale};
use super::schedule::{
    alphas_cumprod, betas, interp, karras_sigmas, log_sigmas, numpy_linspace, sigma_to_t, train_sigmas,
};
use super::SchedulerConfig;
use crate::{Error, Result};

/// Timesteps (one per step) and sigmas (one per step plus the final one) of a multistep solver.
pub struct MultistepTables {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
}

/// How a solver picks the noise level after its last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// `final_sigmas_type`: "zero" (default) or "sigma_min" (UniPC, DPM-Solver).
    FromConfig,
    /// DEIS: the training schedule's smallest sigma, or with Karras sigmas the last Karras sigma repeated.
    Deis,
}

/// `set_timesteps` of the multistep solvers: `n + 1` points for linspace/leading (the last dropped), Karras sigmas
/// mapped back to (rounded) timesteps when `use_karras_sigmas`, then the final sigma.
pub fn tables(config: &SchedulerConfig, n: usize, final_sigma: FinalSigma) -> Result<MultistepTables> {
    let train = config.usize_or("num_train_timesteps", 1000);
    let offset = config.usize_or("steps_offset", 0) as f64;
    let mut timesteps: Vec<f64> = match config.str_or("timestep_spacing", "linspace") {
        "linspace" => {
            numpy_linspace(0.0, (train - 1) as f64, n + 1).into_iter().map(f64::round_ties_even).rev().take(n).collect()
        }
        "leading" => {
            let ratio = (train / (n + 1)) as f64;
            (1..=n).rev().map(|i| (i as f64 * ratio).round_ties_even() + offset).collect()
        }
        "trailing" => {
            let ratio = train as f64 / n as f64;
            let count = (train as f64 / ratio).ceil() as usize;
            (0..count).map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0).collect()
        }
        other => {
            return Err(Error::Other(format!(
                "scheduler config: timestep_spacing {other:?} is not supported (leading, trailing, linspace)"
            )))
        }
    };
    let cumprod = alphas_cumprod(&betas(config)?);
    let sigmas_train = train_sigmas(&cumprod);
    let karras = config.bool_or("use_karras_sigmas", false);
    let mut sigmas: Vec<f64> = if karras {
        let log_sigmas = log_sigmas(&sigmas_train);
        let min = config.f64_or("sigma_min", sigmas_train[0] as f64);
        let max = config.f64_or("sigma_max", sigmas_train[sigmas_train.len() - 1] as f64);
        let sigmas = karras_sigmas(min, max, n);
        let round = config.str_or("beta_schedule", "linear") != "squaredcos_cap_v2";
        timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &log_sigmas);
                if round {
                    t.round_ties_even()
                } else {
                    t
                }
            })
            .collect();
        sigmas
    } else {
        timesteps.iter().map(|&t| interp(t, &sigmas_train)).collect()
    };
    let sigma_min = ((1f32 - cumprod[0]) / cumprod[0]).sqrt() as f64;
    let last = match (final_sigma, config.str_or("final_sigmas_type", "zero")) {
        (FinalSigma::Deis, _) if karras => *sigmas.last().expect("n ≥ 1"),
        (FinalSigma::Deis, _) | (FinalSigma::FromConfig, "sigma_min") => sigma_min,
        (FinalSigma::FromConfig, "zero") => 0.0,
        (_, other) => {
            return Err(Error::Other(format!("scheduler config: final_sigmas_type {other:?} is not supported")))
        }
    };
    sigmas.push(last);
    // The model receives integer timesteps (torch int64).
    let timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
    Ok(MultistepTables { timesteps, sigmas: sigmas.into_iter().map(|s| s as f32).collect() })
}

/// (α_t, σ_t) of a noise level σ: `α = 1/√(σ² + 1)`, `σ_t = σ·α`.
pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1f32 / (sigma * sigma + 1f32).sqrt();
    (alpha, sigma * alpha)
}

/// λ = ln α − ln σ (+∞ at σ = 0).
pub fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// What the model predicts, as the config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    Sample,
    Velocity,
}

impl Prediction {
    pub fn from_config(config: &SchedulerConfig, scheduler: &str) -> Result<Self> {
        match config.str_or("prediction_type", "epsilon") {
            "epsilon" => Ok(Prediction::Epsilon),
            "sample" => Ok(Prediction::Sample),
            "v_prediction" => Ok(Prediction::Velocity),
            other => Err(Error::Other(format!("{scheduler}: unsupported prediction_type {other:?}"))),
        }
    }

    /// The denoised sample x₀ implied by the model output at noise level σ.
    pub fn x0(self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok(match self {
            Prediction::Epsilon => divide(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?,
        })
    }
}

/// Rejects config options the solvers here do not implement, naming them.
pub fn reject_unsupported(config: &SchedulerConfig, scheduler: &str) -> Result<()> {
    for key in ["thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"] {
        if config.bool_or(key, false) {
            return Err(Error::Other(format!("{scheduler}: `{key}` is not supported")));
        }
    }
    Ok(())
}
