//! CLIP text encoders (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`), built from `config.json`.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, Module, VarBuilder};

use super::layers::{embedding, layer_norm, linear_in, Linear, LinearLayout};
use super::ConfigError;
use serde::Deserialize;

/// The fields of a text encoder's `config.json` that shape the network.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Rejects configs the encoder cannot be built with, naming the key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        for (key, value) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::new(
                "num_attention_heads",
                format!("({}) does not divide hidden_size = {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.projection_dim == Some(0) {
            return Err(ConfigError::new("projection_dim", "must be at least 1"));
        }
        Ok(())
    }
}

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// x · sigmoid(1.702 x) (OpenAI CLIP-L).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact erf GELU (OpenCLIP bigG).
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh-approximated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, layout: LinearLayout) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: linear_in(layout, h, h, vb.pp("q_proj"), true)?,
            k_proj: linear_in(layout, h, h, vb.pp("k_proj"), true)?,
            v_proj: linear_in(layout, h, h, vb.pp("v_proj"), true)?,
            out_proj: linear_in(layout, h, h, vb.pp("out_proj"), true)?,
            heads: cfg.num_attention_heads,
            scale: ((h / cfg.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous();
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = super::attention::masked_softmax(&scores, causal_mask)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, layout: LinearLayout) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg, layout)?,
            layer_norm2: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear_in(layout, h, cfg.intermediate_size, vb.pp("mlp").pp("fc1"), true)?,
            fc2: linear_in(layout, cfg.intermediate_size, h, vb.pp("mlp").pp("fc2"), true)?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, causal_mask)?)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?)?;
        x + h
    }
}

/// What SDXL reads from a text encoder for one batch of token ids.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `hidden_states[-2]`: the output of the penultimate encoder layer, (batch, tokens, hidden).
    pub penultimate: Tensor,
    /// `text_embeds`: `text_projection` of the final-layer-normed hidden state at the EOS position, (batch, proj)
    /// (only for encoders with a projection).
    pub pooled: Option<Tensor>,
}

/// A CLIP text transformer, with the optional `text_projection` of `CLIPTextModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: Option<LayerNorm>,
    text_projection: Option<Linear>,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// `vb` is rooted at the module holding `text_model` / `text_projection` keys; both the transformers-4 layout
    /// (`text_model.embeddings…`) and the transformers-5 layout (`embeddings…`) are accepted.
    /// With `with_projection` the final layer, final layer norm and `text_projection` are loaded for the pooled
    /// output; without it only the layers up to the penultimate hidden state are loaded. `layout`: how the linear
    /// layers keep their weights.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, with_projection: bool, layout: LinearLayout) -> Result<Self> {
        cfg.validate()?;
        let tm = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let layer_count = if with_projection { cfg.num_hidden_layers } else { cfg.num_hidden_layers.saturating_sub(1) };
        let layers = (0..layer_count)
            .map(|i| ClipEncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), cfg, layout))
            .collect::<Result<Vec<_>>>()?;
        let (final_layer_norm, text_projection) = if with_projection {
            let proj_dim = cfg.projection_dim.unwrap_or(h);
            (
                Some(layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?),
                Some(linear_in(layout, h, proj_dim, vb.pp("text_projection"), false)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: embedding(cfg.max_position_embeddings, h, emb.pp("position_embedding"))?,
            layers,
            final_layer_norm,
            text_projection,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Appends rows to the token-embedding table (textual inversion: the new tokens' vectors); returns the id of the
    /// first new row.
    pub fn append_token_embeddings(&mut self, rows: &Tensor) -> Result<usize> {
        let table = self.token_embedding.embeddings();
        let first = table.dim(0)?;
        let rows = rows.to_dtype(table.dtype())?.to_device(table.device())?;
        let table = Tensor::cat(&[table, &rows], 0)?;
        let width = table.dim(1)?;
        self.token_embedding = Embedding::new(table, width);
        Ok(first)
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_slice(&mask, (n, n), device)?.to_dtype(dtype)
    }

    /// Position of the pooled token in each row, as transformers chooses it: with the legacy `eos_token_id == 2`
    /// the argmax of the ids (the EOS token has the largest id), otherwise the first EOS.
    fn pooled_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        Ok(rows
            .iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    // torch.argmax returns the first maximal index.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == self.eos_token_id).unwrap_or(0)
                }
            })
            .collect())
    }

    /// Encodes token ids of shape (batch, tokens) (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (_, n) = ids.dims2()?;
        let positions = Tensor::arange(0u32, n as u32, ids.device())?;
        let x = self.token_embedding.forward(ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(n, x.dtype(), x.device())?;
        // With a projection all layers are loaded (the last one feeds the pooled output); without, only those up
        // to the penultimate hidden state.
        let penultimate_layers = self.layers.len().saturating_sub(usize::from(self.text_projection.is_some()));
        let mut x = x;
        for layer in &self.layers[..penultimate_layers] {
            x = layer.forward(&x, &mask)?;
        }
        let penultimate = x.clone();
        let pooled = match (&self.final_layer_norm, &self.text_projection) {
            (Some(norm), Some(proj)) => {
                for layer in &self.layers[penultimate_layers..] {
                    x = layer.forward(&x, &mask)?;
                }
                let x = norm.forward(&x)?;
                let rows = self
                    .pooled_positions(ids)?
                    .into_iter()
                    .enumerate()
                    .map(|(b, pos)| x.i((b, pos)))
                    .collect::<Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&rows, 0)?)?)
            }
            _ => None,
        };
        Ok(ClipOutput { penultimate, pooled })
    }
}
