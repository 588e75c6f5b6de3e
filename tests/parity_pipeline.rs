//! End-to-end: every reference request through `Pipeline::generate` gives diffusers' images (mean absolute pixel
//! difference ≤ 0.5/255) and final latents. The requests are read as diffusers reads prompts (`prompt_syntax: none`:
//! two of them are longer than 77 tokens, which A1111's reading, the default, encodes in full).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{assert_close, mean_abs_pixel_diff, tiny_model, Reference};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, PromptSyntax, Residency};

/// The tiny model with its scheduler config changed (e.g. a v-prediction model): a folder whose components link to
/// the tiny model's and whose `scheduler/scheduler_config.json` carries the overrides.
fn model_with_scheduler_overrides(overrides: &serde_json::Map<String, serde_json::Value>) -> PathBuf {
    if overrides.is_empty() {
        return tiny_model();
    }
    let tag: String = serde_json::to_string(overrides).unwrap().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let dir = std::env::temp_dir().join(format!("dreamshaper-parity-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    for entry in std::fs::read_dir(tiny_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "scheduler" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let path = tiny_model().join("scheduler/scheduler_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (k, v) in overrides {
        config[k] = v.clone();
    }
    std::fs::write(dir.join("scheduler/scheduler_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn generated_images_match_diffusers() {
    let r = Reference::load();
    let mut pipelines: HashMap<String, Pipeline> = HashMap::new();
    let cases = r.json["e2e"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let overrides = case["scheduler_config_overrides"].as_object().cloned().unwrap_or_default();
        let pipeline = pipelines.entry(serde_json::to_string(&overrides).unwrap()).or_insert_with(|| {
            let model = model_with_scheduler_overrides(&overrides);
            let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
            Pipeline::load(model.to_str().unwrap(), options).unwrap()
        });
        let mut request: GenerateRequest = serde_json::from_value(case["request"].clone()).unwrap();
        request.prompt_syntax = PromptSyntax::None;
        let mut evaluations = 0;
        let generation = pipeline
            .generate(&request, &mut |p| {
                if let dreamshaper::Progress::Step { evaluation, .. } = p {
                    evaluations = *evaluation;
                }
                Control::Continue
            })
            .unwrap();
        assert_eq!(generation.seed, request.seed as u64);
        assert_eq!(evaluations, case["unet_timesteps_seen"].as_array().unwrap().len(), "{name}: model evaluations");
        assert_close(&format!("{name} latents"), &generation.latents, &r.get(case["latents"].as_str().unwrap()), 1e-4);
        let expected = r.get(case["images"].as_str().unwrap());
        let (n, h, w, _) = expected.dims4().unwrap();
        assert_eq!(generation.images.len(), n, "{name}: image count");
        let mut ours = Vec::new();
        for image in &generation.images {
            assert_eq!((image.height() as usize, image.width() as usize), (h, w), "{name}: image size");
            ours.extend_from_slice(image.as_raw());
        }
        let theirs = expected.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diff = mean_abs_pixel_diff(&ours, &theirs);
        eprintln!("{name}: mean abs pixel diff {diff:.4}/255");
        assert!(diff <= 0.5, "{name}: mean abs pixel difference {diff}/255 > 0.5/255");
    }
}
