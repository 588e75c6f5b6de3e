//! ResNet blocks and the down/up-sampling convolutions shared by the UNet and the VAE.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::bands::{Bands, Doubling, Source};
pub use super::layers::{conv1x1, conv3x3};
use super::layers::{group_norm, linear, Conv2d, GroupNorm, Linear};

/// diffusers' `ResnetBlock2D` (default time-scale-shift, SiLU, output scale 1).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    /// `temb_channels` is `None` for the VAE's blocks, which take no time embedding.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(groups, c_in, eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), c_in, c_out, 1)?,
            time_emb_proj: temb_channels.map(|t| linear(t, c_out, vb.pp("time_emb_proj"))).transpose()?,
            norm2: group_norm(groups, c_out, eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), c_out, c_out, 1)?,
            conv_shortcut: if c_in != c_out { Some(conv1x1(vb.pp("conv_shortcut"), c_in, c_out)?) } else { None },
        })
    }

    /// `temb` is the already-SiLU'd time embedding shared by all blocks (see [`crate::models::unet`]).
    pub fn forward(&self, x: &Tensor, temb_silu: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb_silu) {
            (Some(proj), Some(t)) => h.broadcast_add(&proj.forward(t)?.unsqueeze(2)?.unsqueeze(3)?)?,
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }

    /// [`Self::forward`] without a time embedding over an image held in host memory (or computed band by band, see
    /// [`Source`]), in bands of rows (see [`Bands`]): each GroupNorm by the whole image's statistics, so the result
    /// is the whole-image forward's. The block holds its input and one image of its output's shape: the second
    /// convolution's output (plus the shortcut) is written over the first's ([`Bands::map_in_place`]).
    pub fn forward_in_bands(&self, x: &Source, bands: &Bands) -> Result<Tensor> {
        let stats1 = x.statistics(bands, self.norm1.groups())?;
        let h = bands
            .map(x, 1, 1, &mut |band, _, _| self.conv1.forward(&self.norm1.forward_given(band, &stats1, true)?))?;
        let stats2 = bands.statistics(&h, self.norm2.groups())?;
        bands.map_in_place(h, 1, &mut |band, rows, core| {
            let h = self.conv2.forward(&self.norm2.forward_given(band, &stats2, true)?)?;
            let h = Bands::crop(&h, &rows, &core, 1)?;
            let x = x.rows(bands, core)?;
            match &self.conv_shortcut {
                Some(shortcut) => shortcut.forward(&x)? + h,
                None => x + h,
            }
        })
    }
}

/// Stride-2 3×3 convolution (`downsamplers.0.conv`): with one pixel of zero padding on every side (the UNet's), or,
/// as diffusers' `Downsample2D` with `padding=0` (the VAE encoder's), with one zero row and column after the image
/// only: `F.pad(x, (0, 1, 0, 1))`, then the convolution without padding.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_after: bool,
}

impl Downsample2D {
    /// Padding 1 on every side (the UNet's down-samplers).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv3x3(vb.pp("conv"), channels, channels, 2)?, pad_after: false })
    }

    /// One zero row and column after the image (diffusers' `padding=0`, the VAE encoder's down-samplers).
    pub fn padded_after(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, 0)?, pad_after: true })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_after {
            self.conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)
        } else {
            self.conv.forward(x)
        }
    }

    /// [`Self::forward`] of a down-sampler [`Self::padded_after`] over an image held in host memory, in bands of rows
    /// (see [`Bands::map_halving`]).
    pub fn forward_in_bands(&self, x: &Tensor, bands: &Bands) -> Result<Tensor> {
        if !self.pad_after {
            candle_core::bail!("Downsample2D: only the VAE's down-samplers (padded after the image) run in bands");
        }
        // Each band is padded below too: a band other than the last then holds an odd number of rows, and the
        // extra zero row after it is read by no output row.
        bands.map_halving(x, &mut |band, _, _| self.forward(band))
    }
}

/// Nearest-neighbour upsampling (×2, or to an explicit size when the UNet's input was not a multiple of its total
/// down-sampling, as diffusers' `upsample_size`) then a 3×3 convolution (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv3x3(vb.pp("conv"), channels, channels, 1)? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((h * 2, w * 2));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

impl Doubling for Upsample2D {
    fn double(&self, band: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(band, None)
    }
}
