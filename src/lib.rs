//! `dreamshaper`: a native Stable Diffusion XL inference engine that matches diffusers.
//!
//! Data flows one way: [`GenerateRequest`] → prompt conditioning → denoising loop → VAE decode → images.

pub mod error;
pub mod rng;
pub mod schedulers;
pub mod tokenizer;

pub use error::{Error, Result};
