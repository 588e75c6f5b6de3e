//! Schedulers: the noise schedule (timesteps and sigmas) and the update rule applied after each model call.
//!
//! One core, shared by every scheduler: [`schedule`] reads the config keys every diffusers class reads alike
//! (betas, prediction type, timestep spacing) with the class's defaults and builds the timestep and σ tables;
//! [`sigma`] holds the arithmetic the update rules share (x₀ per prediction type, input scaling, the ODE
//! derivative, the ancestral split, α/σ/λ of a noise level). Each scheduler family lives in its own file with only
//! its history and its update rule, and is registered by one line in `REGISTRY`; adding a scheduler is one file and
//! one registry line. Every scheduler is built from the model's `scheduler/scheduler_config.json` (see
//! [`SchedulerConfig`]) exactly as diffusers' `Class.from_config(config, **options)` would build it, and refuses a
//! config value it does not implement when it is built, naming the key and the accepted values.

pub mod brownian;
mod config;
mod ddim;
mod ddpm;
mod deis;
mod dpm_sde;
mod dpm_solver;
mod euler;
mod heun;
mod kdpm2;
mod lcm;
mod lms;
mod multistep;
mod pndm;
pub mod schedule;
pub mod sigma;
mod tcd;
mod unipc;

use candle_core::{DType, Tensor};

pub use config::SchedulerConfig;

use crate::rng::TorchRng;
use crate::{Error, Result};

/// What the denoising loop needs to know of a scheduler before it runs: one entry per model evaluation.
#[derive(Debug, Clone)]
pub struct Timetable {
    /// The timestep passed to the model at each model evaluation (float: diffusers' Euler-family timesteps are
    /// fractional).
    pub timesteps: Vec<f64>,
    /// The number of inference steps (not of model evaluations, which differ for schedulers that evaluate the
    /// model more than once per step).
    pub num_inference_steps: usize,
    /// What the initial standard-normal latents are multiplied by.
    pub init_noise_sigma: f64,
    /// For σ-space schedulers, the noise level of each evaluation: the model input is `sample / √(σ² + 1)`. `None`:
    /// the input is the sample itself.
    pub input_sigmas: Option<Vec<f32>>,
    /// diffusers' `scheduler.sigmas` (final level included), for the classes that have them.
    pub sigmas: Option<Vec<f64>>,
    /// ᾱ at each evaluation's timestep, for the variance-preserving classes without σ tables (DDIM, DDPM, PNDM,
    /// LCM, TCD): what their `add_noise` scales by.
    pub alphas_cumprod: Option<Vec<f32>>,
}

impl Timetable {
    /// A multistep solver's table: one evaluation per step, unscaled input, initial noise × 1, its σ per step.
    fn multistep(timesteps: Vec<f64>, sigmas: Vec<f64>) -> Self {
        Self {
            num_inference_steps: timesteps.len(),
            timesteps,
            init_noise_sigma: 1.0,
            input_sigmas: None,
            sigmas: Some(sigmas),
            alphas_cumprod: None,
        }
    }

    /// The table of a variance-preserving class on integer timesteps: unscaled input, initial noise × 1, ᾱ of each
    /// evaluation's timestep.
    fn variance_preserving(timesteps: Vec<f64>, schedule: &schedule::NoiseSchedule) -> Self {
        let alphas_cumprod = timesteps.iter().map(|&t| schedule.alphas_cumprod[t as usize]).collect();
        Self {
            num_inference_steps: timesteps.len(),
            timesteps,
            init_noise_sigma: 1.0,
            input_sigmas: None,
            sigmas: None,
            alphas_cumprod: Some(alphas_cumprod),
        }
    }
}

/// The protocol the denoising loop drives (diffusers' `set_timesteps` / `scale_model_input` / `step`).
///
/// The loop is: for each `index` in `0..timesteps().len()`, call the model on
/// `scale_model_input(sample, index)` at timestep `timesteps()[index]`, then `sample = step(output, index, sample)`.
/// Some schedulers (Heun, DPM2) evaluate the model more than once per inference step; `timesteps()` then holds one
/// entry per model evaluation, as diffusers' `scheduler.timesteps` does.
pub trait Scheduler: Send {
    /// The tables built by `set_timesteps`.
    fn timetable(&self) -> &Timetable;

