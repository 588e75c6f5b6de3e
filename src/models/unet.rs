//! diffusers' `UNet2DConditionModel` as SDXL uses it: timestep embedding plus the `text_time` added conditioning
//! (pooled text embedding and size/crop ids), cross-attention down/mid/up blocks. Every dimension comes from the
//! UNet's `config.json`, so SDXL, SSD-1B, Vega and tiny test models all load.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use serde::Deserialize;

use super::attention::Attention;
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::layers::{conv3x3, group_norm, Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerSpec};
use super::ConfigError;

/// A config value given either once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value of `block` (validated configs have one value or one per block).
    pub fn get(&self, block: usize) -> T {
        match self {
            PerBlock::One(v) => v.clone(),
            PerBlock::Each(v) => v[block.min(v.len().saturating_sub(1))].clone(),
        }
    }

    fn values(&self) -> &[T] {
        match self {
            PerBlock::One(v) => std::slice::from_ref(v),
            PerBlock::Each(v) => v,
        }
    }

    /// One value, or one per block.
    fn check_len(&self, key: &str, blocks: usize) -> std::result::Result<(), ConfigError> {
        match self {
            PerBlock::Each(v) if v.len() != blocks => Err(ConfigError::new(
                key,
                format!("has {} entries for {blocks} blocks (give one value, or one per block)", v.len()),
            )),
            _ => Ok(()),
        }
    }
}

/// `transformer_layers_per_block`: one count, one per block, or (SSD-1B style) one list per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    One(usize),
    PerBlock(Vec<usize>),
    PerLayer(Vec<Vec<usize>>),
}

impl TransformerLayers {
    /// The transformer depth of each of the `layers` attention modules of down block `block` (validated configs
    /// have an entry for every block and, nested, for every layer).
    fn for_block(&self, block: usize, layers: usize) -> Vec<usize> {
        match self {
            TransformerLayers::One(n) => vec![*n; layers],
            TransformerLayers::PerBlock(v) => vec![v[block]; layers],
            TransformerLayers::PerLayer(v) => v[block].clone(),
        }
    }

    /// The mid block's depth: the last block's (its first layer's, nested).
    fn last(&self, blocks: usize) -> usize {
        self.for_block(blocks - 1, 1)[0]
    }
}

fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_channels() -> usize {
    4
}
fn default_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_tlayers() -> TransformerLayers {
    TransformerLayers::One(1)
}
fn default_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// The fields of `unet/config.json` that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_tlayers")]
    pub transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<Vec<usize>>>,
    /// Not a diffusers key: the mid block's transformer depth when it differs from the last level's (derived from
    /// single-file checkpoints); diffusers always uses `transformer_layers_per_block[-1]`.
    #[serde(default)]
    pub mid_block_transformer_layers: Option<usize>,
    /// diffusers' historical naming: in SDXL configs this is the number of heads.
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
}

