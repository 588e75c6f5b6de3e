//! The VAE encoder against diffusers' `AutoencoderKL.encode` and `StableDiffusionXLImg2ImgPipeline.prepare_latents`
//! (tests/fixtures/vae_encoder.safetensors, made by scripts/make_vae_encoder_refs.py): the distribution, its seeded
//! sample, the image latents and the generator's draw order, from the diffusers folder and the single file; the
//! banded encode against the whole one; clear errors for bad images.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use dreamshaper::models::bands::Bands;
use dreamshaper::models::vae_bands::{encode_in_bands, BandPlan, VaeTiling};
use dreamshaper::models::vae_encoder::VaeEncoder;
use dreamshaper::rng::TorchRng;
use dreamshaper::{Pipeline, PipelineOptions};

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::root().join("tests/fixtures/vae_encoder.safetensors"), &Device::Cpu).unwrap()
}

/// The generator seeds of the script (also in the fixture's metadata).
fn seed(name: &str) -> u64 {
    match name {
        "seed.a" => 11,
        "seed.b" => 12,
        "img2img.seed" => 21,
        _ => unreachable!("{name}"),
    }
}

fn encoder(model: &str, config: Option<String>) -> VaeEncoder {
    let options = PipelineOptions { config, ..Default::default() };
    Pipeline::load(model, options).unwrap().load_vae_encoder().unwrap()
}

fn folder_encoder() -> VaeEncoder {
    encoder(common::tiny_model().to_str().unwrap(), None)
}

const TOLERANCE: f64 = 1e-5;

fn check_against_diffusers(what: &str, vae: &VaeEncoder, refs: &HashMap<String, Tensor>) {
    for name in ["a", "b"] {
        let dist = vae.encode(&refs[&format!("image.{name}")]).unwrap();
        let close = |field: &str, t: &Tensor| {
            common::assert_close(&format!("{what} {name}.{field}"), t, &refs[&format!("{name}.{field}")], TOLERANCE)
        };
        close("mean", &dist.mean);
        close("logvar", &dist.logvar);
        close("std", &dist.std);
        close("mean", &dist.mode());
        let mut rng = TorchRng::new(seed(&format!("seed.{name}")));
        close("sample", &dist.sample(&mut rng).unwrap());
    }
}

#[test]
fn encode_matches_diffusers() {
    check_against_diffusers("folder", &folder_encoder(), &fixture());
}

#[test]
fn single_file_encoder_matches_diffusers() {
    let file = common::root().join("models/tiny-sdxl-single/tiny-sdxl.safetensors");
    let config = common::root().join("models/tiny-sdxl-config").display().to_string();
    check_against_diffusers("single file", &encoder(file.to_str().unwrap(), Some(config)), &fixture());
}

#[test]
fn replacement_vae_folder_gives_its_encoder() {
    let options =
        PipelineOptions { vae: Some(common::tiny_model().join("vae").display().to_string()), ..Default::default() };
    let vae = Pipeline::load(common::tiny_model().to_str().unwrap(), options).unwrap().load_vae_encoder().unwrap();
    let refs = fixture();
    common::assert_close(
        "--vae folder a.mean",
        &vae.encode(&refs["image.a"]).unwrap().mean,
        &refs["a.mean"],
        TOLERANCE,
    );
}

