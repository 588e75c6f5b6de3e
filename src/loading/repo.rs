//! A model repository: a local diffusers folder, or a Hugging Face hub id resolved through the user's hub cache
//! (downloading what is missing when online; offline, a clear list of what is missing).

use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::{Error, Result};

/// The default model: Dreamshaper XL 1.0 in diffusers layout.
pub const DEFAULT_MODEL: &str = "Lykon/dreamshaper-xl-1-0";

#[derive(Debug, Clone)]
enum Source {
    Folder(PathBuf),
    Hub { id: String, cache: Cache },
}

/// Where a model's files are found, by their path relative to the repository root (`unet/config.json`).
#[derive(Debug, Clone)]
pub struct ModelRepo {
    source: Source,
}

/// The user's Hugging Face hub cache, found as `huggingface_hub` finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`.
fn hub_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE")) {
        Some(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

impl ModelRepo {
    /// A folder path if `spec` names an existing directory; otherwise a hub id (`owner/name`).
    pub fn open(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::folder(path));
        }
        if path.exists() {
            return Err(Error::NotFound(format!(
                "{spec} is a file; --model takes a diffusers model folder or a hub id like {DEFAULT_MODEL}"
            )));
        }
        let looks_like_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.contains('\\');
        if !looks_like_id {
            return Err(Error::NotFound(format!(
                "model {spec:?} is neither an existing folder nor a hub id of the form owner/name"
            )));
        }
        Ok(Self { source: Source::Hub { id: spec.to_string(), cache: hub_cache() } })
    }

    pub fn folder(path: &Path) -> Self {
        Self { source: Source::Folder(path.to_path_buf()) }
    }

    /// A short name for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Folder(p) => p.display().to_string(),
            Source::Hub { id, .. } => format!("hub model {id}"),
        }
    }

    /// Resolves a file; `Ok(None)` when the repository does not have it.
    pub fn file(&self, rel: &str) -> Result<Option<PathBuf>> {
        match &self.source {
            Source::Folder(dir) => {
                let p = dir.join(rel);
                Ok(p.is_file().then_some(p))
            }
            Source::Hub { id, cache } => {
                if let Some(p) = cache.repo(Repo::new(id.clone(), RepoType::Model)).get(rel) {
                    return Ok(Some(p));
                }
                if hub_offline() {
                    return Ok(None);
                }
                let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
                    .with_progress(true)
                    .build()
                    .map_err(|e| {
                        Error::NotFound(format!("{id}: {rel} cannot be downloaded: the Hugging Face hub client: {e}"))
                    })?;
                match api.model(id.clone()).get(rel) {
                    Ok(p) => Ok(Some(p)),
                    Err(hf_hub::api::sync::ApiError::RequestError(e)) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(Error::NotFound(format!(
                        "{id}: {rel} is not in the local Hugging Face cache ({}) and could not be downloaded: {e}",
                        cache.path().display()
                    ))),
                }
            }
        }
    }

    /// Like [`file`](Self::file), but a missing file is an error naming it.
    pub fn require(&self, rel: &str) -> Result<PathBuf> {
        self.file(rel)?.ok_or_else(|| match &self.source {
            Source::Folder(dir) => {
                Error::NotFound(format!("{} is missing from the model folder {}", rel, dir.display()))
            }
            Source::Hub { id, cache } => Error::NotFound(format!(
                "{id}: {rel} is not in the Hugging Face cache ({}){}",
                cache.path().display(),
                if hub_offline() { " and HF_HUB_OFFLINE is set" } else { "" }
            )),
        })
    }

    /// The safetensors files of a component (`unet`, `vae`, `text_encoder`, …) whose weights are named
    /// `{stem}.safetensors` (or sharded with `{stem}.safetensors.index.json`). With `prefer_fp16` the `.fp16`
    /// variant is taken when the repository has it.
    pub fn weights(&self, component: &str, stem: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
        let variants: &[&str] = if prefer_fp16 { &[".fp16", ""] } else { &["", ".fp16"] };
        let dir = if component.is_empty() { String::new() } else { format!("{component}/") };
        for variant in variants {
            if let Some(p) = self.file(&format!("{dir}{stem}{variant}.safetensors"))? {
                return Ok(vec![p]);
            }
            // diffusers names a sharded variant's index `{stem}.safetensors.index.fp16.json`.
            if let Some(index) = self.file(&format!("{dir}{stem}.safetensors.index{variant}.json"))? {
                return self.shards(component, &index);
            }
        }
        Err(Error::NotFound(if component.is_empty() {
            // A single-component repository (a VAE's, a TAESD's): the weights sit at its root.
            format!("{}: no weights ({stem}.safetensors or its .fp16 variant)", self.describe())
        } else {
            format!(
                "{}: no weights for `{component}` ({component}/{stem}.safetensors or its .fp16 variant)",
                self.describe()
            )
        }))
    }

    fn shards(&self, component: &str, index: &Path) -> Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::model(index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::model(index, "no `weight_map` object"))?;
        let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let dir = if component.is_empty() { String::new() } else { format!("{component}/") };
        files.iter().map(|f| self.require(&format!("{dir}{f}"))).collect()
    }

    /// Reads and parses a JSON file of the repository, with errors naming it.
    pub fn json<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<T> {
        let path = self.require(rel)?;
        read_json(&path)
    }
}

/// Reads and parses a JSON file, with errors naming it and, for a value of the wrong type or a missing key, the
/// key ([`Error::ConfigKey`]).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| json_error(path, e))?;
    deserializer.end().map_err(|e| Error::model(path, format!("invalid JSON: {e}")))?;
    Ok(value)
}

/// A JSON error from `origin`: unreadable JSON, or a key whose value does not fit (the key as a path into the
/// document, `block_out_channels[1]`; a missing key by its own name).
fn json_error(origin: &Path, e: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = e.path().to_string();
    let inner = e.into_inner();
    if !inner.is_data() {
        return Error::model(origin, format!("invalid JSON: {inner}"));
    }
    let message = inner.to_string();
    if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
        let key = if path == "." { field.to_string() } else { format!("{path}.{field}") };
        return Error::config_key(origin, key, "is missing");
    }
    if path == "." {
        return Error::model(origin, format!("invalid config: {message}"));
    }
    Error::config_key(origin, path, message)
}

fn is_not_found(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("404")
}
