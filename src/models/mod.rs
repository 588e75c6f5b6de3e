//! The neural networks of an SDXL pipeline, one component per file. Each block is a plain struct built with
//! `fn new(vb, config)` where `vb.pp("name")` follows diffusers' module tree, so a Rust field path is the checkpoint
//! key path. Configs come from each component's `config.json`; nothing here knows where weights came from.

pub mod attention;
pub mod bands;
pub mod clip;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod taesd;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod vae_bands;
pub mod vae_encoder;

/// A value of a component's `config.json` that its network cannot be built with: the key (a path into the JSON,
/// such as `block_out_channels` or `transformer_layers_per_block[1]`) and what is wrong with it. The loader, which
/// knows the file, turns it into [`crate::Error::ConfigKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config `{}` {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for candle_core::Error {
    fn from(e: ConfigError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}
