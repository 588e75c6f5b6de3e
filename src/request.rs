//! The hosted API's request: one type shared by the library, the CLI and the HTTP server, with the exact JSON
//! field names and defaults of the hosted endpoint.

use serde::{Deserialize, Deserializer, Serialize};

use crate::adapters::LoraRequest;
use crate::prompt::{Emphasis, PromptSyntax, MAX_PROMPT_CHARS};
use crate::{Error, Result};

/// The largest seed the hosted API accepts.
pub const MAX_SEED: i64 = 999_999_999_999_999;

/// One text-to-image request, field for field the hosted API's body. Unknown JSON fields are ignored, as the hosted
/// API ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub negative_prompt: String,
    #[serde(default = "default_samples", deserialize_with = "samples_or_null")]
    pub samples: u32,
    #[serde(default = "default_scheduler", deserialize_with = "scheduler_or_null")]
    pub scheduler: String,
    #[serde(default = "default_steps", deserialize_with = "steps_or_null")]
    pub num_inference_steps: u32,
    #[serde(default = "default_guidance", deserialize_with = "guidance_or_null")]
    pub guidance_scale: f64,
    /// -1 picks a random seed; the seed used is reported with the images.
    #[serde(default = "default_seed", deserialize_with = "seed_or_null")]
    pub seed: i64,
    #[serde(default = "default_size", deserialize_with = "size_or_null")]
    pub img_width: u32,
    #[serde(default = "default_size", deserialize_with = "size_or_null")]
    pub img_height: u32,
    /// Server output format: JSON with base64 JPEG instead of the JPEG itself.
    #[serde(default, deserialize_with = "null_as_default")]
    pub base64: bool,
    /// How prompts are read: `"a1111"` (default: weights, editing, alternation, BREAK, long prompts) or `"none"`
    /// (diffusers: literal text cut to 77 tokens).
    #[serde(default, deserialize_with = "null_as_default")]
    pub prompt_syntax: PromptSyntax,
    /// With A1111 syntax, how weights apply: `"original"` (default, A1111's) or `"no-norm"`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub emphasis: Emphasis,
    /// LoRAs to merge for this request, by name in the LoRA directory (`{"name": "…", "weight": 0.8}`); with A1111
    /// prompt syntax `<lora:NAME:WEIGHT>` tags in the prompt add to them.
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRequest>,
    /// Scheduler config keys on top of the model's `scheduler_config.json`, as diffusers'
    /// `Class.from_config(config, **options)` takes them (`{"timestep_spacing": "trailing"}`).
    #[serde(default, deserialize_with = "null_as_default", skip_serializing_if = "serde_json::Map::is_empty")]
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    /// η, the noise weight of the schedulers that take one (diffusers' `eta`): DDIM (default 0, deterministic) and
    /// TCD (its γ, default 0.3). Refused for other schedulers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// Image to image: the input image, base64 (PNG, JPEG, WebP, …), with or without a `data:image/…;base64,`
    /// prefix (see [`crate::input_image`]). The output images have its size, which must be a multiple of 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How far image to image re-noises the input: in (0, 1], the fraction of the steps that run (diffusers'
    /// default 0.3 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting (with `image`): the mask, base64 like `image` and of its size; its grey level (ITU-R 601 luma, as
    /// PIL's `convert("L")`) is binarised at 0.5: white repaints, black keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// A1111's hires fix: generate, enlarge the latents, then image to image at the larger size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresFix>,
}

/// A1111's "hires fix" (`enable_hr` with the "Latent" upscaler): the first pass at `img_width` × `img_height`, its
/// latents enlarged `scale` times (bilinear, as A1111's "Latent" upscaler: `interpolate(mode="bilinear",
/// antialias=False)`), then a second, image-to-image pass over them at `strength` (A1111's denoising strength) with
/// fresh noise from the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HiresFix {
    /// The size factor, > 1 (the final size is rounded down to a multiple of 8).
    pub scale: f64,
    /// How much of the second pass's schedule runs, in (0, 1] (A1111's default 0.7).
    #[serde(default = "default_hires_strength", deserialize_with = "hires_strength_or_null")]
    pub strength: f64,
    /// How many steps the second pass runs (A1111's `hr_second_pass_steps`; 0 or absent: the first pass's).
    #[serde(default, deserialize_with = "null_as_default")]
    pub steps: u32,
}

