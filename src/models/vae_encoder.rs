//! The encoder half of diffusers' `AutoencoderKL`: RGB in [-1, 1] → the latent distribution
//! (`vae.encode(x).latent_dist`), and the initial latents of image-to-image as the SDXL pipelines make them.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::bands::Bands;
use super::layers::{activation_dtype, conv1x1, conv3x3, group_norm, Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D};
use super::vae::{resnet_chain, VaeConfig, VaeMidBlock};
use super::vae_bands::{encode_in_bands, BandPlan};
use crate::rng::TorchRng;

/// diffusers' `DiagonalGaussianDistribution`: the encoder's moments split along the channels into `mean` and
/// `logvar`, the latter clamped to [-30, 20], and `std = exp(logvar / 2)`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// From the encoder's output (`quant_conv`'s when the VAE has one): (batch, 2 · latent channels, h, w).
    pub fn new(moments: &Tensor) -> Result<Self> {
        let channels = moments.dim(1)?;
        if !channels.is_multiple_of(2) {
            candle_core::bail!(
                "VAE encoder: {channels} output channels, not a mean and a log-variance per latent channel"
            );
        }
        let mean = moments.narrow(1, 0, channels / 2)?.contiguous()?;
        let logvar = moments.narrow(1, channels / 2, channels / 2)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// `latent_dist.sample(generator)`: `mean + std · ε` with ε = `torch.randn(mean.shape, generator=g)`, one draw of
    /// the whole (batch, channels, h, w) shape from `rng`, as diffusers' `randn_tensor` makes it with one CPU
    /// generator. ε is drawn in f32: bit for bit torch's when the distribution is f32 (a VAE that runs in f32 or is
    /// upcast, `force_upcast`); for an f16 distribution torch draws in f16, which this does not reproduce.
    pub fn sample(&self, rng: &mut TorchRng) -> Result<Tensor> {
        let eps = rng.randn_tensor(self.mean.dims(), self.mean.device())?.to_dtype(self.mean.dtype())?;
        &self.mean + (&self.std * eps)?
    }

    /// `latent_dist.mode()`: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// diffusers' `Encoder` and `quant_conv`, built from the VAE's `config.json` and weights (`encoder…`, `quant_conv…`).
#[derive(Debug, Clone)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
    /// What the encoder computes in (its weights' dtype, f32 in CPU mixed precision): images are converted to it.
    dtype: DType,
    pub config: VaeConfig,
}

