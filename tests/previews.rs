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

/// Live TAESD previews of large images are decoded from block-averaged latents (about 512 px a side); small images
/// and the linear map are previewed at full size.
#[test]
fn large_taesd_previews_are_reduced_and_the_rest_are_full_size() {
    use dreamshaper::preview::{LatentRgb, Previewer};
    let taesd = dreamshaper::loading::load_taesd(
        common::root().join("models/tiny-taesdxl").to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let previewer = Previewer::Taesd(taesd);
    let latents = |h: usize, w: usize| Tensor::randn(0f32, 1.0, (2, 4, h, w), &candle_core::Device::Cpu).unwrap();
    assert_eq!(previewer.preview_at_most(&latents(128, 96), 512).unwrap().dimensions(), (384, 512));
    assert_eq!(previewer.preview_at_most(&latents(130, 64), 512).unwrap().dimensions(), (168, 344));
    assert_eq!(previewer.preview_at_most(&latents(8, 12), 512).unwrap().dimensions(), (96, 64));
    let linear = Previewer::LatentRgb(LatentRgb::sdxl(8));
    assert_eq!(linear.preview_at_most(&latents(128, 96), 512).unwrap().dimensions(), (768, 1024));
}
