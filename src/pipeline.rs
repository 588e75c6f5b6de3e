//! The SDXL text-to-image pipeline: loads a model's configs up front and its components when they are needed,
//! and runs request → prompt conditioning → denoising loop → VAE decode → images.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::adapters::embeddings::TextualInversion;
use crate::adapters::requested::{short_hash, specs_in_dir, take_prompt_tags};
use crate::adapters::{LoraFile, LoraSpec};
use crate::conditioning::{ConditioningSchedule, PromptInputs, TextEncoders};
use crate::input_image;
use crate::loading::load_taesd;
use crate::loading::{Component, ModelConfigs, ModelSource};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::layers::{compute_dtype, LinearLayout};
use crate::models::taesd::TaesdDecoder;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::VaeDecoder;
pub use crate::models::vae_bands::VaeTiling;
use crate::models::vae_bands::{decode_in_bands, BandPlan};
use crate::models::vae_encoder::VaeEncoder;
use crate::prompt::encode::ENCODING_PROMPT;
use crate::request::{HiresFix, DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH};
use crate::rng::TorchRng;
use crate::sampling::{self, report, Inpainting, Progress, ProgressFn};
use crate::schedulers::{self, Scheduler};
use crate::tokenizer::ClipTokenizer;
use crate::{Error, GenerateRequest, PromptSyntax, Result};

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
    /// Run dtype of the text encoders and UNet (the VAE may be upcast, see
    /// [`crate::models::vae::VaeConfig::force_upcast`]).
    pub dtype: DType,
    /// A replacement VAE: a folder or hub id with `config.json` + `diffusion_pytorch_model.safetensors`, or a
    /// `.safetensors` file.
    pub vae: Option<String>,
    /// For a single-file checkpoint: a diffusers folder or hub id whose config files (not weights) describe it.
    pub config: Option<String>,
    pub residency: Residency,
    /// Whether the VAE decodes in bands of rows (by default when the image is larger than the VAE's `sample_size`).
    pub vae_tiling: VaeTiling,
    /// LoRAs merged into the UNet and text encoders for every request (see [`Pipeline::set_loras`]).
    pub loras: Vec<LoraSpec>,
    /// Where the LoRAs that requests name (`loras` field, `<lora:NAME:W>` prompt tags) are looked up.
    pub lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings (SDXL `clip_l` + `clip_g` files): a prompt word equal to a file's stem is read
    /// as its vectors, in both text encoders.
    pub embeddings_dir: Option<PathBuf>,
    /// What decodes the final images: the model's VAE, or TAESD-XL for fast drafts.
    pub decoder: FinalDecoder,
}

/// What decodes the denoised latents into the final images.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FinalDecoder {
    /// The model's VAE (or the `--vae` replacement): full quality.
    #[default]
    Vae,
    /// TAESD-XL (`AutoencoderTiny`; a folder or hub id such as [`crate::loading::DEFAULT_TAESD`]): a draft decode
    /// several times faster than the VAE, softer in fine detail and texture.
    Taesd(String),
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            vae: None,
            config: None,
            residency: Residency::Sequential,
            vae_tiling: VaeTiling::Auto,
            loras: Vec::new(),
            lora_dir: None,
            embeddings_dir: None,
            decoder: FinalDecoder::Vae,
        }
    }
}

/// The images of one request and the seed that made them.
#[derive(Debug, Clone)]
pub struct Generation {
    pub images: Vec<RgbImage>,
    pub seed: u64,
    /// The denoised latents, (samples, 4, h/8, w/8), f32.
    pub latents: Tensor,
    /// What the user should know about how the prompts were read (e.g. truncation with `prompt_syntax: none`).
    pub warnings: Vec<String>,
    /// The LoRAs merged for it: (name, weight, A1111's short hash of the file).
    pub loras: Vec<(String, f64, String)>,
}

/// Loaded components, kept when [`Residency::Resident`].
#[derive(Default)]
struct Resident {
    text: Option<TextEncoders>,
    unet: Option<UNet2DConditionModel>,
    vae: Option<VaeDecoder>,
    vae_encoder: Option<VaeEncoder>,
}

