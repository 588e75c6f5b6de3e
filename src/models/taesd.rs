//! TAESD, the tiny distilled autoencoder (diffusers' `AutoencoderTiny`, `madebyollin/taesdxl` for SDXL): its
//! decoder, latents → RGB in about [-1, 1], at a small fraction of the VAE's cost. Used for previews during denoising
//! and as a fast, lower-quality final decoder.
//!
//! The decoder is diffusers' `DecoderTiny`, one `nn.Sequential` named `decoder.layers`: a 3×3 conv from the latents
//! and an activation, then per stage `num_decoder_blocks[i]` residual blocks (`AutoencoderTinyBlock`), a nearest
//! up-sampling (all stages but the last) and a 3×3 conv (without bias, except the last stage's, which gives RGB).
//! Activations and up-samplings hold no weights but take an index in the sequence, so the checkpoint's keys skip them
//! (`decoder.layers.0.weight`, `decoder.layers.2.conv.0.weight`, …); the layers here are numbered the same way.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;

use super::layers::{activation_dtype, conv3x3, Conv2d};
use super::ConfigError;

/// The activation of an `AutoencoderTiny` (`act_fn`, diffusers' `get_activation` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TinyActivation {
    /// `nn.ReLU` (every published TAESD).
    #[default]
    Relu,
    /// `nn.SiLU` (`"silu"` or `"swish"`).
    #[serde(alias = "swish")]
    Silu,
    /// `nn.GELU`: the exact, erf-based GELU.
    Gelu,
}

impl TinyActivation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            TinyActivation::Relu => x.relu(),
            TinyActivation::Silu => candle_nn::ops::silu(x),
            TinyActivation::Gelu => x.gelu_erf(),
        }
    }
}

/// The decoder's up-sampling (`upsample_fn`, an `nn.Upsample` mode). Only `"nearest"`, the default, which every
/// published TAESD uses, is implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpsampleFn {
    /// `nn.Upsample(mode="nearest")`: each pixel repeated.
    #[default]
    Nearest,
}

fn default_block_out_channels() -> Vec<usize> {
    vec![64; 4]
}
fn default_num_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn default_upsampling_scaling_factor() -> usize {
    2
}
fn default_latent_channels() -> usize {
    4
}
fn default_out_channels() -> usize {
    3
}
fn default_scaling_factor() -> f64 {
    1.0
}

/// The fields of an `AutoencoderTiny` `config.json` that shape the decoder; absent keys take diffusers' defaults
/// (which are madebyollin/taesdxl's values). Encoder keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct TaesdConfig {
    /// `_class_name`: `"AutoencoderTiny"` when present (it tells a TAESD from a full VAE's folder).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Channels of each decoder stage (64 × 4 for taesdxl).
    #[serde(default = "default_block_out_channels")]
    pub decoder_block_out_channels: Vec<usize>,
    /// Residual blocks of each decoder stage ([3, 3, 3, 1] for taesdxl).
    #[serde(default = "default_num_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    /// The activation after the first conv and inside the blocks (each block's output always goes through a ReLU).
    #[serde(default)]
    pub act_fn: TinyActivation,
    /// How the stages up-sample.
    #[serde(default)]
    pub upsample_fn: UpsampleFn,
    /// The up-sampling factor between stages (2).
    #[serde(default = "default_upsampling_scaling_factor")]
    pub upsampling_scaling_factor: usize,
    /// Channels of the latents it decodes (4 for SD and SDXL; 16 for taesd3 / taef1).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Channels of the decoded image (3).
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    /// What the SDXL pipeline divides the latents by before decoding: 1.0 for TAESD, which decodes the diffusion
    /// latents as they are (where the SDXL VAE needs them divided by 0.13025).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
}

impl TaesdConfig {
    /// How much the decoder enlarges the latents: `upsampling_scaling_factor`^(stages − 1) (8 for taesdxl).
    pub fn scale_factor(&self) -> usize {
        let ups = self.decoder_block_out_channels.len().saturating_sub(1) as u32;
        self.upsampling_scaling_factor.saturating_pow(ups)
    }

    /// Rejects configs the decoder cannot be built with, naming the key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if let Some(class) = &self.class_name {
            if class != "AutoencoderTiny" {
                return Err(ConfigError::new(
                    "_class_name",
                    format!("is {class:?}; a TAESD is an \"AutoencoderTiny\" (a full VAE is not a TAESD)"),
                ));
            }
        }
        let channels = &self.decoder_block_out_channels;
        if channels.is_empty() {
            return Err(ConfigError::new(
                "decoder_block_out_channels",
                "is empty: the decoder needs at least one stage",
            ));
        }
        if let Some(i) = channels.iter().position(|&c| c == 0) {
            return Err(ConfigError::new(format!("decoder_block_out_channels[{i}]"), "must be at least 1"));
        }
        if self.num_decoder_blocks.len() != channels.len() {
            return Err(ConfigError::new(
                "num_decoder_blocks",
                format!(
                    "has {} stages but decoder_block_out_channels has {} (one entry per stage in both)",
                    self.num_decoder_blocks.len(),
                    channels.len()
                ),
            ));
        }
        let factor = self.upsampling_scaling_factor;
        let ups = (channels.len() - 1) as u32;
        if factor == 0 || factor.checked_pow(ups).is_none_or(|scale| scale > 64) {
            return Err(ConfigError::new(
                "upsampling_scaling_factor",
                format!("is {factor}; with {} stages it must enlarge the latents by 1 to 64 times", channels.len()),
            ));
        }
        if self.latent_channels == 0 {
            return Err(ConfigError::new("latent_channels", "must be at least 1"));
        }
        if self.out_channels != 3 {
            return Err(ConfigError::new(
                "out_channels",
                format!("is {}; the pipeline decodes to RGB images, 3 channels", self.out_channels),
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(ConfigError::new(
                "scaling_factor",
                format!("is {}; it must be a non-zero number", self.scaling_factor),
            ));
        }
        Ok(())
    }
}