    /// The update rule: the previous sample from the model output at evaluation `index`, both float32 (what
    /// diffusers computes in). Any noise is drawn from `rng`.
    fn update(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor>;

    /// How many model evaluations make one inference step (diffusers' `scheduler.order`: 2 for Heun and DPM2,
    /// whose timesteps repeat each level, else 1). Image-to-image starts at evaluation `t_start · order`.
    fn order(&self) -> usize {
        1
    }

    /// The forward process to evaluation `index`'s noise level (diffusers' `add_noise`, as image-to-image calls it
    /// with the scheduler's begin index): `x₀ + σ·noise` in σ-space, `α·x₀ + σ_t·noise` with (α, σ_t) of the level
    /// for the multistep solvers, and √ᾱ_t, √(1 − ᾱ_t) of the evaluation's timestep for the variance-preserving
    /// classes without σ tables.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let table = self.timetable();
        let (alpha, sigma_t) = match (&table.alphas_cumprod, &table.sigmas) {
            (Some(alphas_cumprod), _) => {
                let a = alphas_cumprod[index];
                (a.sqrt(), (1f32 - a).sqrt())
            }
            (None, Some(sigmas)) if table.input_sigmas.is_some() => {
                return Ok((original + sigma::scale(noise, sigmas[index] as f32)?)?);
            }
            (None, Some(sigmas)) => sigma::alpha_sigma(sigmas[index] as f32),
            (None, None) => {
                let message = "a scheduler table without noise levels has no add_noise";
                return Err(Error::Tensor(candle_core::Error::Msg(message.into())));
            }
        };
        Ok((sigma::scale(original, alpha)? + sigma::scale(noise, sigma_t)?)?)
    }

    /// Sets η, the noise weight diffusers passes to `step(eta=…)`: DDIM's (default 0) and TCD's γ (default 0.3).
    /// Returns `Ok(false)` for schedulers whose step takes no η, an error for a value out of the scheduler's range.
    fn set_eta(&mut self, _eta: f64) -> Result<bool> {
        Ok(false)
    }

    /// Computes the previous sample from the model output at evaluation `index`, in the model output's dtype.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let prev = self.update(&f32(model_output)?, index, &f32(sample)?, rng)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    /// The timestep of each model evaluation.
    fn timesteps(&self) -> &[f64] {
        &self.timetable().timesteps
    }

    /// The number of inference steps this scheduler was set up for.
    fn num_inference_steps(&self) -> usize {
        self.timetable().num_inference_steps
    }

    /// What the initial standard-normal latents are multiplied by (1 unless the scheduler works in σ-space).
    fn init_noise_sigma(&self) -> f64 {
        self.timetable().init_noise_sigma
    }

    /// Scales the model input at evaluation `index` (unchanged unless the scheduler works in σ-space).
    fn scale_model_input(&self, sample: Tensor, index: usize) -> Result<Tensor> {
        match &self.timetable().input_sigmas {
            Some(sigmas) => sigma::scale_input(&sample, sigmas[index]),
            None => Ok(sample),
        }
    }

    /// The noise levels, for schedulers that have them (diffusers' `scheduler.sigmas`, final level included).
    fn sigmas(&self) -> Option<&[f64]> {
        self.timetable().sigmas.as_deref()
    }
}

/// f32 tables as the f64 lists diffusers' tensors print as.
fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// The first model evaluation of an image-to-image run at `strength` (diffusers' `get_timesteps` with
/// `denoising_start` unset): the last `⌊n·strength⌋` of the scheduler's n steps run, from evaluation
/// `(n − ⌊n·strength⌋) · order`. An error names `strength` when it is outside (0, 1] or leaves no step to run.
pub fn img2img_start(scheduler: &dyn Scheduler, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::invalid("strength", format!("must be in (0, 1], got {strength}")));
    }
    let n = scheduler.num_inference_steps();
    let init = ((n as f64 * strength) as usize).min(n);
    if init == 0 {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} of {n} steps leaves no step to run (⌊steps·strength⌋ = 0): raise strength or \
                 num_inference_steps"
            ),
        ));
    }
    Ok((n - init) * scheduler.order())
}

/// The config key of the seed a scheduler draws its own noise from (`DPMSolverSDEScheduler`'s Brownian tree); the
/// pipeline sets it to the run's seed unless the request's options do.
pub const NOISE_SAMPLER_SEED: &str = "noise_sampler_seed";

