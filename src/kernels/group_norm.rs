//! GroupNorm (optionally followed by SiLU) in one pass pair per group: mean and variance in f64, then
//! y = x·(γ·rstd) + (β − mean·γ·rstd) per channel, as PyTorch's CPU kernel applies it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::vector::{multiversion, silu};

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

#[inline(always)]
fn moments_body(x: &[f32]) -> (f64, f64) {
    const LANES: usize = 8;
    let mut sums = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(chunk) {
            *s += v as f64;
        }
    }
    let sum: f64 = sums.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>();
    let mean = sum / x.len() as f64;
    let mut squares = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &v) in squares.iter_mut().zip(chunk) {
            let d = v as f64 - mean;
            *s += d * d;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum();
    (mean, (squares.iter().sum::<f64>() + tail) / x.len() as f64)
}

multiversion! {
    /// (mean, biased variance) of `x`, accumulated in f64.
    fn moments(x: &[f32]) -> (f64, f64) => moments_body
}

#[inline(always)]
fn affine_body(x: &[f32], y: &mut [f32], scale: f32, shift: f32, with_silu: bool) {
    if with_silu {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = silu(v * scale + shift);
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}

multiversion! {
    fn affine(x: &[f32], y: &mut [f32], scale: f32, shift: f32, with_silu: bool) => affine_body
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "dreamshaper-group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = x_layout.shape().dims();
        if dims.len() < 2 || self.groups == 0 || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!("group norm: {} groups do not divide the channels of {:?}", self.groups, dims);
        }
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let (x, gamma, beta) =
            (contiguous_f32(x, x_layout)?, contiguous_f32(gamma, gamma_layout)?, contiguous_f32(beta, beta_layout)?);
        if gamma.len() != channels || beta.len() != channels {
            candle_core::bail!("group norm: weight and bias need {channels} elements");
        }
        let per_group = channels / self.groups * spatial;
        let mut out = vec![0f32; x.len()];
        if per_group == 0 {
            return Ok((CpuStorage::F32(out), x_layout.shape().clone()));
        }
        out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(index, (y, x))| {
            let (mean, variance) = moments(x);
            let rstd = 1.0 / (variance + self.eps).sqrt();
            let first_channel = (index % self.groups) * (channels / self.groups);
            for (c, (y, x)) in y.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate() {
                let scale = gamma[first_channel + c] as f64 * rstd;
                let shift = beta[first_channel + c] as f64 - mean * scale;
                affine(x, y, scale as f32, shift as f32, self.silu);
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// GroupNorm over (batch, channels, …) f32 CPU tensors, with SiLU applied after when `silu`.
pub fn group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize, eps: f64, silu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &GroupNormOp { groups, eps, silu })
}
