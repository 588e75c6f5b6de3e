//! The SDXL text-to-image pipeline: loads a model's configs up front and its components when they are needed,
//! and runs request → prompt conditioning → denoising loop → VAE decode → images.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Deserialize;

use crate::conditioning::{Conditioning, TextEncoders};
use crate::loading::{ModelRepo, Weights};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{VaeConfig, VaeDecoder};
use crate::rng::TorchRng;
use crate::sampling::{self, Control, Progress, ProgressFn};
use crate::schedulers::{self, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, GenerateRequest, Result};

/// Whether components stay in memory between generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Residency {
    /// Load each component when its stage starts and free it when the stage ends: the lowest peak memory
    /// (text encoders, then UNet, then VAE). Right for one-off generations.
    #[default]
    Sequential,
    /// Load everything once and keep it (a server).
    Resident,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub device: Device,
    /// Run dtype of the text encoders and UNet (the VAE may be upcast, see [`VaeConfig::force_upcast`]).
    pub dtype: DType,
    /// A replacement VAE: a folder with `config.json` + `diffusion_pytorch_model.safetensors`, or a hub id.
    pub vae: Option<String>,
    pub residency: Residency,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, vae: None, residency: Residency::Sequential }
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

/// Every config of the pipeline, read from the model's own files.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub text_encoder_2: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
}

/// The images of one request and the seed that made them.
#[derive(Debug, Clone)]
pub struct Generation {
    pub images: Vec<RgbImage>,
    pub seed: u64,
    /// The denoised latents, (samples, 4, h/8, w/8), f32.
    pub latents: Tensor,
}

/// Loaded components, kept when [`Residency::Resident`].
#[derive(Default)]
struct Resident {
    text: Option<TextEncoders>,
    unet: Option<UNet2DConditionModel>,
    vae: Option<VaeDecoder>,
}

