//! Where a pipeline's configs, tokenizers and weights come from: a diffusers folder or hub id, or a single-file
//! checkpoint (optionally with a diffusers folder's configs, `--config`), plus an optional replacement VAE.
//! The pipeline asks for components by name and never sees the layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::repo::{read_json, ModelRepo};
use super::single_file::{is_single_file, Part, Remapped, SingleFile};
use super::weights::Weights;
use crate::adapters::module_names::ModuleIndex;
use crate::adapters::{LoraBackend, LoraFile, ResolvedUpdates, Target};
use crate::models::clip::ClipTextConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::models::ConfigError;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The scheduler config of SDXL base (`EulerDiscreteScheduler`), for checkpoints that carry none.
const SDXL_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false
}"#;

/// The pipeline's components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    TextEncoder,
    TextEncoder2,
    Unet,
    Vae,
}

impl Component {
    /// The component's name: its folder in a diffusers repository (`"unet"`, `"text_encoder_2"`, …).
    pub fn name(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Unet => "unet",
            Component::Vae => "vae",
        }
    }

    /// The LoRA target of a component LoRAs patch.
    fn lora_target(self) -> Option<Target> {
        match self {
            Component::TextEncoder => Some(Target::TextEncoder),
            Component::TextEncoder2 => Some(Target::TextEncoder2),
            Component::Unet => Some(Target::Unet),
            Component::Vae => None,
        }
    }

    fn weights_stem(self) -> &'static str {
        match self {
            Component::TextEncoder | Component::TextEncoder2 => "model",
            Component::Unet | Component::Vae => "diffusion_pytorch_model",
        }
    }
}

/// The parts of `model_index.json` we read.
#[derive(Debug, Clone, Deserialize)]
struct ModelIndex {
    #[serde(default = "default_true")]
    force_zeros_for_empty_prompt: bool,
}

fn default_true() -> bool {
    true
}

/// Every config of the pipeline, from the model's own files (or, for a single file, from its keys).
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub text_encoder_2: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
}

enum Weightset {
    Diffusers(ModelRepo),
    SingleFile(SingleFile),
}

enum VaeSource {
    /// A diffusers VAE repository (`config.json` + `diffusion_pytorch_model.safetensors` at its root).
    Repo(ModelRepo),
    /// A VAE file in the original layout (`decoder.mid.…`, with or without `first_stage_model.`).
    Original(SingleFile),
    /// A VAE file in diffusers naming (`decoder.mid_block.…`).
    Diffusers(PathBuf),
}

/// Where everything of one pipeline comes from.
pub struct ModelSource {
    weights: Weightset,
    /// Configs and tokenizers for a single file (`--config`).
    config_repo: Option<ModelRepo>,
    vae: Option<VaeSource>,
    /// LoRA updates merged into the UNet and text encoders as they are loaded.
    adapters: Vec<(Target, ResolvedUpdates)>,
}

/// A component's config file of `repo`, checked by `validate`: errors name the file and the key.
fn component_config<T: serde::de::DeserializeOwned>(
    repo: &ModelRepo,
    rel: &str,
    validate: impl FnOnce(&T) -> std::result::Result<(), ConfigError>,
) -> Result<T> {
    let path = repo.require(rel)?;
    let config = read_json(&path)?;
    validate(&config).map_err(|e| Error::config_key(&path, e.key, e.message))?;
    Ok(config)
}

/// A component's config derived from a single file's keys (`component`: which one), checked by `validate`.
fn derived_config<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    origin: &Path,
    component: &str,
    validate: impl FnOnce(&T) -> std::result::Result<(), ConfigError>,
) -> Result<T> {
    let config = serde_json::from_value(value).map_err(|e| {
        Error::model(origin, format!("the {component} config read off this file's keys is invalid: {e}"))
    })?;
    validate(&config).map_err(|e| {
        Error::config_key(origin, e.key, format!("{} (in the {component} config read off this file's keys)", e.message))
    })?;
    Ok(config)
}

impl ModelSource {
    /// `model`: a diffusers folder, a hub id or a `.safetensors` checkpoint; `config`: a diffusers folder or hub id
    /// whose config files describe a single-file checkpoint; `vae`: a replacement VAE (folder, hub id or file).
    pub fn open(model: &str, config: Option<&str>, vae: Option<&str>) -> Result<Self> {
        let weights = if is_single_file(model) {
            let file = SingleFile::open(Path::new(model))?;
            file.check_sdxl()?;
            Weightset::SingleFile(file)
        } else {
            Weightset::Diffusers(ModelRepo::open(model)?)
        };
        let config_repo = config.map(ModelRepo::open).transpose()?;
        let vae = match vae {
            None => None,
            Some(spec) if is_single_file(spec) => {
                let file = SingleFile::open(Path::new(spec))?;
                Some(if file.has_vae() { VaeSource::Original(file) } else { VaeSource::Diffusers(PathBuf::from(spec)) })
            }
            Some(spec) => Some(VaeSource::Repo(ModelRepo::open(spec)?)),
        };
        if let (Weightset::SingleFile(file), None) = (&weights, &vae) {
            if !file.has_vae() {
                return Err(Error::model(
                    file.path(),
                    "no VAE (first_stage_model.* keys) in this file: give one with --vae",
                ));
            }
        }
        Ok(Self { weights, config_repo, vae, adapters: Vec::new() })
    }

