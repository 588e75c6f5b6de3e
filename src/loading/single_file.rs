//! Single-file checkpoints (civitai / A1111 `.safetensors`) in Stability's original (SGM) key layout: the UNet
//! under `model.diffusion_model.`, CLIP-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG under
//! `conditioner.embedders.1.model.`, the VAE under `first_stage_model.`. Every tensor is mapped to the key the
//! diffusers layout gives it, lazily: the file stays memory-mapped and each tensor is converted when a model takes
//! it. Architectures are read off the keys (block structure, widths, transformer depths), so SDXL base,
//! SSD-1B- and Vega-shaped UNets load without a config; what keys cannot say (attention heads, norms, the VAE
//! scaling factor) takes SDXL's values, or a diffusers config folder's with `--config`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::json;

use super::weights::Weights;
use crate::{Error, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";
pub const VAE_PREFIX: &str = "first_stage_model.";

/// SDXL's attention head width (every SDXL-family UNet and OpenCLIP/CLIP text tower uses 64).
const HEAD_WIDTH: usize = 64;

/// How a stored tensor becomes the diffusers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Same,
    /// Part `index` of `parts` equal slices along dim 0 (OpenCLIP's fused q/k/v `in_proj`).
    Slice {
        index: usize,
        parts: usize,
    },
    /// A transposed matrix (OpenCLIP's `text_projection` is stored as `x @ W`, diffusers wants a Linear weight).
    Transpose,
    /// A 1×1 convolution weight used as a linear layer (the VAE's attention projections).
    Conv1x1ToLinear,
}

#[derive(Debug, Clone)]
struct Mapped {
    source: String,
    transform: Transform,
}

/// The SGM model components.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Unet,
    ClipL,
    ClipG,
    Vae,
}

/// A diffusers-named view of one component of a single-file checkpoint.
pub struct Remapped {
    weights: Arc<Weights>,
    map: HashMap<String, Mapped>,
}

impl Transform {
    /// The manifest's name of the transform (`identity`, `in_proj_q`, `transpose`, `conv1x1_to_linear`).
    pub fn name(self) -> &'static str {
        match self {
            Transform::Same => "identity",
            Transform::Slice { index: 0, .. } => "in_proj_q",
            Transform::Slice { index: 1, .. } => "in_proj_k",
            Transform::Slice { .. } => "in_proj_v",
            Transform::Transpose => "transpose",
            Transform::Conv1x1ToLinear => "conv1x1_to_linear",
        }
    }
}

impl Remapped {
    /// The diffusers names of the tensors it serves.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(m) = self.map.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "{}: missing tensor (diffusers name `{name}`)",
                self.weights.describe()
            )));
        };
        let t = self.weights.load(&m.source, dtype, device)?;
        let context = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("{}: tensor `{}`: {e}", self.weights.describe(), m.source))
        };
        match m.transform {
            Transform::Same => Ok(t),
            Transform::Slice { index, parts } => {
                let rows = t.dim(0).map_err(context)? / parts;
                t.narrow(0, index * rows, rows).map_err(context)?.contiguous()
            }
            Transform::Transpose => t.t().map_err(context)?.contiguous(),
            Transform::Conv1x1ToLinear => match t.dims() {
                [o, i, 1, 1] => t.reshape((*o, *i)),
                [_, _] => Ok(t),
                other => Err(context(candle_core::Error::Msg(format!("expected a 1×1 conv weight, shape {other:?}")))),
            },
        }
    }
}