/// `prepare_latents` with one image and two samples: one posterior sample of the image, scaled and repeated, then
/// the noise as the generator's next draw.
#[test]
fn image_latents_and_draw_order_match_img2img() {
    let refs = fixture();
    let vae = folder_encoder();
    for tiling in [VaeTiling::Never, VaeTiling::Always] {
        let mut rng = TorchRng::new(seed("img2img.seed"));
        let plan = BandPlan::for_vae(tiling, &vae.config);
        let latents = vae.latents_from_image(&refs["image.a"], 2, &plan, &mut rng, &mut |_, _| Ok(())).unwrap();
        assert_eq!(latents.dtype(), DType::F32);
        common::assert_close(
            &format!("{tiling:?} img2img init latents"),
            &latents,
            &refs["img2img.init_latents"],
            TOLERANCE,
        );
        let (first, second) = (latents.get(0).unwrap(), latents.get(1).unwrap());
        assert_eq!(first.to_vec3::<f32>().unwrap(), second.to_vec3::<f32>().unwrap(), "samples share one draw");
        let noise = rng.randn_tensor(&[2, 4, 8, 12], &Device::Cpu).unwrap();
        let expected = refs["img2img.noise"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(noise.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected, "noise: the next draw");
    }
}

#[test]
fn banded_encode_equals_the_whole_encode() {
    let refs = fixture();
    let vae = folder_encoder();
    for name in ["image.a", "image.b"] {
        let image = &refs[name];
        let whole = vae.encode_down(image).unwrap();
        // Bands of one row (two for the down-samplers), of a few rows, of odd sizes, and of the whole image.
        for elements in [1, 3 * 96 * 5, 8 * 96 * 3 + 1, usize::MAX] {
            let bands = Bands::new(&Device::Cpu, elements);
            let banded = vae.encode_down_in_bands(image, &bands, &mut |_, _| Ok(())).unwrap();
            common::assert_close(&format!("{name} bands of {elements} elements vs whole"), &banded, &whole, 1e-6);
        }
        let mut calls = Vec::new();
        let dist = encode_in_bands(&vae, image, &mut |done, total| {
            calls.push((done, total));
            Ok(())
        })
        .unwrap();
        // conv_in, 4 down blocks of 2 ResNets, 3 down-samplers.
        assert_eq!(calls, (1..=12).map(|done| (done, 12)).collect::<Vec<_>>());
        let key = name.trim_start_matches("image.");
        common::assert_close(&format!("{name} banded mean"), &dist.mean, &refs[&format!("{key}.mean")], TOLERANCE);
        common::assert_close(
            &format!("{name} banded logvar"),
            &dist.logvar,
            &refs[&format!("{key}.logvar")],
            TOLERANCE,
        );
    }
}

#[test]
fn auto_plan_bands_images_larger_than_the_sample_size() {
    let vae = folder_encoder();
    let plan = BandPlan::for_vae(VaeTiling::Auto, &vae.config);
    assert_eq!(plan.largest_whole, 16, "sample_size 128 / 8");
    // 136 × 8 px: larger than 128, so banded; the same numbers as the whole encode.
    let image = (Tensor::arange(0f32, (3 * 136 * 8) as f32, &Device::Cpu).unwrap() / 1000.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((1, 3, 136, 8))
        .unwrap();
    let planned = vae.encode_planned(&image, &plan, &mut |_, _| Ok(())).unwrap();
    let whole = vae.encode(&image).unwrap();
    common::assert_close("auto-banded vs whole", &planned.mean, &whole.mean, 1e-6);
}

#[test]
fn bad_images_are_refused_clearly() {
    let vae = folder_encoder();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let error = |shape: &[usize]| vae.encode(&zeros(shape)).unwrap_err().to_string();
    let e = error(&[3, 64, 64]);
    assert!(e.contains("(batch, 3, height, width)") && e.contains("[3, 64, 64]"), "{e}");
    let e = error(&[1, 4, 64, 64]);
    assert!(e.contains("4 channels") && e.contains("takes 3"), "{e}");
    for shape in [[1, 3, 60, 64], [1, 3, 64, 65], [1, 3, 0, 64], [0, 3, 64, 64]] {
        let e = error(&shape);
        assert!(e.contains("multiples of 8"), "{shape:?}: {e}");
    }
    let plan = BandPlan::for_vae(VaeTiling::Never, &vae.config);
    let mut rng = TorchRng::new(0);
    let e = vae
        .latents_from_image(&zeros(&[2, 3, 64, 64]), 3, &plan, &mut rng, &mut |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 samples from 2 images"), "{e}");
    let e = encode_in_bands(&vae, &zeros(&[1, 3, 64, 63]), &mut |_, _| Ok(())).unwrap_err().to_string();
    assert!(e.contains("multiples of 8"), "{e}");
}
