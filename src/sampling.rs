//! The denoising loop: initial noise from the torch-compatible generator, then for every model evaluation the
//! scheduler's input scaling, the UNet on that evaluation's conditioning (both guidance halves in one batch, or in
//! two when A1111 prompts of different lengths make them differ) and the scheduler's update.

use candle_core::{DType, Device, Tensor};

use crate::conditioning::{ConditioningSchedule, StepConditioning};
use crate::models::unet::{AddedConditioning, UNet2DConditionModel};
use crate::rng::TorchRng;
use crate::schedulers::schedule::{interp, Class, NoiseSchedule, Prediction, Spacing, ALL_PREDICTIONS};
use crate::schedulers::sigma::alpha_sigma;
use crate::schedulers::{Scheduler, SchedulerConfig};
use crate::{Error, Result};

/// Where a generation is; passed to the progress callback.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// A stage starts (`"loading text encoders"`, `"encoding prompt"`, `"loading unet"`, `"decoding"` …).
    Stage(&'static str),
    /// Model evaluation `evaluation` of `evaluations` finished; `step` of `steps` inference steps is under way or
    /// done (Heun-like schedulers evaluate the model twice for most steps). `latents`: the loop's state, lent
    /// (`None` where a caller reports steps without latents).
    Step { step: usize, steps: usize, evaluation: usize, evaluations: usize, latents: Option<StepLatents<'a>> },
    /// Part `done` of `total` of a long stage finished (`stage` as its [`Progress::Stage`] named it): a batch of
    /// prompt chunks through a text encoder, a layer of the VAE … Like every report, a point where a cancelled
    /// generation stops.
    Part { stage: &'static str, done: usize, total: usize },
}

/// The denoising loop's state after one model evaluation, lent to the progress callback: nothing is copied unless
/// the callback asks ([`StepLatents::denoised`] computes x₀ on demand).
#[derive(Clone, Copy)]
pub struct StepLatents<'a> {
    /// The sample after the scheduler's step: what the next evaluation starts from.
    pub latents: &'a Tensor,
    /// What the model was given (one guidance half) and what it predicted (guided), at `timestep`.
    model_input: &'a Tensor,
    model_output: &'a Tensor,
    timestep: f64,
    estimator: &'a DenoisedEstimator,
}

impl std::fmt::Debug for StepLatents<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepLatents").field("shape", &self.latents.dims()).field("timestep", &self.timestep).finish()
    }
}

impl StepLatents<'_> {
    /// The x₀ (denoised latents) this evaluation's model output implies: what the image is heading to, as a
    /// preview shows it. Computed on each call (a few element-wise operations on the latents).
    pub fn denoised(&self) -> Result<Tensor> {
        self.estimator.denoised(self.model_output, self.model_input, self.timestep)
    }
}

/// x₀ from a model output, for any scheduler: every scheduler hands the model a variance-preserving input
/// x = α_t·x₀ + σ_t·ε at timestep t (σ-space schedulers scale theirs by 1/√(σ² + 1) for exactly that), so x₀ follows
/// from the training schedule's α_t, σ_t at t (interpolated for fractional timesteps, as the Euler family's σ(t)) and
/// the model's prediction type.
#[derive(Debug, Clone)]
pub struct DenoisedEstimator {
    train_sigmas: Vec<f32>,
    prediction: Prediction,
}

impl DenoisedEstimator {
    /// From the model's scheduler config (its betas and prediction type).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let class = Class { name: "previews", default_spacing: Spacing::Leading, predictions: ALL_PREDICTIONS };
        let schedule = NoiseSchedule::new(config, &class)?;
        Ok(Self { train_sigmas: schedule.train_sigmas(), prediction: schedule.prediction })
    }

    /// x₀ implied by `model_output` for `model_input` at `timestep`.
    pub fn denoised(&self, model_output: &Tensor, model_input: &Tensor, timestep: f64) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(interp(timestep, &self.train_sigmas) as f32);
        let input = model_input.to_dtype(model_output.dtype())?;
        self.prediction.x0_at_alpha(model_output, &input, alpha, sigma)
    }
}

/// What the progress callback answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop at the next opportunity; the generation ends with [`Error::Cancelled`].
    Stop,
}

