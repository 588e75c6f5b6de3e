//! Distances between a run and the reference run.
//!
//! - **Latent RMSE**: `sqrt(mean((a − b)²))` over every element of the denoised latents (the scheduler's latent
//!   space, before the VAE's `scaling_factor` division), in f64.
//! - **Pixel PSNR** (dB): `10 · log10(255² / MSE)` with the MSE over every channel of the 8-bit RGB images.
//!   Identical images have an infinite PSNR, returned as `None`.
//! - **Pixel SSIM**: Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error visibility to
//!   structural similarity", computed on each of the R, G, B channels (values 0…255) and averaged: a Gaussian window
//!   of 11 × 11 pixels with σ = 1.5 (normalised to sum 1), `K1 = 0.01`, `K2 = 0.03`, `L = 255`, variances and
//!   covariance as `E[x²] − μ²`, and the mean over the window positions that lie entirely inside the image (the
//!   paper's MATLAB `filter2(…, 'valid')`). Images smaller than 11 pixels on a side use a window as large as their
//!   shorter side, with the same σ.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// SSIM's window size and Gaussian σ (Wang et al. 2004).
pub const SSIM_WINDOW: usize = 11;
pub const SSIM_SIGMA: f64 = 1.5;
const SSIM_K1: f64 = 0.01;
const SSIM_K2: f64 = 0.03;
const PEAK: f64 = 255.0;

/// Root-mean-square difference of two equally sized slices.
pub fn rmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rmse of slices of different lengths");
    if a.is_empty() {
        return 0.0;
    }
    let sum: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    (sum / a.len() as f64).sqrt()
}

/// RMSE between two latent tensors of the same shape.
pub fn latent_rmse(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::Tensor(candle_core::Error::Msg(format!(
            "latent shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        ))));
    }
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(rmse(&a, &b))
}

fn same_size(a: &RgbImage, b: &RgbImage) -> Result<()> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::Tensor(candle_core::Error::Msg(format!(
            "image sizes differ: {:?} vs {:?}",
            a.dimensions(),
            b.dimensions()
        ))));
    }
    Ok(())
}

/// Mean squared difference of two 8-bit images over all channels.
pub fn mse(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let (a, b) = (a.as_raw(), b.as_raw());
    if a.is_empty() {
        return Ok(0.0);
    }
    Ok(a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64)
}

/// PSNR in dB for a mean squared error of 8-bit values; `None` (infinite) when the MSE is 0.
pub fn psnr_from_mse(mse: f64) -> Option<f64> {
    (mse > 0.0).then(|| 10.0 * (PEAK * PEAK / mse).log10())
}

/// PSNR of two 8-bit RGB images in dB; `None` when they are identical (infinite PSNR).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<Option<f64>> {
    Ok(psnr_from_mse(mse(a, b)?))
}

/// The normalised 1-D Gaussian of SSIM's window (the 2-D window is its outer product).
fn gaussian(size: usize, sigma: f64) -> Vec<f64> {
    let center = (size as f64 - 1.0) / 2.0;
    let w: Vec<f64> = (0..size).map(|i| (-((i as f64 - center).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// 'valid' separable filtering of a `w × h` plane: output `(w − k + 1) × (h − k + 1)`.
fn filter_valid(plane: &[f64], w: usize, h: usize, kernel: &[f64]) -> Vec<f64> {
    let k = kernel.len();
    let (ow, oh) = (w + 1 - k, h + 1 - k);
    let mut rows = vec![0.0; ow * h];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = kernel.iter().enumerate().map(|(i, kv)| kv * plane[y * w + x + i]).sum();
        }
    }
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = kernel.iter().enumerate().map(|(i, kv)| kv * rows[(y + i) * ow + x]).sum();
        }
    }
    out
}

/// Mean SSIM of two single-channel `w × h` planes of 0…255 values.
pub fn ssim_plane(a: &[f64], b: &[f64], w: usize, h: usize) -> f64 {
    assert!(a.len() == w * h && b.len() == w * h && w > 0 && h > 0, "ssim_plane: bad plane sizes");
    let kernel = gaussian(SSIM_WINDOW.min(w).min(h), SSIM_SIGMA);
    let c1 = (SSIM_K1 * PEAK).powi(2);
    let c2 = (SSIM_K2 * PEAK).powi(2);
    let product = |x: &[f64], y: &[f64]| -> Vec<f64> { x.iter().zip(y).map(|(p, q)| p * q).collect() };
    let mu_a = filter_valid(a, w, h, &kernel);
    let mu_b = filter_valid(b, w, h, &kernel);
    let aa = filter_valid(&product(a, a), w, h, &kernel);
    let bb = filter_valid(&product(b, b), w, h, &kernel);
    let ab = filter_valid(&product(a, b), w, h, &kernel);
    let n = mu_a.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let var_a = aa[i] - ma * ma;
            let var_b = bb[i] - mb * mb;
            let cov = ab[i] - ma * mb;
            ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (var_a + var_b + c2))
        })
        .sum();
    total / n as f64
}

