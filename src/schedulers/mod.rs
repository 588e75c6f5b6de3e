//! Schedulers: the noise schedule (timesteps and sigmas) and the update rule applied after each model call.
//!
//! Each scheduler family lives in its own file and is registered by one line in [`REGISTRY`]. Every scheduler is
//! built from the model's `scheduler/scheduler_config.json` (see [`SchedulerConfig`]) exactly as diffusers'
//! `Class.from_config(config, **options)` would build it.

use candle_core::Tensor;

use crate::rng::TorchRng;
use crate::Result;

/// The protocol the denoising loop drives (diffusers' `set_timesteps` / `scale_model_input` / `step`).
///
/// The loop is: for each `index` in `0..timesteps().len()`, call the model on
/// `scale_model_input(sample, index)` at timestep `timesteps()[index]`, then `sample = step(output, index, sample)`.
/// Some schedulers (Heun, DPM2) evaluate the model more than once per inference step; `timesteps()` then holds one
/// entry per model evaluation, as diffusers' `scheduler.timesteps` does.
pub trait Scheduler: Send {
    /// The timestep passed to the model at each model evaluation (float: diffusers' Euler-family timesteps are
    /// fractional).
    fn timesteps(&self) -> &[f64];

    /// The number of inference steps this scheduler was set up for (not the number of model evaluations).
    fn num_inference_steps(&self) -> usize;

    /// What the initial standard-normal latents are multiplied by.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the model input at evaluation `index`.
    fn scale_model_input(&self, sample: Tensor, index: usize) -> Result<Tensor>;

    /// Computes the previous sample from the model output at evaluation `index`. Any noise is drawn from `rng`.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor>;
}
