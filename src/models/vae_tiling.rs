//! Tiled VAE decoding, as diffusers' `AutoencoderKL.tiled_decode` (`vae.enable_tiling()`): the latents are cut
//! into overlapping tiles (`sample_size / 8` latent pixels, 25 % overlap), each decoded alone, and each decoded tile
//! is blended linearly into the one above and the one to its left before its top-left part is kept. Only one row
//! of decoded tiles is held at a time, so memory is bounded by the tile size, not the image size.

use candle_core::{DType, Tensor};

use super::vae::VaeDecoder;
use crate::{Error, Result};

/// When to decode in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Tiles when the image is larger than the VAE's tile (`sample_size` in `vae/config.json`, 1024 for SDXL).
    #[default]
    Auto,
    Always,
    Never,
}

/// Tile geometry (diffusers' `tile_sample_min_size`, `tile_latent_min_size`, `tile_overlap_factor`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileSize {
    /// Decoded tile side in pixels.
    pub sample: usize,
    /// Latent tile side.
    pub latent: usize,
    pub overlap_factor: f64,
}

impl TileSize {
    /// diffusers' defaults from the VAE config: `sample_size`, `sample_size / 2^(levels − 1)`, 0.25.
    pub fn from_vae(vae: &VaeDecoder) -> Result<Self> {
        let config = &vae.config;
        Self::new(config.sample_size, config.sample_size / config.scale_factor(), 0.25)
    }

    pub fn new(sample: usize, latent: usize, overlap_factor: f64) -> Result<Self> {
        if sample == 0 || latent == 0 || !(0.0..1.0).contains(&overlap_factor) {
            return Err(Error::Other(format!(
                "VAE tiling: tile sizes must be positive and the overlap in [0, 1) (got sample {sample}, latent \
                 {latent}, overlap {overlap_factor})"
            )));
        }
        let size = Self { sample, latent, overlap_factor };
        if size.stride() == 0 {
            return Err(Error::Other(format!(
                "VAE tiling: latent tile {latent} with overlap {overlap_factor} advances 0"
            )));
        }
        Ok(size)
    }

    /// Latent distance between tile origins.
    fn stride(&self) -> usize {
        (self.latent as f64 * (1.0 - self.overlap_factor)) as usize
    }

    /// Decoded rows / columns blended between neighbours.
    fn blend(&self) -> usize {
        (self.sample as f64 * self.overlap_factor) as usize
    }

    /// Whether `tiling` asks for tiles for latents of this height and width.
    pub fn applies(&self, tiling: VaeTiling, latent_height: usize, latent_width: usize) -> bool {
        match tiling {
            VaeTiling::Always => true,
            VaeTiling::Never => false,
            VaeTiling::Auto => latent_height > self.latent || latent_width > self.latent,
        }
    }
}

/// One decoded tile, f32, (batch, channels, height, width) in row-major order.
struct Tile {
    data: Vec<f32>,
    planes: usize,
    height: usize,
    width: usize,
}

impl Tile {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (b, c, height, width) = t.dims4()?;
        Ok(Self { data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, planes: b * c, height, width })
    }

    fn at(&self, plane: usize, y: usize, x: usize) -> usize {
        (plane * self.height + y) * self.width + x
    }
}

/// `b[y] = a[end − extent + y]·(1 − y/extent) + b[y]·(y/extent)` over the first `extent` rows (diffusers' blend_v).
fn blend_rows(above: &Tile, tile: &mut Tile, extent: usize) {
    let extent = extent.min(above.height).min(tile.height);
    for y in 0..extent {
        let (keep, take) = ((1.0 - y as f64 / extent as f64) as f32, (y as f64 / extent as f64) as f32);
        for plane in 0..tile.planes {
            for x in 0..tile.width {
                let a = above.data[above.at(plane, above.height - extent + y, x)];
                let i = tile.at(plane, y, x);
                tile.data[i] = a * keep + tile.data[i] * take;
            }
        }
    }
}

/// The same across the first `extent` columns (diffusers' blend_h).
fn blend_columns(left: &Tile, tile: &mut Tile, extent: usize) {
    let extent = extent.min(left.width).min(tile.width);
    for x in 0..extent {
        let (keep, take) = ((1.0 - x as f64 / extent as f64) as f32, (x as f64 / extent as f64) as f32);
        for plane in 0..tile.planes {
            for y in 0..tile.height {
                let a = left.data[left.at(plane, y, left.width - extent + x)];
                let i = tile.at(plane, y, x);
                tile.data[i] = a * keep + tile.data[i] * take;
            }
        }
    }
}

/// Decodes `z` (already divided by the scaling factor, as [`VaeDecoder::decode`] takes it) tile by tile.
/// `on_tile(done, total)` is called after each tile.
pub fn tiled_decode(
    vae: &VaeDecoder,
    z: &Tensor,
    size: TileSize,
    on_tile: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let (_, _, height, width) = z.dims4()?;
    let (stride, blend) = (size.stride(), size.blend());
    let keep = size.sample - blend;
    let origins = |n: usize| (0..n).step_by(stride).collect::<Vec<_>>();
    let (rows, columns) = (origins(height), origins(width));
    let total = rows.len() * columns.len();
    let mut previous: Vec<Tile> = Vec::new();
    let mut output_rows: Vec<Tensor> = Vec::with_capacity(rows.len());
    let mut done = 0;
    for &i in &rows {
        let mut current: Vec<Tile> = Vec::with_capacity(columns.len());
        for (j, &x0) in columns.iter().enumerate() {
            let tile_z = z.narrow(2, i, size.latent.min(height - i))?.narrow(3, x0, size.latent.min(width - x0))?;
            let mut tile = Tile::from_tensor(&vae.decode(&tile_z)?)?;
            if let Some(above) = previous.get(j) {
                blend_rows(above, &mut tile, blend);
            }
            if let Some(left) = current.last() {
                blend_columns(left, &mut tile, blend);
            }
            current.push(tile);
            done += 1;
            on_tile(done, total);
        }
        // The kept top-left parts of this row's tiles, side by side.
        let kept_height = current.iter().map(|t| t.height.min(keep)).max().unwrap_or(0);
        let parts = current
            .iter()
            .map(|t| {
                let (h, w) = (t.height.min(keep), t.width.min(keep));
                let tensor = Tensor::from_slice(&t.data, (1, t.planes, t.height, t.width), z.device())?;
                tensor.narrow(2, 0, h)?.narrow(3, 0, w)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        debug_assert!(parts.iter().all(|p| p.dim(2).ok() == Some(kept_height)));
        output_rows.push(Tensor::cat(&parts, 3)?);
        previous = current;
    }
    let batch = z.dim(0)?;
    let image = Tensor::cat(&output_rows, 2)?;
    let (_, planes, h, w) = image.dims4()?;
    Ok(image.reshape((batch, planes / batch, h, w))?)
}