/// Mean SSIM of two 8-bit RGB images: the mean of the per-channel SSIMs (see the module docs).
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let (w, h) = (a.width() as usize, a.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::Tensor(candle_core::Error::Msg("SSIM of an empty image".into())));
    }
    let channel =
        |img: &RgbImage, c: usize| -> Vec<f64> { img.as_raw().iter().skip(c).step_by(3).map(|&v| v as f64).collect() };
    Ok((0..3).map(|c| ssim_plane(&channel(a, c), &channel(b, c), w, h)).sum::<f64>() / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: u32, h: u32, f: impl Fn(u32, u32, usize) -> u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([f(x, y, 0), f(x, y, 1), f(x, y, 2)]))
    }

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        image(w, h, |x, y, c| {
            let v =
                (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ (c as u32 + seed).wrapping_mul(83_492_791))
                    .wrapping_mul(2_654_435_761);
            (v >> 24) as u8
        })
    }

    #[test]
    fn rmse_by_hand() {
        assert_eq!(rmse(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        // differences 3 and 4: sqrt((9 + 16) / 2)
        assert!((rmse(&[3.0, 0.0], &[0.0, 4.0]) - 12.5f64.sqrt()).abs() < 1e-12);
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &candle_core::Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 2.0], [3.0, 6.0]], &candle_core::Device::Cpu).unwrap();
        assert!((latent_rmse(&a, &b).unwrap() - 1.0).abs() < 1e-12); // sqrt(4 / 4)
        assert!(latent_rmse(&a, &b.flatten_all().unwrap()).is_err());
    }

    #[test]
    fn psnr_known_values() {
        let a = noise(16, 16, 1);
        assert_eq!(psnr(&a, &a).unwrap(), None, "identical images: infinite PSNR");
        // Every value off by exactly 1 (no clipping): MSE 1, PSNR = 20 log10(255) = 48.1308… dB.
        let base = image(16, 16, |x, y, c| (x * 7 + y * 3 + c as u32 * 11) as u8 % 200 + 10);
        let shifted = image(16, 16, |x, y, c| (x * 7 + y * 3 + c as u32 * 11) as u8 % 200 + 11);
        assert!((mse(&base, &shifted).unwrap() - 1.0).abs() < 1e-12);
        let p = psnr(&base, &shifted).unwrap().unwrap();
        assert!((p - 20.0 * 255f64.log10()).abs() < 1e-9 && (p - 48.130_803_608).abs() < 1e-6, "{p}");
        // Black vs white: MSE 255², PSNR 0 dB. MSE 100 → 10·log10(650.25) = 28.1308… dB.
        let black = image(4, 4, |_, _, _| 0);
        let white = image(4, 4, |_, _, _| 255);
        assert!(psnr(&black, &white).unwrap().unwrap().abs() < 1e-12);
        assert!((psnr_from_mse(100.0).unwrap() - 28.130_803_608).abs() < 1e-6);
        assert!(psnr(&black, &noise(5, 4, 0)).is_err(), "size mismatch is an error");
    }

    #[test]
    fn ssim_of_identical_images_is_one() {
        for (w, h) in [(64, 64), (32, 48), (8, 8)] {
            let a = noise(w, h, 3);
            assert!((ssim(&a, &a).unwrap() - 1.0).abs() < 1e-12, "{w}×{h}");
        }
        let flat = image(20, 20, |_, _, _| 77);
        assert!((ssim(&flat, &flat).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ssim_of_flat_images_by_hand() {
        // Two constant images: no variance, so SSIM = (2·μa·μb + C1) / (μa² + μb² + C1) with C1 = (0.01·255)².
        let c1 = (0.01f64 * 255.0).powi(2);
        for (va, vb) in [(0u8, 255u8), (100, 120), (50, 50)] {
            let a = image(16, 16, |_, _, _| va);
            let b = image(16, 16, |_, _, _| vb);
            let (ma, mb) = (va as f64, vb as f64);
            let expected = (2.0 * ma * mb + c1) / (ma * ma + mb * mb + c1);
            let got = ssim(&a, &b).unwrap();
            assert!((got - expected).abs() < 1e-9, "{va} vs {vb}: {got} != {expected}");
        }
    }

    #[test]
    fn ssim_of_a_window_sized_image_by_hand() {
        // An 11×11 image has exactly one window. Image a: left 6 columns 0, right 5 columns 200; b = 200 − a (the
        // same structure, inverted). Weighted by the Gaussian g (symmetric, sums to 1 per axis), the mass of the
        // right 5 columns is p = Σ_{i≥6} g_i, so μa = 200p, μb = 200(1 − p), σa² = σb² = 200² p(1 − p),
        // σab = −200² p(1 − p).
        let a = image(11, 11, |x, _, _| if x >= 6 { 200 } else { 0 });
        let b = image(11, 11, |x, _, _| if x >= 6 { 0 } else { 200 });
        let g = gaussian(11, 1.5);
        let p: f64 = g[6..].iter().sum();
        let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
        let (ma, mb) = (200.0 * p, 200.0 * (1.0 - p));
        let var = 200.0f64.powi(2) * p * (1.0 - p);
        let expected = ((2.0 * ma * mb + c1) * (-2.0 * var + c2)) / ((ma * ma + mb * mb + c1) * (2.0 * var + c2));
        let got = ssim(&a, &b).unwrap();
        assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
        assert!(got < -0.8, "inverted structure is strongly anti-correlated: {got}");
        // p by hand: Gaussian weights at distances 1…5 from the centre, over the full window's sum.
        let weight = |d: f64| (-d * d / 4.5).exp();
        let total: f64 = 1.0 + 2.0 * (1..=5).map(|d| weight(d as f64)).sum::<f64>();
        let p_hand: f64 = (1..=5).map(|d| weight(d as f64)).sum::<f64>() / total;
        assert!((p - p_hand).abs() < 1e-12);
    }

    #[test]
    fn ssim_drops_with_noise_and_is_symmetric() {
        let a = noise(32, 32, 1);
        let b = noise(32, 32, 2);
        let s = ssim(&a, &b).unwrap();
        assert!(s.abs() < 0.2, "independent noise: {s}");
        assert!((s - ssim(&b, &a).unwrap()).abs() < 1e-12);
    }
}
