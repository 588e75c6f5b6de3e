//! Schedulers: the noise schedule (timesteps and sigmas) and the update rule applied after each model call.
//!
//! Each scheduler family lives in its own file and is registered by one line in [`REGISTRY`]. Every scheduler is
//! built from the model's `scheduler/scheduler_config.json` (see [`SchedulerConfig`]) exactly as diffusers'
//! `Class.from_config(config, **options)` would build it.

mod ddim;
mod ddpm;
mod deis;
mod dpm_solver;
mod euler;
mod heun;
mod kdpm2;
mod lms;
mod multistep;
mod pndm;
pub mod schedule;
mod unipc;

use std::path::Path;

use candle_core::Tensor;

use crate::rng::TorchRng;
use crate::{Error, Result};

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

    /// The number of inference steps this scheduler was set up for (not the number of model evaluations, which
    /// differ for schedulers that evaluate the model more than once per step).
    fn num_inference_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// What the initial standard-normal latents are multiplied by (1 unless the scheduler works in σ-space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the model input at evaluation `index` (unchanged unless the scheduler works in σ-space).
    fn scale_model_input(&self, sample: Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample)
    }

    /// Computes the previous sample from the model output at evaluation `index`. Any noise is drawn from `rng`.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor, rng: &mut TorchRng) -> Result<Tensor>;

    /// The noise levels, for schedulers that have them (diffusers' `scheduler.sigmas`, final 0 included).
    fn sigmas(&self) -> Option<Vec<f64>> {
        None
    }
}

/// A model's `scheduler_config.json`, kept whole: each scheduler reads the keys its diffusers class reads, with that
/// class's defaults for missing (or null) keys, as `Class.from_config(config)` does.
#[derive(Debug, Clone, Default)]
pub struct SchedulerConfig {
    values: serde_json::Map<String, serde_json::Value>,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|m| Error::model(path, m))
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(values)) => Ok(Self { values }),
            Ok(_) => Err("a scheduler config must be a JSON object".into()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        }
    }

    /// Sets a key (the `**options` of `from_config`).
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.values.insert(key.to_string(), value);
        self
    }

    fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    pub fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.get(key).and_then(|v| v.as_f64()).unwrap_or(default)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> usize {
        self.get(key).and_then(|v| v.as_u64()).map_or(default, |v| v as usize)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.get(key).and_then(|v| v.as_str()).unwrap_or(default)
    }

    pub fn f64_list(&self, key: &str) -> Option<Vec<f64>> {
        self.get(key)?.as_array()?.iter().map(|v| v.as_f64()).collect()
    }
}

type Constructor = fn(&SchedulerConfig, usize) -> Result<Box<dyn Scheduler>>;

/// One entry per scheduler: the hosted API's name, other accepted names, and how to build it.
struct Entry {
    name: &'static str,
    aliases: &'static [&'static str],
    build: Constructor,
}

const REGISTRY: &[Entry] = &[
    Entry { name: "UniPC", aliases: &["UniPCMultistepScheduler", "unipc", "uni_pc"], build: unipc::UniPc::boxed },
    Entry {
        name: "DPM Multi",
        aliases: &["DPMSolverMultistepScheduler", "dpm_multi", "dpmpp_2m"],
        build: dpm_solver::DpmSolverMultistep::boxed,
    },
    Entry {
        name: "DPM++ 2M Karras",
        aliases: &["dpmpp_2m_karras", "DPM++ 2M Karras"],
        build: dpm_solver::DpmSolverMultistep::karras,
    },
    Entry {
        name: "DPM++ 2M SDE Karras",
        aliases: &["dpmpp_2m_sde_karras"],
        build: dpm_solver::DpmSolverMultistep::sde_karras,
    },
    Entry {
        name: "DPM Single",
        aliases: &["DPMSolverSinglestepScheduler", "dpm_single", "dpmpp_2s"],
        build: dpm_solver::DpmSolverSinglestep::boxed,
    },
    Entry { name: "DDPM", aliases: &["DDPMScheduler", "ddpm"], build: ddpm::Ddpm::boxed },
    Entry { name: "DEIS", aliases: &["DEISMultistepScheduler", "deis"], build: deis::Deis::boxed },
    Entry { name: "DDIM", aliases: &["DDIMScheduler", "ddim"], build: ddim::Ddim::boxed },
    Entry {
        name: "Euler a",
        aliases: &["EulerAncestralDiscreteScheduler", "euler_a", "k_euler_a", "euler_ancestral"],
        build: euler::Euler::ancestral,
    },
    Entry { name: "Heun", aliases: &["HeunDiscreteScheduler", "heun", "k_heun"], build: heun::Heun::boxed },
    Entry { name: "LMS", aliases: &["LMSDiscreteScheduler", "lms", "k_lms"], build: lms::Lms::boxed },
    Entry {
        name: "DPM2 Karras",
        aliases: &["KDPM2DiscreteScheduler", "dpm2_karras", "k_dpm_2_karras"],
        build: kdpm2::Kdpm2::karras,
    },
    Entry {
        name: "DPM2 a Karras",
        aliases: &["KDPM2AncestralDiscreteScheduler", "dpm2_a_karras", "k_dpm_2_a_karras", "dpm2_ancestral_karras"],
        build: kdpm2::Kdpm2::ancestral_karras,
    },
    Entry { name: "PNDM", aliases: &["PNDMScheduler", "pndm", "plms"], build: pndm::Pndm::boxed },
    Entry { name: "Euler", aliases: &["EulerDiscreteScheduler", "euler", "k_euler"], build: euler::Euler::boxed },
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

    /// Builds the scheduler from the model's config, set up for `num_inference_steps`.
    pub fn build(self, config: &SchedulerConfig, num_inference_steps: usize) -> Result<Box<dyn Scheduler>> {
        let train_steps = config.usize_or("num_train_timesteps", 1000);
        if num_inference_steps == 0 || num_inference_steps > train_steps {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("must be between 1 and the model's {train_steps} training timesteps, got {num_inference_steps}"),
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
        std::ptr::eq(self.0, other.0)
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
