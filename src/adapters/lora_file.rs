//! Reading a LoRA file: its layout detected from the keys (never asked of the user), its low-rank pairs and their
//! scales, and a clear refusal of what is not a plain LoRA (LyCORIS LoHa / LoKr, DoRA, SD 1.x files, files with no
//! LoRA keys).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// A LoRA to apply and its weight (A1111's multiplier, diffusers' adapter weight).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl LoraSpec {
    /// `PATH[:WEIGHT]` (weight 1 when absent): the text after the last `:` is the weight when it is a number.
    pub fn parse(arg: &str) -> Result<Self> {
        if let Some((path, weight)) = arg.rsplit_once(':') {
            if let Ok(weight) = weight.trim().parse::<f64>() {
                if !weight.is_finite() {
                    return Err(Error::invalid("lora", format!("weight must be a finite number, got {weight}")));
                }
                return Ok(Self { path: PathBuf::from(path), weight });
            }
        }
        Ok(Self { path: PathBuf::from(arg), weight: 1.0 })
    }
}

/// The pipeline component a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    TextEncoder2,
}

/// How a file names its modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// kohya / A1111 / civitai: `lora_unet_<module with _>`, `lora_te1_…`, `lora_te2_…`, with `.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`; UNet modules in Stability's original layout or in diffusers'.
    Kohya,
    /// diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older `lora.down` / `lora.up`),
    /// `text_encoder.…`, `text_encoder_2.…`, optionally under `base_model.model.`.
    Diffusers,
}

/// One module's low-rank update `ΔW = scale · up · down`: `down` is (rank, in[, kh, kw]), `up` is (out, rank[, 1, 1]).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// The module's name as the file spells it (for messages).
    pub key: String,
    pub target: Target,
    /// The module name in the file's convention, without the target prefix (`input_blocks_4_1_…_to_q`,
    /// `down_blocks.1.attentions.0.…to_q`).
    pub module: String,
    pub down: Tensor,
    pub up: Tensor,
    /// `alpha / rank` (kohya), or 1 when the file stores no alpha.
    pub scale: f64,
}

/// A LoRA file's updates, read into memory.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub naming: Naming,
    pub updates: Vec<LowRank>,
}

impl LoraFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound(format!("LoRA file {} does not exist", path.display())));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::model(path, format!("not a readable safetensors file: {e}")))?;
        let configs = PeftConfigs::from_metadata(path)?;
        Self::from_tensors(path, tensors.into_iter().collect(), &configs)
    }

    /// Reads the updates of a file's tensors (`path` is for messages).
    pub fn from_tensors(path: &Path, tensors: BTreeMap<String, Tensor>, configs: &PeftConfigs) -> Result<Self> {
        refuse_other_formats(path, tensors.keys())?;
        let kohya = tensors
            .keys()
            .any(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te1_") || k.starts_with("lora_te2_"));
        let (naming, updates) = if kohya {
            (Naming::Kohya, kohya_updates(path, &tensors)?)
        } else {
            (Naming::Diffusers, diffusers_updates(path, &tensors, configs)?)
        };
        if updates.is_empty() {
            return Err(Error::model(
                path,
                "holds no LoRA tensors (expected kohya `lora_unet_…`/`lora_te1_…` keys with `.lora_down.weight`, or \
                 diffusers/PEFT `unet.….lora_A.weight` keys)",
            ));
        }
        Ok(Self { path: path.to_path_buf(), naming, updates })
    }
}

/// LyCORIS and DoRA files hold other kinds of updates; SD 1.x kohya files name their single text encoder `lora_te_`.
fn refuse_other_formats<'a>(path: &Path, keys: impl Iterator<Item = &'a String>) -> Result<()> {
    for key in keys {
        let format = if key.contains("hada_w1") || key.contains("hada_w2") {
            "a LyCORIS LoHa"
        } else if key.contains("lokr_w1") || key.contains("lokr_w2") {
            "a LyCORIS LoKr"
        } else if key.contains("dora_scale") || key.contains("lora_magnitude_vector") {
            "a DoRA"
        } else if key.starts_with("lora_te_") {
            "an SD 1.x (single text encoder)"
        } else {
            continue;
        };
        return Err(Error::model(
            path,
            format!("is {format} file (key `{key}`); only plain LoRA files (kohya or diffusers/PEFT) for SDXL are supported"),
        ));
    }
    Ok(())
}

