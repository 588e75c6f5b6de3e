//! Running one layer over an image held in host memory in bands of rows, each band computed on the layer's device:
//! what the VAE's banded decode ([`crate::models::vae_bands`]) builds on. A band is widened by the rows a
//! convolution reaches and cropped back, and a GroupNorm takes the whole image's statistics (merged band by band), so
//! a banded layer gives the whole-image layer's output.
//!
//! Host memory is what bounds the largest images, so the largest activations are never held twice: an up-sampler's
//! output (4× its input) is not held at all but recomputed band by band by the layer that reads it ([`Source`]), and
//! a layer whose output has its input's shape writes it over its input ([`Bands::map_in_place`]).

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::kernels::group_norm::{region_moments, Moments};

/// A layer's computation on one band: `(band, widened rows, core rows) → output`, see [`Bands::map`].
pub type BandFn<'a> = dyn FnMut(&Tensor, Range<usize>, Range<usize>) -> candle_core::Result<Tensor> + 'a;

/// A layer that doubles an image's height and width the way an up-sampler does: nearest-neighbour ×2, then a
/// convolution reaching one row (3×3, padding 1) on the doubled grid, channels kept.
pub trait Doubling {
    /// The layer on a band of whole rows (on the device).
    fn double(&self, band: &Tensor) -> candle_core::Result<Tensor>;
}

/// What a banded layer reads: an image held in host memory, or the output of a [`Doubling`] layer on one, which is
/// computed band by band as it is read and never held whole.
pub enum Source<'a> {
    Held(Tensor),
    Doubled { input: Tensor, layer: &'a dyn Doubling },
}

impl Source<'_> {
    /// (batch, channels, height, width) of the image this stands for.
    pub fn dims(&self) -> candle_core::Result<(usize, usize, usize, usize)> {
        match self {
            Source::Held(x) => x.dims4(),
            Source::Doubled { input, .. } => {
                let (b, c, h, w) = input.dims4()?;
                Ok((b, c, 2 * h, 2 * w))
            }
        }
    }

    /// Rows `rows` of the image, on the bands' device.
    pub fn rows(&self, bands: &Bands, rows: Range<usize>) -> candle_core::Result<Tensor> {
        match self {
            Source::Held(x) => bands.on_device(&x.narrow(2, rows.start, rows.len())?),
            Source::Doubled { input, layer } => {
                // Output row o reads doubled rows o - 1..=o + 1, which repeat input rows (o - 1) / 2..=(o + 1) / 2.
                // The input band's own first and last output rows see the convolution's zero padding: they are
                // not among `rows` unless they are the image's first or last.
                let first = rows.start.saturating_sub(1) / 2;
                let end = (rows.end + 1).div_ceil(2).min(input.dim(2)?);
                let y = layer.double(&bands.on_device(&input.narrow(2, first, end - first)?)?)?;
                y.narrow(2, rows.start - 2 * first, rows.len())
            }
        }
    }

    /// The (mean, biased variance) of each (batch, group) over the whole image, as GroupNorm takes them; a
    /// doubled image's measured band by band and merged (exact to f64 rounding).
    pub fn statistics(&self, bands: &Bands, groups: usize) -> candle_core::Result<Vec<(f64, f64)>> {
        let x = match self {
            Source::Held(x) => return bands.statistics(x, groups),
            Source::Doubled { .. } => self,
        };
        let (batch, channels, height, width) = x.dims()?;
        let band_rows = bands.band_rows(batch * channels * width, height);
        let mut total = vec![Moments::default(); batch * groups];
        for start in (0..height).step_by(band_rows) {
            let band = x.rows(bands, start..(start + band_rows).min(height))?.to_device(&Device::Cpu)?;
            let rows = band.dim(2)?;
            for (total, part) in total.iter_mut().zip(region_moments(&band, groups, 0..rows, 0..width)?) {
                *total = total.merge(part);
            }
        }
        Ok(total.iter().map(Moments::mean_variance).collect())
    }
}

