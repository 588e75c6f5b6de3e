//! Fused scaled-dot-product attention on the CPU: for each (batch, head) and block of query rows, the scores
//! Q·Kᵀ go into a small per-thread buffer, are soft-maxed in place and multiplied by V straight into the output,
//! so no batch × heads × N × N score tensor exists and the buffer stays in cache.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::gemm::{matmul, View};
use super::vector::softmax_in_place;

/// Score elements per query block: 1 Mi f32 (4 MiB) at most.
const BLOCK_SCORES: usize = 1 << 20;
const MAX_BLOCK_ROWS: usize = 128;

struct Sdpa {
    scale: f32,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "dreamshaper-sdpa"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, n_q, dim) = q_layout.shape().dims4()?;
        let (kb, kh, n_kv, kd) = k_layout.shape().dims4()?;
        if (kb, kh, kd) != (batch, heads, dim) || v_layout.shape() != k_layout.shape() {
            candle_core::bail!(
                "attention: shapes q {:?}, k {:?}, v {:?} do not fit",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        let (q, k, v) = (contiguous_f32(q, q_layout)?, contiguous_f32(k, k_layout)?, contiguous_f32(v, v_layout)?);
        let mut out = vec![0f32; batch * heads * n_q * dim];
        if out.is_empty() || n_kv == 0 {
            return Ok((CpuStorage::F32(out), q_layout.shape().clone()));
        }
        let rows = (BLOCK_SCORES / n_kv).clamp(1, MAX_BLOCK_ROWS);
        out.par_chunks_mut(n_q * dim).enumerate().for_each(|(bh, out_bh)| {
            let q_bh = &q[bh * n_q * dim..(bh + 1) * n_q * dim];
            let k_bh = &k[bh * n_kv * dim..(bh + 1) * n_kv * dim];
            let v_bh = &v[bh * n_kv * dim..(bh + 1) * n_kv * dim];
            out_bh.par_chunks_mut(rows * dim).enumerate().for_each(|(block, out_block)| {
                let m = out_block.len() / dim;
                let q_block = &q_bh[block * rows * dim..][..m * dim];
                SCORES.with_borrow_mut(|scores| {
                    scores.resize(m * n_kv, 0.0);
                    let scores = &mut scores[..m * n_kv];
                    // scores (m × n_kv) = Q_block (m × dim) · Kᵀ (dim × n_kv).
                    let (q_view, k_t) = (View::row_major(q_block, dim), View::transposed(k_bh, dim));
                    matmul(scores, n_kv, q_view, k_t, (m, n_kv, dim), false, 1);
                    for row in scores.chunks_mut(n_kv) {
                        softmax_in_place(row, self.scale);
                    }
                    // out (m × dim) = P (m × n_kv) · V (n_kv × dim).
                    let (p_view, v_view) = (View::row_major(scores, n_kv), View::row_major(v_bh, dim));
                    matmul(out_block, dim, p_view, v_view, (m, dim, n_kv), false, 1);
                });
            });
        });
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }
}

/// softmax(q kᵀ · scale) v for `q`: (batch, heads, n_q, d), `k`, `v`: (batch, heads, n_kv, d), f32 CPU tensors.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    debug_assert!(q.device().is_cpu() && q.dtype() == DType::F32);
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Sdpa { scale: scale as f32 })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::models::attention::chunked_attention;

    fn max_relative(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        diff / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn fused_attention_matches_the_plain_composition() {
        let dev = Device::Cpu;
        // Self-attention (several query blocks, odd sizes), cross-attention (77 keys), one head of width 512 (VAE).
        for (b, h, n_q, n_kv, d) in
            [(2, 3, 300, 300, 64), (2, 5, 257, 77, 64), (1, 1, 9000, 9000, 16), (1, 1, 64, 64, 512)]
        {
            let q = (Tensor::randn(0f32, 1., (b, h, n_q, d), &dev).unwrap() * 3.0).unwrap();
            let k = Tensor::randn(0f32, 1., (b, h, n_kv, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1., (b, h, n_kv, d), &dev).unwrap();
            let scale = (d as f64).powf(-0.5);
            let ours = super::scaled_dot_product_attention(&q, &k, &v, scale).unwrap();
            let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let exact = chunked_attention(&f64(&q), &f64(&k), &f64(&v), scale).unwrap();
            let plain = chunked_attention(&q, &k, &v, scale).unwrap();
            let (err, plain_err) = (max_relative(&ours, &exact), max_relative(&plain, &exact));
            assert!(err < 4e-6 || err < 2.0 * plain_err, "({b}, {h}, {n_q}, {n_kv}, {d}): {err:e} vs {plain_err:e}");
        }
        // Non-contiguous inputs (a transposed view) give the same result.
        let q = Tensor::randn(0f32, 1., (1, 40, 2, 64), &dev).unwrap().transpose(1, 2).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 2, 40, 64), &dev).unwrap();
        let ours = super::scaled_dot_product_attention(&q, &k, &k, 0.125).unwrap();
        let reference = chunked_attention(&q.contiguous().unwrap(), &k, &k, 0.125).unwrap();
        assert!(max_relative(&ours, &reference) < 2e-6);
    }
}