impl UNetConfig {
    /// Rejects configs this implementation cannot build or does not cover, naming the key: list lengths that do
    /// not match the number of blocks, zero counts, channels that groups or heads do not divide, block types and
    /// options other than SDXL's.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(ConfigError::new("block_out_channels", "is empty: a UNet needs at least one block"));
        }
        self.check_block_types(n)?;
        self.check_conditioning()?;
        self.check_per_block_values(n)
    }

    /// One down and one up block per entry of `block_out_channels`, of types this UNet implements.
    fn check_block_types(&self, n: usize) -> std::result::Result<(), ConfigError> {
        let (down, up) = (self.down_block_types.len(), self.up_block_types.len());
        if down != n || up != n {
            // Blame the list that disagrees with the other two.
            let key = if down == up {
                "block_out_channels"
            } else if down != n {
                "down_block_types"
            } else {
                "up_block_types"
            };
            return Err(ConfigError::new(
                key,
                format!(
                    "does not match: block_out_channels has {n} entries, down_block_types {down}, up_block_types \
                     {up} (one per block each)"
                ),
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return Err(ConfigError::new("down_block_types", format!("has the unsupported block type `{t}`")));
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return Err(ConfigError::new("up_block_types", format!("has the unsupported block type `{t}`")));
            }
        }
        if let Some(t) = &self.mid_block_type {
            if t != "UNetMidBlock2DCrossAttn" {
                return Err(ConfigError::new("mid_block_type", format!("`{t}` is not supported")));
            }
        }
        Ok(())
    }

    /// SDXL's added time and text conditioning, and none of the other conditioning kinds.
    fn check_conditioning(&self) -> std::result::Result<(), ConfigError> {
        if self.addition_embed_type.as_deref() != Some("text_time") {
            return Err(ConfigError::new(
                "addition_embed_type",
                format!(
                    "is {:?}; an SDXL UNet needs \"text_time\" (is this an SD 1.x/2.x model?)",
                    self.addition_embed_type
                ),
            ));
        }
        for (key, value) in [
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            ("projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim),
        ] {
            if value.is_none() {
                return Err(ConfigError::new(key, "is required (SDXL's added time and text conditioning)"));
            }
        }
        for (key, set) in [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
        ] {
            if set {
                return Err(ConfigError::new(key, "is not supported (leave it null)"));
            }
        }
        if self.resnet_time_scale_shift.as_deref().is_some_and(|s| s != "default") {
            return Err(ConfigError::new("resnet_time_scale_shift", "is not supported: only \"default\" is"));
        }
        Ok(())
    }

    /// The per-block lists have one entry per block, and the widths divide into groups and heads.
    fn check_per_block_values(&self, n: usize) -> std::result::Result<(), ConfigError> {
        self.layers_per_block.check_len("layers_per_block", n)?;
        self.attention_head_dim.check_len("attention_head_dim", n)?;
        if let Some(heads) = &self.num_attention_heads {
            heads.check_len("num_attention_heads", n)?;
        }
        self.cross_attention_dim.check_len("cross_attention_dim", n)?;
        if self.layers_per_block.values().contains(&0) {
            return Err(ConfigError::new("layers_per_block", "must be at least 1 for every block"));
        }
        let heads_key = if self.num_attention_heads.is_some() { "num_attention_heads" } else { "attention_head_dim" };
        if (0..n).any(|i| self.heads(i) == 0) {
            return Err(ConfigError::new(heads_key, "must be at least 1 for every block (attention heads)"));
        }
        if self.norm_num_groups == 0 {
            return Err(ConfigError::new("norm_num_groups", "must be at least 1"));
        }
        self.check_transformer_layers(n)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 {
                return Err(ConfigError::new(format!("block_out_channels[{i}]"), "must be at least 1"));
            }
            if !c.is_multiple_of(self.norm_num_groups) {
                return Err(ConfigError::new(
                    "norm_num_groups",
                    format!("({}) does not divide block_out_channels[{i}] = {c}", self.norm_num_groups),
                ));
            }
            if !c.is_multiple_of(self.heads(i)) {
                return Err(ConfigError::new(
                    heads_key,
                    format!("({} heads for block {i}) does not divide block_out_channels[{i}] = {c}", self.heads(i)),
                ));
            }
        }
        Ok(())
    }

    /// `transformer_layers_per_block` (and `reverse_transformer_layers_per_block`): one entry per block, nested lists
    /// with a depth for every layer of their block.
    fn check_transformer_layers(&self, n: usize) -> std::result::Result<(), ConfigError> {
        const KEY: &str = "transformer_layers_per_block";
        const REVERSE: &str = "reverse_transformer_layers_per_block";
        let per_block = |len: usize, key: &str| {
            if len == n {
                Ok(())
            } else {
                Err(ConfigError::new(key, format!("has {len} entries for {n} blocks (one per block)")))
            }
        };
        match &self.transformer_layers_per_block {
            TransformerLayers::One(_) => {}
            TransformerLayers::PerBlock(v) => per_block(v.len(), KEY)?,
            TransformerLayers::PerLayer(v) => {
                per_block(v.len(), KEY)?;
                for (i, depths) in v.iter().enumerate() {
                    let layers = self.layers_per_block.get(i);
                    if depths.len() < layers {
                        return Err(ConfigError::new(
                            format!("{KEY}[{i}]"),
                            format!("has {} depths for the {layers} layers of down block {i}", depths.len()),
                        ));
                    }
                }
                if self.reverse_transformer_layers_per_block.is_none() {
                    return Err(ConfigError::new(REVERSE, format!("is required when {KEY} is nested")));
                }
            }
        }
        if let Some(reverse) = &self.reverse_transformer_layers_per_block {
            per_block(reverse.len(), REVERSE)?;
            if let Some(i) = reverse.iter().position(Vec::is_empty) {
                return Err(ConfigError::new(format!("{REVERSE}[{i}]"), "is empty"));
            }
        }
        Ok(())
    }

    fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(block)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attentions: Vec<Transformer2DModel>,
    resnets: Vec<ResnetBlock2D>,
}

