//! Loading: hub ids through the local cache, weight variants, and clear errors for every kind of bad model file.

mod common;

use std::path::Path;

use common::{tiny_model, TempDir};
use dreamshaper::loading::ModelRepo;
use dreamshaper::{Pipeline, PipelineOptions};

/// A private copy of the tiny model that a test may damage, removed when dropped.
fn copy_model(name: &str) -> TempDir {
    let dst = TempDir::new(&format!("test-{name}"));
    copy_dir(&tiny_model(), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn load_all(dir: &Path) -> dreamshaper::Result<()> {
    let p = Pipeline::load(dir.to_str().unwrap(), PipelineOptions::default())?;
    p.load_text_encoders()?;
    p.load_unet()?;
    p.load_vae()?;
    Ok(())
}

#[test]
fn missing_config_names_the_file() {
    let dir = copy_model("missing-config");
    std::fs::remove_file(dir.join("unet/config.json")).unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(e.contains("unet/config.json"), "{e}");
}

#[test]
fn missing_weights_name_the_component() {
    let dir = copy_model("missing-weights");
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(e.contains("vae") && e.contains("diffusion_pytorch_model"), "{e}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_model("truncated");
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(e.contains("unet/diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn garbage_file_is_an_error_not_a_panic() {
    let dir = copy_model("garbage");
    std::fs::write(dir.join("text_encoder/model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header")
        .unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(e.contains("text_encoder/model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_name_file_and_tensor() {
    // A config that disagrees with the weights: the UNet's first block is declared wider than stored.
    let dir = copy_model("wrong-shape");
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!([64, 64, 64]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(
        e.contains("unet/diffusion_pytorch_model.safetensors")
            && e.contains("down_blocks.0.")
            && e.contains("has shape [32]"),
        "{e}"
    );

    // A layer more than the weights hold: the missing tensor is named.
    let dir = copy_model("missing-tensor");
    let cfg_path = dir.join("text_encoder_2/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = serde_json::json!(4);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_all(&dir).unwrap_err().to_string();
    assert!(e.contains("missing tensor") && e.contains("layers.3"), "{e}");
}

#[test]
fn sd15_style_unet_config_is_rejected_with_reason() {
    let dir = copy_model("sd15");
    let cfg_path = dir.join("unet/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["addition_embed_type"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Pipeline::load(dir.to_str().unwrap(), PipelineOptions::default()).err().unwrap().to_string();
    assert!(e.contains("unet/config.json") && e.contains("text_time"), "{e}");
}

#[test]
fn fp16_variant_is_preferred_only_in_f16() {
    let dir = copy_model("variant");
    std::fs::copy(
        dir.join("unet/diffusion_pytorch_model.safetensors"),
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let repo = ModelRepo::folder(&dir);
    let f32_files = repo.weights("unet", "diffusion_pytorch_model", false).unwrap();
    let f16_files = repo.weights("unet", "diffusion_pytorch_model", true).unwrap();
    assert!(f32_files[0].ends_with("unet/diffusion_pytorch_model.safetensors"));
    assert!(f16_files[0].ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    // With only the variant present, f32 runs fall back to it.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let only = repo.weights("unet", "diffusion_pytorch_model", false).unwrap();
    assert!(only[0].ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
}

#[test]
fn not_a_model_path_or_id() {
    let e = ModelRepo::open("./no/such/dir").unwrap_err().to_string();
    assert!(e.contains("neither an existing folder nor a hub id"), "{e}");
}

/// A hub id resolves through the Hugging Face cache layout (`models--owner--name/snapshots/<rev>/…`), offline.
#[test]
fn hub_id_loads_from_the_local_cache_offline() {
    let cache = TempDir::new("test-hub");
    let repo_dir = cache.join("models--tester--tiny-sdxl");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    copy_dir(&tiny_model(), &repo_dir.join("snapshots").join(rev));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), rev).unwrap();
    // Environment variables are process-wide; this is the only test that sets them.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let p = Pipeline::load("tester/tiny-sdxl", PipelineOptions::default()).unwrap();
    p.load_text_encoders().unwrap();
    p.load_unet().unwrap();
    let e = Pipeline::load("tester/not-cached", PipelineOptions::default()).err().unwrap().to_string();
    assert!(e.contains("tester/not-cached") && e.contains("model_index.json") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

/// transformers ≥ 5.6 saves CLIP text models without the `text_model.` prefix; both layouts give the same encoder.
#[test]
fn clip_keys_without_text_model_prefix_load_identically() {
    use candle_core::{Device, Tensor};
    let dir = copy_model("no-prefix");
    let path = dir.join("text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.strip_prefix("text_model.").map(str::to_string).unwrap_or(k), v)).collect();
    assert!(renamed.keys().all(|k| !k.starts_with("text_model.")));
    candle_core::safetensors::save(&renamed, &path).unwrap();

    let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 320, 23610, 2368, 49407]], &Device::Cpu).unwrap();
    let encode = |model: &Path| {
        let p = Pipeline::load(model.to_str().unwrap(), PipelineOptions::default()).unwrap();
        p.load_text_encoders().unwrap().text_encoder.forward(&ids).unwrap().penultimate
    };
    let diff = (encode(&dir) - encode(&tiny_model())).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}