fn default_hires_strength() -> f64 {
    0.7
}

impl HiresFix {
    /// The second pass's size for a first pass of `width` × `height`: `⌊size · scale⌋` rounded down to `multiple`.
    pub fn target(&self, width: u32, height: u32, multiple: u32) -> (u32, u32) {
        let side = |v: u32| ((v as f64 * self.scale) as u32) / multiple * multiple;
        (side(width), side(height))
    }

    /// The second pass's schedule as A1111 sets it up (`setup_img2img_steps` with explicit steps): `steps` run, of a
    /// schedule of `⌊steps / min(strength, 0.999)⌋`.
    pub fn schedule_steps(&self, first_pass_steps: u32) -> u32 {
        let steps = if self.steps == 0 { first_pass_steps } else { self.steps };
        (steps as f64 / self.strength.min(0.999)) as u32
    }

    fn validate(&self) -> Result<()> {
        if !(self.scale > 1.0 && self.scale <= 4.0) {
            return Err(Error::invalid("hires.scale", format!("must be in (1, 4], got {}", self.scale)));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(Error::invalid("hires.strength", format!("must be in (0, 1], got {}", self.strength)));
        }
        if self.steps > 1000 {
            return Err(Error::invalid("hires.steps", format!("must be at most 1000, got {}", self.steps)));
        }
        Ok(())
    }
}

/// diffusers' `StableDiffusionXLImg2ImgPipeline` default strength.
pub const DEFAULT_IMG2IMG_STRENGTH: f64 = 0.3;

/// diffusers' `StableDiffusionXLInpaintPipeline` default strength.
pub const DEFAULT_INPAINT_STRENGTH: f64 = 0.9999;

/// A field sent as JSON `null` reads as if it were absent: its default (Python clients send `None` for a parameter
/// they leave unset). Fields that are `Option`s already read `null` as `None`.
fn null_or<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    default: fn() -> T,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_else(default))
}

/// [`null_or`] for fields whose default is the type's.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> std::result::Result<T, D::Error> {
    null_or(d, T::default)
}

fn samples_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    null_or(d, default_samples)
}
fn scheduler_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    null_or(d, default_scheduler)
}
fn steps_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    null_or(d, default_steps)
}
fn guidance_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    null_or(d, default_guidance)
}
fn seed_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    null_or(d, default_seed)
}
fn size_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    null_or(d, default_size)
}
fn hires_strength_or_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    null_or(d, default_hires_strength)
}

fn default_samples() -> u32 {
    1
}
fn default_scheduler() -> String {
    "UniPC".into()
}
fn default_steps() -> u32 {
    30
}
fn default_guidance() -> f64 {
    7.5
}
fn default_seed() -> i64 {
    -1
}
fn default_size() -> u32 {
    1024
}

