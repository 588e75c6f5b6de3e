//! Banded VAE decoding: the banded image equals the whole-image decode (diffusers' untiled `vae.decode`, from
//! tests/fixtures/vae_tiling.safetensors made by scripts/make_vae_tiling_refs.py) within 1/255, bands are chosen by
//! size in `Auto`, and the pipeline uses them.

mod common;

use candle_core::{Device, Tensor};
use dreamshaper::models::bands::Bands;
use dreamshaper::models::vae_bands::{decode_in_bands, BandPlan, VaeTiling};
use dreamshaper::pipeline::to_image;
use dreamshaper::{Pipeline, PipelineOptions};

fn fixture() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(common::root().join("tests/fixtures/vae_tiling.safetensors"), &Device::Cpu).unwrap()
}

fn pipeline(vae_tiling: VaeTiling) -> Pipeline {
    let options = PipelineOptions { vae_tiling, ..Default::default() };
    Pipeline::load(common::tiny_model().to_str().unwrap(), options).unwrap()
}

fn pixels(t: &Tensor) -> Vec<u8> {
    to_image(t).unwrap().into_raw()
}

#[test]
fn banded_decode_gives_the_untiled_image() {
    let refs = fixture();
    let (z, untiled) = (&refs["z"], &refs["untiled"]);
    let vae = pipeline(VaeTiling::Auto).load_vae().unwrap();
    let plan = BandPlan::for_vae(VaeTiling::Auto, &vae.config);
    assert_eq!(plan.largest_whole, 16, "sample_size 128 / 8");
    let whole = vae.decode(z).unwrap();
    common::assert_close("untiled decode vs diffusers", &whole, untiled, 1e-4);

    let mut calls = Vec::new();
    let tiled = decode_in_bands(&vae, z, &mut |done, total| {
        calls.push((done, total));
        Ok(())
    })
    .unwrap();
    // 4 up blocks of 3 ResNets, 3 up-samplers, the output layer.
    assert_eq!(calls, (1..=16).map(|done| (done, 16)).collect::<Vec<_>>());
    assert_eq!(tiled.dims(), untiled.dims());
    let diff = common::mean_abs_pixel_diff(&pixels(&tiled), &pixels(untiled));
    eprintln!("tiled vs untiled decode: {diff:.4}/255 mean absolute");
    assert!(diff <= 1.0, "tiled vs untiled: {diff}/255 (goal ≤ 1/255)");
    // For comparison: diffusers' `enable_tiling()` decode of the same latents (tiles with their own statistics).
    let diffusers = common::mean_abs_pixel_diff(&pixels(&refs["tiled"]), &pixels(untiled));
    eprintln!("diffusers' tiled decode vs untiled: {diffusers:.4}/255");
    assert!(diffusers > 1.0, "the fixture's tiled decode should show what tile-local statistics cost");
    // Worst pixel too (rounding aside): a seam would show as rows far off.
    let (a, b) = (pixels(&tiled), pixels(untiled));
    let worst = a.iter().zip(&b).map(|(&x, &y)| x.abs_diff(y)).max().unwrap();
    eprintln!("worst pixel: {worst}/255");
    assert!(worst <= 1, "tiled vs untiled: a pixel differs by {worst}/255");
}

#[test]
fn bands_of_any_height_give_the_whole_layer() {
    // The upper decoder (ResNets with and without shortcut convs, up-samplers, the output layer) in bands of one
    // row, of a few rows, and of the whole image, against the whole-image forward.
    let refs = fixture();
    let vae = pipeline(VaeTiling::Auto).load_vae().unwrap();
    let middle = vae.decode_middle(&refs["z"]).unwrap();
    let whole = vae.decode_upper(&middle).unwrap();
    for elements in [1, 3 * 32 * 28, usize::MAX] {
        let bands = Bands::new(&Device::Cpu, elements);
        let banded = vae.decode_upper_in_bands(&middle, &bands, &mut |_, _| Ok(())).unwrap();
        common::assert_close(&format!("bands of {elements} elements vs whole"), &banded, &whole, 1e-5);
    }
}

#[test]
fn auto_bands_only_images_larger_than_the_vae_sample_size() {
    let plan = |tiling| BandPlan { tiling, largest_whole: 16 };
    assert!(!plan(VaeTiling::Auto).in_bands(16, 16));
    assert!(plan(VaeTiling::Auto).in_bands(16, 17));
    assert!(plan(VaeTiling::Always).in_bands(8, 8));
    assert!(!plan(VaeTiling::Never).in_bands(400, 400));
    // A VAE trained on images smaller than its down-sampling factor: every image is larger.
    assert!(BandPlan { tiling: VaeTiling::Auto, largest_whole: 0 }.in_bands(1, 1));
}

#[test]
fn pipeline_decodes_large_images_in_bands_like_the_whole_image() {
    let latents = (fixture()["z"].clone() * 0.13025).unwrap();
    let decode = |tiling| {
        let mut stages = Vec::new();
        let images = pipeline(tiling)
            .decode(&latents, &mut |p| {
                if let dreamshaper::Progress::Stage(name) = p {
                    stages.push(*name);
                }
                dreamshaper::Control::Continue
            })
            .unwrap();
        (images, stages.contains(&"decoding in bands"))
    };
    let ((tiled, banded), (whole, whole_banded)) = (decode(VaeTiling::Auto), decode(VaeTiling::Never));
    assert!(banded, "Auto decodes an image larger than the VAE's tile in bands");
    assert!(!whole_banded, "Never decodes the whole image at once");
    assert_eq!((tiled[0].width(), tiled[0].height()), (224, 320));
    let diff = common::mean_abs_pixel_diff(tiled[0].as_raw(), whole[0].as_raw());
    assert!(diff <= 0.01, "pipeline's banded image vs the whole-image decode: {diff}/255");
    let (forced, forced_banded) = decode(VaeTiling::Always);
    assert!(forced_banded && forced[0].as_raw() == tiled[0].as_raw(), "Always bands like Auto does for this size");
}
