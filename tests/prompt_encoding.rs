//! A1111 prompt syntax through the tiny model's text encoders and pipeline: embeddings against the Python reference
//! of A1111's algorithm (`scripts/make_a1111_refs.py`), weights of 1 giving the plain prompt's embeddings exactly,
//! plain short prompts giving the identical image in both syntaxes, and the hosted API's example end to end.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{assert_close, root, tiny_model};
use dreamshaper::conditioning::{ConditioningSchedule, PromptInputs, StepConditioning, TextEncoders};
use dreamshaper::prompt::encode::encode_reading;
use dreamshaper::prompt::{Emphasis, PromptReading, PromptSyntax};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, Residency};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn pipeline() -> Pipeline {
    Pipeline::load(
        tiny_model().to_str().unwrap(),
        PipelineOptions { residency: Residency::Resident, ..Default::default() },
    )
    .unwrap()
}

fn encoders() -> TextEncoders {
    pipeline().load_text_encoders().unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn embeddings_match_the_a1111_reference() {
    let dir = root().join("tests/fixtures");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("a1111.json")).unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("a1111.safetensors"), &Device::Cpu).unwrap().into_iter().collect();
    let enc = encoders();
    let cases = fx["embeddings"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let emphasis: Emphasis = serde_json::from_value(case["emphasis"].clone()).unwrap();
        let reading = PromptReading::new(prompt, steps, [&enc.tokenizer, &enc.tokenizer_2]).unwrap();
        let texts: Vec<&str> = reading.texts.iter().map(|t| t.text.as_str()).collect();
        let want_texts: Vec<&str> = case["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(texts, want_texts, "{name}: distinct texts");
        let embeddings = encode_reading(&reading, &enc, emphasis, &Device::Cpu, &mut |_| Control::Continue).unwrap();
        let context = Tensor::cat(&embeddings.iter().map(|e| e.context.clone()).collect::<Vec<_>>(), 0).unwrap();
        let pooled = Tensor::cat(&embeddings.iter().map(|e| e.pooled.clone()).collect::<Vec<_>>(), 0).unwrap();
        assert_close(&format!("{name} context"), &context, &tensors[case["context"].as_str().unwrap()], TOLERANCE);
        assert_close(&format!("{name} pooled"), &pooled, &tensors[case["pooled"].as_str().unwrap()], TOLERANCE);
    }
}

fn inputs<'a>(prompt: &'a str, negative: &'a str, syntax: PromptSyntax) -> PromptInputs<'a> {
    PromptInputs {
        prompt,
        negative_prompt: negative,
        syntax,
        emphasis: Emphasis::Original,
        force_zeros_for_empty_prompt: true,
        samples: 1,
        guided: true,
        evaluations: 12,
    }
}

/// The prompt's half of a constant guided conditioning (one sample).
fn positive(schedule: &ConditioningSchedule) -> (Tensor, Tensor) {
    assert_eq!(schedule.distinct(), 1);
    match schedule.at(0) {
        StepConditioning::Batched(c) => (c.context.narrow(0, 1, 1).unwrap(), c.pooled.narrow(0, 1, 1).unwrap()),
        StepConditioning::Split { positive, .. } => (positive.context.clone(), positive.pooled.clone()),
    }
}

fn batched(schedule: &ConditioningSchedule) -> (Tensor, Tensor) {
    match schedule.at(0) {
        StepConditioning::Batched(c) => (c.context.clone(), c.pooled.clone()),
        StepConditioning::Split { .. } => panic!("expected one UNet batch"),
    }
}

/// Weights of exactly 1 anywhere (`(x:1)`, `(x:1.0)`) read as the plain prompt: identical embeddings, to the bit,
/// for short and multi-chunk prompts alike; and a plain prompt of ≤ 75 tokens is diffusers' conditioning exactly.
#[test]
fn unit_weights_give_the_plain_prompt_exactly() {
    let enc = encoders();
    const WORDS: &[&str] = &[
        "cat", "grumpy", "neon", "city", "at", "night", "rain", "portrait", "of", "an", "old", "captain", "8k",
        "detailed", "soft", "light", "photo", "forest", "castle", "gold",
    ];
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for case in 0..12 {
        let words = if case % 3 == 2 { 90 + next(60) } else { 3 + next(40) };
        let mut plain = String::new();
        let mut wrapped = String::new();
        let mut i = 0;
        while i < words {
            let span = 1 + next(4);
            let piece: Vec<&str> = (0..span).map(|_| WORDS[next(WORDS.len())]).collect();
            let piece = piece.join(" ");
            let sep = if next(3) == 0 { ", " } else { " " };
            plain.push_str(&piece);
            plain.push_str(sep);
            match next(4) {
                0 => wrapped.push_str(&format!("({piece}:1)")),
                1 => wrapped.push_str(&format!("({piece}:1.0)")),
                2 => wrapped.push_str(&format!("({piece}: 1.00 )")),
                _ => wrapped.push_str(&piece),
            }
            wrapped.push_str(sep);
            i += span;
        }
        let a = enc
            .condition_prompts(&inputs(&plain, "blurry, low quality", PromptSyntax::A1111), &Device::Cpu, &mut |_| {
                Control::Continue
            })
            .unwrap();
        let b = enc
            .condition_prompts(&inputs(&wrapped, "blurry, low quality", PromptSyntax::A1111), &Device::Cpu, &mut |_| {
                Control::Continue
            })
            .unwrap();
        let (ca, pa) = positive(&a);
        let (cb, pb) = positive(&b);
        assert_eq!(ca.dims(), cb.dims(), "{wrapped}");
        assert!(values(&ca) == values(&cb) && values(&pa) == values(&pb), "weights of 1 changed {wrapped:?}");
        let tokens = enc.tokenizer.encode_tokens(&plain).unwrap().len();
        if tokens <= 75 {
            let d = enc
                .condition_prompts(
                    &inputs(&plain, "blurry, low quality", PromptSyntax::None),
                    &Device::Cpu,
                    &mut |_| Control::Continue,
                )
                .unwrap();
            let ((ca, pa), (cd, pd)) = (batched(&a), batched(&d));
            assert!(values(&ca) == values(&cd) && values(&pa) == values(&pd), "A1111 ≠ diffusers for {plain:?}");
            assert!(d.warnings.is_empty());
        } else {
            assert!(ca.dim(1).unwrap() >= 154 && ca.dim(1).unwrap() % 77 == 0, "{tokens} tokens");
            let d = enc
                .condition_prompts(&inputs(&plain, "", PromptSyntax::None), &Device::Cpu, &mut |_| Control::Continue)
                .unwrap();
            assert_eq!(d.warnings.len(), 1, "truncation warning");
            assert!(d.warnings[0].contains(&format!("last {} are ignored", tokens - 75)), "{}", d.warnings[0]);
        }
    }
}

