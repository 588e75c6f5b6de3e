//! Fused CPU kernels for the hot spots of SDXL inference (attention, GEGLU, GroupNorm, convolution), used when
//! the tensors are f32 on the CPU; other devices and dtypes take candle's own ops. Each kernel is checked against
//! the plain candle composition in its tests.

pub mod attention;
pub mod conv;
pub mod geglu;
pub mod gemm;
pub mod gemm_bf16;
pub mod group_norm;
pub mod linear;
pub mod vector;

use candle_core::{CpuStorage, Layout, Result};

/// The f32 elements of a contiguous CPU storage (the kernels' callers make their inputs contiguous).
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("kernel: expected f32 data");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("kernel: expected a contiguous tensor, got layout {layout:?}"),
    }
}
