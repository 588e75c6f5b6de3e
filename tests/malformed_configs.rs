//! Malformed component configs (`unet/config.json`, `vae/config.json`, `text_encoder*/config.json`): loading the
//! model, then generating a tiny image, is an error that names the file and the key, never a panic, a silently
//! different network or an error from deep inside a forward pass.

mod common;

use std::path::{Path, PathBuf};

use dreamshaper::{Control, Error, GenerateRequest, Pipeline, PipelineOptions, Residency};
use serde_json::{json, Value};

/// A private copy of the tiny model (configs copied, everything else linked), removed when dropped, also when the
/// test fails.
struct TempModel {
    dir: PathBuf,
}

impl TempModel {
    fn new(case: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dreamshaper-malformed-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let model = Self { dir };
        link_or_copy(&common::tiny_model(), &model.dir);
        model
    }

    /// Rewrites the JSON file `rel` (relative to the model folder) with `edit`.
    fn edit(&self, rel: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let path = self.dir.join(rel);
        let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(config.as_object_mut().unwrap());
        std::fs::write(&path, config.to_string()).unwrap();
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The folder tree of `src` at `dst`: JSON files copied (tests edit them), other files linked.
fn link_or_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            link_or_copy(&from, &to);
        } else if from.extension().is_some_and(|e| e == "json") {
            std::fs::copy(&from, &to).unwrap();
        } else {
            #[cfg(unix)]
            std::os::unix::fs::symlink(&from, &to).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(&from, &to).unwrap();
        }
    }
}

/// Loads the model with every component resident, then generates one 64×64 image in one step.
fn load_and_generate(model: &TempModel) -> dreamshaper::Result<()> {
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    let pipeline = Pipeline::load(model.dir.to_str().unwrap(), options)?;
    let mut request = GenerateRequest::new("a cat");
    (request.scheduler, request.num_inference_steps, request.seed) = ("Euler".into(), 1, 1);
    (request.img_width, request.img_height) = (64, 64);
    pipeline.generate(&request, &mut |_| Control::Continue)?;
    Ok(())
}

/// Writes `edit` into `file` of a fresh copy of the tiny model and checks that loading it fails with a
/// [`Error::ConfigKey`] for `file` and `key`, whose message names both.
#[track_caller]
fn assert_rejected(case: &str, file: &str, key: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let model = TempModel::new(case);
    model.edit(file, edit);
    match load_and_generate(&model) {
        Err(e @ Error::ConfigKey { .. }) => {
            let message = e.to_string();
            let Error::ConfigKey { path, key: got, .. } = &e else { unreachable!() };
            assert!(path.ends_with(file) && got == key, "{case}: wrong file or key: {message}");
            assert!(message.contains(file) && message.contains(&format!("`{key}`")), "{case}: {message}");
            eprintln!("{case}: {message}");
        }
        Err(e) => panic!("{case}: expected an error naming {file} and `{key}`, got: {e}"),
        Ok(()) => panic!("{case}: the malformed {file} was accepted"),
    }
}

// unet/config.json

#[test]
fn unet_empty_transformer_layers_per_block() {
    assert_rejected("unet-empty-tlayers", "unet/config.json", "transformer_layers_per_block", |c| {
        c.insert("transformer_layers_per_block".into(), json!([]));
    });
}

#[test]
fn unet_transformer_layers_per_block_shorter_than_the_blocks() {
    assert_rejected("unet-short-tlayers", "unet/config.json", "transformer_layers_per_block", |c| {
        c.insert("transformer_layers_per_block".into(), json!([1, 1]));
    });
}

#[test]
fn unet_nested_transformer_layers_shorter_than_a_block() {
    assert_rejected("unet-nested-tlayers", "unet/config.json", "transformer_layers_per_block[1]", |c| {
        c.insert("transformer_layers_per_block".into(), json!([[1, 1], [1], [2, 2]]));
        c.insert("reverse_transformer_layers_per_block".into(), json!([[2, 2, 2], [1, 1, 1], [1, 1, 1]]));
    });
}

#[test]
fn unet_reverse_transformer_layers_shorter_than_the_blocks() {
    assert_rejected("unet-short-reverse", "unet/config.json", "reverse_transformer_layers_per_block", |c| {
        c.insert("reverse_transformer_layers_per_block".into(), json!([[2, 2, 2]]));
    });
}

#[test]
fn unet_block_out_channels_shorter_than_the_block_types() {
    assert_rejected("unet-short-channels", "unet/config.json", "block_out_channels", |c| {
        c.insert("block_out_channels".into(), json!([32, 64]));
    });
}

#[test]
fn unet_down_block_types_shorter_than_the_channels() {
    assert_rejected("unet-short-down", "unet/config.json", "down_block_types", |c| {
        c.insert("down_block_types".into(), json!(["DownBlock2D", "CrossAttnDownBlock2D"]));
    });
}

#[test]
fn unet_up_block_types_longer_than_the_channels() {
    assert_rejected("unet-long-up", "unet/config.json", "up_block_types", |c| {
        c.insert(
            "up_block_types".into(),
            json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
        );
    });
}

