//! Tiled VAE decoding: equal to diffusers' `enable_tiling()` decode (tests/fixtures/vae_tiling.safetensors, made by
//! scripts/make_vae_tiling_refs.py), seamless against the untiled decode, chosen by size in `Auto`, and through the
//! pipeline.

mod common;

use candle_core::{Device, Tensor};
use dreamshaper::models::vae_tiling::{tiled_decode, TileSize, VaeTiling};
use dreamshaper::pipeline::to_image;
use dreamshaper::{Pipeline, PipelineOptions};

fn fixture() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(common::root().join("tests/fixtures/vae_tiling.safetensors"), &Device::Cpu).unwrap()
}

fn pipeline(vae_tiling: VaeTiling) -> Pipeline {
    let options = PipelineOptions { vae_tiling, ..Default::default() };
    Pipeline::load(common::tiny_model().to_str().unwrap(), options).unwrap()
}

#[test]
fn tiled_decode_matches_diffusers_and_the_untiled_image() {
    let refs = fixture();
    let (z, expected) = (&refs["z"], &refs["tiled"]);
    let vae = pipeline(VaeTiling::Auto).load_vae().unwrap();
    let tiles = TileSize::from_vae(&vae).unwrap();
    assert_eq!(tiles, TileSize::new(128, 16, 0.25).unwrap(), "diffusers' tile geometry for sample_size 128");
    let mut seen = 0;
    let ours = tiled_decode(&vae, z, tiles, &mut |done, total| {
        seen = done;
        assert_eq!(total, 12, "4 rows × 3 columns of tiles");
    })
    .unwrap();
    assert_eq!(seen, 12);
    common::assert_close("tiled decode vs diffusers", &ours, expected, 1e-4);

    // Tiles see only their own GroupNorm statistics and mid-block attention context, so a tiled image differs
    // from the whole-image decode; ours differs exactly as diffusers' does (with this random-weight tiny VAE, whose
    // statistics vary much more across the image than a trained VAE's, by several levels).
    let whole = vae.decode(z).unwrap();
    common::assert_close("untiled decode vs diffusers", &whole, &refs["untiled"], 1e-4);
    let pixels = |t: &Tensor| to_image(t).unwrap().into_raw();
    let ours_diff = common::mean_abs_pixel_diff(&pixels(&ours), &pixels(&whole));
    let theirs_diff = common::mean_abs_pixel_diff(&pixels(expected), &pixels(&refs["untiled"]));
    eprintln!("tiled vs untiled: ours {ours_diff:.3}/255, diffusers {theirs_diff:.3}/255");
    assert!((ours_diff - theirs_diff).abs() < 0.01, "ours {ours_diff} vs diffusers {theirs_diff}");
    assert!(common::mean_abs_pixel_diff(&pixels(&ours), &pixels(expected)) < 0.01);
}

#[test]
fn auto_tiles_only_images_larger_than_the_vae_tile() {
    let tiles = TileSize::new(128, 16, 0.25).unwrap();
    assert!(!tiles.applies(VaeTiling::Auto, 16, 16));
    assert!(tiles.applies(VaeTiling::Auto, 16, 17));
    assert!(tiles.applies(VaeTiling::Always, 8, 8));
    assert!(!tiles.applies(VaeTiling::Never, 400, 400));
    for (sample, latent, overlap) in [(0, 16, 0.25), (128, 0, 0.25), (128, 16, 1.0), (128, 1, 0.5)] {
        let e = TileSize::new(sample, latent, overlap).unwrap_err().to_string();
        assert!(e.contains("VAE tiling"), "{e}");
    }
}

#[test]
fn pipeline_decodes_large_images_in_tiles_like_the_whole_image() {
    let latents = (fixture()["z"].clone() * 0.13025).unwrap();
    let tiled = pipeline(VaeTiling::Auto).decode(&latents, &mut |_| dreamshaper::Control::Continue).unwrap();
    let whole = pipeline(VaeTiling::Never).decode(&latents, &mut |_| dreamshaper::Control::Continue).unwrap();
    assert_eq!((tiled[0].width(), tiled[0].height()), (224, 320));
    let reference = to_image(&fixture()["tiled"]).unwrap().into_raw();
    let diff = common::mean_abs_pixel_diff(tiled[0].as_raw(), &reference);
    assert!(diff < 0.01, "pipeline's auto-tiled image vs diffusers' tiled decode: {diff}/255");
    assert!(tiled[0].as_raw() != whole[0].as_raw(), "Never must decode the whole image at once");
    let forced = pipeline(VaeTiling::Always).decode(&latents, &mut |_| dreamshaper::Control::Continue).unwrap();
    assert!(forced[0].as_raw() == tiled[0].as_raw(), "Always tiles like Auto does for this size");
}