type Constructor = fn(&SchedulerConfig, usize) -> Result<Box<dyn Scheduler>>;

/// One entry per scheduler: the hosted API's name, other accepted names, and how to build it.
struct Entry {
    name: &'static str,
    aliases: &'static [&'static str],
    build: Constructor,
    /// The config keys its diffusers class reads besides the shared schedule keys (what options may set), as
    /// space-separated groups.
    keys: &'static [&'static str],
}

const REGISTRY: &[Entry] = &[
    Entry {
        name: "UniPC",
        aliases: &["UniPCMultistepScheduler", "unipc", "uni_pc"],
        build: unipc::UniPc::boxed,
        keys: &[multistep::KEYS, unipc::KEYS],
    },
    Entry {
        name: "DPM Multi",
        aliases: &["DPMSolverMultistepScheduler", "dpm_multi", "dpmpp_2m"],
        build: dpm_solver::DpmSolverMultistep::boxed,
        keys: &[multistep::KEYS, dpm_solver::MULTISTEP_KEYS],
    },
    Entry {
        name: "DPM++ 2M Karras",
        aliases: &["dpmpp_2m_karras", "DPM++ 2M Karras"],
        build: dpm_solver::DpmSolverMultistep::karras,
        keys: &[multistep::KEYS, dpm_solver::MULTISTEP_KEYS],
    },
    Entry {
        name: "DPM++ 2M SDE Karras",
        aliases: &["dpmpp_2m_sde_karras"],
        build: dpm_solver::DpmSolverMultistep::sde_karras,
        keys: &[multistep::KEYS, dpm_solver::MULTISTEP_KEYS],
    },
    Entry {
        name: "DPM Single",
        aliases: &["DPMSolverSinglestepScheduler", "dpm_single", "dpmpp_2s"],
        build: dpm_solver::DpmSolverSinglestep::boxed,
        keys: &[multistep::KEYS, dpm_solver::SINGLESTEP_KEYS],
    },
    Entry { name: "DDPM", aliases: &["DDPMScheduler", "ddpm"], build: ddpm::Ddpm::boxed, keys: &[ddpm::KEYS] },
    Entry {
        name: "DEIS",
        aliases: &["DEISMultistepScheduler", "deis"],
        build: deis::Deis::boxed,
        keys: &[multistep::KEYS, deis::KEYS],
    },
    Entry { name: "DDIM", aliases: &["DDIMScheduler", "ddim"], build: ddim::Ddim::boxed, keys: &[ddim::KEYS] },
    Entry {
        name: "Euler a",
        aliases: &["EulerAncestralDiscreteScheduler", "euler_a", "k_euler_a", "euler_ancestral"],
        build: euler::Euler::ancestral,
        keys: &[euler::ANCESTRAL_KEYS],
    },
    Entry {
        name: "Heun",
        aliases: &["HeunDiscreteScheduler", "heun", "k_heun"],
        build: heun::Heun::boxed,
        keys: &[heun::KEYS],
    },
    Entry {
        name: "LMS",
        aliases: &["LMSDiscreteScheduler", "lms", "k_lms"],
        build: lms::Lms::boxed,
        keys: &[lms::KEYS],
    },
    Entry {
        name: "DPM2 Karras",
        aliases: &["KDPM2DiscreteScheduler", "dpm2_karras", "k_dpm_2_karras"],
        build: kdpm2::Kdpm2::karras,
        keys: &[kdpm2::KEYS],
    },
    Entry {
        name: "DPM2 a Karras",
        aliases: &["KDPM2AncestralDiscreteScheduler", "dpm2_a_karras", "k_dpm_2_a_karras", "dpm2_ancestral_karras"],
        build: kdpm2::Kdpm2::ancestral_karras,
        keys: &[kdpm2::KEYS],
    },
    Entry { name: "PNDM", aliases: &["PNDMScheduler", "pndm", "plms"], build: pndm::Pndm::boxed, keys: &[pndm::KEYS] },
    Entry {
        name: "Euler",
        aliases: &["EulerDiscreteScheduler", "euler", "k_euler"],
        build: euler::Euler::boxed,
        keys: &[euler::KEYS],
    },
    Entry { name: "LCM", aliases: &["LCMScheduler", "lcm"], build: lcm::Lcm::boxed, keys: &[lcm::KEYS] },
    Entry { name: "TCD", aliases: &["TCDScheduler", "tcd"], build: tcd::Tcd::boxed, keys: &[tcd::KEYS] },
    Entry {
        name: "DPM++ 2M SDE",
        aliases: &["dpmpp_2m_sde"],
        build: dpm_solver::DpmSolverMultistep::sde,
        keys: &[multistep::KEYS, dpm_solver::MULTISTEP_KEYS],
    },
    Entry {
        name: "DPM++ 3M SDE Karras",
        aliases: &["dpmpp_3m_sde_karras"],
        build: dpm_solver::DpmSolverMultistep::sde_3m_karras,
        keys: &[multistep::KEYS, dpm_solver::MULTISTEP_KEYS],
    },
    Entry {
        name: "DPM++ SDE Karras",
        aliases: &["dpmpp_sde_karras", "k_dpmpp_sde_karras"],
        build: dpm_sde::DpmSde::karras,
        keys: &[dpm_sde::KEYS],
    },
    Entry {
        name: "DPM++ SDE",
        aliases: &["DPMSolverSDEScheduler", "dpmpp_sde", "k_dpmpp_sde"],
        build: dpm_sde::DpmSde::boxed,
        keys: &[dpm_sde::KEYS],
    },
];

