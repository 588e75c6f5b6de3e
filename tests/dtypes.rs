//! Reduced-precision runs: f16 on the CPU gives nearly the f32 image; unsupported combinations are clear errors.

mod common;

use candle_core::{DType, Device};
use common::{mean_abs_pixel_diff, tiny_model};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions};

fn generate(dtype: DType) -> Vec<u8> {
    let options = PipelineOptions { dtype, ..Default::default() };
    let pipeline = Pipeline::load(tiny_model().to_str().unwrap(), options).unwrap();
    let mut request = GenerateRequest::new("a photo of a Grumpy cat, 8k!");
    (request.scheduler, request.num_inference_steps, request.seed) = ("Euler".into(), 6, 3);
    (request.img_width, request.img_height) = (96, 64);
    let generation = pipeline.generate(&request, &mut |_| Control::Continue).unwrap();
    generation.images[0].as_raw().clone()
}

#[test]
fn f16_is_close_to_f32() {
    let diff = mean_abs_pixel_diff(&generate(DType::F32), &generate(DType::F16));
    eprintln!("f16 vs f32: mean abs {diff:.3}/255");
    assert!(diff <= 2.0, "f16 image differs from f32 by {diff}/255 on average");
}

#[test]
fn bf16_on_cpu_is_a_clear_error() {
    let options = PipelineOptions { dtype: DType::BF16, device: Device::Cpu, ..Default::default() };
    let e = Pipeline::load(tiny_model().to_str().unwrap(), options).err().unwrap().to_string();
    assert!(e.contains("bf16") && e.contains("f32 or f16"), "{e}");
}