#[test]
fn unet_attention_head_dim_shorter_than_the_blocks() {
    assert_rejected("unet-short-heads", "unet/config.json", "attention_head_dim", |c| {
        c.insert("attention_head_dim".into(), json!([1, 2]));
    });
}

#[test]
fn unet_empty_num_attention_heads() {
    assert_rejected("unet-empty-num-heads", "unet/config.json", "num_attention_heads", |c| {
        c.insert("num_attention_heads".into(), json!([]));
    });
}

#[test]
fn unet_zero_attention_heads() {
    assert_rejected("unet-zero-heads", "unet/config.json", "attention_head_dim", |c| {
        c.insert("attention_head_dim".into(), json!(0));
    });
}

#[test]
fn unet_layers_per_block_shorter_than_the_blocks() {
    assert_rejected("unet-short-layers", "unet/config.json", "layers_per_block", |c| {
        c.insert("layers_per_block".into(), json!([2, 2]));
    });
}

#[test]
fn unet_zero_norm_num_groups() {
    assert_rejected("unet-zero-groups", "unet/config.json", "norm_num_groups", |c| {
        c.insert("norm_num_groups".into(), json!(0));
    });
}

#[test]
fn unet_channels_not_divisible_by_the_groups() {
    assert_rejected("unet-indivisible-groups", "unet/config.json", "norm_num_groups", |c| {
        c.insert("norm_num_groups".into(), json!(24));
    });
}

#[test]
fn unet_wrong_typed_value() {
    assert_rejected("unet-string-groups", "unet/config.json", "norm_num_groups", |c| {
        c.insert("norm_num_groups".into(), json!("32"));
    });
}

#[test]
fn unet_wrong_typed_list_item() {
    assert_rejected("unet-string-channel", "unet/config.json", "block_out_channels[1]", |c| {
        c.insert("block_out_channels".into(), json!([32, "64", 64]));
    });
}

#[test]
fn unet_missing_required_key() {
    assert_rejected("unet-missing-channels", "unet/config.json", "block_out_channels", |c| {
        c.remove("block_out_channels");
    });
}

// vae/config.json

#[test]
fn vae_empty_block_out_channels() {
    assert_rejected("vae-empty-channels", "vae/config.json", "block_out_channels", |c| {
        c.insert("block_out_channels".into(), json!([]));
    });
}

#[test]
fn vae_missing_norm_num_groups() {
    // The default, 32, does not divide the tiny VAE's 8 channels.
    assert_rejected("vae-missing-groups", "vae/config.json", "norm_num_groups", |c| {
        c.remove("norm_num_groups");
    });
}

#[test]
fn vae_zero_norm_num_groups() {
    assert_rejected("vae-zero-groups", "vae/config.json", "norm_num_groups", |c| {
        c.insert("norm_num_groups".into(), json!(0));
    });
}

#[test]
fn vae_channels_not_divisible_by_the_groups() {
    assert_rejected("vae-indivisible-groups", "vae/config.json", "norm_num_groups", |c| {
        c.insert("norm_num_groups".into(), json!(3));
    });
}

#[test]
fn vae_not_rgb() {
    assert_rejected("vae-out-channels", "vae/config.json", "out_channels", |c| {
        c.insert("out_channels".into(), json!(4));
    });
}

#[test]
fn vae_latents_mean_of_the_wrong_length() {
    assert_rejected("vae-latents-mean", "vae/config.json", "latents_mean", |c| {
        c.insert("latents_mean".into(), json!([0.0, 0.1]));
        c.insert("latents_std".into(), json!([1.0, 1.0, 1.0, 1.0]));
    });
}

#[test]
fn vae_wrong_typed_value() {
    assert_rejected("vae-bool-channels", "vae/config.json", "latent_channels", |c| {
        c.insert("latent_channels".into(), json!(true));
    });
}

// text_encoder/config.json, text_encoder_2/config.json

#[test]
fn text_encoder_zero_attention_heads() {
    assert_rejected("te-zero-heads", "text_encoder/config.json", "num_attention_heads", |c| {
        c.insert("num_attention_heads".into(), json!(0));
    });
}

#[test]
fn text_encoder_hidden_size_not_divisible_by_the_heads() {
    assert_rejected("te-indivisible-heads", "text_encoder/config.json", "num_attention_heads", |c| {
        c.insert("num_attention_heads".into(), json!(5));
    });
}

#[test]
fn text_encoder_2_without_layers() {
    assert_rejected("te2-no-layers", "text_encoder_2/config.json", "num_hidden_layers", |c| {
        c.insert("num_hidden_layers".into(), json!(0));
    });
}

#[test]
fn text_encoder_2_unknown_activation() {
    assert_rejected("te2-activation", "text_encoder_2/config.json", "hidden_act", |c| {
        c.insert("hidden_act".into(), json!("relu6"));
    });
}

#[test]
fn text_encoder_2_missing_required_key() {
    assert_rejected("te2-missing-hidden", "text_encoder_2/config.json", "hidden_size", |c| {
        c.remove("hidden_size");
    });
}