/// A pair's parts as they are gathered from the keys.
#[derive(Default)]
struct Pair {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn scalar(path: &Path, key: &str, t: &Tensor) -> Result<f64> {
    let values: Vec<f32> = t
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1())
        .map_err(|e| Error::model(path, format!("tensor `{key}`: {e}")))?;
    match values.as_slice() {
        [v] => Ok(*v as f64),
        _ => Err(Error::model(path, format!("tensor `{key}` should hold one number (alpha), holds {}", values.len()))),
    }
}

fn finish(path: &Path, key: String, target: Target, module: String, pair: Pair) -> Result<LowRank> {
    let (Some(down), Some(up)) = (pair.down, pair.up) else {
        return Err(Error::model(path, format!("module `{key}` lacks its down or up matrix")));
    };
    let rank = down.dim(0).map_err(|e| Error::model(path, format!("module `{key}`: {e}")))?;
    if up.dims().get(1) != Some(&rank) {
        return Err(Error::model(
            path,
            format!("module `{key}`: down {:?} and up {:?} do not share a rank", down.dims(), up.dims()),
        ));
    }
    let scale = pair.alpha.map_or(1.0, |alpha| alpha / rank as f64);
    Ok(LowRank { key, target, module, down, up, scale })
}

/// Module-name prefixes of each SDXL part, as kohya and diffusers files spell them.
const KOHYA_PARTS: [(&str, Target); 3] =
    [("lora_unet_", Target::Unet), ("lora_te1_", Target::TextEncoder), ("lora_te2_", Target::TextEncoder2)];
const DIFFUSERS_PARTS: [(&str, Target); 3] =
    [("unet.", Target::Unet), ("text_encoder_2.", Target::TextEncoder2), ("text_encoder.", Target::TextEncoder)];

/// The part a module patches and its name within that part.
fn split_target<'a>(path: &Path, module: &'a str, parts: &[(&str, Target)]) -> Result<(Target, &'a str)> {
    parts.iter().find_map(|(prefix, target)| module.strip_prefix(prefix).map(|rest| (*target, rest))).ok_or_else(|| {
        let names: Vec<&str> = parts.iter().map(|(p, _)| *p).collect();
        Error::model(path, format!("key `{module}` names no SDXL part ({})", names.join(", ")))
    })
}

fn kohya_updates(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<Vec<LowRank>> {
    let mut pairs: BTreeMap<&str, Pair> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((module, part)) = key.split_once('.') else {
            return Err(Error::model(path, format!("unexpected key `{key}` in a kohya LoRA file")));
        };
        let pair = pairs.entry(module).or_default();
        match part {
            "lora_down.weight" => pair.down = Some(t.clone()),
            "lora_up.weight" => pair.up = Some(t.clone()),
            "alpha" => pair.alpha = Some(scalar(path, key, t)?),
            _ => return Err(Error::model(path, format!("key `{key}`: `{part}` is not a LoRA down/up/alpha tensor"))),
        }
    }
    let mut updates = Vec::with_capacity(pairs.len());
    for (module, pair) in pairs {
        let (target, rest) = split_target(path, module, &KOHYA_PARTS)?;
        updates.push(finish(path, module.to_string(), target, rest.to_string(), pair)?);
    }
    Ok(updates)
}

