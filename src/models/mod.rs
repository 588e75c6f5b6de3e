//! The neural networks of an SDXL pipeline, one component per file. Each block is a plain struct built with
//! `fn new(vb, config)` where `vb.pp("name")` follows diffusers' module tree, so a Rust field path is the checkpoint
//! key path. Configs come from each component's `config.json`; nothing here knows where weights came from.

pub mod attention;
pub mod bands;
pub mod clip;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod vae_bands;