impl From<&Tensor> for Source<'_> {
    fn from(x: &Tensor) -> Self {
        Source::Held(x.clone())
    }
}

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

    /// Rows per band of an image whose rows hold `per_row` elements each: at least one, at most `height`.
    fn band_rows(&self, per_row: usize, height: usize) -> usize {
        (self.elements / per_row.max(1)).clamp(1, height.max(1))
    }

    /// `f` over `x` (batch, channels, height, width) band by band: `f(band, rows, core)` gets the rows `rows` of
    /// `x` on the device, which widen the band's own rows `core` by `reach` on each side (within the image), and
    /// returns the output of `rows` or of `core` alone (`scale` output rows per input row; see [`Self::crop`]). The
    /// bands' `core` outputs are assembled in host memory.
    pub fn map(&self, x: &Source, reach: usize, scale: usize, f: &mut BandFn) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims()?;
        let band_rows = self.band_rows(batch * channels * width, height);
        if band_rows >= height {
            // One band: its output is the layer's, without assembling a copy.
            return f(&x.rows(self, 0..height)?, 0..height, 0..height)?.to_device(&Device::Cpu);
        }
        let mut output = Assembly::default();
        for start in (0..height).step_by(band_rows) {
            let core = start..(start + band_rows).min(height);
            let rows = core.start.saturating_sub(reach)..(core.end + reach).min(height);
            let y = f(&x.rows(self, rows.clone())?, rows.clone(), core.clone())?.to_device(&Device::Cpu)?;
            let skip = Self::skip(&y, &rows, &core, scale)?;
            output.place(&y, skip, core.len() * scale, height * scale, core.start * scale)?;
        }
        output.finish()
    }

    /// [`Self::map`] at one output row per input row, for a layer whose output has its input's shape, written over
    /// `x` as the bands go (so the layer holds one image, not two). The `reach` rows above each band, which the
    /// band before has overwritten by then, are kept from before that. `x` must be contiguous, in host memory, and
    /// shared with no other tensor that is still read.
    pub fn map_in_place(&self, x: Tensor, reach: usize, f: &mut BandFn) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        // At least `reach` rows a band, so that the rows kept from one band are all the next one needs.
        let band_rows = self.band_rows(batch * channels * width, height).max(reach);
        if band_rows >= height {
            return f(&self.on_device(&x)?, 0..height, 0..height)?.to_device(&Device::Cpu);
        }
        let x = x.contiguous()?;
        // The original rows above the next band (those this band overwrites and the next one reads).
        let mut kept: Option<Tensor> = None;
        for start in (0..height).step_by(band_rows) {
            let core = start..(start + band_rows).min(height);
            let rows = core.start.saturating_sub(reach)..(core.end + reach).min(height);
            let below = x.narrow(2, core.start, rows.end - core.start)?;
            let band = match kept.take() {
                Some(above) => Tensor::cat(&[&above, &below], 2)?,
                None => below,
            };
            let y = f(&self.on_device(&band)?, rows.clone(), core.clone())?.to_device(&Device::Cpu)?;
            let skip = Self::skip(&y, &rows, &core, 1)?;
            let above_next = core.end.saturating_sub(reach).max(core.start);
            if core.end < height && reach > 0 {
                kept = Some(x.narrow(2, above_next, core.end - above_next)?.force_contiguous()?);
            }
            x.slice_set(&y.narrow(2, skip, core.len())?.contiguous()?, 2, core.start)?;
        }
        Ok(x)
    }

    /// How many leading rows of a band's output `y` to skip: it holds the output of the core rows alone, or of all
    /// the widened rows.
    fn skip(y: &Tensor, rows: &Range<usize>, core: &Range<usize>, scale: usize) -> candle_core::Result<usize> {
        Ok(match y.dim(2)? {
            n if n == core.len() * scale => 0,
            n if n == rows.len() * scale => (core.start - rows.start) * scale,
            n => candle_core::bail!(
                "bands: a band of {} rows ({} widened) gave {n} output rows at scale {scale}",
                core.len(),
                rows.len()
            ),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose every value differs: (batch, channels, height, width).
    fn image(dims: (usize, usize, usize, usize)) -> Tensor {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let values: Vec<f32> = (0..n).map(|i| ((i * 7919) % 263) as f32 / 263.0 - 0.5).collect();
        Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
    }

    /// A 3×3 convolution (padding 1) of each channel with an asymmetric kernel, so that a row read from the wrong
    /// place or a padding row inside the image changes the output.
    fn convolve(x: &Tensor) -> candle_core::Result<Tensor> {
        let channels = x.dim(1)?;
        let kernel: Vec<f32> = (0..9).map(|i| i as f32 - 2.5).collect();
        let kernel = Tensor::from_vec(kernel, (1, 1, 3, 3), x.device())?.repeat((channels, 1, 1, 1))?;
        x.conv2d(&kernel, 1, 1, 1, channels)
    }

    struct UpThenConvolve;

    impl Doubling for UpThenConvolve {
        fn double(&self, band: &Tensor) -> candle_core::Result<Tensor> {
            let (_, _, h, w) = band.dims4()?;
            convolve(&band.upsample_nearest2d(2 * h, 2 * w)?)
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn every_row_range_of_a_doubled_image_is_the_whole_doubled_image_s() {
        let input = image((2, 3, 5, 4));
        let whole = UpThenConvolve.double(&input).unwrap();
        let source = Source::Doubled { input, layer: &UpThenConvolve };
        assert_eq!(source.dims().unwrap(), (2, 3, 10, 8));
        let bands = Bands::new(&Device::Cpu, 1);
        for start in 0..10 {
            for end in start + 1..=10 {
                let rows = source.rows(&bands, start..end).unwrap();
                assert_eq!(max_diff(&rows, &whole.narrow(2, start, end - start).unwrap()), 0.0, "{start}..{end}");
            }
        }
        // Its statistics, merged band by band, are the whole image's.
        let want = bands.statistics(&whole, 3).unwrap();
        for elements in [1, 2 * 3 * 8 * 3, usize::MAX] {
            let got = source.statistics(&Bands::new(&Device::Cpu, elements), 3).unwrap();
            for ((m, v), (wm, wv)) in got.iter().zip(&want) {
                assert!((m - wm).abs() < 1e-12 && (v - wv).abs() < 1e-12, "{elements}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn a_layer_written_over_its_input_gives_the_whole_layer_s_output() {
        let x = image((2, 3, 7, 5));
        let want = convolve(&x).unwrap();
        // Bands of 1, 2, 3 and 7 rows (the band rows are elements / (batch · channels · width)).
        for rows in [1, 2, 3, 7] {
            let bands = Bands::new(&Device::Cpu, rows * 2 * 3 * 5);
            for crop in [false, true] {
                let input = x.force_contiguous().unwrap();
                let got = bands
                    .map_in_place(input.clone(), 1, &mut |band, widened, core| match crop {
                        true => Bands::crop(&convolve(band)?, &widened, &core, 1),
                        false => convolve(band),
                    })
                    .unwrap();
                assert_eq!(max_diff(&got, &want), 0.0, "bands of {rows} rows, cropped by the layer: {crop}");
                // Written over the input (which shares its storage with `input`), unless in one band.
                assert!(rows == 7 || max_diff(&input, &want) == 0.0, "bands of {rows} rows: not written in place");
            }
        }
    }
}
