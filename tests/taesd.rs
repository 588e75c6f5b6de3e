//! TAESD-XL (`AutoencoderTiny`) decoding against diffusers (tests/fixtures/taesd_refs.safetensors, from
//! scripts/make_tiny_taesd.py with models/tiny-taesdxl), its loading errors, and the latent previews.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::TempDir;
use dreamshaper::loading::{load_taesd, DEFAULT_TAESD};
use dreamshaper::pipeline::to_image;
use dreamshaper::preview::{LatentRgb, Previewer, SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS};
use dreamshaper::Error;
use serde_json::{json, Value};

fn tiny_taesd() -> PathBuf {
    common::root().join("models/tiny-taesdxl")
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::root().join("tests/fixtures/taesd_refs.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A copy of the tiny TAESD with its config edited by `edit`, removed when dropped.
fn edited_copy(label: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> TempDir {
    let dir = TempDir::new(&format!("taesd-{label}"));
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(tiny_taesd().join(file), dir.join(file)).unwrap();
    }
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

fn load(dir: &Path) -> dreamshaper::Result<dreamshaper::models::taesd::TaesdDecoder> {
    load_taesd(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
}

#[test]
fn decode_matches_diffusers() {
    let refs = refs();
    let taesd = load(&tiny_taesd()).unwrap();
    assert_eq!(taesd.config.scale_factor(), 8);
    for case in ["a", "b"] {
        let (latents, expected) = (&refs[&format!("{case}.latents")], &refs[&format!("{case}.image")]);
        let image = taesd.decode_latents(latents).unwrap();
        assert_eq!(image.dtype(), DType::F32);
        let err = max_abs_diff(&image, expected);
        eprintln!("TAESD decode {case} {:?}: max |ours − diffusers| = {err:.3e}", latents.dims());
        assert!(err <= 1.0 / 255.0, "case {case}: max error {err}");
        // The previewer's decode is the same decode (the path for a TAESD final decoder).
        let via_previewer = Previewer::Taesd(taesd.clone()).decode(latents).unwrap();
        assert_eq!(max_abs_diff(&via_previewer, &image), 0.0);
    }
}

/// The latents are divided by the config's `scaling_factor` (1.0 for taesdxl) before decoding, as the SDXL pipeline
/// does: with 0.5, latents halved decode to the reference image.
#[test]
fn decode_divides_by_the_scaling_factor() {
    let refs = refs();
    let dir = edited_copy("scaling", |c| {
        c.insert("scaling_factor".into(), json!(0.5));
    });
    let taesd = load(&dir).unwrap();
    let image = taesd.decode_latents(&(&refs["a.latents"] * 0.5).unwrap()).unwrap();
    assert!(max_abs_diff(&image, &refs["a.image"]) <= 1.0 / 255.0);
}

/// bf16 runs in CPU mixed precision (bf16 convolutions, f32 activations), f16 in f16: both close to the f32 decode.
#[test]
fn half_precision_decodes_close_to_f32() {
    let refs = refs();
    for (dtype, tolerance) in [(DType::BF16, 0.1), (DType::F16, 0.02)] {
        let taesd = load_taesd(tiny_taesd().to_str().unwrap(), dtype, &Device::Cpu).unwrap();
        let image = taesd.decode_latents(&refs["b.latents"]).unwrap();
        let err = max_abs_diff(&image, &refs["b.image"]);
        eprintln!("{dtype:?} (computing in {:?}): max error {err:.3e}", taesd.dtype());
        assert!(err <= tolerance, "{dtype:?}: max error {err}");
    }
}

#[test]
fn latents_of_another_model_are_a_clear_error() {
    let taesd = load(&tiny_taesd()).unwrap();
    let latents = Tensor::zeros((1, 16, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = taesd.decode_latents(&latents).unwrap_err().to_string();
    assert!(e.contains("16 channels") && e.contains("latent_channels"), "{e}");
}

#[test]
fn missing_files_are_named() {
    let dir = edited_copy("no-weights", |_| {});
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains(dir.to_str().unwrap()) && e.contains("diffusion_pytorch_model.safetensors"), "{e}");

    let dir = edited_copy("no-config", |_| {});
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains(dir.to_str().unwrap()) && e.contains("config.json"), "{e}");

    // A file is not a TAESD; neither is a name that is no folder and no hub id.
    let file = tiny_taesd().join("config.json");
    let e = load(&file).unwrap_err().to_string();
    assert!(e.contains("is a file") && e.contains(DEFAULT_TAESD), "{e}");
    let e = load_taesd("./no/such/taesd", DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("TAESD") && e.contains("neither an existing folder nor a hub id"), "{e}");
}

#[test]
fn malformed_weights_name_the_file() {
    let dir = edited_copy("garbage", |_| {});
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains(weights.to_str().unwrap()) && e.contains("truncated or corrupt"), "{e}");
}

/// Each bad config is an error naming config.json and the key.
#[test]
fn bad_configs_name_the_key() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("num_decoder_blocks", json!([3, 3, 3]), "4"),
        ("decoder_block_out_channels", json!("64"), "invalid type"),
        ("decoder_block_out_channels", json!([]), "empty"),
        ("act_fn", json!("tanh"), "unknown variant"),
        ("upsample_fn", json!("bilinear"), "unknown variant"),
        ("_class_name", json!("AutoencoderKL"), "AutoencoderTiny"),
        ("out_channels", json!(4), "RGB"),
        ("scaling_factor", json!(0.0), "non-zero"),
        ("upsampling_scaling_factor", json!(0), "1 to 64"),
    ];
    for (key, value, says) in cases {
        let dir = edited_copy("bad-config", |c| {
            c.insert(key.into(), value.clone());
        });
        match load(&dir) {
            Err(Error::ConfigKey { path, key: named, message }) => {
                assert!(path.ends_with("config.json"), "{key}: {}", path.display());
                assert_eq!(named, key);
                assert!(message.contains(says), "{key} = {value}: {message}");
            }
            Err(e) => panic!("{key} = {value}: not a config-key error: {e}"),
            Ok(_) => panic!("{key} = {value}: loaded"),
        }
    }
}

/// A config that does not fit the weights: the file and the tensor are named.
#[test]
fn config_disagreeing_with_the_weights_names_the_tensor() {
    let dir = edited_copy("wider", |c| {
        c.insert("decoder_block_out_channels".into(), json!([16, 8, 8, 8]));
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("taesd") && e.contains("decoder.layers.0.weight") && e.contains("[8, 4, 3, 3]"), "{e}");

    let dir = edited_copy("deeper", |c| {
        c.insert("num_decoder_blocks".into(), json!([3, 3, 3, 2]));
    });
    let e = load(&dir).unwrap_err().to_string();
    assert!(e.contains("missing tensor") && e.contains("decoder.layers.18.conv.0.weight"), "{e}");
}

/// The hub's config was written by an older diffusers: without `upsample_fn` and `shift_factor` (as the tiny
/// config), and without `_class_name` or `block_out_channels` it still loads with diffusers' defaults.
#[test]
fn sparse_config_takes_diffusers_defaults() {
    let dir = edited_copy("sparse", |c| {
        for key in ["_class_name", "_diffusers_version", "block_out_channels", "act_fn", "scaling_factor"] {
            c.remove(key);
        }
    });
    let refs = refs();
    let image = load(&dir).unwrap().decode_latents(&refs["b.latents"]).unwrap();
    assert!(max_abs_diff(&image, &refs["b.image"]) <= 1.0 / 255.0);
}

/// A hub id (the default, madebyollin/taesdxl) resolves through the Hugging Face cache, here offline.
#[test]
fn hub_id_loads_from_the_local_cache() {
    let cache = TempDir::new("taesd-hub");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--madebyollin--taesdxl");
    let snapshot = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(tiny_taesd().join(file), snapshot.join(file)).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    // Process-wide; the only test of this binary that reads the hub.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let taesd = load_taesd(DEFAULT_TAESD, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(taesd.config.decoder_block_out_channels, vec![8; 4]);
    let e = load_taesd("tester/no-taesd", DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("tester/no-taesd") && e.contains("config.json") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn taesd_preview_is_the_first_image() {
    let refs = refs();
    let previewer = Previewer::Taesd(load(&tiny_taesd()).unwrap());
    let image = previewer.preview(&refs["b.latents"]).unwrap();
    assert_eq!(image.dimensions(), (64, 64));
    let expected = to_image(&refs["b.image"].narrow(0, 0, 1).unwrap()).unwrap();
    let worst = image.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "max pixel difference {worst}");
}

/// The linear preview: image-sized, and each latent pixel's colour is Σ latent·factor + bias, mapped from [-1, 1]
/// to 0..255 as the final image is.
#[test]
fn linear_preview_follows_the_matrix() {
    // Latents (B=2, 4, h=3, w=5), zero but for two pixels of the first image: (x 0, y 0) = [1.0, -0.5, 0.5, 2.0]
    // and (x 4, y 0) = [1.5, -1.0, 0.5, -0.5].
    let mut values = vec![0f32; 2 * 4 * 3 * 5];
    for (c, (a, b)) in [(1.0, 1.5), (-0.5, -1.0), (0.5, 0.5), (2.0, -0.5)].into_iter().enumerate() {
        values[c * 15] = a;
        values[c * 15 + 4] = b;
    }
    let latents = Tensor::from_vec(values, (2, 4, 3, 5), &Device::Cpu).unwrap();
    let image = Previewer::LatentRgb(LatentRgb::sdxl(8)).preview(&latents).unwrap();
    assert_eq!(image.dimensions(), (40, 24), "latent size × 8");
    // By hand, from ComfyUI's SDXL factors, then (x + 1) / 2 · 255 rounded (clamped to 0..255):
    // R = 0.3651·1 + (−0.2533)(−0.5) + 0.1076·0.5 + (−0.3165)·2 + 0.1084 = 0.02095 → 130.17 → 130
    // G = 0.4232 + 0.0021 + 0.05555 − 0.4984 − 0.0175 = −0.03505 → 123.03 → 123
    // B = 0.4341 − 0.0534 − 0.0181 − 0.4376 − 0.0011 = −0.0761 → 117.80 → 118
    // The bilinear enlargement (half-pixel centres) keeps a corner pixel's colour exactly.
    assert_eq!(image.get_pixel(0, 0).0, [130, 123, 118]);
    // R = 0.54765 + 0.2533 + 0.0538 + 0.15825 + 0.1084 = 1.1214 → clamped 255; G = 0.80165 → 229.71 → 230;
    // B = 0.63455 → 208.41 → 208.
    assert_eq!(image.get_pixel(39, 0).0, [255, 230, 208]);
    // A zero latent is the bias: (0.1084, −0.0175, −0.0011) → 141.32, 125.27, 127.36.
    assert_eq!(image.get_pixel(39, 23).0, [141, 125, 127]);

    // The projection itself, at latent size (scale 1), for all pixels and both images.
    let rgb = LatentRgb::sdxl(1).project(&latents).unwrap();
    assert_eq!(rgb.dims(), &[2, 3, 3, 5]);
    let out: Vec<f32> = rgb.flatten_all().unwrap().to_vec1().unwrap();
    let values: Vec<f32> = latents.flatten_all().unwrap().to_vec1().unwrap();
    for b in 0..2 {
        for p in 0..15 {
            for k in 0..3 {
                let expected = (0..4).map(|c| values[b * 60 + c * 15 + p] * SDXL_LATENT_RGB_FACTORS[c][k]).sum::<f32>()
                    + SDXL_LATENT_RGB_BIAS[k];
                let got = out[b * 45 + k * 15 + p];
                assert!((got - expected).abs() < 1e-6, "image {b}, pixel {p}, channel {k}: {got} vs {expected}");
            }
        }
    }
}