pub struct Pipeline {
    repo: ModelRepo,
    vae_repo: (ModelRepo, &'static str),
    pub configs: ModelConfigs,
    device: Device,
    dtype: DType,
    resident: Resident,
}

impl Pipeline {
    /// Reads a model's configs (a diffusers folder or a hub id) and, with [`Residency::Resident`], its weights.
    pub fn load(model: &str, options: PipelineOptions) -> Result<Self> {
        if options.device.is_cpu() && options.dtype == DType::BF16 {
            return Err(Error::invalid(
                "dtype",
                "bf16 is not supported on the CPU yet (candle has no CPU bf16 matmul); use f32 or f16",
            ));
        }
        let repo = ModelRepo::open(model)?;
        // A replacement VAE is its own repository root (`config.json` at the top), the model's VAE lives in `vae/`.
        let vae_repo = match &options.vae {
            Some(spec) => (ModelRepo::open(spec)?, ""),
            None => (repo.clone(), "vae"),
        };
        let index: ModelIndex = repo.json("model_index.json")?;
        let unet: UNetConfig = repo.json("unet/config.json")?;
        if let Err(message) = unet.validate() {
            return Err(Error::model(repo.require("unet/config.json")?, message));
        }
        let vae: VaeConfig = vae_repo.0.json(&join(vae_repo.1, "config.json"))?;
        let configs = ModelConfigs {
            unet,
            vae,
            text_encoder: repo.json("text_encoder/config.json")?,
            text_encoder_2: repo.json("text_encoder_2/config.json")?,
            scheduler: schedulers::SchedulerConfig::from_file(&repo.require("scheduler/scheduler_config.json")?)?,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
        };
        let mut pipeline = Self {
            repo,
            vae_repo,
            configs,
            device: options.device,
            dtype: options.dtype,
            resident: Resident::default(),
        };
        if options.residency == Residency::Resident {
            pipeline.resident = Resident {
                text: Some(pipeline.load_text_encoders()?),
                unet: Some(pipeline.load_unet()?),
                vae: Some(pipeline.load_vae()?),
            };
        }
        Ok(pipeline)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The VAE's spatial down-sampling factor: image sizes must be multiples of it.
    pub fn vae_scale_factor(&self) -> usize {
        self.configs.vae.scale_factor()
    }

    /// The VAE runs in f32 when the run dtype is f16 and its config says it overflows in f16.
    pub fn vae_dtype(&self) -> DType {
        if self.dtype == DType::F16 && self.configs.vae.force_upcast {
            DType::F32
        } else {
            self.dtype
        }
    }

    fn var_builder(
        &self,
        repo: &ModelRepo,
        component: &str,
        stem: &str,
        dtype: DType,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        let files = repo.weights(component, stem, dtype == DType::F16)?;
        Ok(Weights::open(&files)?.into_var_builder(dtype, &self.device))
    }

    fn tokenizer(&self, folder: &str) -> Result<ClipTokenizer> {
        // Resolve each file (downloads into the hub cache if needed), then read the folder.
        let vocab = match self.repo.file(&format!("{folder}/tokenizer.json"))? {
            Some(p) => p,
            None => {
                self.repo.require(&format!("{folder}/merges.txt"))?;
                self.repo.require(&format!("{folder}/vocab.json"))?
            }
        };
        self.repo.file(&format!("{folder}/tokenizer_config.json"))?;
        let dir: PathBuf = vocab.parent().map(PathBuf::from).unwrap_or_default();
        ClipTokenizer::from_dir(&dir)
    }

    /// Loads both tokenizers and text encoders.
    pub fn load_text_encoders(&self) -> Result<TextEncoders> {
        let load = |component: &str, cfg: &ClipTextConfig, with_projection: bool| -> Result<ClipTextModel> {
            let vb = self.var_builder(&self.repo, component, "model", self.dtype)?;
            ClipTextModel::new(vb, cfg, with_projection).map_err(|e| component_error(component, e))
        };
        Ok(TextEncoders {
            tokenizer: self.tokenizer("tokenizer")?,
            tokenizer_2: self.tokenizer("tokenizer_2")?,
            text_encoder: load("text_encoder", &self.configs.text_encoder, false)?,
            text_encoder_2: load("text_encoder_2", &self.configs.text_encoder_2, true)?,
        })
    }

    pub fn load_unet(&self) -> Result<UNet2DConditionModel> {
        let vb = self.var_builder(&self.repo, "unet", "diffusion_pytorch_model", self.dtype)?;
        UNet2DConditionModel::new(vb, &self.configs.unet).map_err(|e| component_error("unet", e))
    }

    pub fn load_vae(&self) -> Result<VaeDecoder> {
        let (repo, dir) = &self.vae_repo;
        let vb = self.var_builder(repo, dir, "diffusion_pytorch_model", self.vae_dtype())?;
        VaeDecoder::new(vb, &self.configs.vae).map_err(|e| component_error("vae", e))
    }

    /// Prompt conditioning for a request (text encoders loaded for the call unless resident).
    pub fn condition(&self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Conditioning> {
        let loaded;
        let encoders = match &self.resident.text {
            Some(t) => t,
            None => {
                stage(progress, "loading text encoders")?;
                loaded = self.load_text_encoders()?;
                &loaded
            }
        };
        stage(progress, "encoding prompt")?;
        encoders.condition(
            &request.prompt,
            &request.negative_prompt,
            self.configs.force_zeros_for_empty_prompt,
            request.samples as usize,
            request.guidance_scale > 1.0,
            &self.device,
        )
    }

    /// The denoising loop for a request, from the seed's initial noise to the denoised latents.
    pub fn denoise(
        &self,
        request: &GenerateRequest,
        conditioning: &Conditioning,
        seed: u64,
        progress: &mut ProgressFn,
    ) -> Result<Tensor> {
        let mut scheduler =
            schedulers::create(&request.scheduler, &self.configs.scheduler, request.num_inference_steps as usize)?;
        let loaded;
        let unet = match &self.resident.unet {
            Some(u) => u,
            None => {
                stage(progress, "loading unet")?;
                loaded = self.load_unet()?;
                &loaded
            }
        };
        let (height, width) = (request.img_height as usize, request.img_width as usize);
        let scale = self.vae_scale_factor();
        let shape = [request.samples as usize, self.configs.unet.in_channels, height / scale, width / scale];
        let mut rng = TorchRng::new(seed);
        let latents =
            sampling::initial_latents(&mut rng, shape, scheduler.init_noise_sigma(), &self.device, DType::F32)?;
        stage(progress, "denoising")?;
        let latents = sampling::denoise(
            unet,
            scheduler.as_mut(),
            conditioning,
            latents,
            sampling::Guidance { scale: request.guidance_scale, height, width },
            &mut rng,
            progress,
        )?;
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// VAE decode of denoised latents to 8-bit RGB images, one image at a time.
    pub fn decode(&self, latents: &Tensor, progress: &mut ProgressFn) -> Result<Vec<RgbImage>> {
        let loaded;
        let vae = match &self.resident.vae {
            Some(v) => v,
            None => {
                stage(progress, "loading vae")?;
                loaded = self.load_vae()?;
                &loaded
            }
        };
        stage(progress, "decoding")?;
        let mut images = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let z = latents.narrow(0, i, 1)?.to_dtype(self.vae_dtype())?;
            images.push(to_image(&vae.decode_latents(&z)?)?);
        }
        Ok(images)
    }

    /// Checks a request against what this model needs.
    pub fn validate(&self, request: &GenerateRequest) -> Result<()> {
        request.validate_for_model(self.vae_scale_factor() as u32)?;
        schedulers::create(&request.scheduler, &self.configs.scheduler, request.num_inference_steps as usize)?;
        Ok(())
    }

    /// One request, end to end.
    pub fn generate(&self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
        self.validate(request)?;
        let seed = request.resolve_seed();
        let conditioning = self.condition(request, progress)?;
        let latents = self.denoise(request, &conditioning, seed, progress)?;
        drop(conditioning);
        let images = self.decode(&latents, progress)?;
        Ok(Generation { images, seed, latents })
    }
}

fn join(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        file.to_string()
    } else {
        format!("{dir}/{file}")
    }
}

fn stage(progress: &mut ProgressFn, name: &'static str) -> Result<()> {
    match progress(&Progress::Stage(name)) {
        Control::Continue => Ok(()),
        Control::Stop => Err(Error::Cancelled),
    }
}

fn component_error(component: &str, e: candle_core::Error) -> Error {
    Error::Other(format!("loading {component}: {e}"))
}

/// diffusers' post-processing: `(x / 2 + 0.5).clamp(0, 1) · 255`, rounded half to even (numpy's `round`).
pub fn to_image(decoded: &Tensor) -> Result<RgbImage> {
    let x = decoded.to_dtype(DType::F32)?.squeeze(0)?;
    let (c, h, w) = x.dims3()?;
    if c != 3 {
        return Err(Error::Other(format!("the VAE produced {c} channels, expected 3")));
    }
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let hwc: Vec<f32> = x.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = hwc.iter().map(|&v| (v * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| Error::Other("image buffer size mismatch".into()))
}
