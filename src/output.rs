//! Writing images: PNG files carrying the generation parameters in A1111's `parameters` text chunk, so existing
//! tools (A1111's PNG info, civitai, ComfyUI readers) show how an image was made.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::prompt::{Emphasis, PromptSyntax};
use crate::{Error, GenerateRequest, Result};

/// A1111's infotext: prompt, `Negative prompt: …` (when there is one), then the settings line.
/// `loras`: the LoRAs merged (name, weight, short hash), recorded as A1111 records them (`Lora hashes`), so civitai
/// recognises them; their `<lora:…>` tags stay in the prompt text.
pub fn a1111_parameters(request: &GenerateRequest, seed: u64, model: &str, loras: &[(String, f64, String)]) -> String {
    let mut text = request.prompt.clone();
    if !request.negative_prompt.is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(&request.negative_prompt);
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        request.num_inference_steps,
        request.scheduler,
        request.guidance_scale,
        seed,
        request.img_width,
        request.img_height,
        model
    ));
    if let (Some(_), Some(strength)) = (&request.image, request.strength) {
        text.push_str(&format!(", Denoising strength: {strength}"));
    }
    if let Some(hires) = &request.hires {
        text.push_str(&format!(", Denoising strength: {}, Hires upscale: {}", hires.strength, hires.scale));
        if hires.steps > 0 {
            text.push_str(&format!(", Hires steps: {}", hires.steps));
        }
        text.push_str(", Hires upscaler: Latent");
    }
    // A1111 names a non-default emphasis when a prompt has brackets it applies to.
    let bracketed = [&request.prompt, &request.negative_prompt].iter().any(|p| p.contains('(') || p.contains('['));
    if request.prompt_syntax == PromptSyntax::A1111 && request.emphasis != Emphasis::Original && bracketed {
        text.push_str(&format!(", Emphasis: {}", request.emphasis.a1111_name()));
    }
    if !loras.is_empty() {
        let hashes: Vec<String> = loras.iter().map(|(name, _, hash)| format!("{name}: {hash}")).collect();
        text.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
    }
    text
}

/// Writes `image` as PNG with a `parameters` text chunk (tEXt when the text is Latin-1, iTXt otherwise).
pub fn save_png(image: &RgbImage, path: &Path, parameters: &str) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    write_png(BufWriter::new(file), image, parameters).map_err(|e| Error::output(path, format!("writing PNG: {e}")))
}

/// `image` as PNG bytes with a `parameters` text chunk, as [`save_png`] writes it (for answers sent over HTTP).
pub fn png_bytes_with_parameters(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    write_png(&mut bytes, image, parameters).map_err(|e| Error::output("(in memory)", format!("writing PNG: {e}")))?;
    Ok(bytes)
}

fn write_png<W: Write>(writer: W, image: &RgbImage, parameters: &str) -> std::result::Result<(), png::EncodingError> {
    let mut encoder = png::Encoder::new(writer, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let latin1 = parameters.chars().all(|c| (c as u32) < 256);
    if latin1 {
        encoder.add_text_chunk("parameters".into(), parameters.into())?;
    } else {
        encoder.add_itxt_chunk("parameters".into(), parameters.into())?;
    }
    let mut writer = encoder.write_header()?;
    writer.write_image_data(image.as_raw())?;
    writer.finish()
}

/// Output file names: `out.png` for one image, `out_0.png … out_{n-1}.png` for several.
pub fn output_paths(output: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = output.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    (0..count).map(|i| output.with_file_name(format!("{stem}_{i}.{ext}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_outputs() {
        assert_eq!(output_paths(Path::new("a/out.png"), 1), vec![PathBuf::from("a/out.png")]);
        assert_eq!(
            output_paths(Path::new("a/out.png"), 3),
            ["a/out_0.png", "a/out_1.png", "a/out_2.png"].map(PathBuf::from).to_vec()
        );
    }

    #[test]
    fn png_bytes_carry_the_parameters() {
        let image = RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let bytes = png_bytes_with_parameters(&image, "a cat\nSteps: 2").unwrap();
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8();
        assert_eq!(decoded, image);
        let reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().unwrap();
        let text = &reader.info().uncompressed_latin1_text;
        assert_eq!((text[0].keyword.as_str(), text[0].text.as_str()), ("parameters", "a cat\nSteps: 2"));
    }

    #[test]
    fn infotext_like_a1111() {
        let mut r = GenerateRequest::new("a cat");
        r.negative_prompt = "blurry".into();
        r.scheduler = "Euler a".into();
        let t = a1111_parameters(&r, 42, "tiny", &[]);
        assert_eq!(
            t,
            "a cat\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 1024x1024, Model: tiny"
        );
        r.prompt = "a (cat:1.2)".into();
        r.emphasis = Emphasis::NoNorm;
        assert!(a1111_parameters(&r, 42, "tiny", &[]).ends_with("Model: tiny, Emphasis: No norm"));
    }
}
