//! Live previews: the progress callback's view of the denoising loop ([`dreamshaper::sampling::StepLatents`]) and
//! the x₀ it implies.

mod common;

use candle_core::Tensor;
use common::{relative_error, tiny_model};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, Progress, Residency};

fn pipeline() -> Pipeline {
    let options = PipelineOptions { residency: Residency::Resident, ..Default::default() };
    Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap()
}

fn request(scheduler: &str, steps: u32) -> GenerateRequest {
    let mut request = GenerateRequest::new("a photo of a Grumpy cat");
    request.scheduler = scheduler.into();
    request.num_inference_steps = steps;
    request.img_width = 64;
    request.img_height = 64;
    request.seed = 7;
    request
}

/// Every evaluation lends the latents after its step; the x₀ of the last evaluation is where the run ends: exactly
/// the final latents for schedulers whose last step lands on σ = 0 (Euler, DPM-Solver++ with a zero final σ), and
/// the x₀ estimates converge towards the result along the run.
#[test]
fn the_callback_sees_each_steps_latents_and_their_denoised_estimate() {
    let pipeline = pipeline();
    for scheduler in ["Euler", "DPM++ 2M Karras", "LCM"] {
        let request = request(scheduler, 6);
        let (mut seen, mut denoised): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
        let generation = pipeline
            .generate(&request, &mut |p| {
                if let Progress::Step { latents: Some(state), evaluation, .. } = p {
                    assert_eq!(*evaluation, seen.len() + 1);
                    seen.push(state.latents.clone());
                    denoised.push(state.denoised().unwrap());
                }
                Control::Continue
            })
            .unwrap();
        assert_eq!(seen.len(), 6, "{scheduler}: one view per model evaluation");
        let last = seen.last().unwrap();
        assert_eq!(relative_error(last, &generation.latents), 0.0, "{scheduler}: the last view is the result");
        let final_error = relative_error(denoised.last().unwrap(), &generation.latents);
        assert!(final_error < 1e-5, "{scheduler}: final x₀ vs result: relative {final_error:e}");
        let first_error = relative_error(&denoised[0], &generation.latents);
        assert!(first_error > final_error, "{scheduler}: x₀ estimates approach the result");
    }
}
