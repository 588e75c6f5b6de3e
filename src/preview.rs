//! Previews of an image while it is being denoised: SDXL latents (the loop's latents or its x₀ prediction, shape
//! (B, 4, h, w), in the diffusion model's space, i.e. *not* divided by the VAE's scaling factor 0.13025) turned into
//! an RGB picture far more cheaply than by the VAE. Two ways:
//!
//! - [`Previewer::Taesd`]: the TAESD-XL decoder ([`crate::models::taesd`], loaded with
//!   [`crate::loading::load_taesd`]): a full-size image close to the VAE's, for a small fraction of its cost;
//! - [`Previewer::LatentRgb`]: no network at all, a fixed linear map of each latent pixel to a colour
//!   ([`LatentRgb`]): blurry, colours only roughly right, nearly free.
//!
//! Both give the image as the VAE does, (B, 3, H, W) in about [-1, 1] ([`Previewer::decode`]), which the pipeline's
//! output conversion ([`crate::pipeline::to_image`]) turns into 8-bit RGB ([`Previewer::preview`]).

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::models::taesd::TaesdDecoder;
use crate::pipeline::to_image;
use crate::{Error, Result};

/// The SDXL latent → RGB factors of ComfyUI (github.com/comfyanonymous/ComfyUI, `comfy/latent_formats.py`, class
/// `SDXL`, `latent_rgb_factors`; read at commit 040a3243), one row per latent channel, columns R, G, B, as its
/// "Latent2RGB" previewer applies them (`latent_preview.py`: `F.linear(x0, factorsᵀ, bias)`, clamped to [-1, 1],
/// then `(x + 1) · 127.5` rounded).
///
/// What they approximate: the SDXL VAE decoder, by one affine map per latent pixel, from the latents as the
/// denoising loop holds them (scaled by 0.13025, not divided back) to the colour, in [-1, 1], of the 8 × 8 pixels
/// the VAE decodes that latent pixel into. They are a fit to the VAE's decodes, so colours come out roughly right and
/// nothing finer than a latent pixel shows. They replaced ComfyUI's earlier SDXL factors (still those of its
/// `SDXL_Playground_2_5`), which had no bias.
pub const SDXL_LATENT_RGB_FACTORS: [[f32; 3]; 4] =
    [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]];

/// The bias added to [`SDXL_LATENT_RGB_FACTORS`]' colours: ComfyUI's `SDXL.latent_rgb_factors_bias`.
pub const SDXL_LATENT_RGB_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// A fixed linear latent → RGB map: for each latent pixel, colour = `Σ_c latent[c] · factors[c] + bias`, in about
/// [-1, 1] (ComfyUI's `Latent2RGBPreviewer`). [`Self::decode`] enlarges the result to the image's size.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentRgb {
    /// One row per latent channel: its contribution to R, G and B.
    pub factors: [[f32; 3]; 4],
    /// Added to every pixel's R, G and B.
    pub bias: [f32; 3],
    /// How much [`Self::decode`] enlarges the latents: the VAE's scale factor (8 for SDXL), so that the preview
    /// has the final image's size.
    pub scale: usize,
}

impl LatentRgb {
    /// ComfyUI's SDXL factors ([`SDXL_LATENT_RGB_FACTORS`], [`SDXL_LATENT_RGB_BIAS`]); `scale`: the VAE's scale
    /// factor (`Pipeline::vae_scale_factor`, 8 for SDXL), or 1 for a latent-sized preview.
    pub fn sdxl(scale: usize) -> Self {
        Self { factors: SDXL_LATENT_RGB_FACTORS, bias: SDXL_LATENT_RGB_BIAS, scale }
    }

