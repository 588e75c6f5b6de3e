//! The limits on prompts (characters, 75-token chunks, distinct schedule texts), cancellation while prompts are
//! encoded and images decoded, and the UNet's cross-attention caches emptied when a generation ends.

mod common;

use common::tiny_model;
use dreamshaper::models::unet::UNet2DConditionModel;
use dreamshaper::prompt::{PromptReading, MAX_PROMPT_CHARS, MAX_PROMPT_CHUNKS, MAX_SCHEDULE_TEXTS};
use dreamshaper::rng::TorchRng;
use dreamshaper::sampling::{self, DenoisedEstimator, Guidance, Inpainting};
use dreamshaper::tokenizer::ClipTokenizer;
use dreamshaper::{Control, Error, GenerateRequest, Pipeline, PipelineOptions, Progress, Residency};

fn pipeline() -> Pipeline {
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap()
}

fn small_request(prompt: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    (r.scheduler, r.num_inference_steps, r.seed, r.img_width, r.img_height) = ("Euler".into(), 2, 5, 64, 64);
    r.negative_prompt = "blurry".into();
    r
}

/// What a generation reported, as text: `stage:NAME`, `part:NAME`, `step`.
fn event(p: &Progress) -> String {
    match p {
        Progress::Stage(name) => format!("stage:{name}"),
        Progress::Part { stage, .. } => format!("part:{stage}"),
        Progress::Step { .. } => "step".into(),
    }
}

/// Runs `request`, recording every report; `stop` says at which report (given the ones before) to answer stop.
fn run(
    p: &Pipeline,
    request: &GenerateRequest,
    stop: impl Fn(&[String], &str) -> bool,
) -> (dreamshaper::Result<dreamshaper::Generation>, Vec<String>) {
    let mut events: Vec<String> = Vec::new();
    let result = p.generate(request, &mut |progress| {
        let e = event(progress);
        let answer = if stop(&events, &e) { Control::Stop } else { Control::Continue };
        events.push(e);
        answer
    });
    (result, events)
}

fn invalid(result: dreamshaper::Result<dreamshaper::Generation>) -> (&'static str, String) {
    match result {
        Err(Error::InvalidRequest { field, message }) => (field, message),
        other => panic!("expected an invalid request, got {:?}", other.map(|g| g.images.len())),
    }
}

/// A comma-separated prompt of `words` two-token phrases ("cat,").
fn phrases(words: usize) -> String {
    vec!["cat"; words].join(", ")
}

#[test]
fn character_limit_is_checked_before_anything_runs() {
    let huge = "a".repeat(1 << 20);
    for field in ["prompt", "negative_prompt"] {
        let mut request = small_request("a cat");
        match field {
            "prompt" => request.prompt = huge.clone(),
            _ => request.negative_prompt = huge.clone(),
        }
        // The server's check (no tokenizer, no model).
        let e = request.validate_hosted().unwrap_err().to_string();
        assert!(e.contains(&format!("`{field}`")) && e.contains(&MAX_PROMPT_CHARS.to_string()), "{e}");
        // The library's: refused before any stage starts.
        let (result, events) = run(&pipeline(), &request, |_, _| false);
        let (got, message) = invalid(result);
        assert_eq!(got, field);
        assert!(message.contains(&format!("at most {MAX_PROMPT_CHARS} characters")), "{message}");
        assert!(message.contains(&(1 << 20).to_string()), "{message}");
        assert!(events.is_empty(), "{events:?}");
    }
    // Exactly at the limit is accepted by the check.
    let at_limit = small_request(&"a".repeat(MAX_PROMPT_CHARS));
    at_limit.validate_prompts().unwrap();
}

#[test]
fn chunk_and_schedule_limits_are_refused_before_any_encoder_runs() {
    let p = pipeline();
    let tokenizer = ClipTokenizer::from_dir(&tiny_model().join("tokenizer")).unwrap();
    let tokenizers = [&tokenizer, &tokenizer];
    // Too many chunks, in the prompt or the negative prompt (both are read before either is encoded).
    let long = phrases(MAX_PROMPT_CHUNKS * 75 / 2 + 100);
    assert!(long.chars().count() <= MAX_PROMPT_CHARS);
    let chunks = PromptReading::new(&long, 2, tokenizers).unwrap().chunk_count;
    assert!(chunks > MAX_PROMPT_CHUNKS);
    for field in ["prompt", "negative_prompt"] {
        let mut request = small_request("a cat");
        match field {
            "prompt" => request.prompt = long.clone(),
            _ => request.negative_prompt = long.clone(),
        }
        let (result, events) = run(&p, &request, |_, _| false);
        let (got, message) = invalid(result);
        assert_eq!(got, field);
        assert!(message.contains(&format!("at most {MAX_PROMPT_CHUNKS} chunks")), "{message}");
        assert!(message.contains(&format!("got {chunks} chunks")), "{message}");
        assert!(!events.iter().any(|e| e.starts_with("part") || e == "step"), "{events:?}");
    }

    // Too many distinct texts: one edit per step.
    let edits: String = (1..=20).map(|k| format!("[w{k}:x{k}:{k}] ")).collect();
    let mut request = small_request(&edits);
    request.num_inference_steps = 30;
    let (result, events) = run(&p, &request, |_, _| false);
    let (got, message) = invalid(result);
    assert_eq!(got, "prompt");
    assert!(message.contains(&format!("at most {MAX_SCHEDULE_TEXTS} distinct texts")), "{message}");
    assert!(!events.iter().any(|e| e.starts_with("part") || e == "step"), "{events:?}");
    // The same edits over few steps are few texts; an alternation over many steps is two.
    assert_eq!(PromptReading::limited(&edits, 4, tokenizers, "prompt").unwrap().texts.len(), 4);
    let alternating = PromptReading::limited("a [cat|dog] on a mat", 100, tokenizers, "prompt").unwrap();
    assert_eq!((alternating.entries.len(), alternating.texts.len()), (100, 2));
    // Without the limits (`--explain-prompt`), the reading is whole.
    assert_eq!(PromptReading::new(&edits, 30, tokenizers).unwrap().texts.len(), 21);
}

