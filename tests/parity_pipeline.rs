//! End-to-end: every reference request through `Pipeline::generate` gives diffusers' images (mean absolute pixel
//! difference ≤ 0.5/255) and final latents. The requests are read as diffusers reads prompts (`prompt_syntax: none`:
//! two of them are longer than 77 tokens, which A1111's reading, the default, encodes in full).

mod common;

use common::{assert_close, mean_abs_pixel_diff, tiny_model, Reference};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, PromptSyntax, Residency};

#[test]
fn generated_images_match_diffusers() {
    let r = Reference::load();
    let pipeline = Pipeline::load(
        tiny_model().to_str().unwrap(),
        PipelineOptions { residency: Residency::Resident, ..Default::default() },
    )
    .unwrap();
    let cases = r.json["e2e"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
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