/// The callback type used throughout the pipeline.
pub type ProgressFn<'a> = dyn for<'p> FnMut(&Progress<'p>) -> Control + 'a;

/// Reports `report`; [`Error::Cancelled`] when the callback answers [`Control::Stop`].
pub fn report(progress: &mut ProgressFn, report: &Progress) -> Result<()> {
    match progress(report) {
        Control::Continue => Ok(()),
        Control::Stop => Err(Error::Cancelled),
    }
}

/// Empties a UNet's cross-attention key/value caches when dropped.
struct ContextCaches<'a>(&'a UNet2DConditionModel);

impl Drop for ContextCaches<'_> {
    fn drop(&mut self) {
        self.0.clear_context_cache();
    }
}

/// `torch.randn((samples, channels, h, w), generator)` × the scheduler's initial sigma, in `dtype`.
pub fn initial_latents(
    rng: &mut TorchRng,
    shape: [usize; 4],
    init_noise_sigma: f64,
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let noise = rng.randn_tensor(&shape, device)?;
    Ok((noise * init_noise_sigma)?.to_dtype(dtype)?)
}

/// SDXL's `add_time_ids`: original size, crop top-left (0, 0), target size, one row per batch entry.
pub fn time_ids(height: usize, width: usize, batch: usize, device: &Device) -> Result<Tensor> {
    let row = [height as f32, width as f32, 0.0, 0.0, height as f32, width as f32];
    Ok(Tensor::from_slice(&row, (1, 6), device)?.repeat((batch, 1))?)
}

/// The per-request numbers the loop needs besides the conditioning.
#[derive(Debug, Clone, Copy)]
pub struct Guidance<'a> {
    /// Classifier-free guidance scale (used when the conditioning is guided).
    pub scale: f64,
    /// Image size in pixels, for SDXL's size conditioning.
    pub height: usize,
    pub width: usize,
    /// How the progress callback's [`StepLatents::denoised`] computes x₀.
    pub estimator: &'a DenoisedEstimator,
    /// The first model evaluation to run: 0, or image-to-image's `t_start · order`
    /// ([`crate::schedulers::img2img_start`]), the latents then being the input image's noised to that level.
    pub start: usize,
    /// Inpainting: the blend of a regular UNet, or the channels of an inpainting UNet.
    pub inpaint: Inpainting<'a>,
}

