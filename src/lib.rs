//! `dreamshaper`: a native Stable Diffusion XL inference engine that matches diffusers.
//!
//! Data flows one way: [`GenerateRequest`] → prompt conditioning → denoising loop → VAE decode → images.
//!
//! Cargo features (all but the GPU ones on by default): `server` (the `server` module: the local HTTP server),
//! `bench` (the `bench` module: the scheduler comparison), `cli` (the `dreamshaper` binary; implies both), and
//! `cuda`, `cudnn`, `flash-attn`, `metal` for GPUs. With `default-features = false` the library generates images
//! without pulling in axum, tokio, plotters or clap.

pub mod adapters;
#[cfg(feature = "bench")]
pub mod bench;
pub mod conditioning;
pub mod error;
pub mod input_image;
pub mod kernels;
pub mod loading;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod preview;
pub mod prompt;
pub mod request;
pub mod rng;
pub mod sampling;
pub mod schedulers;
#[cfg(feature = "server")]
pub mod server;
pub mod tokenizer;

pub use error::{Error, Result};
pub use pipeline::{FinalDecoder, Generation, Pipeline, PipelineOptions, Residency, VaeTiling};
pub use prompt::{Emphasis, PromptSyntax};
pub use request::GenerateRequest;
pub use sampling::{Control, Progress};