    /// The repository configs are read from, if any.
    fn config_repo(&self) -> Option<&ModelRepo> {
        match &self.weights {
            Weightset::Diffusers(repo) => Some(repo),
            Weightset::SingleFile(_) => self.config_repo.as_ref(),
        }
    }

    /// Every config of the pipeline, each checked: a value a component cannot be built with is an error naming the
    /// file and the key.
    pub fn configs(&self) -> Result<ModelConfigs> {
        Ok(match (&self.weights, self.config_repo()) {
            (_, Some(repo)) => {
                let index: ModelIndex = repo.json("model_index.json")?;
                ModelConfigs {
                    unet: component_config(repo, "unet/config.json", UNetConfig::validate)?,
                    vae: self.vae_config()?,
                    text_encoder: component_config(repo, "text_encoder/config.json", ClipTextConfig::validate)?,
                    text_encoder_2: component_config(repo, "text_encoder_2/config.json", ClipTextConfig::validate)?,
                    scheduler: SchedulerConfig::from_file(&repo.require("scheduler/scheduler_config.json")?)?,
                    force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
                }
            }
            (Weightset::SingleFile(file), None) => {
                let origin = file.path();
                let clip = |part, component| {
                    derived_config(file.clip_config(part)?, origin, component, ClipTextConfig::validate)
                };
                ModelConfigs {
                    unet: derived_config(file.unet_config()?, origin, "unet", UNetConfig::validate)?,
                    vae: self.vae_config()?,
                    text_encoder: clip(Part::ClipL, "text_encoder")?,
                    text_encoder_2: clip(Part::ClipG, "text_encoder_2")?,
                    scheduler: SchedulerConfig::from_json(SDXL_SCHEDULER_CONFIG)
                        .expect("the built-in SDXL scheduler config is a JSON object"),
                    force_zeros_for_empty_prompt: true,
                }
            }
            (Weightset::Diffusers(_), None) => unreachable!("a diffusers source is its own config repository"),
        })
    }

    /// The config of the VAE that decodes: the replacement's (`--vae`) or the model's own.
    fn vae_config(&self) -> Result<VaeConfig> {
        match &self.vae {
            Some(VaeSource::Repo(repo)) => component_config(repo, "config.json", VaeConfig::validate),
            Some(VaeSource::Original(file)) => {
                let mut config: VaeConfig =
                    derived_config(file.vae_config()?, file.path(), "vae", VaeConfig::validate)?;
                config.force_upcast = !named_f16_safe(file.path());
                Ok(config)
            }
            Some(VaeSource::Diffusers(path)) => {
                let mut config = self.own_vae_config()?;
                config.force_upcast = !named_f16_safe(path);
                Ok(config)
            }
            None => self.own_vae_config(),
        }
    }

    /// The model's own VAE config: its repository's `vae/config.json`, or read off a single file's keys (SDXL's for a
    /// file without a VAE).
    fn own_vae_config(&self) -> Result<VaeConfig> {
        match (&self.weights, self.config_repo()) {
            (_, Some(repo)) => component_config(repo, "vae/config.json", VaeConfig::validate),
            (Weightset::SingleFile(file), None) if file.has_vae() => {
                derived_config(file.vae_config()?, file.path(), "vae", VaeConfig::validate)
            }
            _ => Ok(sdxl_vae_config()),
        }
    }

    /// Both tokenizers: the repository's, or CLIP's built-in vocabulary for a single file without `--config`.
    pub fn tokenizers(&self) -> Result<(ClipTokenizer, ClipTokenizer)> {
        match self.config_repo() {
            Some(repo)
                if repo.file("tokenizer/vocab.json")?.is_some() || repo.file("tokenizer/tokenizer.json")?.is_some() =>
            {
                Ok((tokenizer_from(repo, "tokenizer")?, tokenizer_from(repo, "tokenizer_2")?))
            }
            Some(repo) if matches!(self.weights, Weightset::Diffusers(_)) => Err(Error::NotFound(format!(
                "{}: tokenizer/vocab.json (or tokenizer.json) is missing",
                repo.describe()
            ))),
            _ => Ok((ClipTokenizer::builtin("<|endoftext|>")?, ClipTokenizer::builtin("!")?)),
        }
    }