impl SimpleBackend for Remapped {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, device)?;
        if t.dims() != shape.dims() {
            let source = self.map.get(name).map_or(name, |m| m.source.as_str());
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{source}` (diffusers `{name}`) has shape {:?}, the model config expects {:?}",
                self.weights.describe(),
                t.dims(),
                shape.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

/// One resolution level of the UNet as the file's keys show it.
#[derive(Debug, Clone, Default)]
struct Level {
    channels: usize,
    /// Transformer depth after each ResNet (0: no attention).
    depths: Vec<usize>,
}

/// A single-file checkpoint, opened and indexed.
pub struct SingleFile {
    path: PathBuf,
    /// `None` for a key listing without data (see [`SingleFile::from_key_shapes`]).
    weights: Option<Arc<Weights>>,
    /// stored name → shape
    shapes: BTreeMap<String, Vec<usize>>,
    /// Where the VAE's keys start ("first_stage_model." or "" for a standalone VAE file).
    vae_prefix: Option<&'static str>,
}

impl SingleFile {
    pub fn open(path: &Path) -> Result<Self> {
        let weights = Weights::open(&[path.to_path_buf()])?;
        let shapes: BTreeMap<String, Vec<usize>> =
            weights.names().filter_map(|n| Some((n.to_string(), weights.shape_of(n)?))).collect();
        Ok(Self::index(path, Some(Arc::new(weights)), shapes))
    }

    /// A checkpoint known only by its key names and shapes (no tensor data): enough to derive its configs and key
    /// mapping, e.g. to check a manifest of a real checkpoint's keys.
    pub fn from_key_shapes(origin: &Path, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        Self::index(origin, None, shapes)
    }

    fn index(path: &Path, weights: Option<Arc<Weights>>, shapes: BTreeMap<String, Vec<usize>>) -> Self {
        let has = |prefix: &str| shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix));
        let vae_prefix = if has("first_stage_model.decoder.") {
            Some(VAE_PREFIX)
        } else if has("decoder.mid.") {
            Some("")
        } else {
            None
        };
        Self { path: path.to_path_buf(), weights, shapes, vae_prefix }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    fn keys_under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Vec<usize>)> + 'a {
        self.shapes
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(move |(k, v)| (&k[prefix.len()..], v))
    }

    fn shape(&self, key: &str) -> Result<&Vec<usize>> {
        self.shapes.get(key).ok_or_else(|| Error::model(&self.path, format!("missing tensor `{key}`")))
    }

    fn dim(&self, key: &str, d: usize) -> Result<usize> {
        let s = self.shape(key)?;
        s.get(d).copied().ok_or_else(|| Error::model(&self.path, format!("tensor `{key}` has shape {s:?}")))
    }

    /// Checks the file is an SDXL base-family checkpoint and says what it is not, otherwise.
    pub fn check_sdxl(&self) -> Result<()> {
        if self.has_prefix("cond_stage_model.") {
            return Err(Error::model(
                &self.path,
                "this is a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model.* keys), not SDXL",
            ));
        }
        if !self.has_prefix(UNET_PREFIX) {
            let what = if self.vae_prefix == Some("") { " (it looks like a VAE file: pass it with --vae)" } else { "" };
            return Err(Error::model(&self.path, format!("no UNet (model.diffusion_model.* keys) in this file{what}")));
        }
        if !self.has_prefix(&format!("{UNET_PREFIX}label_emb.")) {
            return Err(Error::model(
                &self.path,
                "the UNet has no label_emb (SDXL's added conditioning): not an SDXL model",
            ));
        }
        if self.has_prefix("conditioner.embedders.0.model.") && !self.has_prefix(CLIP_L_PREFIX) {
            return Err(Error::model(&self.path, "SDXL refiner checkpoints (OpenCLIP only) are not supported"));
        }
        for (prefix, what) in [(CLIP_L_PREFIX, "CLIP-L text encoder"), (CLIP_G_PREFIX, "OpenCLIP bigG text encoder")] {
            if !self.has_prefix(prefix) {
                return Err(Error::model(&self.path, format!("no {what} ({prefix}* keys) in this file")));
            }
        }
        Ok(())
    }

    pub fn has_vae(&self) -> bool {
        self.vae_prefix.is_some()
    }

    /// The down and up levels of the UNet, read from `input_blocks` / `output_blocks`.
    fn unet_levels(&self) -> Result<(Vec<Level>, Vec<Level>, usize)> {
        let blocks = |group: &str| -> BTreeMap<usize, BTreeSet<String>> {
            let mut m: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
            for (rest, _) in self.keys_under(UNET_PREFIX) {
                if let Some(tail) = rest.strip_prefix(group) {
                    if let Some((i, inner)) = tail.split_once('.') {
                        if let Ok(i) = i.parse() {
                            m.entry(i).or_default().insert(inner.to_string());
                        }
                    }
                }
            }
            m
        };
        let depth = |inner: &BTreeSet<String>, k: usize| -> usize {
            let prefix = format!("{k}.transformer_blocks.");
            inner
                .iter()
                .filter_map(|s| s.strip_prefix(&prefix)?.split('.').next()?.parse::<usize>().ok())
                .max()
                .map_or(0, |d| d + 1)
        };
        let mut down = vec![Level::default()];
        for (i, inner) in blocks("input_blocks.") {
            if i == 0 {
                continue;
            }
            if inner.contains("0.op.weight") {
                down.push(Level::default());
                continue;
            }
            let level = down.last_mut().expect("non-empty");
            level.channels = self.dim(&format!("{UNET_PREFIX}input_blocks.{i}.0.out_layers.3.weight"), 0)?;
            level.depths.push(depth(&inner, 1));
        }
        let mut up = vec![Level::default()];
        let outputs = blocks("output_blocks.");
        let last = outputs.keys().last().copied();
        for (i, inner) in &outputs {
            let level = up.last_mut().expect("non-empty");
            level.channels = self.dim(&format!("{UNET_PREFIX}output_blocks.{i}.0.out_layers.3.weight"), 0)?;
            level.depths.push(depth(inner, 1));
            if (inner.contains("1.conv.weight") || inner.contains("2.conv.weight")) && Some(*i) != last {
                up.push(Level::default());
            }
        }
        let mid_depth = self
            .keys_under(&format!("{UNET_PREFIX}middle_block.1.transformer_blocks."))
            .filter_map(|(rest, _)| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |d| d + 1);
        if down.iter().any(|l| l.depths.is_empty()) || up.len() != down.len() {
            return Err(Error::model(&self.path, "unrecognised UNet block structure (input_blocks/output_blocks)"));
        }
        Ok((down, up, mid_depth))
    }

    /// The UNet config the keys imply, in `unet/config.json` form.
    pub fn unet_config(&self) -> Result<serde_json::Value> {
        let (down, up, mid_depth) = self.unet_levels()?;
        let u = |k: &str| format!("{UNET_PREFIX}{k}");
        let channels: Vec<usize> = down.iter().map(|l| l.channels).collect();
        let kind = |l: &Level, cross: &str, plain: &str| {
            if l.depths.iter().any(|&d| d > 0) {
                cross.to_string()
            } else {
                plain.to_string()
            }
        };
        let cross_key = self
            .keys_under(UNET_PREFIX)
            .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
            .map(|(k, _)| u(k))
            .ok_or_else(|| Error::model(&self.path, "the UNet has no cross-attention (attn2) layers"))?;
        let proj_in = self.keys_under(UNET_PREFIX).find(|(k, _)| k.ends_with(".proj_in.weight")).map(|(_, s)| s.len());
        let label_in = self.dim(&u("label_emb.0.0.weight"), 1)?;
        let pooled = self.dim(&format!("{CLIP_G_PREFIX}text_projection"), 1).unwrap_or(1280);
        let down_depths: Vec<Vec<usize>> = down.iter().map(|l| l.depths.iter().map(|&d| d.max(1)).collect()).collect();
        Ok(json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.dim(&u("input_blocks.0.0.weight"), 1)?,
            "out_channels": self.dim(&u("out.2.weight"), 0)?,
            "block_out_channels": channels,
            "down_block_types": down.iter().map(|l| kind(l, "CrossAttnDownBlock2D", "DownBlock2D")).collect::<Vec<_>>(),
            "up_block_types": up.iter().map(|l| kind(l, "CrossAttnUpBlock2D", "UpBlock2D")).collect::<Vec<_>>(),
            "mid_block_type": if mid_depth > 0 { json!("UNetMidBlock2DCrossAttn") } else { json!(null) },
            "mid_block_transformer_layers": mid_depth,
            "layers_per_block": down.iter().map(|l| l.depths.len()).collect::<Vec<_>>(),
            "transformer_layers_per_block": down_depths,
            "reverse_transformer_layers_per_block":
                up.iter().map(|l| l.depths.iter().map(|&d| d.max(1)).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "attention_head_dim": channels.iter().map(|c| (c / HEAD_WIDTH).max(1)).collect::<Vec<_>>(),
            "cross_attention_dim": self.dim(&cross_key, 1)?,
            "use_linear_projection": proj_in != Some(4),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": label_in.saturating_sub(pooled) / 6,
            "projection_class_embeddings_input_dim": label_in,
            "norm_num_groups": 32,
            "sample_size": 128,
        }))
    }

    /// A CLIP text config from the keys (CLIP-L: `quick_gelu`; bigG: exact GELU).
    pub fn clip_config(&self, part: Part) -> Result<serde_json::Value> {
        Ok(match part {
            Part::ClipL => {
                let p = |k: &str| format!("{CLIP_L_PREFIX}text_model.{k}");
                let hidden = self.dim(&p("embeddings.token_embedding.weight"), 1)?;
                json!({
                    "vocab_size": self.dim(&p("embeddings.token_embedding.weight"), 0)?,
                    "hidden_size": hidden,
                    "intermediate_size": self.dim(&p("encoder.layers.0.mlp.fc1.weight"), 0)?,
                    "num_hidden_layers": self.count_layers(&p("encoder.layers.")),
                    "num_attention_heads": (hidden / HEAD_WIDTH).max(1),
                    "max_position_embeddings": self.dim(&p("embeddings.position_embedding.weight"), 0)?,
                    "hidden_act": "quick_gelu",
                    "projection_dim": 768,
                    "eos_token_id": 2,
                })
            }
            Part::ClipG => {
                let p = |k: &str| format!("{CLIP_G_PREFIX}{k}");
                let hidden = self.dim(&p("token_embedding.weight"), 1)?;
                json!({
                    "vocab_size": self.dim(&p("token_embedding.weight"), 0)?,
                    "hidden_size": hidden,
                    "intermediate_size": self.dim(&p("transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
                    "num_hidden_layers": self.count_layers(&p("transformer.resblocks.")),
                    "num_attention_heads": (hidden / HEAD_WIDTH).max(1),
                    "max_position_embeddings": self.dim(&p("positional_embedding"), 0)?,
                    "hidden_act": "gelu",
                    "projection_dim": self.dim(&p("text_projection"), 1)?,
                    "eos_token_id": 2,
                })
            }
            _ => unreachable!("not a text encoder"),
        })
    }

    fn count_layers(&self, prefix: &str) -> usize {
        self.keys_under(prefix)
            .filter_map(|(rest, _)| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    }

    /// The VAE config from the decoder's keys, with SDXL's scaling factor.
    pub fn vae_config(&self) -> Result<serde_json::Value> {
        let prefix = self.vae_prefix.ok_or_else(|| self.no_vae())?;
        let p = |k: &str| format!("{prefix}{k}");
        let levels = self.count_layers(&p("decoder.up."));
        let channels = (0..levels)
            .map(|k| self.dim(&p(&format!("decoder.up.{k}.block.0.conv2.weight")), 0))
            .collect::<Result<Vec<_>>>()?;
        Ok(json!({
            "_class_name": "AutoencoderKL",
            "block_out_channels": channels,
            "layers_per_block": self.count_layers(&p("decoder.up.0.block.")).saturating_sub(1),
            "latent_channels": self.dim(&p("post_quant_conv.weight"), 0)?,
            "norm_num_groups": 32,
            "scaling_factor": 0.13025,
            "force_upcast": true,
        }))
    }

    fn no_vae(&self) -> Error {
        Error::model(&self.path, "no VAE (first_stage_model.* keys) in this file: give one with --vae")
    }

    /// The diffusers-named weights of one component.
    pub fn component(&self, part: Part) -> Result<Remapped> {
        let weights =
            self.weights.clone().ok_or_else(|| Error::model(&self.path, "a key listing holds no tensor data"))?;
        Ok(Remapped { weights, map: self.key_map(part)? })
    }

    /// For one component: each diffusers tensor name with the stored key it comes from and the transform's name.
    pub fn mapping(&self, part: Part) -> Result<Vec<(String, String, &'static str)>> {
        let mut rows: Vec<_> =
            self.key_map(part)?.into_iter().map(|(d, m)| (d, m.source, m.transform.name())).collect();
        rows.sort();
        Ok(rows)
    }

    fn key_map(&self, part: Part) -> Result<HashMap<String, Mapped>> {
        Ok(match part {
            Part::Unet => self.unet_map()?,
            // `position_ids` is a buffer the encoder recomputes (some files even store it as broken floats).
            Part::ClipL => self
                .keys_under(CLIP_L_PREFIX)
                .filter(|(k, _)| !k.ends_with("position_ids"))
                .map(|(k, _)| {
                    (k.to_string(), Mapped { source: format!("{CLIP_L_PREFIX}{k}"), transform: Transform::Same })
                })
                .collect(),
            Part::ClipG => self.clip_g_map(),
            Part::Vae => self.vae_map()?,
        })
    }

    /// Stored keys that no component uses (EMA copies, `logit_scale`, …), for a debug report.
    pub fn unused_keys(&self) -> Result<Vec<String>> {
        let mut used = BTreeSet::new();
        for part in [Part::Unet, Part::ClipL, Part::ClipG, Part::Vae] {
            if part == Part::Vae && !self.has_vae() {
                continue;
            }
            used.extend(self.key_map(part)?.into_values().map(|m| m.source));
        }
        Ok(self.shapes.keys().filter(|k| !used.contains(*k)).cloned().collect())
    }

    fn unet_map(&self) -> Result<HashMap<String, Mapped>> {
        let (down, up, _) = self.unet_levels()?;
        // SGM block prefix → (diffusers prefix, whether its inner names are ResNet names).
        let mut blocks: HashMap<String, (String, bool)> = HashMap::new();
        blocks.insert("input_blocks.0.0.".into(), ("conv_in.".into(), false));
        blocks.insert("time_embed.0.".into(), ("time_embedding.linear_1.".into(), false));
        blocks.insert("time_embed.2.".into(), ("time_embedding.linear_2.".into(), false));
        blocks.insert("label_emb.0.0.".into(), ("add_embedding.linear_1.".into(), false));
        blocks.insert("label_emb.0.2.".into(), ("add_embedding.linear_2.".into(), false));
        blocks.insert("middle_block.0.".into(), ("mid_block.resnets.0.".into(), true));
        blocks.insert("middle_block.1.".into(), ("mid_block.attentions.0.".into(), false));
        blocks.insert("middle_block.2.".into(), ("mid_block.resnets.1.".into(), true));
        blocks.insert("out.0.".into(), ("conv_norm_out.".into(), false));
        blocks.insert("out.2.".into(), ("conv_out.".into(), false));
        let mut i = 1;
        for (b, level) in down.iter().enumerate() {
            for j in 0..level.depths.len() {
                blocks.insert(format!("input_blocks.{i}.0."), (format!("down_blocks.{b}.resnets.{j}."), true));
                blocks.insert(format!("input_blocks.{i}.1."), (format!("down_blocks.{b}.attentions.{j}."), false));
                i += 1;
            }
            if b + 1 < down.len() {
                blocks.insert(
                    format!("input_blocks.{i}.0.op."),
                    (format!("down_blocks.{b}.downsamplers.0.conv."), false),
                );
                i += 1;
            }
        }
        let mut i = 0;
        for (b, level) in up.iter().enumerate() {
            for (j, &depth) in level.depths.iter().enumerate() {
                blocks.insert(format!("output_blocks.{i}.0."), (format!("up_blocks.{b}.resnets.{j}."), true));
                blocks.insert(format!("output_blocks.{i}.1."), (format!("up_blocks.{b}.attentions.{j}."), false));
                let upsampler = if depth > 0 { 2 } else { 1 };
                blocks.insert(
                    format!("output_blocks.{i}.{upsampler}.conv."),
                    (format!("up_blocks.{b}.upsamplers.0.conv."), false),
                );
                i += 1;
            }
        }
        let mut map = HashMap::new();
        for (rest, _) in self.keys_under(UNET_PREFIX) {
            let Some((sgm, (diffusers, resnet))) = longest_prefix(&blocks, rest) else { continue };
            let inner = &rest[sgm.len()..];
            let inner = if *resnet { rename_resnet(inner) } else { inner.to_string() };
            map.insert(
                format!("{diffusers}{inner}"),
                Mapped { source: format!("{UNET_PREFIX}{rest}"), transform: Transform::Same },
            );
        }
        Ok(map)
    }

    fn clip_g_map(&self) -> HashMap<String, Mapped> {
        let mut map = HashMap::new();
        let mut put = |diffusers: String, source: &str, transform: Transform| {
            map.insert(diffusers, Mapped { source: format!("{CLIP_G_PREFIX}{source}"), transform });
        };
        for (rest, _) in self.keys_under(CLIP_G_PREFIX) {
            let t = "text_model.";
            match rest {
                "token_embedding.weight" => put(format!("{t}embeddings.token_embedding.weight"), rest, Transform::Same),
                "positional_embedding" => {
                    put(format!("{t}embeddings.position_embedding.weight"), rest, Transform::Same)
                }
                "text_projection" => put("text_projection.weight".into(), rest, Transform::Transpose),
                _ if rest.starts_with("ln_final.") => {
                    put(format!("{t}final_layer_norm.{}", &rest[9..]), rest, Transform::Same)
                }
                _ => {
                    let Some(tail) = rest.strip_prefix("transformer.resblocks.") else { continue };
                    let Some((layer, inner)) = tail.split_once('.') else { continue };
                    let base = format!("{t}encoder.layers.{layer}.");
                    let suffix = |s: &str| s.rsplit('.').next().unwrap_or("").to_string();
                    match inner {
                        "attn.in_proj_weight" | "attn.in_proj_bias" => {
                            let kind = if inner.ends_with("weight") { "weight" } else { "bias" };
                            for (index, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                                put(
                                    format!("{base}self_attn.{proj}.{kind}"),
                                    rest,
                                    Transform::Slice { index, parts: 3 },
                                );
                            }
                        }
                        _ => {
                            let renamed = if inner.starts_with("attn.out_proj.") {
                                format!("self_attn.out_proj.{}", suffix(inner))
                            } else if inner.starts_with("ln_1.") {
                                format!("layer_norm1.{}", suffix(inner))
                            } else if inner.starts_with("ln_2.") {
                                format!("layer_norm2.{}", suffix(inner))
                            } else if inner.starts_with("mlp.c_fc.") {
                                format!("mlp.fc1.{}", suffix(inner))
                            } else if inner.starts_with("mlp.c_proj.") {
                                format!("mlp.fc2.{}", suffix(inner))
                            } else {
                                continue;
                            };
                            put(format!("{base}{renamed}"), rest, Transform::Same);
                        }
                    }
                }
            }
        }
        map
    }

    /// The VAE's keys, both halves: the decoder and `post_quant_conv` (text-to-image), the encoder and `quant_conv`
    /// (image-to-image).
    fn vae_map(&self) -> Result<HashMap<String, Mapped>> {
        let prefix = self.vae_prefix.ok_or_else(|| self.no_vae())?;
        let levels = self.count_layers(&format!("{prefix}decoder.up."));
        let mut map = HashMap::new();
        for (rest, _) in self.keys_under(prefix) {
            let mapped =
                |diffusers: String, transform| (diffusers, Mapped { source: format!("{prefix}{rest}"), transform });
            let (half, inner) = match rest.split_once('.') {
                Some((half @ ("decoder" | "encoder"), inner)) => (half, inner),
                _ => {
                    if rest.starts_with("post_quant_conv.") || rest.starts_with("quant_conv.") {
                        let (k, v) = mapped(rest.to_string(), Transform::Same);
                        map.insert(k, v);
                    }
                    continue;
                }
            };
            let mut transform = Transform::Same;
            let renamed = if let Some(r) = inner.strip_prefix("mid.block_1.") {
                format!("mid_block.resnets.0.{}", rename_vae_resnet(r))
            } else if let Some(r) = inner.strip_prefix("mid.block_2.") {
                format!("mid_block.resnets.1.{}", rename_vae_resnet(r))
            } else if let Some(r) = inner.strip_prefix("mid.attn_1.") {
                let (layer, param) = r.split_once('.').unwrap_or((r, ""));
                let layer = match layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => continue,
                };
                if layer != "group_norm" && param == "weight" {
                    transform = Transform::Conv1x1ToLinear;
                }
                format!("mid_block.attentions.0.{layer}.{param}")
            } else if let Some(r) = inner.strip_prefix(if half == "decoder" { "up." } else { "down." }) {
                let Some((k, r)) = r.split_once('.') else { continue };
                let Ok(k) = k.parse::<usize>() else { continue };
                // The decoder's `up` levels count from the lowest resolution, diffusers' `up_blocks` from the
                // highest; the encoder's `down` levels and `down_blocks` both from the image's.
                let (blocks, block, sampler) = if half == "decoder" {
                    ("up_blocks", levels - 1 - k, ("upsample.", "upsamplers"))
                } else {
                    ("down_blocks", k, ("downsample.", "downsamplers"))
                };
                if let Some(r) = r.strip_prefix("block.") {
                    let Some((j, r)) = r.split_once('.') else { continue };
                    format!("{blocks}.{block}.resnets.{j}.{}", rename_vae_resnet(r))
                } else if let Some(r) = r.strip_prefix(sampler.0) {
                    format!("{blocks}.{block}.{}.0.{r}", sampler.1)
                } else {
                    continue;
                }
            } else if let Some(r) = inner.strip_prefix("norm_out.") {
                format!("conv_norm_out.{r}")
            } else if inner.starts_with("conv_in.") || inner.starts_with("conv_out.") {
                inner.to_string()
            } else {
                continue;
            };
            let (k, v) = mapped(format!("{half}.{renamed}"), transform);
            map.insert(k, v);
        }
        Ok(map)
    }
}

fn longest_prefix<'a>(
    blocks: &'a HashMap<String, (String, bool)>,
    key: &str,
) -> Option<(&'a String, &'a (String, bool))> {
    blocks.iter().filter(|(p, _)| key.starts_with(p.as_str())).max_by_key(|(p, _)| p.len())
}

/// A UNet ResNet block's layers: SGM name → diffusers name (each followed by `.`).
pub(crate) const SGM_RESNET_LAYERS: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

fn rename_resnet(inner: &str) -> String {
    for (from, to) in SGM_RESNET_LAYERS {
        if let Some(rest) = inner.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    inner.to_string()
}

fn rename_vae_resnet(inner: &str) -> String {
    match inner.strip_prefix("nin_shortcut.") {
        Some(rest) => format!("conv_shortcut.{rest}"),
        None => inner.to_string(),
    }
}

/// Whether a `--model`/`--vae` argument names a single checkpoint file.
pub fn is_single_file(spec: &str) -> bool {
    let p = Path::new(spec);
    p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}
