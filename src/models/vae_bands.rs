//! Decoding (and encoding) large images in bands, to the whole-image decode's picture.
//!
//! diffusers' `enable_tiling()` decodes overlapping tiles independently and blends them: each tile normalises
//! (GroupNorm) and attends over itself only, so the picture depends on the tiling. Tile-local statistics cannot be
//! patched up afterwards either: statistics estimated in an extra pass still leave visible differences, because a
//! layer's statistics are only known once every earlier layer has been computed everywhere (see BENCHMARKS.md). So
//! here:
//! - the decoder's middle (post-quant conv, conv_in, the mid-block with its attention over all pixels) runs on the
//!   whole latent, at 1/8 of the image's size;
//! - the upper decoder (up blocks and output conv, where the memory goes) runs one layer at a time over the whole
//!   image, held in host memory: each GroupNorm takes the whole image's statistics (exact, merged band by band in
//!   f64), then the layer's convolutions run on the VAE's device in bands of rows, each band widened by the one row a
//!   3×3 convolution reaches and cropped back (see [`crate::models::bands`]).
//!
//! The result is the whole-image decode's (to float rounding), with the device's working memory bounded by a band.
//! Host memory holds at most two activations of the layer at hand, a ResNet block's input and the one image its two
//! convolutions write in turn (the second over the first, [`Bands::map_in_place`]), and never the normalised,
//! im2col copies a whole-image decode makes. The last up-sampler's output (256 channels at the image's resolution,
//! twice the last block's activation and the largest of all) is not held either: the ResNet block that reads it
//! recomputes it band by band ([`super::bands::Source`]) three times (its statistics, its first convolution, its
//! shortcut), which costs two more of that up-sampler's convolutions and saves, at 2048², the 4 GB image.

use candle_core::{DType, Device, Tensor};

use super::bands::Bands;
use super::vae::{VaeConfig, VaeDecoder};
use super::vae_encoder::{DiagonalGaussian, VaeEncoder};
use crate::Result;

/// Elements of a band's input (4 bytes each in f32): 16 M, 64 MB.
pub const BAND_ELEMENTS: usize = 16 << 20;

/// When to decode in bands (the `--vae-tiling` / `--no-vae-tiling` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// In bands when the image is larger than the size the VAE was trained on (`sample_size` in `vae/config.json`,
    /// 1024 for SDXL).
    #[default]
    Auto,
    Always,
    Never,
}

/// Which latents a decode takes in bands: the caller's [`VaeTiling`] and, for [`VaeTiling::Auto`], the largest
/// latent side decoded whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandPlan {
    pub tiling: VaeTiling,
    /// The largest latent height or width [`VaeTiling::Auto`] decodes whole.
    pub largest_whole: usize,
}

impl BandPlan {
    /// For a VAE: `Auto` decodes whole up to the image size it was trained on (`sample_size`, 1024 px for SDXL: 128
    /// latent pixels).
    pub fn for_vae(tiling: VaeTiling, config: &VaeConfig) -> Self {
        Self { tiling, largest_whole: config.sample_size / config.scale_factor() }
    }

    /// Whether latents of this height and width decode in bands.
    pub fn in_bands(&self, latent_height: usize, latent_width: usize) -> bool {
        match self.tiling {
            VaeTiling::Always => true,
            VaeTiling::Never => false,
            VaeTiling::Auto => latent_height > self.largest_whole || latent_width > self.largest_whole,
        }
    }
}

/// Decodes `z` (already divided by the scaling factor, as [`VaeDecoder::decode`] takes it) in bands, to the
/// whole-image decode's picture (see the module's documentation). `on_layer(done, total)` is called after each
/// layer of the upper decoder; an error it returns (a cancellation) ends the
/// decode there. Returns f32 RGB in about [-1, 1], (batch, channels, height, width), on `z`'s device.
pub fn decode_in_bands(
    vae: &VaeDecoder,
    z: &Tensor,
    on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    let bands = Bands::new(z.device(), BAND_ELEMENTS);
    let middle = vae.decode_middle(z)?.to_device(&Device::Cpu)?;
    let image = vae.decode_upper_in_bands(&middle, &bands, on_layer)?;
    Ok(image.to_dtype(DType::F32)?.to_device(z.device())?)
}

/// Encodes `image` ((batch, 3, height, width) in [-1, 1], as [`VaeEncoder::encode`] takes it) in bands, to the
/// whole-image encode's distribution: the mirror of [`decode_in_bands`]. The encoder's full-resolution part
/// (`conv_in` and the down blocks, [`VaeEncoder::encode_down_in_bands`]) runs layer by layer over the image in host
/// memory, in bands of rows on `image`'s device, each GroupNorm by the whole image's statistics and each
/// down-sampler in bands of whole output rows ([`Bands::map_halving`]); the rest (the mid-block with its attention
/// over all pixels, the output layers, `quant_conv`) runs whole on the device at the latents' size. `on_layer(done,
/// total)` is called after each banded layer; an error it returns (a cancellation) ends the encode there. The
/// distribution is on `image`'s device, in the encoder's dtype.
pub fn encode_in_bands(
    vae: &VaeEncoder,
    image: &Tensor,
    on_layer: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<DiagonalGaussian> {
    vae.check_image(image)?;
    let device = image.device();
    let bands = Bands::new(device, BAND_ELEMENTS);
    let x = image.to_dtype(vae.dtype())?.to_device(&Device::Cpu)?;
    let down = vae.encode_down_in_bands(&x, &bands, on_layer)?.to_device(device)?;
    Ok(DiagonalGaussian::new(&vae.encode_middle(&down)?)?)
}