fn diffusers_updates(path: &Path, tensors: &BTreeMap<String, Tensor>, configs: &PeftConfigs) -> Result<Vec<LowRank>> {
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    for (key, t) in tensors {
        let name = key.strip_prefix("base_model.model.").unwrap_or(key);
        let (module, part) = if let Some(m) = name.strip_suffix(".alpha") {
            (m, "alpha")
        } else if let Some((m, part)) = split_lora_suffix(name) {
            (m, part)
        } else {
            return Err(Error::model(path, format!("key `{key}` is not a LoRA tensor (lora_A / lora_B / alpha)")));
        };
        let pair = pairs.entry(module.to_string()).or_default();
        match part {
            "down" => pair.down = Some(t.clone()),
            "up" => pair.up = Some(t.clone()),
            _ => pair.alpha = Some(scalar(path, key, t)?),
        }
    }
    let mut updates = Vec::with_capacity(pairs.len());
    for (module, pair) in pairs {
        let has_alpha = pair.alpha.is_some();
        let (target, rest) = split_target(path, &module, &DIFFUSERS_PARTS)?;
        let rest = rest.to_string();
        let mut update = finish(path, module, target, rest, pair)?;
        if !has_alpha {
            update.scale = configs.scale(target, &update.module, update.down.dims()[0]);
        }
        updates.push(update);
    }
    Ok(updates)
}

/// The PEFT `LoraConfig` of each part that diffusers writes into a file's metadata (`lora_adapter_metadata`): the
/// scale of a module's update is `lora_alpha / r` (`/ √r` with rsLoRA), `alpha_pattern` overriding the alpha of the
/// modules it names. Without metadata PEFT's default applies (alpha = r: scale 1).
#[derive(Debug, Clone, Default)]
pub struct PeftConfigs {
    by_part: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
}