pub struct Pipeline {
    source: ModelSource,
    pub configs: ModelConfigs,
    device: Device,
    dtype: DType,
    vae_tiling: VaeTiling,
    residency: Residency,
    resident: Resident,
    /// The TAESD decoder when it decodes the final images ([`FinalDecoder::Taesd`]; small, so always resident).
    taesd: Option<TaesdDecoder>,
    /// The pipeline's own LoRAs (merged for every request), and where requests' LoRAs are found.
    base_loras: Vec<LoraSpec>,
    lora_dir: Option<PathBuf>,
    /// The LoRAs merged now (as set), and their (name, weight, short hash) for the images' parameters.
    merged_loras: Vec<LoraSpec>,
    active_loras: Vec<(String, f64, String)>,
    /// Textual-inversion embeddings added to both tokenizers and text encoders.
    embeddings: Vec<TextualInversion>,
}

impl Pipeline {
    /// Reads a model's configs (a diffusers folder, a hub id or a single `.safetensors` checkpoint) and, with
    /// [`Residency::Resident`], its weights.
    pub fn load(model: &str, options: PipelineOptions) -> Result<Self> {
        let source = ModelSource::open(model, options.config.as_deref(), options.vae.as_deref())?;
        let configs = source.configs()?;
        let mut pipeline = Self {
            source,
            configs,
            device: options.device,
            dtype: options.dtype,
            vae_tiling: options.vae_tiling,
            residency: options.residency,
            resident: Resident::default(),
            taesd: None,
            base_loras: options.loras.clone(),
            lora_dir: options.lora_dir.clone(),
            merged_loras: Vec::new(),
            active_loras: Vec::new(),
            embeddings: match &options.embeddings_dir {
                Some(dir) => crate::adapters::embeddings::load_dir(dir)?,
                None => Vec::new(),
            },
        };
        if let FinalDecoder::Taesd(spec) = &options.decoder {
            pipeline.taesd = Some(load_taesd(spec, pipeline.dtype, &pipeline.device)?);
        }
        if !options.loras.is_empty() {
            pipeline.set_loras(&options.loras)?;
        }
        if pipeline.residency == Residency::Resident {
            pipeline.resident = Resident {
                text: Some(pipeline.load_text_encoders()?),
                unet: Some(pipeline.load_unet()?),
                vae: Some(pipeline.load_vae()?),
                vae_encoder: Some(pipeline.load_vae_encoder()?),
            };
        }
        Ok(pipeline)
    }

    /// Merges `loras` (each with its weight; several add up) into the UNet and text encoders, replacing the LoRAs set
    /// before; an empty list restores the model's own weights. A resident pipeline reloads the components they touch.
    pub fn set_loras(&mut self, loras: &[LoraSpec]) -> Result<()> {
        let files = open_loras(loras)?;
        self.source.set_loras(&files, &self.configs.unet)?;
        self.active_loras = files
            .iter()
            .map(|(file, weight)| {
                let name = file.path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                Ok((name, *weight, short_hash(&file.path)?))
            })
            .collect::<Result<_>>()?;
        self.merged_loras = loras.to_vec();
        // A resident pipeline's loaded components are replaced (the base weights stay in their files: an empty
        // list loads them exactly as before).
        if self.residency == Residency::Resident && self.resident.unet.is_some() {
            self.resident.text = Some(self.load_text_encoders()?);
            self.resident.unet = Some(self.load_unet()?);
        }
        Ok(())
    }

    /// The request as it is generated (with A1111 prompt syntax, `<lora:…>` tags removed from its prompt) and the
    /// LoRAs it needs: the pipeline's own, then those of its `loras` field and its prompt's tags, found in the LoRA
    /// directory.
    pub fn request_loras(&self, request: &GenerateRequest) -> Result<(GenerateRequest, Vec<LoraSpec>)> {
        let mut request = request.clone();
        let mut named = request.loras.clone();
        if request.prompt_syntax == PromptSyntax::A1111 {
            let (prompt, tags) = take_prompt_tags(&request.prompt)?;
            request.prompt = prompt;
            named.extend(tags);
        }
        let mut loras = self.base_loras.clone();
        loras.extend(specs_in_dir(self.lora_dir.as_deref(), &named)?);
        Ok((request, loras))
    }

