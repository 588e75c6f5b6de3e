//! GroupNorm (optionally followed by SiLU) in one pass pair per group: mean and variance in f64, then
//! y = x·(γ·rstd) + (β − mean·γ·rstd) per channel, as PyTorch's CPU kernel applies it. The statistics can also be
//! given (a banded decode normalises every band by the whole image's statistics) and measured over a region
//! ([`region_moments`]).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vector::{multiversion, silu};
use super::{contiguous_f32, with_f32_data};

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// (mean, biased variance) per (batch, group), used instead of the input's own when given.
    given: Option<Arc<[(f64, f64)]>>,
}

/// Count, mean and sum of squared deviations of a set of values; sets combine exactly with [`Moments::merge`]
/// (Chan, Golub and LeVeque's pairwise update), so statistics measured piece by piece equal the whole set's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    pub fn of(x: &[f32]) -> Self {
        if x.is_empty() {
            return Self::default();
        }
        let (mean, variance) = moments(x);
        Self { count: x.len() as f64, mean, m2: variance * x.len() as f64 }
    }

    pub fn merge(self, other: Self) -> Self {
        if other.count == 0.0 {
            return self;
        }
        if self.count == 0.0 {
            return other;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        Self {
            count,
            mean: self.mean + delta * other.count / count,
            m2: self.m2 + other.m2 + delta * delta * self.count * other.count / count,
        }
    }

    /// (mean, biased variance), what GroupNorm normalises by.
    pub fn mean_variance(&self) -> (f64, f64) {
        (self.mean, if self.count > 0.0 { self.m2 / self.count } else { 0.0 })
    }
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
        if let Some(given) = &self.given {
            if given.len() * per_group != x.len() {
                candle_core::bail!(
                    "group norm: {} given statistics for {} groups",
                    given.len(),
                    x.len() / per_group.max(1)
                );
            }
        }
        let mut out = vec![0f32; x.len()];
        if per_group == 0 {
            return Ok((CpuStorage::F32(out), x_layout.shape().clone()));
        }
        out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(index, (y, x))| {
            let (mean, variance) = match &self.given {
                Some(given) => given[index],
                None => moments(x),
            };
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
    apply(x, gamma, beta, GroupNormOp { groups, eps, silu, given: None })
}

fn apply(x: &Tensor, gamma: &Tensor, beta: &Tensor, op: GroupNormOp) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

/// [`group_norm`] by given statistics: `given[b · groups + g]` is the (mean, biased variance) of group g of item b.
pub fn group_norm_given(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
    given: &[(f64, f64)],
) -> Result<Tensor> {
    apply(x, gamma, beta, GroupNormOp { groups, eps, silu, given: Some(given.into()) })
}

/// The [`Moments`] of each (batch, group) of a (batch, channels, height, width) tensor over the pixels in `rows` ×
/// `columns`, in the order `b · groups + g`. CPU tensors of any float dtype (values are read as f32).
pub fn region_moments(x: &Tensor, groups: usize, rows: Range<usize>, columns: Range<usize>) -> Result<Vec<Moments>> {
    let (batch, channels, height, width) = x.dims4()?;
    if groups == 0 || !channels.is_multiple_of(groups) || rows.end > height || columns.end > width {
        candle_core::bail!(
            "group moments: region {rows:?} × {columns:?} of {groups} groups outside a tensor of {:?}",
            x.dims()
        );
    }
    if rows.is_empty() || columns.is_empty() {
        return Ok(vec![Moments::default(); batch * groups]);
    }
    let per_group = channels / groups;
    with_f32_data(x, |data| {
        (0..batch * groups)
            .into_par_iter()
            .map(|index| {
                let first_plane = index * per_group;
                let mut total = Moments::default();
                for plane in first_plane..first_plane + per_group {
                    for y in rows.clone() {
                        let start = (plane * height + y) * width;
                        total = total.merge(Moments::of(&data[start + columns.start..start + columns.end]));
                    }
                }
                total
            })
            .collect()
    })
}
