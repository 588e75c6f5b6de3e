//! Zero-copy loading (`dreamshaper::loading::mapped`): with the mapping-aware allocator installed, weight tensors are
//! the files' mapped memory, keep their file mapped exactly as long as they live, and give the same results as
//! weights read into memory of their own.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{tiny_model, TempDir};
use dreamshaper::loading::mapped::{self, MappedAwareAllocator};
use dreamshaper::loading::Weights;
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions};

#[global_allocator]
static ALLOCATOR: MappedAwareAllocator = MappedAwareAllocator;

fn generate() -> Vec<u8> {
    let pipeline = Pipeline::load(tiny_model().to_str().unwrap(), PipelineOptions::default()).unwrap();
    let mut request = GenerateRequest::new("a photo of a Grumpy cat, 8k!");
    (request.num_inference_steps, request.seed, request.img_width, request.img_height) = (4, 11, 96, 64);
    let generation = pipeline.generate(&request, &mut |_| Control::Continue).unwrap();
    generation.images[0].as_raw().clone()
}

/// One test function: the mapping count is process-wide, so the checks must not run concurrently.
#[test]
fn tensors_share_the_mapping_live_as_long_as_it_and_match_read_weights() {
    assert!(mapped::zero_copy_available(), "the allocator is installed: zero copy must be on");
    assert_eq!(mapped::live_mappings(), 0);

    // An f32 file: the loaded tensor is the mapped memory, and keeps it mapped after the file's Weights are gone.
    let dir = TempDir::new("zero-copy");
    let path = dir.join("w.safetensors");
    let a = Tensor::arange(0f32, 4096., &Device::Cpu).unwrap().reshape((64, 64)).unwrap();
    let b = Tensor::arange(0f32, 10., &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    candle_core::safetensors::save(&[("a", a.clone()), ("b", b)].into_iter().collect(), &path).unwrap();
    let weights = Weights::open(std::slice::from_ref(&path)).unwrap();
    assert_eq!(mapped::live_mappings(), 1, "opening the file maps it");
    let loaded = weights.load("a", DType::F32, &Device::Cpu).unwrap();
    let converted = weights.load("b", DType::F32, &Device::Cpu).unwrap();
    drop(weights);
    assert_eq!(mapped::live_mappings(), 1, "the f32 tensor still uses the mapping");
    assert_eq!(loaded.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
    assert_eq!(converted.to_vec1::<f32>().unwrap(), (0..10).map(|i| i as f32).collect::<Vec<_>>());
    drop(loaded);
    assert_eq!(mapped::live_mappings(), 0, "the last tensor over the file unmaps it");
    drop(dir);

    // A whole generation: the same image as with weights read into their own memory, and nothing left mapped.
    let zero_copy = generate();
    assert_eq!(mapped::live_mappings(), 0, "every component freed after the generation");
    mapped::set_zero_copy(false);
    let copied = generate();
    mapped::set_zero_copy(true);
    assert_eq!(zero_copy, copied, "zero-copy weights changed the image");
}
