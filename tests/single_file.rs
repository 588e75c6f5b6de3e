//! Single-file checkpoints in the original (SGM) layout: the same tensors and the same image as the diffusers
//! folder, every key of a full-size SDXL checkpoint mapped one to one, and clear errors for bad files.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{root, tiny_model, TempDir};
use dreamshaper::loading::single_file::{Part, SingleFile};
use dreamshaper::loading::{Component, ModelSource, Weights};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, Residency};
use serde_json::json;

fn single_file() -> PathBuf {
    root().join("models/tiny-sdxl-single/tiny-sdxl.safetensors")
}

fn config_folder() -> String {
    root().join("models/tiny-sdxl-config").display().to_string()
}

#[test]
fn every_component_loads_the_same_tensors_as_the_folder() {
    let folder = ModelSource::open(tiny_model().to_str().unwrap(), None, None).unwrap();
    let single = ModelSource::open(single_file().to_str().unwrap(), Some(&config_folder()), None).unwrap();
    for (component, dir, file) in [
        (Component::Unet, "unet", "diffusion_pytorch_model"),
        (Component::Vae, "vae", "diffusion_pytorch_model"),
        (Component::TextEncoder, "text_encoder", "model"),
        (Component::TextEncoder2, "text_encoder_2", "model"),
    ] {
        let names: Vec<String> = Weights::open(&[tiny_model().join(format!("{dir}/{file}.safetensors"))])
            .unwrap()
            .names()
            .map(str::to_string)
            .collect();
        assert!(names.len() > 10);
        let a = folder.var_builder(component, DType::F32, &Device::Cpu).unwrap();
        let b = single.var_builder(component, DType::F32, &Device::Cpu).unwrap();
        for name in &names {
            let (x, y) = (a.get_unchecked(name).unwrap(), b.get_unchecked(name).unwrap());
            assert_eq!(x.dims(), y.dims(), "{component:?} {name}");
            let diff = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{component:?} {name}");
        }
    }
}

#[test]
fn single_file_and_folder_give_the_same_image() {
    let mut request = GenerateRequest::new("a photo of a Grumpy cat, 8k!");
    request.negative_prompt = "blurry".into();
    (request.scheduler, request.num_inference_steps, request.seed, request.samples) = ("Euler".into(), 4, 42, 2);
    (request.img_width, request.img_height) = (96, 64);
    let run = |model: &Path, config: Option<String>| {
        let options = PipelineOptions { config, residency: Residency::Sequential, ..Default::default() };
        let p = Pipeline::load(model.to_str().unwrap(), options).unwrap();
        let g = p.generate(&request, &mut |_| Control::Continue).unwrap();
        (g.images, g.latents.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let (images_a, latents_a) = run(&tiny_model(), None);
    let (images_b, latents_b) = run(&single_file(), Some(config_folder()));
    assert_eq!(latents_a, latents_b);
    assert_eq!(images_a, images_b);
}

#[test]
fn unused_keys_are_reported() {
    let p = Pipeline::load(
        single_file().to_str().unwrap(),
        PipelineOptions { config: Some(config_folder()), ..Default::default() },
    )
    .unwrap();
    let unused = p.unused_keys().unwrap();
    assert!(unused.iter().any(|k| k == "conditioner.embedders.1.model.logit_scale"), "{unused:?}");
    // The VAE's encoder serves image-to-image.
    assert!(unused.iter().all(|k| !k.starts_with("first_stage_model.")), "{unused:?}");
    assert!(unused.iter().all(|k| !k.starts_with("model.diffusion_model.")), "{unused:?}");
}

struct ManifestRow {
    sgm_key: String,
    sgm_shape: Vec<usize>,
    component: String,
    diffusers_key: String,
    diffusers_shape: Vec<usize>,
    transform: String,
    inference: bool,
}

fn manifest() -> Vec<ManifestRow> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/sdxl_keys_manifest.tsv")).unwrap();
    let shape = |s: &str| -> Vec<usize> {
        s.trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap())
            .collect()
    };
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            ManifestRow {
                sgm_key: f[0].into(),
                sgm_shape: shape(f[1]),
                component: f[2].into(),
                diffusers_key: f[3].into(),
                diffusers_shape: if f[4] == "-" { vec![] } else { shape(f[4]) },
                transform: f[5].into(),
                inference: f[6] == "yes",
            }
        })
        .collect()
}

