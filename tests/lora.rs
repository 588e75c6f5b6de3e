//! LoRA files of every supported layout give diffusers' images (tests/fixtures/lora_refs.*, made by
//! scripts/make_lora_refs.py with `load_lora_weights` + `set_adapters`): each format alone, two at once with their
//! own weights, a negative weight; files of other kinds are refused by name; a resident pipeline switches LoRAs
//! and returns to the exact base weights.

mod common;

use common::{mean_abs_pixel_diff, root, tiny_model};
use dreamshaper::adapters::LoraSpec;
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, PromptSyntax, Residency};
use serde_json::Value;

fn refs() -> (std::collections::HashMap<String, candle_core::Tensor>, Value) {
    let dir = root().join("tests/fixtures");
    let tensors = candle_core::safetensors::load(dir.join("lora_refs.safetensors"), &candle_core::Device::Cpu).unwrap();
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("lora_refs.json")).unwrap()).unwrap();
    (tensors, json)
}

fn specs(case: &Value) -> Vec<LoraSpec> {
    case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraSpec { path: root().join(l["file"].as_str().unwrap()), weight: l["weight"].as_f64().unwrap() })
        .collect()
}

fn request(case: &Value) -> GenerateRequest {
    let call = &case["diffusers_call"];
    let mut r = GenerateRequest::new(call["prompt"].as_str().unwrap());
    r.negative_prompt = call["negative_prompt"].as_str().unwrap_or("").to_string();
    r.scheduler = "Euler".into();
    r.num_inference_steps = call["num_inference_steps"].as_u64().unwrap() as u32;
    r.guidance_scale = call["guidance_scale"].as_f64().unwrap();
    r.seed = 42;
    r.img_width = call["width"].as_u64().unwrap() as u32;
    r.img_height = call["height"].as_u64().unwrap() as u32;
    r.prompt_syntax = PromptSyntax::None;
    r
}

fn image_bytes(pipeline: &Pipeline, request: &GenerateRequest) -> Vec<u8> {
    let generation = pipeline.generate(request, &mut |_| Control::Continue).unwrap();
    generation.images.iter().flat_map(|i| i.as_raw().iter().copied()).collect()
}