    /// The colours at the latents' resolution: (B, 3, h, w) f32 from (B, 4, h, w) latents.
    pub fn project(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        if c != self.factors.len() {
            return Err(Error::Tensor(candle_core::Error::Msg(format!(
                "latent → RGB preview: the latents have {c} channels, the factors are for {} (SDXL latents)",
                self.factors.len()
            ))));
        }
        let device = latents.device();
        // (3, 4): row = output colour, column = latent channel.
        let rows: Vec<f32> = (0..3).flat_map(|rgb| self.factors.iter().map(move |row| row[rgb])).collect();
        let matrix = Tensor::from_vec(rows, (1, 3, c), device)?;
        let bias = Tensor::from_vec(self.bias.to_vec(), (1, 3, 1), device)?;
        let x = latents.to_dtype(DType::F32)?.reshape((b, c, h * w))?;
        let rgb = matrix.broadcast_matmul(&x)?.broadcast_add(&bias)?;
        Ok(rgb.reshape((b, 3, h, w))?)
    }

    /// [`Self::project`] enlarged `scale` times by bilinear interpolation (half-pixel centres, as PyTorch's
    /// `align_corners=False` and image viewers scale): (B, 3, h·scale, w·scale) f32. Bilinear rather than nearest,
    /// because nearest shows every latent pixel as a visible 8 × 8 block; the preview stays soft either way, since it
    /// has one colour per latent pixel.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let rgb = self.project(latents)?;
        if self.scale <= 1 {
            return Ok(rgb);
        }
        let (_, _, h, w) = rgb.dims4()?;
        Ok(rgb.upsample_bilinear2d(h * self.scale, w * self.scale, false)?)
    }
}

/// How previews are made from latents.
#[derive(Debug, Clone)]
pub enum Previewer {
    /// With a TAESD decoder (from [`crate::loading::load_taesd`]). Cloning it shares its weights.
    Taesd(TaesdDecoder),
    /// With a fixed linear map ([`LatentRgb::sdxl`]).
    LatentRgb(LatentRgb),
}

impl Previewer {
    /// The images of all `latents` (B, 4, h, w) as (B, 3, H, W) in about [-1, 1], like the VAE's output: what
    /// [`crate::pipeline::to_image`] converts one image of. With TAESD, H, W = 8h, 8w and this is TAESD as the
    /// SDXL pipeline's final decoder (`latents / scaling_factor`, then the decoder); with [`LatentRgb`] the size is
    /// set by its `scale`. The result is in the decoder's dtype (f32 for [`LatentRgb`]) on the latents' device.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match self {
            Previewer::Taesd(taesd) => Ok(taesd.decode_latents(latents)?),
            Previewer::LatentRgb(map) => map.decode(latents),
        }
    }

    /// The first image of `latents` (B, 4, h, w) as 8-bit RGB (only that one is decoded).
    pub fn preview(&self, latents: &Tensor) -> Result<RgbImage> {
        let first = latents.narrow(0, 0, 1)?;
        to_image(&self.decode(&first)?)
    }

    /// [`Self::preview`] no larger than about `max_side` pixels a side where that saves work: a TAESD preview of a
    /// large image decodes the latents averaged over k × k blocks (k the smallest integer that brings the image's
    /// longer side to `max_side` or less), a picture k times smaller at about 1/k² of the cost — a 1024² TAESD
    /// decode takes ~12 s on a 2-core CPU, close to 13 % of a UNet step, a 512² one about a quarter of that. The
    /// linear map is cheap at any size and is not reduced.
    pub fn preview_at_most(&self, latents: &Tensor, max_side: usize) -> Result<RgbImage> {
        let first = latents.narrow(0, 0, 1)?;
        let Previewer::Taesd(taesd) = self else {
            return self.preview(&first);
        };
        let (_, _, h, w) = first.dims4()?;
        let side = h.max(w) * taesd.config.scale_factor();
        let k = side.div_ceil(max_side.max(1));
        if k < 2 || h < k || w < k {
            return self.preview(&first);
        }
        let pooled = first.avg_pool2d(k)?;
        to_image(&self.decode(&pooled)?)
    }
}
