//! Loading a TAESD (diffusers' `AutoencoderTiny`) from its own repository: a folder or hub id holding `config.json`
//! and `diffusion_pytorch_model.safetensors` at the root, as `madebyollin/taesdxl` does.

use std::path::Path;

use candle_core::{DType, Device};

use super::repo::{read_json, ModelRepo};
use super::weights::Weights;
use crate::models::taesd::{TaesdConfig, TaesdDecoder};
use crate::{Error, Result};

/// The TAESD for SDXL latents on the Hugging Face hub.
pub const DEFAULT_TAESD: &str = "madebyollin/taesdxl";

/// The TAESD at `spec` (a folder, or a hub id such as [`DEFAULT_TAESD`], resolved through the hub cache like a
/// model), its decoder built with weights in `dtype` on `device` (the `.fp16` weights file is preferred for f16,
/// when the repository has one). TAESD runs in the pipeline's dtype: unlike the SDXL VAE it does not overflow in f16.
///
/// Errors name what is wrong: a file or unknown name given as `spec`, the missing `config.json` or weights file, a
/// config key that cannot be used ([`Error::ConfigKey`]), a weight that is missing or of the wrong shape
/// ([`Error::ComponentLoad`] for `"taesd"`, naming the file and the tensor).
pub fn load_taesd(spec: &str, dtype: DType, device: &Device) -> Result<TaesdDecoder> {
    let repo = open(spec)?;
    let config_path = repo.require("config.json")?;
    let config: TaesdConfig = read_json(&config_path)?;
    config.validate().map_err(|e| Error::config_key(&config_path, e.key, e.message))?;
    let weights = Weights::open(&repo.weights("", "diffusion_pytorch_model", dtype == DType::F16)?)?;
    TaesdDecoder::new(weights.into_var_builder(dtype, device), &config).map_err(|e| Error::ComponentLoad {
        component: "taesd",
        source: Box::new(Error::from(e)),
        hint: String::new(),
    })
}

fn open(spec: &str) -> Result<ModelRepo> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelRepo::folder(path));
    }
    if path.exists() {
        return Err(Error::NotFound(format!(
            "TAESD {spec} is a file; a TAESD is a folder with config.json and diffusion_pytorch_model.safetensors, \
             or a hub id like {DEFAULT_TAESD}"
        )));
    }
    ModelRepo::open(spec).map_err(|e| Error::NotFound(format!("TAESD: {e}")))
}