impl VaeEncoder {
    /// `vb` is rooted at the VAE (keys `encoder…`, `quant_conv…`), as for [`crate::models::vae::VaeDecoder::new`].
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let cfg = config;
        cfg.validate()?;
        let channels = &cfg.block_out_channels;
        let (groups, eps) = (cfg.norm_num_groups, 1e-6);
        let enc = vb.pp("encoder");
        let top = *channels.last().expect("validated: at least one level");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut c_prev = channels[0];
        for (i, &c_out) in channels.iter().enumerate() {
            let vb = enc.pp("down_blocks").pp(i);
            let resnets = resnet_chain(&vb, cfg.layers_per_block, c_prev, c_out, groups, eps)?;
            let downsampler = if i + 1 < channels.len() {
                Some(Downsample2D::padded_after(vb.pp("downsamplers").pp(0), c_out)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock { resnets, downsampler });
            c_prev = c_out;
        }
        let moments = 2 * cfg.latent_channels;
        Ok(Self {
            conv_in: conv3x3(enc.pp("conv_in"), cfg.in_channels, channels[0], 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(enc.pp("mid_block"), top, cfg)?,
            conv_norm_out: group_norm(groups, top, eps, enc.pp("conv_norm_out"))?,
            conv_out: conv3x3(enc.pp("conv_out"), top, moments, 1)?,
            quant_conv: if cfg.use_quant_conv { Some(conv1x1(vb.pp("quant_conv"), moments, moments)?) } else { None },
            dtype: activation_dtype(&vb),
            config: cfg.clone(),
        })
    }

    /// The dtype the encoder computes in (images are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Checks an image batch: (batch, `in_channels`, height, width) with a height and width that are non-zero
    /// multiples of the VAE's scale factor (8 for SDXL), as the pipelines' images are.
    pub fn check_image(&self, image: &Tensor) -> Result<()> {
        let (channels, scale) = (self.config.in_channels, self.config.scale_factor());
        let dims = image.dims();
        let [batch, c, h, w] = dims else {
            candle_core::bail!("VAE encoder: an image batch is (batch, {channels}, height, width), got shape {dims:?}")
        };
        if *c != channels {
            candle_core::bail!("VAE encoder: the image has {c} channels, the VAE takes {channels} (shape {dims:?})");
        }
        if *batch == 0 || *h == 0 || *w == 0 || !h.is_multiple_of(scale) || !w.is_multiple_of(scale) {
            candle_core::bail!(
                "VAE encoder: a {h}×{w} image batch of {batch}; height and width must be non-zero multiples of {scale} \
                 (the VAE's scale factor)"
            );
        }
        Ok(())
    }

    /// diffusers' `vae.encode(image).latent_dist` (untiled): `image` is (batch, 3, height, width) in [-1, 1], any
    /// dtype (converted to the encoder's: f32 for a VAE loaded upcast, see [`crate::Pipeline::vae_dtype`]).
    pub fn encode(&self, image: &Tensor) -> Result<DiagonalGaussian> {
        self.check_image(image)?;
        DiagonalGaussian::new(&self.encode_middle(&self.encode_down(&image.to_dtype(self.dtype)?)?)?)
    }

    /// [`Self::encode`], in bands of rows ([`encode_in_bands`]) when `plan` says so for the image's latent size.
    /// `on_layer(done, total)` is called after each layer of the full-resolution part (whole or banded); an error it
    /// returns (a cancellation) ends the encode there.
    pub fn encode_planned(
        &self,
        image: &Tensor,
        plan: &BandPlan,
        on_layer: &mut dyn FnMut(usize, usize) -> crate::Result<()>,
    ) -> crate::Result<DiagonalGaussian> {
        self.check_image(image)?;
        let (_, _, h, w) = image.dims4()?;
        let scale = self.config.scale_factor();
        if plan.in_bands(h / scale, w / scale) {
            encode_in_bands(self, image, on_layer)
        } else {
            let down = self.down_layers(&image.to_dtype(self.dtype)?, on_layer)?;
            Ok(DiagonalGaussian::new(&self.encode_middle(&down)?)?)
        }
    }

    /// The encoder's first part, at the image's resolution and below, where the memory goes: `conv_in` and the down
    /// blocks (ResNets, down-samplers). `x` is in the encoder's dtype.
    pub fn encode_down(&self, x: &Tensor) -> Result<Tensor> {
        self.down_layers(x, &mut |_, _| Ok(()))
    }

    /// `conv_in`, then each down block's resnets and down-sampler.
    fn down_layer_count(&self) -> usize {
        1 + self.down_blocks.iter().map(|b| b.resnets.len() + usize::from(b.downsampler.is_some())).sum::<usize>()
    }

    fn down_layers<E: From<candle_core::Error>>(
        &self,
        x: &Tensor,
        on_layer: &mut dyn FnMut(usize, usize) -> std::result::Result<(), E>,
    ) -> std::result::Result<Tensor, E> {
        let total = self.down_layer_count();
        let mut done = 0;
        let mut step = || {
            done += 1;
            on_layer(done, total)
        };
        let mut x = self.conv_in.forward(x)?;
        step()?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x, None)?;
                step()?;
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                step()?;
            }
        }
        Ok(x)
    }

    /// [`Self::encode_down`] layer by layer over an image held in host memory, each layer computed in bands of rows
    /// on the VAE's device, every GroupNorm by the whole image's statistics (see [`crate::models::vae_bands`]).
    /// `on_layer(done, total)` follows the layers; an error it returns (a cancellation) ends the encode there.
    pub fn encode_down_in_bands(
        &self,
        x: &Tensor,
        bands: &Bands,
        on_layer: &mut dyn FnMut(usize, usize) -> crate::Result<()>,
    ) -> crate::Result<Tensor> {
        let total = self.down_layer_count();
        let mut done = 0;
        let mut step = || {
            done += 1;
            on_layer(done, total)
        };
        let mut x = bands.map(&x.into(), 1, 1, &mut |band, _, _| self.conv_in.forward(band))?;
        step()?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward_in_bands(&(&x).into(), bands)?;
                step()?;
            }
            if let Some(down) = &block.downsampler {
                x = down.forward_in_bands(&x, bands)?;
                step()?;
            }
        }
        Ok(x)
    }

    /// The rest, at the latents' resolution, from [`Self::encode_down`]'s output: the mid-block (with its attention
    /// over all pixels), the output norm and conv and `quant_conv`. Returns the moments (mean and log-variance).
    pub fn encode_middle(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.mid_block.forward(x)?;
        let moments = self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => Ok(moments),
        }
    }

    /// Latents from encoded images as the SDXL pipelines scale them: `scaling_factor · z`, or with `latents_mean` /
    /// `latents_std` in the config `(z − mean) · scaling_factor / std` (the inverse of
    /// [`crate::models::vae::VaeDecoder::scale_latents`]). `shift_factor` is not read: diffusers' SDXL pipelines
    /// ignore it too.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        match (&cfg.latents_mean, &cfg.latents_std) {
            (Some(mean), Some(std)) => {
                let per_channel = |v: &[f64]| -> Result<Tensor> {
                    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(v, (1, cfg.latent_channels, 1, 1), z.device())?.to_dtype(z.dtype())
                };
                (z.broadcast_sub(&per_channel(mean)?)? * cfg.scaling_factor)?.broadcast_div(&per_channel(std)?)
            }
            _ => z * cfg.scaling_factor,
        }
    }

    /// The image latents of SDXL image-to-image for `samples` images, as `StableDiffusionXLImg2ImgPipeline.
    /// prepare_latents` makes them with one CPU generator (`retrieve_latents(vae.encode(image), generator)`,
    /// sample mode "sample"), before its noise is added. Returns f32 (samples, latent channels, h/8, w/8).
    ///
    /// The generator's draws, in order (what a caller must reproduce for diffusers' numbers):
    /// 1. the posterior sample here: **one** `randn` of the encoded batch's shape (image batch, 4, h/8, w/8): the
    ///    images are encoded once, as given, not once per sample;
    /// 2. the pipeline then repeats the scaled latents `samples / batch` times along the batch (`torch.cat([z] · k)`:
    ///    image 0, 1, …, 0, 1, …), so with one image every sample starts from the same posterior sample;
    /// 3. next the pipeline draws its noise, one `randn` of (samples, 4, h/8, w/8) from the same generator (the
    ///    caller's next draw from `rng`), and `scheduler.add_noise(latents, noise, t)`;
    /// 4. then the denoising loop's own draws (ancestral / SDE schedulers).
    ///
    /// (With a list of generators diffusers instead encodes image by image, each sample drawing from its own
    /// generator; the SDXL inpainting pipeline's `_encode_vae_image` draws the same single `randn` as step 1, but
    /// after nothing else and without the `latents_mean`/`latents_std` branch.)
    ///
    /// `force_upcast`: diffusers encodes in f32 for such a VAE; this encoder encodes in its own dtype, so load it as
    /// the pipeline loads the VAE ([`crate::Pipeline::load_vae_encoder`] does: f32 when upcast). diffusers then
    /// casts the sample to the run dtype before scaling it (`init_latents.to(dtype)`); here it is scaled in the
    /// encoder's dtype and returned in f32, the same numbers in an f32 run (an f16 run's are f16-rounded there).
    ///
    /// `plan` chooses a whole-image or banded encode (the same numbers to float rounding, see
    /// [`crate::models::vae_bands`]).
    pub fn latents_from_image(
        &self,
        image: &Tensor,
        samples: usize,
        plan: &BandPlan,
        rng: &mut TorchRng,
        on_layer: &mut dyn FnMut(usize, usize) -> crate::Result<()>,
    ) -> crate::Result<Tensor> {
        self.check_image(image)?;
        let batch = image.dim(0)?;
        if samples == 0 || !samples.is_multiple_of(batch) {
            return Err(candle_core::Error::Msg(format!(
                "VAE encoder: {samples} samples from {batch} images (a multiple of the images is needed)"
            ))
            .into());
        }
        let z = self.encode_planned(image, plan, on_layer)?.sample(rng)?;
        let z = self.scale_latents(&z)?.to_dtype(DType::F32)?;
        let copies = samples / batch;
        Ok(if copies == 1 { z } else { Tensor::cat(&vec![&z; copies], 0)? })
    }
}
