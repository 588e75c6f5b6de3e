//! Input images for image to image: decoding a request's base64 field and diffusers' `VaeImageProcessor`
//! preprocessing (RGB, float in [-1, 1], channels first).

use base64::Engine;
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// Decodes a request's image field: base64 of a PNG, JPEG, WebP, … file, optionally behind a
/// `data:image/…;base64,` prefix. Alpha is dropped (the VAE takes RGB). A URL is refused: the engine fetches nothing.
pub fn decode_base64(field: &'static str, data: &str) -> Result<RgbImage> {
    let bytes = base64_bytes(field, data)?;
    let decoded =
        image::load_from_memory(&bytes).map_err(|e| Error::invalid(field, format!("is not a readable image: {e}")))?;
    Ok(decoded.to_rgb8())
}

/// The file bytes behind a base64 image field.
fn base64_bytes(field: &'static str, data: &str) -> Result<Vec<u8>> {
    let data = data.trim();
    if data.starts_with("http://") || data.starts_with("https://") {
        return Err(Error::invalid(field, "image URLs are not fetched: send the image itself, base64-encoded"));
    }
    let payload = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, b64)| b64)
            .ok_or_else(|| Error::invalid(field, "a data URL must be of the form data:image/…;base64,<data>"))?,
        None => data,
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| Error::invalid(field, format!("is not valid base64: {e}")))
}

/// The width and height of a base64 image field, from the image's header alone (nothing else is decoded).
pub fn base64_dimensions(field: &'static str, data: &str) -> Result<(u32, u32)> {
    let bytes = base64_bytes(field, data)?;
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::invalid(field, format!("is not a readable image: {e}")))?
        .into_dimensions()
        .map_err(|e| Error::invalid(field, format!("is not a readable image: {e}")))
}

/// An image as the base64 PNG a request's image field takes (for library callers and tests).
pub fn encode_base64_png(image: &RgbImage) -> Result<String> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Tensor(candle_core::Error::Msg(format!("cannot encode a PNG: {e}"))))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// diffusers' `VaeImageProcessor.preprocess` of an RGB image whose sides are multiples of `multiple`: `x / 255`,
/// then `2x − 1`, as a (1, 3, H, W) float32 tensor. Sides that are not multiples are refused, naming the field:
/// diffusers would resize such an image with PIL's Lanczos filter to the multiple below, which this engine does not
/// reproduce.
pub fn to_tensor(field: &'static str, image: &RgbImage, multiple: u32, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || w % multiple != 0 || h % multiple != 0 {
        return Err(Error::invalid(
            field,
            format!(
                "is {w}×{h}: both sides must be multiples of {multiple} (crop or resize it to {}×{})",
                w / multiple * multiple,
                h / multiple * multiple
            ),
        ));
    }
    // numpy: image / 255.0 in float32, then 2·x − 1 in float32.
    let values: Vec<f32> = image.as_raw().iter().map(|&v| 2.0 * (v as f32 / 255.0) - 1.0).collect();
    let hwc = Tensor::from_vec(values, (h as usize, w as usize, 3), device)?;
    Ok(hwc.permute((2, 0, 1))?.contiguous()?.unsqueeze(0)?)
}

/// diffusers' mask preprocessing (`VaeImageProcessor(do_binarize, do_convert_grayscale)`): PIL's `convert("L")`
/// luma `(299·R + 587·G + 114·B) / 1000` in its fixed-point form, `/ 255`, then 0 below 0.5 and 1 from 0.5 (1:
/// repaint), as a (1, 1, H, W) float32 tensor. The mask must have the image's size.
pub fn mask_to_tensor(mask: &RgbImage, image_size: (u32, u32), device: &Device) -> Result<Tensor> {
    let (w, h) = mask.dimensions();
    if (w, h) != image_size {
        return Err(Error::invalid(
            "mask",
            format!("is {w}×{h}, but the image is {}×{}: they must be the same size", image_size.0, image_size.1),
        ));
    }
    let values: Vec<f32> = mask
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            let luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
            if (luma as f32 / 255.0) < 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, h as usize, w as usize), device)?)
}

/// The mask at the latents' size, as diffusers' `torch.nn.functional.interpolate(mask, size)` (nearest: latent pixel
/// (i, j) takes mask pixel (i·s, j·s) for the scale factor s).
pub fn mask_to_latents(mask: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let rows = Tensor::arange_step(0u32, h as u32, scale as u32, mask.device())?;
    let cols = Tensor::arange_step(0u32, w as u32, scale as u32, mask.device())?;
    let picked = mask.index_select(&rows, 2)?.index_select(&cols, 3)?;
    debug_assert_eq!(picked.dims(), [b, c, h / scale, w / scale]);
    Ok(picked)
}
