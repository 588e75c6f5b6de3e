//! Image to image and inpainting against diffusers' `StableDiffusionXLImg2ImgPipeline` and
//! `StableDiffusionXLInpaintPipeline` on the tiny model (tests/fixtures/img2img_refs.*, scripts/make_img2img_refs.py):
//! the encoded input's posterior sample and the noise from the request's generator in diffusers' order, each
//! scheduler's `add_noise` at the strength's first step, the rest of the schedule, inpainting's per-step blend with a
//! hard and a grey (binarised) mask, A1111's hires fix (latents enlarged, then image to image); plus the errors a bad
//! input gets.

mod common;

use base64::Engine;
use candle_core::Device;
use common::{assert_close, mean_abs_pixel_diff, root, tiny_model};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, Progress, PromptSyntax, Residency};

fn pipeline() -> Pipeline {
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap()
}

fn input_base64() -> String {
    let bytes = std::fs::read(root().join("tests/fixtures/img2img_input.png")).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn img2img_matches_diffusers() {
    let dir = root().join("tests/fixtures");
    let tensors = candle_core::safetensors::load(dir.join("img2img_refs.safetensors"), &Device::Cpu).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("img2img_refs.json")).unwrap()).unwrap();
    let pipeline = pipeline();
    let dir9 = common::TempDir::new("inpaint-unet");
    let inpainting = inpainting_model(&dir9);
    let image = input_base64();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    assert!(cases.iter().filter(|c| c["request"]["mask"].is_string()).count() >= 5, "inpainting cases");
    assert!(cases.iter().filter(|c| c["unet"].is_string()).count() >= 2, "9-channel inpainting cases");
    assert!(cases.iter().filter(|c| c["request"]["hires"].is_object()).count() >= 2, "hires-fix cases");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut request: GenerateRequest = serde_json::from_value(case["request"].clone()).unwrap();
        request.prompt_syntax = PromptSyntax::None;
        if request.hires.is_none() {
            request.image = Some(image.clone());
        }
        if let Some(mask) = &request.mask {
            // The fixture names its mask file: inpainting with a regular UNet.
            let bytes = std::fs::read(root().join(format!("tests/fixtures/inpaint_mask_{mask}.png"))).unwrap();
            request.mask = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        let mut evaluations = 0;
        let pipeline = if case.get("unet").is_some() { &inpainting } else { &pipeline };
        let generation = pipeline
            .generate(&request, &mut |p| {
                if let Progress::Step { evaluation, .. } = p {
                    evaluations = *evaluation;
                }
                Control::Continue
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(evaluations, case["unet_timesteps_seen"].as_array().unwrap().len(), "{name}: model evaluations");
        assert_close(&format!("{name} latents"), &generation.latents, &tensors[&format!("{name}.latents")], 1e-4);
        let expected = &tensors[&format!("{name}.images")];
        let (n, h, w, _) = expected.dims4().unwrap();
        assert_eq!(generation.images.len(), n, "{name}");
        let mut ours = Vec::new();
        for image in &generation.images {
            assert_eq!((image.width() as usize, image.height() as usize), (w, h), "{name}: size");
            ours.extend_from_slice(image.as_raw());
        }
        let diff = mean_abs_pixel_diff(&ours, &expected.flatten_all().unwrap().to_vec1::<u8>().unwrap());
        eprintln!("{name}: mean abs pixel diff {diff:.4}/255");
        assert!(diff <= 0.5, "{name}: {diff}/255");
    }
}

/// The tiny model with the 9-channel inpainting UNet of tests/fixtures/inpaint_unet (scripts/make_inpaint_unet.py):
/// a folder whose other components link to the tiny model's.
fn inpainting_model(dir: &common::TempDir) -> Pipeline {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "unet" {
            std::os::unix::fs::symlink(entry.path(), model.join(entry.file_name())).unwrap();
        }
    }
    std::os::unix::fs::symlink(root().join("tests/fixtures/inpaint_unet"), model.join("unet")).unwrap();
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    Pipeline::load(model.to_str().unwrap(), options).unwrap()
}

/// An inpainting (9-channel) model refuses what it cannot do: text to image, image to image without a mask.
#[test]
fn an_inpainting_unet_needs_an_image_and_a_mask() {
    let dir = common::TempDir::new("inpaint-unet-refusals");
    let pipeline = inpainting_model(&dir);
    let mut request = GenerateRequest::new("a cat");
    (request.scheduler, request.num_inference_steps, request.img_width, request.img_height) =
        ("Euler".into(), 2, 64, 64);
    let e = pipeline.generate(&request, &mut |_| Control::Continue).unwrap_err().to_string();
    assert!(e.contains("9 input channels") && e.contains("mask"), "{e}");
    request.image = Some(input_base64());
    let e = pipeline.generate(&request, &mut |_| Control::Continue).unwrap_err().to_string();
    assert!(e.contains("9 input channels") && e.contains("mask"), "{e}");
}

#[test]
fn bad_inputs_are_refused_naming_the_field() {
    let pipeline = pipeline();
    let base = || {
        let mut r = GenerateRequest::new("a cat");
        (r.scheduler, r.num_inference_steps, r.seed) = ("Euler".into(), 4, 1);
        r.image = Some(input_base64());
        r
    };
    let refused = |r: GenerateRequest, field: &str, words: &str| {
        let e = pipeline.generate(&r, &mut |_| Control::Continue).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "expected `{field}` … {words}: {e}");
    };
    refused(GenerateRequest { strength: Some(0.0), ..base() }, "strength", "(0, 1]");
    refused(GenerateRequest { strength: Some(1.5), ..base() }, "strength", "(0, 1]");
    refused(GenerateRequest { strength: Some(0.2), ..base() }, "strength", "no step");
    refused(GenerateRequest { image: Some("not base64!".into()), ..base() }, "image", "base64");
    refused(GenerateRequest { image: Some("aGVsbG8=".into()), ..base() }, "image", "readable image");
    refused(GenerateRequest { image: Some("https://example.com/cat.png".into()), ..base() }, "image", "URL");
    let mut odd = Vec::new();
    image::RgbImage::new(60, 64).write_to(&mut std::io::Cursor::new(&mut odd), image::ImageFormat::Png).unwrap();
    let odd = base64::engine::general_purpose::STANDARD.encode(odd);
    refused(GenerateRequest { image: Some(odd), ..base() }, "image", "multiples of 8");
    refused(GenerateRequest { image: None, strength: Some(0.5), ..base() }, "strength", "image");
    let mut small_mask = Vec::new();
    image::GrayImage::new(64, 64)
        .write_to(&mut std::io::Cursor::new(&mut small_mask), image::ImageFormat::Png)
        .unwrap();
    let small_mask = base64::engine::general_purpose::STANDARD.encode(small_mask);
    refused(GenerateRequest { mask: Some(small_mask.clone()), ..base() }, "mask", "same size");
    refused(GenerateRequest { mask: Some("???".into()), ..base() }, "mask", "base64");
    refused(GenerateRequest { image: None, mask: Some(small_mask), ..base() }, "mask", "image");
    // A data URL is read like the bare base64.
    let url = format!("data:image/png;base64,{}", input_base64());
    let a = pipeline.generate(&GenerateRequest { image: Some(url), ..base() }, &mut |_| Control::Continue).unwrap();
    let b = pipeline.generate(&base(), &mut |_| Control::Continue).unwrap();
    assert_eq!(a.images[0].as_raw(), b.images[0].as_raw());
}
