//! Reduced-precision runs on the CPU: f16, bf16 and int8 (mixed precision: bf16 or int8 matrix products, f32
//! elsewhere), give nearly the f32 image.

mod common;

use candle_core::DType;
use common::{mean_abs_pixel_diff, tiny_model};
use dreamshaper::models::layers::INT8_WEIGHTS;
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
fn bf16_is_close_to_f32() {
    let (f32_image, bf16_image) = (generate(DType::F32), generate(DType::BF16));
    let diff = mean_abs_pixel_diff(&f32_image, &bf16_image);
    eprintln!("bf16 vs f32: mean abs {diff:.3}/255");
    assert!(diff <= 2.0, "bf16 image differs from f32 by {diff}/255 on average");
    // The bf16 products really ran: rounding every operand to 8 significant bits leaves a trace.
    assert_ne!(f32_image, bf16_image, "the bf16 run gave the f32 image bit for bit");
}

#[test]
fn int8_is_close_to_f32() {
    let (f32_image, int8_image) = (generate(DType::F32), generate(INT8_WEIGHTS));
    let diff = mean_abs_pixel_diff(&f32_image, &int8_image);
    eprintln!("int8 vs f32: mean abs {diff:.3}/255");
    // 2.4–2.7/255 here (the tiny random model amplifies any change of rounding over its six steps); quantization
    // gone wrong (a wrong scale, clamped values) gives tens.
    assert!(diff <= 4.0, "int8 image differs from f32 by {diff}/255 on average");
    assert_ne!(f32_image, int8_image, "the int8 run gave the f32 image bit for bit");
}