/// diffusers' `AutoencoderTinyBlock`: three 3×3 convs with the activation between them (`conv.0`, `conv.2`,
/// `conv.4` of an `nn.Sequential`), plus the input, then ReLU. (Its `skip` is a 1×1 conv only when the channel count
/// changes, which it never does in the decoder: there it is the identity and has no weights.)
#[derive(Debug, Clone)]
struct TinyBlock {
    convs: [Conv2d; 3],
    act: TinyActivation,
}

impl TinyBlock {
    fn new(vb: VarBuilder, channels: usize, act: TinyActivation) -> Result<Self> {
        let conv = |i: usize| conv3x3(vb.pp("conv").pp(i), channels, channels, 1);
        Ok(Self { convs: [conv(0)?, conv(2)?, conv(4)?], act })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.convs[0].forward(x)?)?;
        let h = self.act.apply(&self.convs[1].forward(&h)?)?;
        (self.convs[2].forward(&h)? + x)?.relu()
    }
}

/// One entry of `decoder.layers`.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Activation(TinyActivation),
    Block(TinyBlock),
    /// Nearest up-sampling by this factor.
    Upsample(usize),
}

/// The decoder of diffusers' `AutoencoderTiny`, with the SDXL pipeline's latent scaling around it.
#[derive(Debug, Clone)]
pub struct TaesdDecoder {
    layers: Vec<Layer>,
    dtype: DType,
    /// The config it was built from.
    pub config: TaesdConfig,
}

impl TaesdDecoder {
    /// `vb` is rooted at the model (keys `decoder.layers.…`; the encoder's keys are not read).
    pub fn new(vb: VarBuilder, config: &TaesdConfig) -> Result<Self> {
        let cfg = config;
        cfg.validate()?;
        let dtype = activation_dtype(&vb);
        let vb = vb.pp("decoder").pp("layers");
        let channels = &cfg.decoder_block_out_channels;
        let mut layers =
            vec![Layer::Conv(conv3x3(vb.pp(0), cfg.latent_channels, channels[0], 1)?), Layer::Activation(cfg.act_fn)];
        let stages = channels.len();
        for (i, (&c, &blocks)) in channels.iter().zip(&cfg.num_decoder_blocks).enumerate() {
            for _ in 0..blocks {
                layers.push(Layer::Block(TinyBlock::new(vb.pp(layers.len()), c, cfg.act_fn)?));
            }
            let last = i + 1 == stages;
            if !last {
                layers.push(Layer::Upsample(cfg.upsampling_scaling_factor));
            }
            // Like diffusers, each stage's conv keeps the stage's channels (the next stage's blocks take them as
            // they are); only the last stage's conv has a bias and gives the image.
            let conv = if last {
                conv3x3(vb.pp(layers.len()), c, cfg.out_channels, 1)?
            } else {
                Conv2d::new_no_bias(vb.pp(layers.len()), c, c, 3, 1, 1)?
            };
            layers.push(Layer::Conv(conv));
        }
        Ok(Self { layers, dtype, config: cfg.clone() })
    }

    /// The dtype the decoder computes in (f32 for a bf16 model on the CPU, see [`crate::models::layers`]).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// From denoised SDXL latents (B, 4, h, w), as `StableDiffusionXLPipeline` decodes with an `AutoencoderTiny`:
    /// `vae.decode(latents / scaling_factor)`. Returns the image (B, 3, h·8, w·8) in about [-1, 1], in the
    /// decoder's dtype.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents.to_dtype(self.dtype)? / self.config.scaling_factor)?)
    }

    /// diffusers' `AutoencoderTiny.decode(z)` (`DecoderTiny.forward`): `z` is already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.config.latent_channels {
            candle_core::bail!(
                "TAESD: the latents have {c} channels, this TAESD decodes {} (`latent_channels` in its config): it is \
                 made for another model's latents",
                self.config.latent_channels
            );
        }
        // The decoder's soft clamp of its input to (-3, 3).
        // A true division, as torch's `x / 3` (candle's `/ 3.0` multiplies by 1/3, which can differ in the last bit).
        let three = Tensor::new(3f32, z.device())?.to_dtype(self.dtype)?;
        let mut x = (z.to_dtype(self.dtype)?.broadcast_div(&three)?.tanh()? * 3.0)?;
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(conv) => conv.forward(&x)?,
                Layer::Activation(act) => act.apply(&x)?,
                Layer::Block(block) => block.forward(&x)?,
                Layer::Upsample(factor) => {
                    let (_, _, h, w) = x.dims4()?;
                    x.upsample_nearest2d(h * factor, w * factor)?
                }
            };
        }
        // [0, 1] → [-1, 1], diffusers' convention.
        (x * 2.0)? - 1.0
    }
}
