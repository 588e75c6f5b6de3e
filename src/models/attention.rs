//! Multi-head scaled dot-product attention, shared by the UNet's transformer blocks and the VAE's mid block.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Result, Tensor, TensorId, D};
use candle_nn::{Module, VarBuilder};

use super::layers::{linear, linear_no_bias, Linear};

use crate::kernels;

/// Upper bound on the number of attention-score elements materialised at once (per query chunk), so that large
/// images never allocate a full batch × heads × N × N score tensor.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// softmax(q kᵀ · scale) v for `q`: (batch, heads, n_q, d), `k`, `v`: (batch, heads, n_kv, d).
/// On the CPU this is the fused kernel (in f32 whatever the storage dtype); on CUDA with the `flash-attn` feature,
/// f16 / bf16 inputs go to the flash-attention kernels; elsewhere queries are processed in chunks so the score
/// tensor stays under `MAX_SCORE_ELEMENTS`.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() {
        let dtype = q.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return kernels::attention::scaled_dot_product_attention(&f32(q)?, &f32(k)?, &f32(v)?, scale)?.to_dtype(dtype);
    }
    #[cfg(feature = "flash-attn")]
    if let Some(out) = flash_attention(q, k, v, scale)? {
        return Ok(out);
    }
    chunked_attention(q, k, v, scale)
}

/// candle-flash-attn's kernels where they apply: CUDA, f16 or bf16, a head size that is a multiple of 8 up to
/// 512 (the UNet's 64; the VAE's single 512-wide head runs in f32 and takes the chunked path). They take
/// (batch, tokens, heads, head size) with only the last dimension contiguous, which is a transposed view of ours.
#[cfg(feature = "flash-attn")]
fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let head_size = q.dim(3)?;
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    if !q.device().is_cuda() || !half || head_size % 8 != 0 || head_size > 512 {
        return Ok(None);
    }
    let tokens_first = |t: &Tensor| t.transpose(1, 2);
    let out =
        candle_flash_attn::flash_attn(&tokens_first(q)?, &tokens_first(k)?, &tokens_first(v)?, scale as f32, false)?;
    Ok(Some(out.transpose(1, 2)?))
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

/// How many cross-attention contexts an [`Attention`] keeps the keys and values of: the batched prompt pair, or
/// the negative and positive prompts when they run as separate batches.
const CACHED_CONTEXTS: usize = 2;

/// The keys and values (heads split) of the most recent cross-attention contexts, by the context tensor's id.
/// A denoising loop passes the same text-context tensor at every step, so its projections, which do not depend on
/// the step, are computed once per generation instead of once per step. Tensor ids are never reused, so an entry
/// cannot be mistaken for another context. The entries belong to one generation: the pipeline empties them when its
/// denoising loop ends ([`Attention::clear_context_cache`]), so they never pin a finished request's memory.
#[derive(Debug, Default)]
struct ContextProjections {
    recent: Mutex<Vec<(TensorId, Tensor, Tensor)>>,
}

impl ContextProjections {
    /// The entries, oldest first (a panic elsewhere while they were held leaves them valid).
    fn recent(&self) -> MutexGuard<'_, Vec<(TensorId, Tensor, Tensor)>> {
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    context_projections: Arc<ContextProjections>,
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
            context_projections: Arc::default(),
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        x.reshape((b, n, self.heads, c / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// `x`: (batch, tokens, query_dim); `context`: (batch, tokens_kv, context_dim) or `None` for self-attention.
    /// Cross-attention keys and values of a context seen recently are reused (see `ContextProjections`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let (k, v) = match context {
            Some(context) => self.context_keys_values(context)?,
            None => (self.split_heads(&self.to_k.forward(x)?)?, self.split_heads(&self.to_v.forward(x)?)?),
        };
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        let (b, _, n, _) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, ()))?;
        self.to_out.forward(&out)
    }

    /// Drops the cached cross-attention keys and values (see `ContextProjections`).
    pub fn clear_context_cache(&self) {
        self.context_projections.recent().clear();
    }

    /// How many contexts' keys and values are cached.
    pub fn cached_contexts(&self) -> usize {
        self.context_projections.recent().len()
    }

    fn context_keys_values(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let id = context.id();
        if let Some((_, k, v)) = self.context_projections.recent().iter().find(|(seen, _, _)| *seen == id) {
            return Ok((k.clone(), v.clone()));
        }
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let mut recent = self.context_projections.recent();
        if recent.len() == CACHED_CONTEXTS {
            recent.remove(0);
        }
        recent.push((id, k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Softmax over the last dimension with an additive mask (used by CLIP's causal attention).
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(seed: u64, shape: &[usize]) -> Tensor {
        crate::rng::TorchRng::new(seed).randn_tensor(shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn cross_attention_reuses_a_contexts_projections_and_only_its_own() {
        let (dim, context_dim, heads, head_dim) = (16, 12, 2, 8);
        let mut weights = std::collections::HashMap::new();
        for (i, (name, c_in)) in [("to_q", dim), ("to_k", context_dim), ("to_v", context_dim)].into_iter().enumerate() {
            weights.insert(format!("{name}.weight"), randn(10 + i as u64, &[heads * head_dim, c_in]));
        }
        weights.insert("to_out.0.weight".into(), randn(20, &[dim, heads * head_dim]));
        weights.insert("to_out.0.bias".into(), randn(21, &[dim]));
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let attention = Attention::new(vb, dim, context_dim, heads, head_dim, false).unwrap();
        let x = randn(1, &[2, 5, dim]);
        let contexts = [randn(2, &[2, 7, context_dim]), randn(3, &[2, 7, context_dim]), randn(4, &[2, 7, context_dim])];
        // What each context gives when first seen, from a fresh copy (a new tensor id, so never from the cache).
        let fresh = |c: &Tensor| attention.forward(&x, Some(&c.copy().unwrap())).unwrap();
        let expected: Vec<Tensor> = contexts.iter().map(fresh).collect();
        let cached = |c: &Tensor| attention.context_projections.recent.lock().unwrap().iter().any(|e| e.0 == c.id());
        for round in 0..3 {
            for (context, expected) in contexts.iter().zip(&expected) {
                let out = attention.forward(&x, Some(context)).unwrap();
                let diff = (out - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert_eq!(diff, 0.0, "round {round}: a context's output must not depend on the cache");
                assert!(cached(context));
            }
        }
        // Only the most recent contexts are kept.
        assert!(!cached(&contexts[0]) && cached(&contexts[1]) && cached(&contexts[2]));
        assert_eq!(attention.context_projections.recent.lock().unwrap().len(), CACHED_CONTEXTS);
        // Hits (a loop's steps) give the same output as computing the projections again.
        for _ in 0..2 {
            for (context, expected) in contexts[1..].iter().zip(&expected[1..]) {
                let out = attention.forward(&x, Some(context)).unwrap();
                assert_eq!(
                    (out - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(),
                    0.0
                );
            }
        }
    }
}