fn small_request(prompt: &str, negative: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.negative_prompt = negative.into();
    (r.scheduler, r.num_inference_steps, r.seed, r.img_width, r.img_height) = ("Euler".into(), 4, 5, 64, 64);
    r
}

/// A prompt without syntax of ≤ 75 tokens gives the identical image with either syntax.
#[test]
fn plain_short_prompts_give_identical_images_in_both_syntaxes() {
    let p = pipeline();
    let cases = [
        ("a photo of a Grumpy cat, 8k!", "blurry, low quality, watermark, text", 7.5, 1),
        ("a photo of a Grumpy cat, 8k!", "", 7.5, 2),
        ("a lighthouse on a cliff: golden hour", "fog", 1.0, 1),
    ];
    for (prompt, negative, guidance, samples) in cases {
        let mut request = small_request(prompt, negative);
        (request.guidance_scale, request.samples) = (guidance, samples);
        let a1111 = p.generate(&request, &mut |_| Control::Continue).unwrap();
        request.prompt_syntax = PromptSyntax::None;
        let none = p.generate(&request, &mut |_| Control::Continue).unwrap();
        assert_eq!(values(&a1111.latents), values(&none.latents), "{prompt:?} / {negative:?}");
        for (x, y) in a1111.images.iter().zip(&none.images) {
            assert_eq!(x.as_raw(), y.as_raw());
        }
        assert!(a1111.warnings.is_empty() && none.warnings.is_empty());
    }
}

/// The hosted API's example request: a long weighted prompt with an alternation and a long negative prompt.
#[test]
fn hosted_example_runs_end_to_end() {
    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/a1111.json")).unwrap()).unwrap();
    let prompt = fx["hosted"]["prompt"].as_str().unwrap();
    let negative = fx["hosted"]["negative"].as_str().unwrap();
    let p = pipeline();
    let mut request = small_request(prompt, negative);
    request.num_inference_steps = 5;
    request.samples = 2;

    let schedule = p.condition(&request, &mut |_| Control::Continue).unwrap();
    // The alternation changes the prompt every step: two distinct conditionings, alternating from the second step.
    assert_eq!(schedule.distinct(), 2);
    let firsts: Vec<usize> = schedule.entries().map(|(until, _)| until).collect();
    assert_eq!(firsts, vec![1, 2, 3, usize::MAX]);
    // Prompt: two chunks; negative prompt: one. A1111 runs them as two UNet batches.
    match schedule.at(0) {
        StepConditioning::Split { negative, positive } => {
            assert_eq!(positive.context.dims(), &[2, 154, 64]);
            assert_eq!(negative.context.dims(), &[2, 77, 64]);
            assert_eq!(positive.pooled.dims(), &[2, 32]);
        }
        StepConditioning::Batched(_) => panic!("different lengths must be split"),
    }

    let mut steps = 0;
    let generation = p
        .generate(&request, &mut |progress| {
            if let dreamshaper::Progress::Step { evaluation, .. } = progress {
                steps = *evaluation;
            }
            Control::Continue
        })
        .unwrap();
    assert_eq!(steps, 5);
    assert_eq!(generation.images.len(), 2);
    assert!(values(&generation.latents).iter().all(|v| v.is_finite()));
    assert!(generation.warnings.is_empty());
    let again = p.generate(&request, &mut |_| Control::Continue).unwrap();
    assert_eq!(values(&again.latents), values(&generation.latents), "deterministic");

    // Read literally (diffusers), the same request differs and says what was cut.
    request.prompt_syntax = PromptSyntax::None;
    let literal = p.generate(&request, &mut |_| Control::Continue).unwrap();
    assert_ne!(values(&literal.latents), values(&generation.latents));
    assert!(literal.warnings.iter().any(|w| w.starts_with("the prompt is") && w.contains("ignored")));
}
