//! diffusers' `Transformer2DModel` (continuous input, linear or 1×1-conv projections) and its
//! `BasicTransformerBlock`s: self-attention, cross-attention on the text, GEGLU feed-forward.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{LayerNorm, Module, VarBuilder};

use super::attention::Attention;
use super::layers::{conv1x1, group_norm, layer_norm, linear, Conv2d, GroupNorm, Linear};
use crate::kernels;

/// `ff.net.0` (GEGLU: a projection to twice the width, split into value and exact-GELU gate) then `ff.net.2`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            proj_out: linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        if h.device().is_cpu() && h.dtype() == DType::F32 {
            return self.proj_out.forward(&kernels::geglu::geglu(&h)?);
        }
        let half = h.dim(D::Minus1)? / 2;
        let value = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
        self.proj_out.forward(&(value * gate)?)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// GroupNorm → projection in → transformer blocks → projection out, plus the residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// The shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, spec: TransformerSpec) -> Result<Self> {
        let c = spec.channels;
        let head_dim = c / spec.heads;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if spec.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv1x1(vb.pp(name), c, c)?)
            })
        };
        Ok(Self {
            norm: group_norm(spec.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks: (0..spec.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        vb.pp("transformer_blocks").pp(i),
                        c,
                        spec.heads,
                        head_dim,
                        spec.context_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: projection("proj_out")?,
        })
    }

    /// The cross-attention layers, for their key/value caches.
    pub fn cross_attentions(&self) -> impl Iterator<Item = &Attention> {
        self.blocks.iter().map(|block| &block.attn2)
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut tokens = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Linear(l) => to_image(&l.forward(&tokens)?)?,
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
        };
        out + x
    }
}
