//! The decoder half of diffusers' `AutoencoderKL`: latents → RGB in [-1, 1] (the encoder is
//! [`crate::models::vae_encoder`]), and the config and mid-block both halves share.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;

use super::attention::Attention;
use super::bands::{Bands, Source};
use super::layers::{conv1x1, conv3x3, group_norm, Conv2d, GroupNorm};
use super::resnet::{ResnetBlock2D, Upsample2D};
use super::ConfigError;

fn default_groups() -> usize {
    32
}
fn default_layers() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_channels() -> usize {
    3
}
fn default_latent() -> usize {
    4
}
fn default_scale() -> f64 {
    0.18215
}

/// The fields of `vae/config.json` that shape the decoder and the encoder.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    /// The encoder's input channels (RGB).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_scale")]
    pub scaling_factor: f64,
    /// Per-channel latent statistics some SDXL-family VAEs carry (the SDXL pipeline de-normalises with them).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The image size the VAE was trained on: larger images decode in bands (see [`crate::models::vae_bands`]).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
}

fn default_sample_size() -> usize {
    1024
}

impl VaeConfig {
    /// How much the decoder enlarges the latent: 2^(levels − 1) (8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Rejects configs the decoder cannot be built with or the pipeline cannot use, naming the key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let channels = &self.block_out_channels;
        if channels.is_empty() {
            return Err(ConfigError::new("block_out_channels", "is empty: a VAE needs at least one level"));
        }
        // More levels than a usize can shift by would overflow the scale factor (and no VAE has them).
        if channels.len() > 16 {
            return Err(ConfigError::new("block_out_channels", format!("has {} levels; at most 16", channels.len())));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err(ConfigError::new("norm_num_groups", "must be at least 1"));
        }
        for (i, &c) in channels.iter().enumerate() {
            if c == 0 {
                return Err(ConfigError::new(format!("block_out_channels[{i}]"), "must be at least 1"));
            }
            if !c.is_multiple_of(groups) {
                let default = if groups == default_groups() { ", the default when the key is absent" } else { "" };
                return Err(ConfigError::new(
                    "norm_num_groups",
                    format!("({groups}{default}) does not divide block_out_channels[{i}] = {c}"),
                ));
            }
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
        for (key, values) in [("latents_mean", &self.latents_mean), ("latents_std", &self.latents_std)] {
            if let Some(values) = values {
                if values.len() != self.latent_channels {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "has {} values for {} latent channels (one per channel)",
                            values.len(),
                            self.latent_channels
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The VAE's single-head self-attention over all pixels, with its own GroupNorm and residual.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            attention: Attention::new(vb, channels, channels, 1, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let out = self.attention.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers' `UNetMidBlock2D` as both VAE halves use it: ResNet, self-attention over all pixels (unless
/// `mid_block_add_attention` is false), ResNet, at the latents' resolution.
#[derive(Debug, Clone)]
pub(crate) struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    /// `vb` is rooted at the mid-block (`encoder.mid_block`, `decoder.mid_block`).
    pub(crate) fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig) -> Result<Self> {
        let (groups, eps) = (cfg.norm_num_groups, 1e-6);
        let resnet = |i: usize| ResnetBlock2D::new(vb.pp("resnets").pp(i), channels, channels, None, groups, eps);
        let attention = if cfg.mid_block_add_attention {
            Some(VaeAttention::new(vb.pp("attentions").pp(0), channels, groups)?)
        } else {
            None
        };
        Ok(Self { resnets: [resnet(0)?, resnet(1)?], attention })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(attention) = &self.attention {
            x = attention.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// A VAE block's `resnets.0 … resnets.{count−1}`: the first from `c_in` channels, all to `c_out` (no time embedding).
pub(super) fn resnet_chain(
    vb: &VarBuilder,
    count: usize,
    c_in: usize,
    c_out: usize,
    groups: usize,
    eps: f64,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            ResnetBlock2D::new(vb.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, None, groups, eps)
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: VaeConfig,
}

impl VaeDecoder {
    /// `vb` is rooted at the VAE (keys `post_quant_conv…`, `decoder…`).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let cfg = config;
        cfg.validate()?;
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let eps = 1e-6;
        let dec = vb.pp("decoder");
        let top = *channels.last().expect("validated: at least one level");
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv1x1(vb.pp("post_quant_conv"), cfg.latent_channels, cfg.latent_channels)?)
        } else {
            None
        };
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut c_prev = reversed[0];
        for (i, &c_out) in reversed.iter().enumerate() {
            let vb = dec.pp("up_blocks").pp(i);
            let resnets = resnet_chain(&vb, cfg.layers_per_block + 1, c_prev, c_out, groups, eps)?;
            let upsampler =
                if i + 1 < reversed.len() { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), c_out)?) } else { None };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            c_prev = c_out;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv3x3(dec.pp("conv_in"), cfg.latent_channels, top, 1)?,
            mid_block: VaeMidBlock::new(dec.pp("mid_block"), top, cfg)?,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, dec.pp("conv_norm_out"))?,
            conv_out: conv3x3(dec.pp("conv_out"), channels[0], cfg.out_channels, 1)?,
            config: cfg.clone(),
        })
    }

    /// diffusers' `vae.decode(z)`: `z` is already divided by the scaling factor. Returns RGB in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_upper(&self.decode_middle(z)?)
    }

    /// The decoder's first part, at the latents' resolution: post-quant conv, conv_in and the mid-block (ResNets
    /// and the attention over all pixels). Cheap in memory even for large images (512 channels at 1/8 size for
    /// SDXL), so a banded decode runs it whole.
    pub fn decode_middle(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.mid_block.forward(&self.conv_in.forward(&z)?)
    }

    /// The rest, from [`Self::decode_middle`]'s output: the up blocks, the output norm and conv.
    pub fn decode_upper(&self, x: &Tensor) -> Result<Tensor> {
        self.upper_layers(x, &mut |_, _| Ok(()))
    }

    /// [`Self::decode`] with `on_layer(done, total)` called after each layer of the
    /// upper decoder; an error it returns (a cancellation) ends the decode there.
    pub fn decode_reporting(
        &self,
        z: &Tensor,
        on_layer: &mut dyn FnMut(usize, usize) -> crate::Result<()>,
    ) -> crate::Result<Tensor> {
        self.upper_layers(&self.decode_middle(z)?, on_layer)
    }

    /// The upper decoder's layers: each up block's resnets and up-sampler, then the output norm and conv as one.
    fn upper_layer_count(&self) -> usize {
        self.up_blocks.iter().map(|b| b.resnets.len() + usize::from(b.upsampler.is_some())).sum::<usize>() + 1
    }

    fn upper_layers<E: From<candle_core::Error>>(
        &self,
        x: &Tensor,
        on_layer: &mut dyn FnMut(usize, usize) -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E> {
        let total = self.upper_layer_count();
        let mut done = 0;
        let mut step = || {
            done += 1;
            on_layer(done, total)
        };
        let mut x = x.clone();
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, None)?;
                step()?;
            }
            if let Some(up) = &block.upsampler {
                x = up.forward(&x, None)?;
                step()?;
            }
        }
        let x = self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)?;
        step()?;
        Ok(x)
    }

    /// [`Self::decode_upper`] layer by layer over an image held in host memory, each layer computed in bands of
    /// rows on the VAE's device, every GroupNorm by the whole image's statistics (see [`crate::models::vae_bands`]).
    /// `on_layer(done, total)` follows the layers; an error it returns (a cancellation) ends the decode there.
    pub fn decode_upper_in_bands(
        &self,
        x: &Tensor,
        bands: &Bands,
        on_layer: &mut dyn FnMut(usize, usize) -> crate::Result<()>,
    ) -> crate::Result<Tensor> {
        let total = self.upper_layer_count();
        let mut done = 0;
        let mut step = || {
            done += 1;
            on_layer(done, total)
        };
        // The image-resolution activation (the last block's output), which an identity ResNet block there holds
        // twice (its input and its output): what the decode's host memory comes to anyway.
        let (batch, _, height, width) = x.dims4()?;
        let scale = self.config.scale_factor();
        let image_elements = batch * self.config.block_out_channels[0] * height * scale * width * scale;
        let hold = |x: &Source| bands.map(x, 0, 1, &mut |band, _, _| Ok(band.clone()));
        let mut x = Source::Held(x.clone());
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = Source::Held(resnet.forward_in_bands(&x, bands)?);
                step()?;
            }
            if let Some(up) = &block.upsampler {
                // Two up-samplers in a row (no VAE has them): the first one's output is held after all.
                let input = match x {
                    Source::Held(input) => input,
                    doubled => hold(&doubled)?,
                };
                let doubled = Source::Doubled { input, layer: up };
                // An up-sampled image larger than that (SDXL's last, 256 channels at the image's resolution: 4 GB
                // at 2048²) is not held: the next block computes it band by band as it reads it, three times (its
                // statistics, its first convolution, its shortcut). Smaller ones are held, computed once.
                let (b, c, h, w) = doubled.dims()?;
                x = if b * c * h * w > image_elements { doubled } else { Source::Held(hold(&doubled)?) };
                step()?;
            }
        }
        let stats = x.statistics(bands, self.conv_norm_out.groups())?;
        let image = bands.map(&x, 1, 1, &mut |band, _, _| {
            self.conv_out.forward(&self.conv_norm_out.forward_given(band, &stats, true)?)
        })?;
        step()?;
        Ok(image)
    }

    /// From the denoised latents, as the SDXL pipeline does: `latents / scaling_factor`, or with
    /// `latents_mean`/`latents_std` in the config `latents · std / scaling_factor + mean`; then decode.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.scale_latents(latents)?)
    }

    /// What [`Self::decode`] takes, from denoised latents: `latents / scaling_factor`, or with `latents_mean` /
    /// `latents_std` in the config `latents · std / scaling_factor + mean`.
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let z = match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) => {
                let per_channel = |v: &[f64]| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (1, cfg.latent_channels, 1, 1), latents.device())?.to_dtype(latents.dtype())
                };
                (latents.broadcast_mul(&per_channel(std)?)? / cfg.scaling_factor)?.broadcast_add(&per_channel(mean)?)?
            }
            _ => (latents / cfg.scaling_factor)?,
        };
        Ok(z)
    }
}
