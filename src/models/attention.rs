//! Multi-head scaled dot-product attention, shared by the UNet's transformer blocks and the VAE's mid block.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Module, VarBuilder};

use super::layers::{linear, linear_no_bias, Linear};

use crate::kernels;

/// Upper bound on the number of attention-score elements materialised at once (per query chunk), so that large
/// images never allocate a full batch × heads × N × N score tensor.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// softmax(q kᵀ · scale) v for `q`: (batch, heads, n_q, d), `k`, `v`: (batch, heads, n_kv, d).
/// On the CPU this is the fused kernel (in f32 whatever the storage dtype); elsewhere queries are processed in
/// chunks so the score tensor stays under [`MAX_SCORE_ELEMENTS`].
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() {
        let dtype = q.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return kernels::attention::scaled_dot_product_attention(&f32(q)?, &f32(k)?, &f32(v)?, scale)?.to_dtype(dtype);
    }
    chunked_attention(q, k, v, scale)
}

/// The plain composition (matmul, softmax, matmul) over query chunks.
pub fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, n_q, _) = q.dims4()?;
    let n_kv = k.dim(2)?;
    let k_t = k.transpose(2, 3)?.contiguous()?;
    let rows = (MAX_SCORE_ELEMENTS / (b * h * n_kv).max(1)).clamp(1, n_q);
    let mut outputs = Vec::with_capacity(n_q.div_ceil(rows));
    let mut start = 0;
    while start < n_q {
        let len = rows.min(n_q - start);
        let q_chunk = q.narrow(2, start, len)?.contiguous()?;
        let scores = (q_chunk.matmul(&k_t)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outputs.push(probs.matmul(v)?);
        start += len;
    }
    if outputs.len() == 1 {
        Ok(outputs.pop().expect("one chunk"))
    } else {
        Tensor::cat(&outputs, 2)
    }
}

/// diffusers' `Attention` processor (q/k/v projections, SDPA, output projection) on (batch, tokens, channels).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `context_dim` is the width of the key/value input (the query width for self-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let proj = |dim: usize, name: &str| {
            if qkv_bias {
                linear(dim, inner, vb.pp(name))
            } else {
                linear_no_bias(dim, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: proj(query_dim, "to_q")?,
            to_k: proj(context_dim, "to_k")?,
            to_v: proj(context_dim, "to_v")?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// `x`: (batch, tokens, query_dim); `context`: (batch, tokens_kv, context_dim) or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        let (b, _, n, _) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, ()))?;
        self.to_out.forward(&out)
    }
}

/// Softmax over the last dimension with an additive mask (used by CLIP's causal attention).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)
}