/// Full-size SDXL base keys (made by diffusers on the meta device, see scripts/make_sdxl_key_manifest.py): our
/// mapping sends every inference tensor to the same diffusers tensor with the same transform, and the configs read
/// off the keys are SDXL base's.
#[test]
fn full_size_sdxl_keys_map_one_to_one() {
    let rows = manifest();
    let shapes: BTreeMap<String, Vec<usize>> = rows.iter().map(|r| (r.sgm_key.clone(), r.sgm_shape.clone())).collect();
    let file = SingleFile::from_key_shapes(Path::new("sdxl_keys_manifest.tsv"), shapes);
    file.check_sdxl().unwrap();

    for (part, component) in
        [(Part::Unet, "unet"), (Part::Vae, "vae"), (Part::ClipL, "text_encoder"), (Part::ClipG, "text_encoder_2")]
    {
        let ours: BTreeSet<(String, String, String)> =
            file.mapping(part).unwrap().into_iter().map(|(d, s, t)| (d, s, t.to_string())).collect();
        let expected: BTreeSet<(String, String, String)> = rows
            .iter()
            .filter(|r| r.component == component && r.inference)
            .map(|r| (r.diffusers_key.clone(), r.sgm_key.clone(), r.transform.clone()))
            .collect();
        let missing: Vec<_> = expected.difference(&ours).take(5).collect();
        let extra: Vec<_> = ours.difference(&expected).take(5).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{component}: missing {missing:?}, extra {extra:?}");
    }
    // Every key an inference tensor needs is used; only the manifest's non-inference keys are left over.
    let unused: BTreeSet<String> = file.unused_keys().unwrap().into_iter().collect();
    let not_needed: BTreeSet<String> = rows.iter().filter(|r| !r.inference).map(|r| r.sgm_key.clone()).collect();
    let used_by_inference: BTreeSet<String> = rows.iter().filter(|r| r.inference).map(|r| r.sgm_key.clone()).collect();
    assert_eq!(unused, &not_needed - &used_by_inference);

    // Each transform turns the stored shape into the diffusers shape.
    for r in rows.iter().filter(|r| r.inference) {
        let s = &r.sgm_shape;
        let expected = match r.transform.as_str() {
            "identity" => s.clone(),
            "transpose" => vec![s[1], s[0]],
            "in_proj_q" | "in_proj_k" | "in_proj_v" => [vec![s[0] / 3], s[1..].to_vec()].concat(),
            "conv1x1_to_linear" => s[..2].to_vec(),
            other => panic!("unknown transform {other}"),
        };
        assert_eq!(expected, r.diffusers_shape, "{}", r.sgm_key);
    }

    // The configs read off the keys are SDXL base's.
    let unet = file.unet_config().unwrap();
    let clip_l = file.clip_config(Part::ClipL).unwrap();
    let clip_g = file.clip_config(Part::ClipG).unwrap();
    let vae = file.vae_config().unwrap();
    for (cfg, key, want) in [
        (&unet, "block_out_channels", json!([320, 640, 1280])),
        (&unet, "down_block_types", json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])),
        (&unet, "up_block_types", json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])),
        (&unet, "attention_head_dim", json!([5, 10, 20])),
        (&unet, "layers_per_block", json!([2, 2, 2])),
        (&unet, "transformer_layers_per_block", json!([[1, 1], [2, 2], [10, 10]])),
        (&unet, "mid_block_transformer_layers", json!(10)),
        (&unet, "cross_attention_dim", json!(2048)),
        (&unet, "addition_time_embed_dim", json!(256)),
        (&unet, "projection_class_embeddings_input_dim", json!(2816)),
        (&unet, "use_linear_projection", json!(true)),
        (&clip_l, "hidden_size", json!(768)),
        (&clip_l, "num_hidden_layers", json!(12)),
        (&clip_l, "num_attention_heads", json!(12)),
        (&clip_l, "hidden_act", json!("quick_gelu")),
        (&clip_g, "hidden_size", json!(1280)),
        (&clip_g, "num_hidden_layers", json!(32)),
        (&clip_g, "num_attention_heads", json!(20)),
        (&clip_g, "intermediate_size", json!(5120)),
        (&clip_g, "projection_dim", json!(1280)),
        (&clip_g, "hidden_act", json!("gelu")),
        (&vae, "block_out_channels", json!([128, 256, 512, 512])),
        (&vae, "layers_per_block", json!(2)),
    ] {
        assert_eq!(cfg[key], want, "{key}");
    }
}

