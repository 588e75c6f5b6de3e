//! GEGLU: the first half of the last dimension times the exact GELU of the second half.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::vector::geglu as geglu_row;

struct GegluOp;

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "dreamshaper-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let width = *dims.last().unwrap_or(&0);
        if !width.is_multiple_of(2) {
            candle_core::bail!("geglu: the last dimension of {dims:?} must be even");
        }
        let half = width / 2;
        let x = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; x.len() / 2];
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("checked above") = half;
        if let Some(rows_per_task) = 16_384usize.checked_div(half) {
            // Rows in parallel, a few at a time so that each task has some work.
            let rows_per_task = rows_per_task.max(1);
            out.par_chunks_mut(rows_per_task * half).zip(x.par_chunks(rows_per_task * width)).for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(half).zip(x.chunks(width)) {
                    geglu_row(&x[..half], &x[half..], y);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `x[..., :d] · GELU(x[..., d:])` for an f32 CPU tensor whose last dimension is 2d.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GegluOp)
}
