//! `dreamshaper`: a native Stable Diffusion XL inference engine that matches diffusers.
//!
//! Data flows one way: [`GenerateRequest`] → prompt conditioning → denoising loop → VAE decode → images.

pub mod bench;
pub mod conditioning;
pub mod error;
pub mod kernels;
pub mod loading;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod prompt;
pub mod request;
pub mod rng;
pub mod sampling;
pub mod schedulers;
pub mod server;
pub mod tokenizer;

pub use error::{Error, Result};
pub use pipeline::{Generation, Pipeline, PipelineOptions, Residency, VaeTiling};
pub use prompt::{Emphasis, PromptSyntax};
pub use request::GenerateRequest;
pub use sampling::{Control, Progress};