    /// One request with the LoRAs it names (see [`Self::request_loras`]) merged; consecutive requests with the same
    /// LoRAs and weights reuse the merged weights.
    pub fn generate_with_loras(&mut self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
        let (request, loras) = self.request_loras(request)?;
        if loras != self.merged_loras {
            self.set_loras(&loras)?;
        }
        self.generate(&request, progress)
    }

    /// The LoRAs merged now: (name, weight, A1111's short hash of the file).
    pub fn active_loras(&self) -> &[(String, f64, String)] {
        &self.active_loras
    }

    /// Stored tensors of a single-file checkpoint that no component uses (EMA copies, …).
    pub fn unused_keys(&self) -> Result<Vec<String>> {
        self.source.unused_keys()
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

    /// Loads both tokenizers and text encoders.
    pub fn load_text_encoders(&self) -> Result<TextEncoders> {
        let load = |component: Component, cfg: &ClipTextConfig, with_projection: bool| -> Result<ClipTextModel> {
            let vb = self.source.var_builder(component, self.dtype, &self.device)?;
            // A resident model is called for many requests: worth its load-time transpose (see LinearLayout).
            let layout = match self.residency {
                Residency::Resident => LinearLayout::TransposedForFewRows,
                Residency::Sequential => LinearLayout::AsStored,
            };
            ClipTextModel::new(vb, cfg, with_projection, layout).map_err(|e| self.component_error(component, e))
        };
        let (tokenizer, tokenizer_2) = self.tokenizers()?;
        let mut text_encoder = load(Component::TextEncoder, &self.configs.text_encoder, false)?;
        let mut text_encoder_2 = load(Component::TextEncoder2, &self.configs.text_encoder_2, true)?;
        for embedding in &self.embeddings {
            text_encoder.append_token_embeddings(&embedding.clip_l)?;
            text_encoder_2.append_token_embeddings(&embedding.clip_g)?;
        }
        Ok(TextEncoders { tokenizer, tokenizer_2, text_encoder, text_encoder_2 })
    }

    /// Both tokenizers, with the textual-inversion embeddings' tokens added (ids after the vocabulary, in the order
    /// the text encoders' tables get their vectors).
    fn tokenizers(&self) -> Result<(ClipTokenizer, ClipTokenizer)> {
        let (mut tokenizer, mut tokenizer_2) = self.source.tokenizers()?;
        // Rows the embeddings before this one took after each text encoder's vocabulary.
        let mut added = 0;
        for embedding in &self.embeddings {
            let tokens = embedding.tokens();
            for (tok, table) in [
                (&mut tokenizer, self.configs.text_encoder.vocab_size),
                (&mut tokenizer_2, self.configs.text_encoder_2.vocab_size),
            ] {
                let first = table + added;
                let ids = tok.add_embedding_tokens(&tokens)?;
                if ids.first().copied() != Some(first as u32) || tok.vocab_size() != first + tokens.len() {
                    return Err(Error::Tokenizer(format!(
                        "embedding `{}`: its tokens got ids {ids:?}, but the text encoder's table gives them {first}…",
                        embedding.name
                    )));
                }
            }
            added += tokens.len();
        }
        Ok((tokenizer, tokenizer_2))
    }

    pub fn load_unet(&self) -> Result<UNet2DConditionModel> {
        let vb = self.source.var_builder(Component::Unet, self.dtype, &self.device)?;
        UNet2DConditionModel::new(vb, &self.configs.unet).map_err(|e| self.component_error(Component::Unet, e))
    }

    pub fn load_vae(&self) -> Result<VaeDecoder> {
        let vb = self.source.var_builder(Component::Vae, self.vae_dtype(), &self.device)?;
        VaeDecoder::new(vb, &self.configs.vae).map_err(|e| self.component_error(Component::Vae, e))
    }

    /// The VAE's encoder (image-to-image), from the same weights and in the same dtype as [`Self::load_vae`]'s decoder
    /// (f32 when the VAE is upcast, see [`Self::vae_dtype`]).
    pub fn load_vae_encoder(&self) -> Result<VaeEncoder> {
        let vb = self.source.var_builder(Component::Vae, self.vae_dtype(), &self.device)?;
        VaeEncoder::new(vb, &self.configs.vae).map_err(|e| self.component_error(Component::Vae, e))
    }

    fn component_error(&self, component: Component, e: candle_core::Error) -> Error {
        Error::ComponentLoad {
            component: component.name(),
            source: Box::new(Error::from(e)),
            hint: self.source.config_hint().to_string(),
        }
    }

    /// The request's scheduler, built from the model's scheduler config: checks the name, the step count and the
    /// config's values.
    pub fn scheduler(&self, request: &GenerateRequest) -> Result<Box<dyn Scheduler>> {
        self.scheduler_for_seed(request, None)
    }

    /// [`Self::scheduler`] for a run with `seed`: a scheduler that seeds its own noise from its config
    /// (`noise_sampler_seed`, DPM++ SDE's Brownian tree) gets the run's seed unless the request's options set one.
    pub fn scheduler_for_seed(&self, request: &GenerateRequest, seed: Option<u64>) -> Result<Box<dyn Scheduler>> {
        let kind = schedulers::lookup(&request.scheduler)?;
        let mut options = request.scheduler_options.clone();
        if let Some(seed) = seed.filter(|_| kind.reads(schedulers::NOISE_SAMPLER_SEED)) {
            options.entry(schedulers::NOISE_SAMPLER_SEED).or_insert(seed.into());
        }
        let config = kind.configure(&self.configs.scheduler, &options)?;
        let mut scheduler = kind.build(&config, request.num_inference_steps as usize)?;
        if let Some(eta) = request.eta {
            if !scheduler.set_eta(eta)? {
                let message = format!("{} takes no eta (DDIM and TCD do)", kind.name());
                return Err(Error::invalid("eta", message));
            }
        }
        Ok(scheduler)
    }

    /// Prompt conditioning for a request (text encoders loaded for the call unless resident), read with the
    /// request's prompt syntax, for every model evaluation of its scheduler.
    pub fn condition(&self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<ConditioningSchedule> {
        self.condition_for(request, self.scheduler(request)?.timesteps().len(), progress)
    }

    /// [`Self::condition`] for a scheduler of `evaluations` model evaluations.
    fn condition_for(
        &self,
        request: &GenerateRequest,
        evaluations: usize,
        progress: &mut ProgressFn,
    ) -> Result<ConditioningSchedule> {
        let mut slot = None;
        let encoders =
            component(&self.resident.text, &mut slot, progress, "loading text encoders", || self.load_text_encoders())?;
        stage(progress, ENCODING_PROMPT)?;
        encoders.condition_prompts(
            &PromptInputs {
                prompt: &request.prompt,
                negative_prompt: &request.negative_prompt,
                syntax: request.prompt_syntax,
                emphasis: request.emphasis,
                force_zeros_for_empty_prompt: self.configs.force_zeros_for_empty_prompt,
                samples: request.samples as usize,
                guided: request.guidance_scale > 1.0,
                evaluations,
            },
            &self.device,
            progress,
        )
    }

    /// How the request's prompts are read, in words (`--explain-prompt`); needs only the tokenizers.
    pub fn explain_prompt(&self, request: &GenerateRequest) -> Result<String> {
        let (request, loras) = self.request_loras(request)?;
        let (tokenizer, tokenizer_2) = self.tokenizers()?;
        // A1111's prompt-editing steps count the scheduler's model evaluations.
        let evaluations = self.scheduler(&request)?.timesteps().len();
        let mut text = crate::prompt::explain::explain(&request, evaluations, [&tokenizer, &tokenizer_2])?;
        let used: Vec<&TextualInversion> = self
            .embeddings
            .iter()
            .filter(|e| request.prompt.contains(&e.name) || request.negative_prompt.contains(&e.name))
            .collect();
        if !used.is_empty() {
            text.push_str("Textual inversion embeddings used:\n");
            for e in used {
                text.push_str(&format!("  {} ({} vectors)\n", e.name, e.vectors()));
            }
        }
        if !loras.is_empty() {
            text.push_str("LoRAs (merged into the UNet and both text encoders):\n");
            for lora in &loras {
                text.push_str(&format!("  {} (weight {})\n", lora.path.display(), lora.weight));
            }
        }
        Ok(text)
    }

    /// The denoising loop for a request, from the seed's initial noise (or, with an `image`, from the input
    /// image's noised latents) to the denoised latents.
    pub fn denoise(
        &self,
        request: &GenerateRequest,
        conditioning: &ConditioningSchedule,
        seed: u64,
        progress: &mut ProgressFn,
    ) -> Result<Tensor> {
        let mut request = request.clone();
        let inputs = self.input_tensors(&mut request)?;
        let mut scheduler = self.scheduler_for_seed(&request, Some(seed))?;
        match inputs {
            Some((image, mask)) => {
                self.denoise_image(&request, (&image, mask.as_ref()), conditioning, scheduler.as_mut(), seed, progress)
            }
            None => self.denoise_with(&request, conditioning, scheduler.as_mut(), seed, progress),
        }
    }

    /// [`Self::denoise`] with the request's scheduler already built (see [`Self::scheduler`]).
    pub fn denoise_with(
        &self,
        request: &GenerateRequest,
        conditioning: &ConditioningSchedule,
        scheduler: &mut dyn Scheduler,
        seed: u64,
        progress: &mut ProgressFn,
    ) -> Result<Tensor> {
        let (height, width) = (request.img_height as usize, request.img_width as usize);
        let scale = self.vae_scale_factor();
        let shape = [request.samples as usize, self.configs.unet.in_channels, height / scale, width / scale];
        let mut rng = TorchRng::new(seed);
        let latents =
            sampling::initial_latents(&mut rng, shape, scheduler.init_noise_sigma(), &self.device, DType::F32)?;
        self.run_loop(request, conditioning, scheduler, (latents, 0), Inpainting::None, &mut rng, progress)
    }

    /// Image to image's denoising loop: the input `image` ((1, 3, H, W) in [-1, 1], [`input_image::to_tensor`])
    /// encoded (a posterior sample from the seed's generator), noised with the generator's next draw to the level of
    /// the evaluation the request's strength starts at ([`schedulers::img2img_start`]), as diffusers'
    /// `StableDiffusionXLImg2ImgPipeline.prepare_latents` does, then the scheduler's remaining evaluations.
    pub fn denoise_image(
        &self,
        request: &GenerateRequest,
        (image, mask): (&Tensor, Option<&Tensor>),
        conditioning: &ConditioningSchedule,
        scheduler: &mut dyn Scheduler,
        seed: u64,
        progress: &mut ProgressFn,
    ) -> Result<Tensor> {
        let start = schedulers::img2img_start(scheduler, request.strength.unwrap_or(DEFAULT_IMG2IMG_STRENGTH))?;
        let mut rng = TorchRng::new(seed);
        let samples = request.samples as usize;
        // diffusers' StableDiffusionXLInpaintPipeline: at full strength the run starts from pure noise, and a
        // 9-channel inpainting UNet then needs no image latents (a 4-channel one still blends them in).
        let strength_max = mask.is_some() && request.strength == Some(1.0);
        let nine_channels = mask.is_some() && self.configs.unet.in_channels == 9;
        // The generator's draws, in diffusers' order: the image's posterior sample, the noise, the masked image's.
        let (image_latents, noise, masked_latents) = {
            let mut slot = None;
            let encoder = component(&self.resident.vae_encoder, &mut slot, progress, "loading vae encoder", || {
                self.load_vae_encoder()
            })?;
            stage(progress, ENCODING_IMAGE)?;
            let plan = BandPlan::for_vae(self.vae_tiling, &self.configs.vae);
            let mut encode = |x: &Tensor, rng: &mut TorchRng| -> Result<Tensor> {
                let x = x.to_dtype(encoder.dtype())?.to_device(&self.device)?;
                encoder.latents_from_image(&x, samples, &plan, rng, &mut |done, total| {
                    report(progress, &Progress::Part { stage: ENCODING_IMAGE, done, total })
                })
            };
            let image_latents = if nine_channels && strength_max { None } else { Some(encode(image, &mut rng)?) };
            let scale = self.vae_scale_factor();
            let (_, _, h, w) = image.dims4()?;
            let shape = [samples, self.configs.vae.latent_channels, h / scale, w / scale];
            let noise = rng.randn_tensor(&shape, &self.device)?;
            let masked_latents = match mask {
                // The masked image, `image · (mask < 0.5)`, is encoded (a draw) though a 4-channel UNet leaves it
                // unused: there only the draw is made.
                Some(mask) if nine_channels => Some(encode(&image.broadcast_mul(&mask.affine(-1.0, 1.0)?)?, &mut rng)?),
                Some(_) => {
                    rng.randn(shape[1..].iter().product());
                    None
                }
                None => None,
            };
            (image_latents, noise, masked_latents)
        };
        let start_latents = match &image_latents {
            Some(latents) if !strength_max => scheduler.add_noise(latents, &noise, start)?,
            _ => (&noise * scheduler.init_noise_sigma())?,
        };
        let Some(mask) = mask else {
            return self.run_loop(
                request,
                conditioning,
                scheduler,
                (start_latents, start),
                Inpainting::None,
                &mut rng,
                progress,
            );
        };
        let mask = input_image::mask_to_latents(mask, self.vae_scale_factor())?.repeat((samples, 1, 1, 1))?;
        let mask = mask.to_device(&self.device)?;
        match (masked_latents, image_latents) {
            (Some(masked), _) => {
                let channels = Tensor::cat(&[&mask, &masked], 1)?;
                let inpainting = Inpainting::Channels(&channels);
                self.run_loop(request, conditioning, scheduler, (start_latents, start), inpainting, &mut rng, progress)
            }
            (None, Some(image_latents)) => {
                let blend = sampling::InpaintBlend { image_latents, noise, mask };
                let inpainting = Inpainting::Blend(&blend);
                self.run_loop(request, conditioning, scheduler, (start_latents, start), inpainting, &mut rng, progress)
            }
            (None, None) => unreachable!("a 4-channel UNet always has the image latents"),
        }
    }

    /// The denoising loop from `latents` at evaluation `start` (with inpainting's blend).
    #[allow(clippy::too_many_arguments)]
    fn run_loop(
        &self,
        request: &GenerateRequest,
        conditioning: &ConditioningSchedule,
        scheduler: &mut dyn Scheduler,
        (latents, start): (Tensor, usize),
        inpaint: Inpainting,
        rng: &mut TorchRng,
        progress: &mut ProgressFn,
    ) -> Result<Tensor> {
        let mut slot = None;
        let unet = component(&self.resident.unet, &mut slot, progress, "loading unet", || self.load_unet())?;
        let (height, width) = (request.img_height as usize, request.img_width as usize);
        // For the progress callback's x₀ (previews): the model's own schedule, whatever the scheduler.
        let estimator = sampling::DenoisedEstimator::new(&self.configs.scheduler)?;
        stage(progress, "denoising")?;
        let guidance =
            sampling::Guidance { scale: request.guidance_scale, height, width, estimator: &estimator, start, inpaint };
        let latents = sampling::denoise(unet, scheduler, conditioning, latents, guidance, rng, progress)?;
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// VAE decode of denoised latents to 8-bit RGB images, one image at a time (TAESD's with
    /// [`FinalDecoder::Taesd`]).
    pub fn decode(&self, latents: &Tensor, progress: &mut ProgressFn) -> Result<Vec<RgbImage>> {
        if let Some(taesd) = &self.taesd {
            const DECODING: &str = "decoding with taesd";
            stage(progress, DECODING)?;
            let samples = latents.dim(0)?;
            return (0..samples)
                .map(|i| {
                    let image = to_image(&taesd.decode_latents(&latents.narrow(0, i, 1)?.to_dtype(taesd.dtype())?)?);
                    report(progress, &Progress::Part { stage: DECODING, done: i + 1, total: samples })?;
                    image
                })
                .collect();
        }
        let mut slot = None;
        let vae = component(&self.resident.vae, &mut slot, progress, "loading vae", || self.load_vae())?;
        stage(progress, "decoding")?;
        let mut images = Vec::with_capacity(latents.dim(0)?);
        let plan = BandPlan::for_vae(self.vae_tiling, &vae.config);
        for i in 0..latents.dim(0)? {
            let z = latents.narrow(0, i, 1)?.to_dtype(compute_dtype(&self.device, self.vae_dtype()))?;
            let (_, _, h, w) = z.dims4()?;
            let decoded = if plan.in_bands(h, w) {
                const DECODING: &str = "decoding in bands";
                stage(progress, DECODING)?;
                decode_in_bands(vae, &vae.scale_latents(&z)?, &mut |done, total| {
                    report(progress, &Progress::Part { stage: DECODING, done, total })
                })?
            } else {
                vae.decode_reporting(&vae.scale_latents(&z)?, &mut |done, total| {
                    report(progress, &Progress::Part { stage: "decoding", done, total })
                })?
            };
            images.push(to_image(&decoded)?);
        }
        Ok(images)
    }

    /// Checks a request against what this model needs.
    pub fn validate(&self, request: &GenerateRequest) -> Result<()> {
        request.validate_for_model(self.vae_scale_factor() as u32)?;
        self.scheduler(request).map(drop)
    }

    /// One request, end to end (its scheduler built once): text to image, or image to image when the request has
    /// an `image` (the output then has the input's size).
    pub fn generate(&self, request: &GenerateRequest, progress: &mut ProgressFn) -> Result<Generation> {
        let multiple = self.vae_scale_factor() as u32;
        let mut request = request.clone();
        let image = self.input_tensors(&mut request)?;
        let request = &request;
        request.validate_for_model(multiple)?;
        let seed = request.resolve_seed();
        let mut scheduler = self.scheduler_for_seed(request, Some(seed))?;
        if let (Some(strength), Some(_)) = (request.strength, &image) {
            schedulers::img2img_start(scheduler.as_ref(), strength)?; // refused before any model loads
        }
        let conditioning = self.condition_for(request, scheduler.timesteps().len(), progress)?;
        let latents = match &image {
            Some((image, mask)) => {
                self.denoise_image(request, (image, mask.as_ref()), &conditioning, scheduler.as_mut(), seed, progress)?
            }
            None => self.denoise_with(request, &conditioning, scheduler.as_mut(), seed, progress)?,
        };
        let mut warnings = conditioning.warnings.clone();
        drop(conditioning);
        let latents = match &request.hires {
            Some(hires) => {
                let (latents, more) = self.hires_pass(request, hires, &latents, seed, progress)?;
                warnings.extend(more);
                latents
            }
            None => latents,
        };
        let images = self.decode(&latents, progress)?;
        Ok(Generation { images, seed, latents, warnings, loras: self.active_loras.clone() })
    }

    /// The request's input image (and mask) as tensors for image to image / inpainting, the request's size and
    /// default strength set from them; `None` for text to image.
    #[allow(clippy::type_complexity)]
    fn input_tensors(&self, request: &mut GenerateRequest) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let multiple = self.vae_scale_factor() as u32;
        let image = match &request.image {
            Some(data) => {
                let image = input_image::decode_base64("image", data)?;
                (request.img_width, request.img_height) = image.dimensions();
                let mask = match &request.mask {
                    Some(data) => {
                        let mask = input_image::decode_base64("mask", data)?;
                        Some(input_image::mask_to_tensor(&mask, image.dimensions(), &Device::Cpu)?)
                    }
                    None => None,
                };
                let default = if mask.is_some() { DEFAULT_INPAINT_STRENGTH } else { DEFAULT_IMG2IMG_STRENGTH };
                request.strength.get_or_insert(default);
                Some((input_image::to_tensor("image", &image, multiple, &Device::Cpu)?, mask))
            }
            None => None,
        };
        let channels = self.configs.unet.in_channels;
        if image.as_ref().is_some_and(|(_, mask)| mask.is_some()) && channels != 4 && channels != 9 {
            return Err(Error::invalid(
                "mask",
                format!("this model's UNet takes {channels} input channels: inpainting needs 4 (regular) or 9"),
            ));
        }
        if channels != 4 && image.as_ref().is_none_or(|(_, mask)| mask.is_none()) {
            return Err(Error::invalid(
                "mask",
                format!("this model's UNet takes {channels} input channels: it is an inpainting model, give an image and a mask"),
            ));
        }
        Ok(image)
    }

    /// A1111's hires fix after the first pass: its latents enlarged (bilinear, A1111's "Latent" upscaler), then an
    /// image-to-image pass at the larger size from them, noised with a fresh draw from the seed (A1111 re-seeds its
    /// noise for the second pass), `hires.steps` steps of a `steps / strength` schedule (A1111's
    /// `setup_img2img_steps`). The schedule and its start follow this engine's image to image (diffusers'
    /// `get_timesteps`).
    fn hires_pass(
        &self,
        request: &GenerateRequest,
        hires: &HiresFix,
        latents: &Tensor,
        seed: u64,
        progress: &mut ProgressFn,
    ) -> Result<(Tensor, Vec<String>)> {
        let multiple = self.vae_scale_factor() as u32;
        let (width, height) = hires.target(request.img_width, request.img_height, multiple);
        let mut second = request.clone();
        (second.img_width, second.img_height) = (width, height);
        second.num_inference_steps = hires.schedule_steps(request.num_inference_steps);
        second.hires = None;
        second.validate_for_model(multiple)?;
        let mut scheduler = self.scheduler_for_seed(&second, Some(seed))?;
        let start = schedulers::img2img_start(scheduler.as_ref(), hires.strength)?;
        stage(progress, "hires fix: upscaling latents")?;
        let scale = multiple as usize;
        let upscaled = latents.upsample_bilinear2d(height as usize / scale, width as usize / scale, false)?;
        let conditioning = self.condition_for(&second, scheduler.timesteps().len(), progress)?;
        let mut rng = TorchRng::new(seed);
        let noise = rng.randn_tensor(upscaled.dims(), &self.device)?;
        let noised = scheduler.add_noise(&upscaled, &noise, start)?;
        let latents = self.run_loop(
            &second,
            &conditioning,
            scheduler.as_mut(),
            (noised, start),
            Inpainting::None,
            &mut rng,
            progress,
        )?;
        Ok((latents, conditioning.warnings.clone()))
    }
}

/// Reads each LoRA file once (a file named twice adds its weights, as A1111 does with a repeated tag).
fn open_loras(loras: &[LoraSpec]) -> Result<Vec<(Arc<LoraFile>, f64)>> {
    let mut opened: Vec<(Arc<LoraFile>, f64)> = Vec::new();
    for spec in loras {
        match opened.iter_mut().find(|(file, _)| file.path == spec.path) {
            Some((_, weight)) => *weight += spec.weight,
            None => opened.push((Arc::new(LoraFile::open(&spec.path)?), spec.weight)),
        }
    }
    Ok(opened)
}

/// The resident component, or one loaded now into `slot` (so it is freed when the caller's stage ends).
fn component<'a, T>(
    resident: &'a Option<T>,
    slot: &'a mut Option<T>,
    progress: &mut ProgressFn,
    stage_name: &'static str,
    load: impl FnOnce() -> Result<T>,
) -> Result<&'a T> {
    if let Some(loaded) = resident {
        return Ok(loaded);
    }
    stage(progress, stage_name)?;
    Ok(slot.insert(load()?))
}

fn stage(progress: &mut ProgressFn, name: &'static str) -> Result<()> {
    report(progress, &Progress::Stage(name))
}

/// The stage name of image to image's VAE encode.
const ENCODING_IMAGE: &str = "encoding image";

/// diffusers' post-processing: `(x / 2 + 0.5).clamp(0, 1) · 255`, rounded half to even (numpy's `round`).
pub fn to_image(decoded: &Tensor) -> Result<RgbImage> {
    let x = decoded.to_dtype(DType::F32)?.squeeze(0)?;
    let (c, h, w) = x.dims3()?;
    if c != 3 {
        return Err(Error::Tensor(candle_core::Error::Msg(format!("the VAE produced {c} channels, expected 3 (RGB)"))));
    }
    let x = ((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let hwc: Vec<f32> = x.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = hwc.iter().map(|&v| (v * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).ok_or_else(|| {
        Error::Tensor(candle_core::Error::Msg(format!(
            "image buffer size mismatch: {w}×{h} RGB from {} values",
            hwc.len()
        )))
    })
}