fn load_error(model: &Path) -> String {
    Pipeline::load(model.to_str().unwrap(), PipelineOptions { config: Some(config_folder()), ..Default::default() })
        .and_then(|p| p.load_text_encoders().map(|_| p))
        .and_then(|p| p.load_unet().map(|_| p))
        .and_then(|p| p.load_vae().map(|_| ()))
        .unwrap_err()
        .to_string()
}

#[test]
fn truncated_or_lying_files_name_the_file() {
    let dir = TempDir::new("single-bad-files");
    let bytes = std::fs::read(single_file()).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_error(&truncated);
    assert!(e.contains("truncated.safetensors") && e.contains("truncated or corrupt"), "{e}");

    // A header whose offsets point past the end of the data.
    let lying = dir.join("lying.safetensors");
    let header =
        br#"{"model.diffusion_model.out.2.weight":{"dtype":"F16","shape":[4,32,3,3],"data_offsets":[0,999999]}}"#;
    let mut data = (header.len() as u64).to_le_bytes().to_vec();
    data.extend_from_slice(header);
    data.extend_from_slice(&[0u8; 64]);
    std::fs::write(&lying, data).unwrap();
    let e = load_error(&lying);
    assert!(e.contains("lying.safetensors"), "{e}");
}

#[test]
fn wrong_shape_tensor_names_the_stored_key() {
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(single_file(), &Device::Cpu).unwrap();
    let key = "model.diffusion_model.middle_block.1.proj_in.weight";
    let t = tensors[key].clone();
    tensors.insert(key.into(), t.narrow(0, 0, 32).unwrap());
    let dir = TempDir::new("single-wrong-shape");
    let path = dir.join("wrong-shape.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let e = load_error(&path);
    assert!(e.contains(key) && e.contains("wrong-shape.safetensors") && e.contains("shape"), "{e}");
}

#[test]
fn non_sdxl_and_partial_files_are_explained() {
    let dir = TempDir::new("single-partial");
    let write = |name: &str, keys: &[&str]| -> PathBuf {
        let tensors: HashMap<String, Tensor> =
            keys.iter().map(|k| (k.to_string(), Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap())).collect();
        let path = dir.join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    let sd15 = write(
        "sd15.safetensors",
        &[
            "model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "first_stage_model.decoder.conv_in.weight",
        ],
    );
    let e = Pipeline::load(sd15.to_str().unwrap(), PipelineOptions::default()).err().unwrap().to_string();
    assert!(e.contains("1.x/2.x") && e.contains("sd15.safetensors"), "{e}");

    let vae_only = write("vae-only.safetensors", &["decoder.mid.block_1.norm1.weight", "post_quant_conv.weight"]);
    let e = Pipeline::load(vae_only.to_str().unwrap(), PipelineOptions::default()).err().unwrap().to_string();
    assert!(e.contains("--vae"), "{e}");

    // A checkpoint without a VAE needs --vae.
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(single_file(), &Device::Cpu).unwrap();
    tensors.retain(|k, _| !k.starts_with("first_stage_model."));
    let no_vae = dir.join("no-vae.safetensors");
    candle_core::safetensors::save(&tensors, &no_vae).unwrap();
    let e = Pipeline::load(no_vae.to_str().unwrap(), PipelineOptions::default()).err().unwrap().to_string();
    assert!(e.contains("no VAE") && e.contains("--vae"), "{e}");
    // … and works with the tiny model's VAE given as a folder.
    let vae_dir = tiny_model().join("vae").display().to_string();
    let options = PipelineOptions { config: Some(config_folder()), vae: Some(vae_dir), ..Default::default() };
    Pipeline::load(no_vae.to_str().unwrap(), options).unwrap().load_vae().unwrap();
}