/// A registered scheduler, found by [`lookup`]: what the CLI, the server and `bench-schedulers` hold once a name
/// has been checked.
#[derive(Clone, Copy)]
pub struct Kind(&'static Entry);

impl Kind {
    /// The hosted API's spelling of the name.
    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// Whether its diffusers class reads config key `key` (a shared schedule key or one of its own).
    pub fn reads(self, key: &str) -> bool {
        schedule::SCHEDULE_KEYS.contains(&key)
            || self.0.keys.iter().any(|group| group.split_whitespace().any(|k| k == key))
    }

    /// The model's config with `options` on top, as `Class.from_config(config, **options)` takes them; a key the
    /// class does not read is an error naming it and the scheduler (the values are checked when it is built).
    pub fn configure(
        self,
        config: &SchedulerConfig,
        options: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<SchedulerConfig> {
        let mut config = config.clone();
        for (key, value) in options {
            if !self.reads(key) {
                return Err(Error::invalid(
                    "scheduler_options",
                    format!(
                        "`{key}` is not a config key of {} (it reads: {}, {})",
                        self.name(),
                        schedule::SCHEDULE_KEYS.join(", "),
                        self.0.keys.join(", ")
                    ),
                ));
            }
            config = config.with(key, value.clone());
        }
        Ok(config)
    }

    /// Builds the scheduler from the model's config, set up for `num_inference_steps`.
    pub fn build(self, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
        let train_steps = schedule::train_timesteps(config);
        if num_inference_steps == 0 || num_inference_steps > train_steps {
            return Err(Error::invalid(
                "num_inference_steps",
                format!(
                    "must be between 1 and the model's {train_steps} training timesteps, got {num_inference_steps}"
                ),
            ));
        }
        (self.0.build)(config, num_inference_steps)
    }
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for Kind {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Kind {}

/// The names of every registered scheduler, as the hosted API spells them.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|e| e.name).collect()
}

/// Every registered scheduler, in registry order.
pub fn all() -> impl Iterator<Item = Kind> {
    REGISTRY.iter().map(Kind)
}

/// The scheduler called `name` (case-insensitive; hosted-API, diffusers-class or A1111 name), or
/// [`Error::UnknownScheduler`] listing the valid names.
pub fn lookup(name: &str) -> Result<Kind> {
    let wanted = name.trim();
    REGISTRY
        .iter()
        .find(|e| e.name.eq_ignore_ascii_case(wanted) || e.aliases.iter().any(|a| a.eq_ignore_ascii_case(wanted)))
        .map(Kind)
        .ok_or_else(|| Error::UnknownScheduler { name: name.to_string(), valid: names() })
}

/// Builds the scheduler `name` (see [`lookup`]) from the model's config, set up for `num_inference_steps`.
pub fn create(name: &str, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
    lookup(name)?.build(config, num_inference_steps)
}