/// A long A1111 prompt (≈ 3,000 characters: weights, an edit, an alternation, BREAK) generates.
#[test]
fn a_long_a1111_prompt_still_generates() {
    let mut prompt =
        String::from("masterpiece, (best quality:1.2), [a lighthouse:a castle:0.5] on a [rocky|sandy] shore, ");
    while prompt.len() < 3_000 {
        prompt.push_str("(golden hour light:1.1), dramatic clouds, [soft] reflections on wet sand, BREAK ");
        prompt.push_str("intricate details, sharp focus, wide angle, 35mm photograph, ");
    }
    let p = pipeline();
    let (result, events) = run(&p, &small_request(&prompt), |_, _| false);
    let generation = result.unwrap();
    assert_eq!(generation.images.len(), 1);
    assert!(events.iter().filter(|e| *e == "part:encoding prompt").count() > 2, "{events:?}");
}

#[test]
fn cancelling_while_the_prompt_is_encoded_stops_before_the_unet() {
    let p = pipeline();
    let request = small_request(&phrases(300)); // 600 tokens: 9 chunks, so many batches to encode
    let started = |events: &[String]| events.iter().any(|e| e == "stage:encoding prompt");
    let (result, events) = run(&p, &request, |events, _| started(events));
    assert!(matches!(result, Err(Error::Cancelled)), "{:?}", result.map(|g| g.images.len()));
    // Stopped at the first report after encoding started: one batch of chunks, no UNet.
    assert_eq!(events.last().map(String::as_str), Some("part:encoding prompt"), "{events:?}");
    assert_eq!(events.iter().filter(|e| e.starts_with("part")).count(), 1, "{events:?}");
    assert!(!events.iter().any(|e| e == "step" || e == "stage:denoising"), "{events:?}");
}

#[test]
fn cancelling_while_decoding_stops_within_a_layer() {
    let p = pipeline();
    for tiling in [false, true] {
        let mut request = small_request("a cat");
        if tiling {
            // Wider than the tiny VAE's sample size (128 px): decoded in bands.
            (request.img_width, request.img_height) = (256, 64);
        }
        let (result, events) = run(&p, &request, |_, e| e.starts_with("part:decoding"));
        assert!(matches!(result, Err(Error::Cancelled)), "{:?}", result.map(|g| g.images.len()));
        let parts: Vec<&String> = events.iter().filter(|e| e.starts_with("part:decoding")).collect();
        assert_eq!(parts.len(), 1, "{events:?}");
        assert_eq!(events.iter().any(|e| e == "stage:decoding in bands"), tiling, "{events:?}");
    }
}

/// The cross-attention layers keep a context's keys and values for the loop's steps, and hold none once the loop
/// has ended, whether it finished or was cancelled.
#[test]
fn cross_attention_caches_are_emptied_when_a_loop_ends() {
    let p = pipeline();
    let unet: UNet2DConditionModel = p.load_unet().unwrap();
    let mut request = small_request("a cat");
    request.num_inference_steps = 3;
    let conditioning = p.condition(&request, &mut |_| Control::Continue).unwrap();
    let estimator = DenoisedEstimator::new(&p.configs.scheduler).unwrap();
    for stop_at in [None, Some(1)] {
        let mut scheduler = p.scheduler(&request).unwrap();
        let mut rng = TorchRng::new(5);
        let latents = sampling::initial_latents(
            &mut rng,
            [1, 4, 8, 8],
            scheduler.init_noise_sigma(),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap();
        let guidance =
            Guidance { scale: 7.5, height: 64, width: 64, estimator: &estimator, start: 0, inpaint: Inpainting::None };
        let mut cached = Vec::new();
        let result =
            sampling::denoise(&unet, scheduler.as_mut(), &conditioning, latents, guidance, &mut rng, &mut |progress| {
                let Progress::Step { evaluation, .. } = progress else { return Control::Continue };
                cached.push(unet.cached_contexts());
                if Some(*evaluation) == stop_at {
                    Control::Stop
                } else {
                    Control::Continue
                }
            });
        assert_eq!(result.is_ok(), stop_at.is_none());
        assert!(!cached.is_empty() && cached.iter().all(|&n| n > 0), "cached during the loop: {cached:?}");
        assert_eq!(unet.cached_contexts(), 0, "after the loop (stop at {stop_at:?})");
    }
}