impl GenerateRequest {
    /// A request with the hosted API's defaults for everything but the prompt.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            samples: default_samples(),
            scheduler: default_scheduler(),
            num_inference_steps: default_steps(),
            guidance_scale: default_guidance(),
            seed: default_seed(),
            img_width: default_size(),
            img_height: default_size(),
            base64: false,
            prompt_syntax: PromptSyntax::default(),
            emphasis: Emphasis::default(),
            loras: Vec::new(),
            scheduler_options: serde_json::Map::new(),
            eta: None,
            image: None,
            strength: None,
            mask: None,
            hires: None,
        }
    }

    /// What any model needs, whatever API is imitated: positive counts, a seed in range, a finite guidance
    /// scale, sizes that are positive multiples of `size_multiple` (the VAE's down-sampling factor).
    pub fn validate_for_model(&self, size_multiple: u32) -> Result<()> {
        self.validate_prompts()?;
        if self.samples == 0 {
            return Err(Error::invalid("samples", "must be at least 1"));
        }
        if self.num_inference_steps == 0 {
            return Err(Error::invalid("num_inference_steps", "must be at least 1"));
        }
        if !self.guidance_scale.is_finite() || self.guidance_scale < 0.0 {
            return Err(Error::invalid(
                "guidance_scale",
                format!("must be a finite number ≥ 0, got {}", self.guidance_scale),
            ));
        }
        if self.seed < -1 {
            return Err(Error::invalid("seed", format!("must be -1 (random) or 0 … {MAX_SEED}, got {}", self.seed)));
        }
        for (field, v) in [("img_width", self.img_width), ("img_height", self.img_height)] {
            if v == 0 || v % size_multiple != 0 {
                return Err(Error::invalid(field, format!("must be a positive multiple of {size_multiple}, got {v}")));
            }
        }
        if let Some(hires) = &self.hires {
            if self.image.is_some() {
                return Err(Error::invalid("hires", "is for text to image: it cannot be combined with an image"));
            }
            hires.validate()?;
        }
        if self.mask.is_some() && self.image.is_none() {
            return Err(Error::invalid("mask", "is for inpainting: give the image it applies to too"));
        }
        if let Some(strength) = self.strength {
            if self.image.is_none() {
                return Err(Error::invalid("strength", "is for image to image: give an image too"));
            }
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(Error::invalid("strength", format!("must be in (0, 1], got {strength}")));
            }
        }
        Ok(())
    }

    /// The prompts' length: at most [`MAX_PROMPT_CHARS`] characters each (no tokenizer needed, so a server checks
    /// it before queuing; [`Self::validate_for_model`] and [`Self::validate_hosted`] include it). The limits on
    /// chunks and distinct texts ([`crate::prompt::MAX_PROMPT_CHUNKS`], [`crate::prompt::MAX_SCHEDULE_TEXTS`]) need
    /// the tokenizers and are checked when the prompts are read, before any text encoder runs.
    pub fn validate_prompts(&self) -> Result<()> {
        for (field, text) in [("prompt", &self.prompt), ("negative_prompt", &self.negative_prompt)] {
            let chars = text.chars().count();
            if chars > MAX_PROMPT_CHARS {
                let message = format!("must be at most {MAX_PROMPT_CHARS} characters long, got {chars}");
                return Err(Error::invalid(field, message));
            }
        }
        Ok(())
    }

    /// The hosted API's own ranges (enforced where the hosted API is imitated: the HTTP server).
    pub fn validate_hosted(&self) -> Result<()> {
        self.validate_prompts()?;
        if !(1..=4).contains(&self.samples) {
            return Err(Error::invalid("samples", format!("must be between 1 and 4, got {}", self.samples)));
        }
        if !(20..=100).contains(&self.num_inference_steps) {
            return Err(Error::invalid(
                "num_inference_steps",
                format!("must be between 20 and 100, got {}", self.num_inference_steps),
            ));
        }
        if !(1.0..=25.0).contains(&self.guidance_scale) {
            return Err(Error::invalid(
                "guidance_scale",
                format!("must be between 1 and 25, got {}", self.guidance_scale),
            ));
        }
        if !(-1..=MAX_SEED).contains(&self.seed) {
            return Err(Error::invalid("seed", format!("must be between -1 and {MAX_SEED}, got {}", self.seed)));
        }
        for (field, v) in [("img_width", self.img_width), ("img_height", self.img_height)] {
            if !(512..=2048).contains(&v) || v % 8 != 0 {
                return Err(Error::invalid(field, format!("must be a multiple of 8 between 512 and 2048, got {v}")));
            }
        }
        Ok(())
    }

    /// The seed to use: the request's, or a fresh random one in the hosted range for -1.
    pub fn resolve_seed(&self) -> u64 {
        if self.seed >= 0 {
            return self.seed as u64;
        }
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.finish() % (MAX_SEED as u64 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_hosted_api() {
        let r: GenerateRequest = serde_json::from_str(r#"{"prompt": "a cat", "unknown_field": 3}"#).unwrap();
        assert_eq!(r, GenerateRequest::new("a cat"));
        assert_eq!((r.samples, r.num_inference_steps, r.seed, r.img_width, r.img_height), (1, 30, -1, 1024, 1024));
        assert_eq!(r.scheduler, "UniPC");
        assert_eq!(r.guidance_scale, 7.5);
        assert!(!r.base64);
        assert_eq!((r.prompt_syntax, r.emphasis), (PromptSyntax::A1111, Emphasis::Original));
        let r: GenerateRequest =
            serde_json::from_str(r#"{"prompt": "a", "prompt_syntax": "none", "emphasis": "no-norm"}"#).unwrap();
        assert_eq!((r.prompt_syntax, r.emphasis), (PromptSyntax::None, Emphasis::NoNorm));
        assert!(serde_json::from_str::<GenerateRequest>(r#"{"prompt": "a", "prompt_syntax": "compel"}"#).is_err());
    }

    #[test]
    fn null_reads_as_absent() {
        let nulls = r#"{"prompt": "a cat", "negative_prompt": null, "samples": null, "scheduler": null,
            "num_inference_steps": null, "guidance_scale": null, "seed": null, "img_width": null, "img_height": null,
            "base64": null, "prompt_syntax": null, "emphasis": null, "loras": null, "scheduler_options": null,
            "eta": null, "image": null, "strength": null, "mask": null, "hires": null}"#;
        let r: GenerateRequest = serde_json::from_str(nulls).unwrap();
        assert_eq!(r, GenerateRequest::new("a cat"));
        let r: GenerateRequest =
            serde_json::from_str(r#"{"prompt": "a", "hires": {"scale": 2, "strength": null, "steps": null}}"#).unwrap();
        let hires = r.hires.unwrap();
        assert_eq!((hires.strength, hires.steps), (0.7, 0));
        // Values still read as before, and a wrong type is still an error naming what was expected.
        let r: GenerateRequest = serde_json::from_str(r#"{"prompt": "a", "seed": 7, "negative_prompt": "b"}"#).unwrap();
        assert_eq!((r.seed, r.negative_prompt.as_str()), (7, "b"));
        let e = serde_json::from_str::<GenerateRequest>(r#"{"prompt": "a", "samples": "3"}"#).unwrap_err();
        assert!(e.to_string().contains("u32"), "{e}");
        // The prompt is required: null is not a prompt.
        assert!(serde_json::from_str::<GenerateRequest>(r#"{"prompt": null}"#).is_err());
    }

    #[test]
    fn missing_prompt_is_an_error() {
        let e = serde_json::from_str::<GenerateRequest>(r#"{"samples": 2}"#).unwrap_err();
        assert!(e.to_string().contains("prompt"), "{e}");
    }

    #[test]
    fn model_validation_names_the_field() {
        let mut r = GenerateRequest::new("x");
        r.img_width = 100;
        let e = r.validate_for_model(8).unwrap_err().to_string();
        assert!(e.contains("img_width") && e.contains("multiple of 8"), "{e}");
        r.img_width = 96;
        r.validate_for_model(8).unwrap();
        r.num_inference_steps = 0;
        assert!(r.validate_for_model(8).unwrap_err().to_string().contains("num_inference_steps"));
    }

    #[test]
    fn hosted_ranges() {
        let mut r = GenerateRequest::new("x");
        r.validate_hosted().unwrap();
        r.samples = 5;
        assert!(r.validate_hosted().unwrap_err().to_string().contains("samples"));
        r.samples = 4;
        r.seed = MAX_SEED + 1;
        assert!(r.validate_hosted().unwrap_err().to_string().contains("seed"));
        r.seed = -1;
        let s = r.resolve_seed();
        assert!(s <= MAX_SEED as u64);
    }
}
