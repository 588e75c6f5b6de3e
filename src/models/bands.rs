//! Running one layer over an image held in host memory in bands of rows, each band computed on the layer's device:
//! what the VAE's banded decode ([`crate::models::vae_bands`]) builds on. A band is widened by the rows a
//! convolution reaches and cropped back, and a GroupNorm takes the whole image's statistics (merged band by band), so
//! a banded layer gives the whole-image layer's output.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::kernels::group_norm::{region_moments, Moments};

/// A layer's computation on one band: `(band, widened rows, core rows) → output`, see [`Bands::map`].
pub type BandFn<'a> = dyn FnMut(&Tensor, Range<usize>, Range<usize>) -> candle_core::Result<Tensor> + 'a;

/// How a layer runs over an image held in host memory: band by band on `device`.
#[derive(Debug, Clone)]
pub struct Bands {
    device: Device,
    elements: usize,
}

impl Bands {
    /// Bands of at most about `elements` input elements (at least one row), computed on `device`.
    pub fn new(device: &Device, elements: usize) -> Self {
        Self { device: device.clone(), elements: elements.max(1) }
    }

    pub fn on_device(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.to_device(&self.device)
    }

    /// The (mean, biased variance) of each (batch, group) of `x` over the whole image, as GroupNorm takes them.
    pub fn statistics(&self, x: &Tensor, groups: usize) -> candle_core::Result<Vec<(f64, f64)>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(region_moments(x, groups, 0..h, 0..w)?.iter().map(Moments::mean_variance).collect())
    }

    /// `f` over `x` (batch, channels, height, width) band by band: `f(band, rows, core)` gets the rows `rows` of
    /// `x` on the device, which widen the band's own rows `core` by `reach` on each side (within the image), and
    /// returns the output of `rows` or of `core` alone (`scale` output rows per input row; see [`Self::crop`]). The
    /// bands' `core` outputs are assembled in host memory.
    pub fn map(&self, x: &Tensor, reach: usize, scale: usize, f: &mut BandFn) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let per_row = (batch * channels * width).max(1);
        let band_rows = (self.elements / per_row).clamp(1, height.max(1));
        if band_rows >= height {
            // One band: its output is the layer's, without assembling a copy.
            return f(&self.on_device(x)?, 0..height, 0..height)?.to_device(&Device::Cpu);
        }
        let mut output = Assembly::default();
        for start in (0..height).step_by(band_rows) {
            let core = start..(start + band_rows).min(height);
            let rows = core.start.saturating_sub(reach)..(core.end + reach).min(height);
            let band = self.on_device(&x.narrow(2, rows.start, rows.len())?)?;
            let y = f(&band, rows.clone(), core.clone())?.to_device(&Device::Cpu)?;
            // The output of the core rows alone, or of all the widened rows (then skip the extra ones).
            let skip = match y.dim(2)? {
                n if n == core.len() * scale => 0,
                n if n == rows.len() * scale => (core.start - rows.start) * scale,
                n => candle_core::bail!(
                    "bands: a band of {} rows ({} widened) gave {n} output rows at scale {scale}",
                    core.len(),
                    rows.len()
                ),
            };
            output.place(&y, skip, core.len() * scale, height * scale, core.start * scale)?;
        }
        output.finish()
    }

    /// `f` over `x` band by band for a layer that halves the height as diffusers' VAE down-sampler does (a stride-2
    /// 3×3 convolution after one zero row below the image): output row `o` reads input rows `2o..=2o + 2`. Each
    /// band's `core` input rows start at an even row, and `f(band, rows, core)` gets `rows`, the core and the one row
    /// below it (within the image), and returns the `core.len() / 2` output rows of the core (rounded down, as the
    /// whole layer is at an odd height). The bands' outputs are assembled in host memory.
    pub fn map_halving(&self, x: &Tensor, f: &mut BandFn) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let per_row = (batch * channels * width).max(1);
        // An even number of rows, at least 2, so that every band but the last starts and ends on an output row.
        let band_rows = ((self.elements / per_row).max(2) & !1).min(height.max(1));
        if band_rows >= height {
            return f(&self.on_device(x)?, 0..height, 0..height)?.to_device(&Device::Cpu);
        }
        let mut output = Assembly::default();
        for start in (0..height).step_by(band_rows) {
            let core = start..(start + band_rows).min(height);
            let rows = core.start..(core.end + 1).min(height);
            let band = self.on_device(&x.narrow(2, rows.start, rows.len())?)?;
            let y = f(&band, rows.clone(), core.clone())?.to_device(&Device::Cpu)?;
            let out_rows = core.len() / 2;
            if y.dim(2)? != out_rows {
                candle_core::bail!(
                    "bands: a band of {} rows ({} with the row below) gave {} output rows, not {out_rows}",
                    core.len(),
                    rows.len(),
                    y.dim(2)?
                );
            }
            output.place(&y, 0, out_rows, height / 2, core.start / 2)?;
        }
        output.finish()
    }

    /// The output rows of `core` from `y`, the output of the widened `rows` at `scale` output rows per input row.
    pub fn crop(y: &Tensor, rows: &Range<usize>, core: &Range<usize>, scale: usize) -> candle_core::Result<Tensor> {
        y.narrow(2, (core.start - rows.start) * scale, core.len() * scale)
    }
}

/// A layer's output in host memory, assembled band by band.
#[derive(Default)]
enum Assembly {
    #[default]
    Empty,
    /// f32: the bands' rows are copied straight into one buffer, in parallel.
    F32 {
        data: Vec<f32>,
        dims: (usize, usize, usize, usize),
    },
    Tensor(Tensor),
}

impl Assembly {
    /// Writes `rows` rows of the band `y` (batch, channels, ·, width) from its row `skip` at row `offset` of an
    /// output `height` rows high.
    fn place(&mut self, y: &Tensor, skip: usize, rows: usize, height: usize, offset: usize) -> candle_core::Result<()> {
        let (b, c, y_rows, w) = y.dims4()?;
        if let Self::Empty = self {
            *self = if y.dtype() == DType::F32 {
                Self::F32 { data: vec![0.0; b * c * height * w], dims: (b, c, height, w) }
            } else {
                Self::Tensor(Tensor::zeros((b, c, height, w), y.dtype(), &Device::Cpu)?)
            };
        }
        match self {
            Self::F32 { data, dims } => {
                if (dims.0, dims.1, dims.3) != (b, c, w) || offset + rows > height || skip + rows > y_rows {
                    candle_core::bail!("bands: a band of {:?} does not fit an output of {dims:?}", y.dims());
                }
                crate::kernels::with_f32_data(y, |band| {
                    use rayon::prelude::*;
                    data.par_chunks_mut(height * w).zip(band.par_chunks(y_rows * w)).for_each(|(out, band)| {
                        out[offset * w..(offset + rows) * w].copy_from_slice(&band[skip * w..(skip + rows) * w]);
                    });
                })
            }
            Self::Tensor(output) => output.slice_set(&y.narrow(2, skip, rows)?.contiguous()?, 2, offset),
            Self::Empty => unreachable!("set above"),
        }
    }

    fn finish(self) -> candle_core::Result<Tensor> {
        match self {
            Self::Empty => candle_core::bail!("bands: an image without rows"),
            Self::F32 { data, dims } => Tensor::from_vec(data, dims, &Device::Cpu),
            Self::Tensor(t) => Ok(t),
        }
    }
}