#[test]
fn every_lora_layout_gives_diffusers_image() {
    let (tensors, json) = refs();
    let mut checked = 0;
    for case in json["cases"].as_array().unwrap() {
        if !case["embeddings"].as_array().unwrap().is_empty() || case["loras"].as_array().unwrap().is_empty() {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let options = PipelineOptions { loras: specs(case), ..Default::default() };
        let pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
        let ours = image_bytes(&pipeline, &request(case));
        let theirs = tensors[case["images"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diff = mean_abs_pixel_diff(&ours, &theirs);
        let moved = case["mean_abs_diff_from_base"].as_f64().unwrap();
        eprintln!("{name}: {diff:.4}/255 from diffusers' (the LoRA moves the image {moved:.1}/255)");
        assert!(moved >= 10.0, "{name}: the fixture's LoRA must move the image");
        assert!(diff <= 0.5, "{name}: {diff}/255 from diffusers' image");
        checked += 1;
    }
    assert!(checked >= 6, "each layout, two at once and a negative weight");
}

#[test]
fn other_kinds_of_files_are_refused_by_name() {
    let dir = root().join("models/tiny-sdxl-loras");
    for (file, words) in
        [("sd15.safetensors", vec!["sd15.safetensors"]), ("loha.safetensors", vec!["LoHa", "loha.safetensors"])]
    {
        let options =
            PipelineOptions { loras: vec![LoraSpec { path: dir.join(file), weight: 1.0 }], ..Default::default() };
        let e = Pipeline::load(tiny_model().to_str().unwrap(), options).err().unwrap().to_string();
        assert!(words.iter().all(|w| e.contains(w)), "{file}: {e}");
    }
    let missing = LoraSpec { path: dir.join("nope.safetensors"), weight: 1.0 };
    let e =
        Pipeline::load(tiny_model().to_str().unwrap(), PipelineOptions { loras: vec![missing], ..Default::default() })
            .err()
            .unwrap()
            .to_string();
    assert!(e.contains("nope.safetensors"), "{e}");
}

#[test]
fn a_resident_pipeline_switches_loras_and_restores_the_base_weights_exactly() {
    let (tensors, json) = refs();
    let case = |name: &str| json["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    let mut pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
    let base_case = case("base");
    let base = image_bytes(&pipeline, &request(&base_case));
    let lora_case = case("kohya_sgm");
    pipeline.set_loras(&specs(&lora_case)).unwrap();
    let with_lora = image_bytes(&pipeline, &request(&lora_case));
    let theirs = tensors[lora_case["images"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert!(mean_abs_pixel_diff(&with_lora, &theirs) <= 0.5);
    pipeline.set_loras(&[]).unwrap();
    assert_eq!(image_bytes(&pipeline, &request(&base_case)), base, "bit-identical to the image before the LoRA");
}

/// `<lora:NAME:W>` in the prompt (A1111 syntax) and the request's `loras` field, both found in the LoRA directory,
/// give diffusers' image of the two LoRAs; the images' parameters record them as A1111 does.
#[test]
fn prompt_tags_and_the_request_field_load_from_the_lora_directory() {
    let (tensors, json) = refs();
    let case = json["cases"].as_array().unwrap().iter().find(|c| c["name"] == "kohya_sgm_0.6_peft_0.8").unwrap();
    let options = PipelineOptions { lora_dir: Some(root().join("models/tiny-sdxl-loras")), ..Default::default() };
    let mut pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
    let mut request = request(case);
    request.prompt_syntax = PromptSyntax::A1111;
    request.prompt = format!("{} <lora:kohya_sgm:0.6>", request.prompt);
    request.loras = vec![dreamshaper::adapters::LoraRequest { name: "peft".into(), weight: 0.8 }];
    let explained = pipeline.explain_prompt(&request).unwrap();
    assert!(
        explained.contains("kohya_sgm.safetensors (weight 0.6)") && explained.contains("peft.safetensors (weight 0.8)")
    );
    let generation = pipeline.generate_with_loras(&request, &mut |_| Control::Continue).unwrap();
    let ours: Vec<u8> = generation.images[0].as_raw().to_vec();
    let theirs = tensors[case["images"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let diff = mean_abs_pixel_diff(&ours, &theirs);
    assert!(diff <= 0.5, "{diff}/255 from diffusers' image");
    // A1111's short hashes (SHA-256 of the file after its header), computed with Python's hashlib.
    let hashes: Vec<(&str, &str)> = generation.loras.iter().map(|(n, _, h)| (n.as_str(), h.as_str())).collect();
    assert_eq!(hashes, vec![("peft", "bdc98dab0c8f"), ("kohya_sgm", "ba2b431c28a8")]);
    let text = dreamshaper::output::a1111_parameters(&request, generation.seed, "tiny", &generation.loras);
    assert!(text.starts_with("a photo of a Grumpy cat, 8k! <lora:kohya_sgm:0.6>"), "{text}");
    assert!(text.ends_with("Lora hashes: \"peft: bdc98dab0c8f, kohya_sgm: ba2b431c28a8\""), "{text}");
}

#[test]
fn request_names_cannot_leave_the_lora_directory() {
    let options = PipelineOptions { lora_dir: Some(root().join("models/tiny-sdxl-loras")), ..Default::default() };
    let pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
    for name in ["../tiny-sdxl-loras/peft", "/etc/passwd", "embeddings/../../tiny-sdxl/unet/diffusion_pytorch_model"] {
        let mut request = GenerateRequest::new("x");
        request.loras = vec![dreamshaper::adapters::LoraRequest { name: name.into(), weight: 1.0 }];
        match pipeline.request_loras(&request) {
            Err(dreamshaper::Error::InvalidRequest { field: "loras", .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    let mut request = GenerateRequest::new("x <lora:nope>");
    request.loras.clear();
    let e = pipeline.request_loras(&request).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("kohya_sgm") && e.contains("peft"), "{e}");
}

/// Textual inversion: `tinycat` (2 vectors, `clip_l` + `clip_g`) in the prompt and in the negative prompt gives
/// diffusers' image with `load_textual_inversion` into both encoders; without the embedding the image differs.
#[test]
fn textual_inversion_embeddings_give_diffusers_images() {
    let (tensors, json) = refs();
    let options = PipelineOptions {
        embeddings_dir: Some(root().join("models/tiny-sdxl-loras/embeddings")),
        ..Default::default()
    };
    let pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
    for name in ["ti_prompt", "ti_negative"] {
        let case = json["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap();
        for syntax in [PromptSyntax::None, PromptSyntax::A1111] {
            let mut request = request(case);
            request.prompt_syntax = syntax;
            let ours = image_bytes(&pipeline, &request);
            let theirs = tensors[case["images"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let diff = mean_abs_pixel_diff(&ours, &theirs);
            let moved = case["mean_abs_diff_from_no_embedding"].as_f64().unwrap();
            eprintln!(
                "{name} ({syntax:?}): {diff:.4}/255 from diffusers' (the embedding moves the image {moved:.1}/255)"
            );
            assert!(moved >= 10.0 && diff <= 0.5, "{name}: {diff}/255");
        }
    }
    let case = json["cases"].as_array().unwrap().iter().find(|c| c["name"] == "ti_prompt").unwrap();
    let explained = pipeline.explain_prompt(&request(case)).unwrap();
    assert!(explained.contains("tinycat (2 vectors)"), "{explained}");
    let weighted = GenerateRequest { prompt: "a photo of (tinycat:1.2), 8k!".into(), ..request(case) };
    let weighted = GenerateRequest { prompt_syntax: PromptSyntax::A1111, ..weighted };
    let a = image_bytes(&pipeline, &weighted);
    assert_ne!(a, image_bytes(&pipeline, &GenerateRequest { prompt_syntax: PromptSyntax::A1111, ..request(case) }));
}

/// A LoRA with A1111 syntax: emphasis weights and a prompt longer than one 75-token chunk (the text-encoder part of
/// the LoRA applies to every chunk): the image is the LoRA's, not the base model's, and reproducible.
#[test]
fn loras_work_with_a1111_weights_and_long_prompts() {
    let long = "(a highly detailed:1.3) portrait of an old sea captain with a weathered face, deep wrinkles and a thick \
                white beard, wearing a [navy blue] wool coat with shiny brass buttons, standing on the deck of a wooden \
                ship during a violent storm at night, lightning in the sky, huge waves, dramatic rim lighting, 35mm \
                photograph, f/1.8, bokeh, trending on ArtStation, octane render, 8k uhd, masterpiece, best quality";
    let mut request = GenerateRequest::new(long);
    (request.scheduler, request.num_inference_steps, request.img_width, request.img_height, request.seed) =
        ("Euler".into(), 3, 64, 64, 5);
    let base = Pipeline::load(tiny_model().to_str().unwrap(), PipelineOptions::default()).unwrap();
    let explained = base.explain_prompt(&request).unwrap();
    assert!(explained.contains("chunk 2") || explained.contains("2 chunks"), "{explained}");
    let spec = LoraSpec { path: root().join("models/tiny-sdxl-loras/kohya_sgm.safetensors"), weight: 0.8 };
    let with =
        Pipeline::load(tiny_model().to_str().unwrap(), PipelineOptions { loras: vec![spec], ..Default::default() })
            .unwrap();
    let (a, b) = (image_bytes(&base, &request), image_bytes(&with, &request));
    assert!(mean_abs_pixel_diff(&a, &b) > 5.0, "the LoRA changes the image");
    assert_eq!(b, image_bytes(&with, &request));
}