impl PeftConfigs {
    /// Reads the `lora_adapter_metadata` entry of a safetensors file's header, if it has one.
    pub fn from_metadata(path: &Path) -> Result<Self> {
        use std::io::Read;
        let bad = |m: String| Error::model(path, m);
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
        let len = u64::from_le_bytes(len);
        if len > 100_000_000 {
            return Err(bad(format!("safetensors header of {len} bytes: not a safetensors file")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header is not JSON: {e}")))?;
        let Some(text) = header["__metadata__"]["lora_adapter_metadata"].as_str() else {
            return Ok(Self::default());
        };
        let flat: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| bad(format!("metadata `lora_adapter_metadata` is not a JSON object: {e}")))?;
        let mut by_part: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        for (key, value) in flat {
            if let Some((part, field)) = key.split_once('.') {
                by_part.entry(part.to_string()).or_default().insert(field.to_string(), value);
            }
        }
        for (part, config) in &by_part {
            if config.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
                return Err(bad(format!("is a DoRA file (`{part}.use_dora`); only plain LoRA files are supported")));
            }
        }
        Ok(Self { by_part })
    }

    /// The scale of `module`'s update (rank `rank`) in `target`.
    fn scale(&self, target: Target, module: &str, rank: usize) -> f64 {
        let part = match target {
            Target::Unet => "unet",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        };
        let Some(config) = self.by_part.get(part) else { return 1.0 };
        // PEFT matches a pattern against the end of the module's name.
        let pattern_alpha = config.get("alpha_pattern").and_then(|p| p.as_object()).and_then(|patterns| {
            patterns
                .iter()
                .filter(|(pattern, _)| module == pattern.as_str() || module.ends_with(&format!(".{pattern}")))
                .max_by_key(|(pattern, _)| pattern.len())
                .and_then(|(_, alpha)| alpha.as_f64())
        });
        let Some(alpha) = pattern_alpha.or_else(|| config.get("lora_alpha").and_then(|a| a.as_f64())) else {
            return 1.0;
        };
        if config.get("use_rslora").and_then(|v| v.as_bool()) == Some(true) {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// `<module>.lora_A[.<adapter>].weight` → (module, "down"), `lora_B` / `lora.up` / `lora_linear_layer.up` → "up".
fn split_lora_suffix(name: &str) -> Option<(&str, &'static str)> {
    let stem = name.strip_suffix(".weight")?;
    for (marker, part) in [
        (".lora_A", "down"),
        (".lora_B", "up"),
        (".lora.down", "down"),
        (".lora.up", "up"),
        (".lora_linear_layer.down", "down"),
        (".lora_linear_layer.up", "up"),
    ] {
        if let Some(index) = stem.rfind(marker) {
            let after = &stem[index + marker.len()..];
            // Nothing after the marker, or one adapter name (`lora_A.default`).
            if after.is_empty() || (after.starts_with('.') && !after[1..].contains('.')) {
                return Some((&stem[..index], part));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_weight_follows_the_last_colon_when_it_is_a_number() {
        assert_eq!(LoraSpec::parse("a/b.safetensors").unwrap().weight, 1.0);
        let s = LoraSpec::parse("a/b.safetensors:0.6").unwrap();
        assert_eq!((s.path, s.weight), (PathBuf::from("a/b.safetensors"), 0.6));
        assert_eq!(LoraSpec::parse("x.safetensors:-0.7").unwrap().weight, -0.7);
        assert_eq!(LoraSpec::parse("C:/x.safetensors").unwrap().path, PathBuf::from("C:/x.safetensors"));
        assert!(LoraSpec::parse("x.safetensors:inf").is_err());
    }

    #[test]
    fn lora_suffixes_of_every_diffusers_generation() {
        assert_eq!(split_lora_suffix("unet.a.to_q.lora_A.weight"), Some(("unet.a.to_q", "down")));
        assert_eq!(split_lora_suffix("unet.a.to_q.lora_B.default.weight"), Some(("unet.a.to_q", "up")));
        assert_eq!(split_lora_suffix("unet.a.to_q.lora.down.weight"), Some(("unet.a.to_q", "down")));
        assert_eq!(split_lora_suffix("unet.a.to_q.lora_linear_layer.up.weight"), Some(("unet.a.to_q", "up")));
        assert_eq!(split_lora_suffix("unet.a.to_q.weight"), None);
    }

    fn t(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn other_formats_and_empty_files_are_refused_by_name() {
        let path = Path::new("x.safetensors");
        let one = |k: &str| BTreeMap::from([(k.to_string(), t(&[2, 2]))]);
        for (key, word) in [
            ("lora_unet_a.hada_w1_a", "LoHa"),
            ("lora_unet_a.lokr_w1", "LoKr"),
            ("lora_unet_a.dora_scale", "DoRA"),
            ("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SD 1.x"),
        ] {
            let e = LoraFile::from_tensors(path, one(key), &PeftConfigs::default()).unwrap_err().to_string();
            assert!(e.contains(word) && e.contains("x.safetensors"), "{e}");
        }
        let e = LoraFile::from_tensors(path, BTreeMap::new(), &PeftConfigs::default()).unwrap_err().to_string();
        assert!(e.contains("no LoRA tensors"), "{e}");
    }

    #[test]
    fn kohya_scale_is_alpha_over_rank() {
        let path = Path::new("k.safetensors");
        let tensors = BTreeMap::from([
            ("lora_unet_a_b.lora_down.weight".to_string(), t(&[4, 8])),
            ("lora_unet_a_b.lora_up.weight".to_string(), t(&[6, 4])),
            ("lora_unet_a_b.alpha".to_string(), Tensor::new(2f32, &Device::Cpu).unwrap()),
            ("lora_te2_c.lora_down.weight".to_string(), t(&[4, 8])),
            ("lora_te2_c.lora_up.weight".to_string(), t(&[6, 4])),
        ]);
        let file = LoraFile::from_tensors(path, tensors, &PeftConfigs::default()).unwrap();
        assert_eq!(file.naming, Naming::Kohya);
        let scales: Vec<(Target, &str, f64)> =
            file.updates.iter().map(|u| (u.target, u.module.as_str(), u.scale)).collect();
        assert_eq!(scales, vec![(Target::TextEncoder2, "c", 1.0), (Target::Unet, "a_b", 0.5)]);
    }
}