    /// A component's weights, converted to `dtype` on `device` as they are taken.
    pub fn var_builder(&self, component: Component, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let (backend, _) = self.weight_source(component, dtype == DType::F16)?;
        let backend = match self.adapters.iter().find(|(t, _)| Some(*t) == component.lora_target()) {
            Some((_, updates)) if !updates.is_empty() => Box::new(LoraBackend::new(backend, updates.clone())),
            _ => backend,
        };
        Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
    }

    /// A component's stored weights (under their diffusers names) and those names.
    fn weight_source(&self, component: Component, prefer_fp16: bool) -> Result<(Box<dyn SimpleBackend>, Vec<String>)> {
        fn boxed(weights: Weights) -> (Box<dyn SimpleBackend>, Vec<String>) {
            let names = weights.names().map(String::from).collect();
            (Box::new(weights), names)
        }
        fn boxed_remapped(remapped: Remapped) -> (Box<dyn SimpleBackend>, Vec<String>) {
            let names = remapped.names().map(String::from).collect();
            (Box::new(remapped), names)
        }
        if component == Component::Vae {
            match &self.vae {
                Some(VaeSource::Repo(repo)) => {
                    return Ok(boxed(Weights::open(&repo.weights("", "diffusion_pytorch_model", prefer_fp16)?)?))
                }
                Some(VaeSource::Original(file)) => return Ok(boxed_remapped(file.component(Part::Vae)?)),
                Some(VaeSource::Diffusers(path)) => return Ok(boxed(Weights::open(std::slice::from_ref(path))?)),
                None => {}
            }
        }
        match &self.weights {
            Weightset::Diffusers(repo) => {
                Ok(boxed(Weights::open(&repo.weights(component.name(), component.weights_stem(), prefer_fp16)?)?))
            }
            Weightset::SingleFile(file) => {
                let part = match component {
                    Component::TextEncoder => Part::ClipL,
                    Component::TextEncoder2 => Part::ClipG,
                    Component::Unet => Part::Unet,
                    Component::Vae => Part::Vae,
                };
                Ok(boxed_remapped(file.component(part)?))
            }
        }
    }

    /// Merges `loras` (each with its weight) into the UNet and text encoders from their next load on. Every update
    /// must patch a module of this model (an error names the key and the file otherwise).
    pub fn set_loras(&mut self, loras: &[(Arc<LoraFile>, f64)], unet: &UNetConfig) -> Result<()> {
        let mut adapters = Vec::new();
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let target = component.lora_target().expect("patched components");
            if !loras.iter().any(|(file, _)| file.updates.iter().any(|u| u.target == target)) {
                continue;
            }
            let (_, names) = self.weight_source(component, false)?;
            let index =
                ModuleIndex::new(names.iter().map(String::as_str), (component == Component::Unet).then_some(unet));
            adapters.push((target, ResolvedUpdates::resolve(loras, target, &index)?));
        }
        self.adapters = adapters;
        Ok(())
    }

    /// A hint added to loading errors when the configs were read off a single file's keys.
    pub fn config_hint(&self) -> &'static str {
        match (&self.weights, &self.config_repo) {
            (Weightset::SingleFile(_), None) => {
                " (this checkpoint's dimensions were read off its keys with SDXL's conventions; if it is not \
                 SDXL-shaped, give its configs with --config <diffusers folder or hub id>)"
            }
            _ => "",
        }
    }

    /// Stored keys of a single-file checkpoint that no component uses (EMA weights, `logit_scale`…).
    pub fn unused_keys(&self) -> Result<Vec<String>> {
        match &self.weights {
            Weightset::SingleFile(file) => file.unused_keys(),
            Weightset::Diffusers(_) => Ok(Vec::new()),
        }
    }
}

fn tokenizer_from(repo: &ModelRepo, folder: &str) -> Result<ClipTokenizer> {
    // Resolve each file (into the hub cache if needed), then read the folder.
    let vocab = match repo.file(&format!("{folder}/tokenizer.json"))? {
        Some(p) => p,
        None => {
            repo.require(&format!("{folder}/merges.txt"))?;
            repo.require(&format!("{folder}/vocab.json"))?
        }
    };
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        repo.file(&format!("{folder}/{optional}"))?;
    }
    let dir: PathBuf = vocab.parent().map(PathBuf::from).unwrap_or_default();
    ClipTokenizer::from_dir(&dir)
}

/// SDXL's VAE config (for a single file that relies on `--vae` for its weights).
fn sdxl_vae_config() -> VaeConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 32, "scaling_factor": 0.13025, "force_upcast": true
    }))
    .expect("valid built-in config")
}

/// A VAE file whose name says it was fixed for f16 (`sdxl.vae.fp16-fix.safetensors`, `sdxl_vae_fp16fix…`).
fn named_f16_safe(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().contains("fp16"))
}