/// The SDXL added conditioning for one batch: pooled text embedding and `time_ids`.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// (batch, pooled width)
    pub text_embeds: Tensor,
    /// (batch, 6): original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: Tensor,
}

/// What building the UNet's blocks needs beside their weights: the config and the time-embedding width.
struct BlockParts<'a> {
    cfg: &'a UNetConfig,
    temb_dim: usize,
}

impl BlockParts<'_> {
    fn resnet(&self, vb: VarBuilder, c_in: usize, c_out: usize) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(vb, c_in, c_out, Some(self.temb_dim), self.cfg.norm_num_groups, self.cfg.norm_eps)
    }

    fn transformer(&self, vb: VarBuilder, channels: usize, block: usize, layers: usize) -> Result<Transformer2DModel> {
        let cfg = self.cfg;
        Transformer2DModel::new(
            vb,
            TransformerSpec {
                channels,
                heads: cfg.heads(block),
                layers,
                context_dim: cfg.cross_attention_dim.get(block),
                groups: cfg.norm_num_groups,
                use_linear_projection: cfg.use_linear_projection,
            },
        )
    }

    /// `down_blocks.i`: its resnets, transformers (cross-attention blocks) and down-sampler (all but the last).
    fn down_block(&self, vb: VarBuilder, i: usize) -> Result<DownBlock> {
        let (cfg, channels) = (self.cfg, &self.cfg.block_out_channels);
        let c_out = channels[i];
        let c_in = if i == 0 { channels[0] } else { channels[i - 1] };
        let layers = cfg.layers_per_block.get(i);
        let depths = cfg.transformer_layers_per_block.for_block(i, layers);
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for (j, &depth) in depths.iter().enumerate().take(layers) {
            resnets.push(self.resnet(vb.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out)?);
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D" {
                attentions.push(self.transformer(vb.pp("attentions").pp(j), c_out, i, depth)?);
            }
        }
        let last = i + 1 == channels.len();
        let downsampler = if last { None } else { Some(Downsample2D::new(vb.pp("downsamplers").pp(0), c_out)?) };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    /// `mid_block`: resnet, transformer, resnet at the deepest width.
    fn mid_block(&self, vb: VarBuilder) -> Result<MidBlock> {
        let (cfg, n) = (self.cfg, self.cfg.block_out_channels.len());
        let c = cfg.block_out_channels[n - 1];
        let depth = cfg.mid_block_transformer_layers.unwrap_or(cfg.transformer_layers_per_block.last(n));
        Ok(MidBlock {
            resnet_in: self.resnet(vb.pp("resnets").pp(0), c, c)?,
            attentions: vec![self.transformer(vb.pp("attentions").pp(0), c, n - 1, depth)?],
            resnets: vec![self.resnet(vb.pp("resnets").pp(1), c, c)?],
        })
    }

    /// `up_blocks.i`, mirroring down block `n − 1 − i`: one resnet more than it (each taking a skip connection),
    /// transformers for cross-attention blocks, an up-sampler for all but the last.
    fn up_block(&self, vb: VarBuilder, i: usize) -> Result<UpBlock> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let block = n - 1 - i;
        let c_out = reversed[i];
        let c_prev = if i == 0 { reversed[0] } else { reversed[i - 1] };
        let c_skip_last = reversed[(i + 1).min(n - 1)];
        let layers = cfg.layers_per_block.get(block) + 1;
        let depths = match &cfg.reverse_transformer_layers_per_block {
            Some(rev) => rev[i].clone(),
            None => cfg.transformer_layers_per_block.for_block(block, layers),
        };
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j + 1 == layers { c_skip_last } else { c_out };
            let c_in = if j == 0 { c_prev } else { c_out };
            resnets.push(self.resnet(vb.pp("resnets").pp(j), c_in + skip, c_out)?);
            if cfg.up_block_types[i] == "CrossAttnUpBlock2D" {
                let depth = *depths.get(j).or(depths.last()).unwrap_or(&1);
                attentions.push(self.transformer(vb.pp("attentions").pp(j), c_out, block, depth)?);
            }
        }
        let upsampler = if i + 1 < n { Some(Upsample2D::new(vb.pp("upsamplers").pp(0), c_out)?) } else { None };
        Ok(UpBlock { resnets, attentions, upsampler })
    }
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    pub config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let cfg = config;
        cfg.validate()?;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let parts = BlockParts { cfg, temb_dim: channels[0] * 4 };
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let add_dim = cfg.addition_time_embed_dim.expect("validated");
        let shift = cfg.freq_shift;
        let down_blocks = (0..n).map(|i| parts.down_block(vb.pp("down_blocks").pp(i), i)).collect::<Result<_>>()?;
        let mid_block = match cfg.mid_block_type {
            Some(_) => Some(parts.mid_block(vb.pp("mid_block"))?),
            None => None,
        };
        let up_blocks = (0..n).map(|i| parts.up_block(vb.pp("up_blocks").pp(i), i)).collect::<Result<_>>()?;
        let temb_dim = parts.temb_dim;

        Ok(Self {
            time_proj: Timesteps { channels: channels[0], flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: shift },
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb_dim)?,
            add_time_proj: Timesteps { channels: add_dim, flip_sin_to_cos: cfg.flip_sin_to_cos, freq_shift: shift },
            add_embedding: TimestepEmbedding::new(
                vb.pp("add_embedding"),
                cfg.projection_class_embeddings_input_dim.expect("validated"),
                temb_dim,
            )?,
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, channels[0], 1)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), channels[0], cfg.out_channels, 1)?,
            dtype: super::layers::activation_dtype(&vb),
            config: cfg.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every transformer block's cross-attention.
    fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        let down = self.down_blocks.iter().flat_map(|b| &b.attentions);
        let mid = self.mid_block.iter().flat_map(|m| &m.attentions);
        let up = self.up_blocks.iter().flat_map(|b| &b.attentions);
        down.chain(mid).chain(up).flat_map(Transformer2DModel::cross_attentions)
    }

    /// Drops the cross-attention key/value caches (computed once per text context and reused across a denoising
    /// loop's steps): a generation's contexts are of no use to the next, and would keep its memory.
    pub fn clear_context_cache(&self) {
        self.cross_attentions().for_each(Attention::clear_context_cache);
    }

    /// How many text contexts' keys and values the cross-attention layers hold, summed over the layers.
    pub fn cached_contexts(&self) -> usize {
        self.cross_attentions().map(Attention::cached_contexts).sum()
    }

    /// The time embedding plus the added (pooled text + time ids) embedding, with SiLU applied once for all
    /// ResNet blocks. `timestep` is the same for every batch row, as in the SDXL pipeline.
    fn embedding(&self, timestep: f64, batch: usize, added: &AddedConditioning, device: &Device) -> Result<Tensor> {
        let t = self.time_proj.forward(&vec![timestep; batch], device)?;
        let emb = self.time_embedding.forward(&t, self.dtype)?;
        let ids: Vec<f64> = added.time_ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let time_embeds = self.add_time_proj.forward(&ids, device)?.reshape((batch, ()))?;
        let add = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?;
        let aug = self.add_embedding.forward(&add, self.dtype)?;
        candle_nn::ops::silu(&(emb + aug)?)
    }

    /// Predicts the noise (or v) for `sample` (batch, 4, h, w) at `timestep`, conditioned on
    /// `context` (batch, tokens, cross-attention width) and the added conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: &AddedConditioning,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let temb = self.embedding(timestep, batch, added, sample.device())?;
        let context = context.to_dtype(self.dtype)?;
        let mut x = self.conv_in.forward(&sample.to_dtype(self.dtype)?)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = down.forward(&x)?;
                skips.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            x = mid.resnet_in.forward(&x, Some(&temb))?;
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets) {
                x = attn.forward(&x, &context)?;
                x = resnet.forward(&x, Some(&temb))?;
            }
        }
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip =
                    skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip connections exhausted".into()))?;
                x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &context)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the skip connection consumed next (×2 unless the input size was not a
                // multiple of the total down-sampling).
                let size = skips.last().map(|s| s.dims4()).transpose()?.map(|(_, _, h, w)| (h, w));
                x = up.forward(&x, size)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