/// How an inpainting run keeps the unmasked image.
#[derive(Debug, Clone, Copy, Default)]
pub enum Inpainting<'a> {
    /// Not inpainting.
    #[default]
    None,
    /// A regular (4-channel) UNet: after every step, what lies outside the mask is put back ([`InpaintBlend`]).
    Blend(&'a InpaintBlend),
    /// An inpainting (9-channel) UNet: the mask and the masked image's latents, (samples, 1 + 4, h, w), appended to
    /// the scaled latents as the UNet's input channels at every evaluation (both guidance halves).
    Channels(&'a Tensor),
}

/// diffusers' inpainting blend for a 4-channel UNet: after each step the sample outside the mask is replaced by the
/// input image's latents noised to the next evaluation's level (with the same noise as the start), and by the image's
/// latents themselves after the last step: `(1 − mask)·proper + mask·latents`.
#[derive(Debug, Clone)]
pub struct InpaintBlend {
    /// The input image's latents (samples, 4, h, w).
    pub image_latents: Tensor,
    /// The noise the run started from (the same draw `add_noise` used).
    pub noise: Tensor,
    /// 1 where the image is repainted, 0 where it is kept, at the latents' size (samples, 1, h, w).
    pub mask: Tensor,
}

impl InpaintBlend {
    fn apply(&self, scheduler: &dyn Scheduler, latents: &Tensor, next: Option<usize>) -> Result<Tensor> {
        let proper = match next {
            Some(index) => scheduler.add_noise(&self.image_latents, &self.noise, index)?,
            None => self.image_latents.clone(),
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        let latents = latents.to_dtype(proper.dtype())?;
        Ok((keep.broadcast_mul(&proper)? + self.mask.broadcast_mul(&latents)?)?)
    }
}

/// Runs the scheduler's timesteps from `latents` and returns the denoised latents. Model evaluation `index` uses
/// `conditioning.at(index)`.
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    conditioning: &ConditioningSchedule,
    mut latents: Tensor,
    guidance: Guidance,
    rng: &mut TorchRng,
    progress: &mut ProgressFn,
) -> Result<Tensor> {
    let Guidance { scale: guidance_scale, height, width, estimator, start, inpaint } = guidance;
    // The cross-attention layers cache this loop's text contexts' keys and values for its steps; they are emptied
    // when it ends, however it ends (done, failed, cancelled, unwinding), so no generation's memory outlives it.
    let _caches = ContextCaches(unet);
    let device = latents.device().clone();
    let batch = latents.dim(0)? * if conditioning.guided { 2 } else { 1 };
    let time_ids = time_ids(height, width, batch, &device)?.to_dtype(unet.dtype())?;
    let timesteps = scheduler.timesteps().to_vec();
    let order = scheduler.order();
    // The evaluations and steps this run makes (all of them unless it starts part-way, as image to image does).
    let evaluations = timesteps.len().saturating_sub(start);
    let steps = scheduler.num_inference_steps() - start / order;
    for (index, &t) in timesteps.iter().enumerate().skip(start) {
        let input = if conditioning.guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let input = scheduler.scale_model_input(input, index)?;
        let prediction = match inpaint {
            Inpainting::Channels(channels) => {
                let channels = channels.to_dtype(input.dtype())?;
                let channels = if conditioning.guided { Tensor::cat(&[&channels, &channels], 0)? } else { channels };
                predict(unet, &Tensor::cat(&[&input, &channels], 1)?, t, conditioning.at(index), &time_ids)?
            }
            _ => predict(unet, &input, t, conditioning.at(index), &time_ids)?,
        };
        let prediction = prediction.to_dtype(latents.dtype())?;
        let prediction = if conditioning.guided {
            let half = prediction.dim(0)? / 2;
            let uncond = prediction.narrow(0, 0, half)?;
            let cond = prediction.narrow(0, half, half)?;
            (&uncond + ((cond - &uncond)? * guidance_scale)?)?
        } else {
            prediction
        };
        latents = scheduler.step(&prediction, index, &latents, rng)?;
        if let Inpainting::Blend(blend) = inpaint {
            let next = (index + 1 < timesteps.len()).then_some(index + 1);
            latents = blend.apply(scheduler, &latents, next)?.to_dtype(latents.dtype())?;
        }
        let evaluation = index + 1 - start;
        let step = (evaluation * steps).div_ceil(evaluations);
        let model_input = if conditioning.guided { input.narrow(0, 0, input.dim(0)? / 2)? } else { input };
        let state = StepLatents {
            latents: &latents,
            model_input: &model_input,
            model_output: &prediction,
            timestep: t,
            estimator,
        };
        let report = Progress::Step { step, steps, evaluation, evaluations, latents: Some(state) };
        if progress(&report) == Control::Stop {
            return Err(Error::Cancelled);
        }
    }
    Ok(latents)
}

/// The UNet's prediction for `input` (all rows) under one evaluation's conditioning.
fn predict(
    unet: &UNet2DConditionModel,
    input: &Tensor,
    t: f64,
    conditioning: &StepConditioning,
    time_ids: &Tensor,
) -> Result<Tensor> {
    let run = |input: &Tensor, context: &Tensor, pooled: &Tensor, time_ids: Tensor| -> Result<Tensor> {
        let added = AddedConditioning { text_embeds: pooled.clone(), time_ids };
        Ok(unet.forward(input, t, context, &added)?)
    };
    match conditioning {
        StepConditioning::Batched(c) => run(input, &c.context, &c.pooled, time_ids.clone()),
        StepConditioning::Split { negative, positive } => {
            let half = input.dim(0)? / 2;
            let uncond =
                run(&input.narrow(0, 0, half)?, &negative.context, &negative.pooled, time_ids.narrow(0, 0, half)?)?;
            let cond = run(
                &input.narrow(0, half, half)?,
                &positive.context,
                &positive.pooled,
                time_ids.narrow(0, half, half)?,
            )?;
            Ok(Tensor::cat(&[uncond, cond], 0)?)
        }
    }
}
