//! The arithmetic every update rule shares, written once: float32 tensor–scalar operations as torch does them, the
//! x₀ (and ε) implied by a model output for each prediction type — in σ-space (k-diffusion's denoiser) and in the
//! variance-preserving (α_t, σ_t) form —, input scaling, the ODE derivative, the ancestral σ_up/σ_down split, and
//! the conversions between a noise level σ and (α_t, σ_t, λ_t). No scheduler converts a model output itself.

use candle_core::Tensor;

use super::schedule::Prediction;
use crate::Result;

/// `tensor * scalar` with the scalar rounded to f32 first, as torch multiplies a float32 tensor by a 0-d float32
/// tensor.
pub fn scale(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `tensor / scalar` as an exact division (not a multiplication by the reciprocal).
pub fn divide(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?.to_dtype(t.dtype())?)
}

/// The model input at noise level σ: `sample / √(σ² + 1)` (k-diffusion's c_in).
pub fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(divide(sample, (sigma * sigma + 1.0).sqrt())?)
}

/// The ODE derivative `(x − x₀) / σ` (k-diffusion's `to_d`).
pub fn derivative(sample: &Tensor, x0: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(divide(&(sample - x0)?, sigma)?)
}

/// An ancestral step from σ_from to σ_to: `(σ_down, σ_up)` — step deterministically down to σ_down, then add σ_up
/// of fresh noise (k-diffusion's `get_ancestral_step` with η = 1, float32 as diffusers).
pub fn ancestral_split(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
    let up = (to2 * (from2 - to2) / from2).sqrt();
    ((to2 - up * up).sqrt(), up)
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

impl Prediction {
    /// x₀ from the model output at noise level σ in σ-space (samples scaled so that x = x₀ + σ·ε): Euler, Heun,
    /// LMS, DPM2.
    pub fn x0_at_sigma(self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        Ok(match self {
            Prediction::Epsilon => (sample - scale(model_output, sigma)?)?,
            Prediction::VPrediction => {
                let c = sigma * sigma + 1.0;
                (scale(model_output, -sigma / c.sqrt())? + divide(sample, c)?)?
            }
            Prediction::Sample => model_output.clone(),
        })
    }

    /// x₀ from the model output of a variance-preserving sample x = α_t·x₀ + σ_t·ε: DDIM, DDPM and the multistep
    /// solvers.
    pub fn x0_at_alpha(self, model_output: &Tensor, sample: &Tensor, alpha_t: f32, sigma_t: f32) -> Result<Tensor> {
        Ok(match self {
            Prediction::Epsilon => divide(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?,
            Prediction::VPrediction => (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?,
            Prediction::Sample => model_output.clone(),
        })
    }

    /// ε from the model output of a variance-preserving sample (DDIM's direction, PNDM's transfer).
    pub fn epsilon_at_alpha(
        self,
        model_output: &Tensor,
        sample: &Tensor,
        alpha_t: f32,
        sigma_t: f32,
    ) -> Result<Tensor> {
        Ok(match self {
            Prediction::Epsilon => model_output.clone(),
            Prediction::VPrediction => (scale(model_output, alpha_t)? + scale(sample, sigma_t)?)?,
            Prediction::Sample => divide(&(sample - scale(model_output, alpha_t)?)?, sigma_t)?,
        })
    }
}
