//! Textual inversion: SDXL embeddings (civitai's layout: `clip_l` (n × 768) and `clip_g` (n × 1280) tensors in one
//! `.safetensors`), named by their file stem. As diffusers' `load_textual_inversion` does for SDXL's two encoders, an
//! embedding of n vectors adds the tokens `name`, `name_1`, … `name_{n−1}` to both tokenizers, their vectors to both
//! token-embedding tables, and a prompt's `name` is read as those n tokens.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// One embedding: its name (the file stem) and its vectors for each text encoder.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub name: String,
    /// (n, CLIP-L width): for `text_encoder`.
    pub clip_l: Tensor,
    /// (n, bigG width): for `text_encoder_2`.
    pub clip_g: Tensor,
}

impl TextualInversion {
    pub fn open(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::model(path, format!("not a readable safetensors file: {e}")))?;
        let get = |key: &str| {
            tensors.get(key).cloned().ok_or_else(|| {
                Error::model(path, format!("has no `{key}` tensor (an SDXL embedding holds `clip_l` and `clip_g`)"))
            })
        };
        let (clip_l, clip_g) = (get("clip_l")?, get("clip_g")?);
        match (clip_l.dims(), clip_g.dims()) {
            ([n, _], [m, _]) if n == m && *n > 0 => {}
            (l, g) => {
                return Err(Error::model(
                    path,
                    format!("`clip_l` {l:?} and `clip_g` {g:?} must be (vectors, width) with as many vectors"),
                ))
            }
        }
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { name, clip_l, clip_g })
    }

    /// How many token positions it takes.
    pub fn vectors(&self) -> usize {
        self.clip_l.dims()[0]
    }

    /// Its tokens: `name`, `name_1`, … (diffusers' multi-vector naming).
    pub fn tokens(&self) -> Vec<String> {
        (0..self.vectors()).map(|i| if i == 0 { self.name.clone() } else { format!("{}_{i}", self.name) }).collect()
    }
}

/// Every embedding (`*.safetensors`) directly in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<TextualInversion>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    paths.iter().map(|p| TextualInversion::open(p)).collect()
}
