//! Fused CPU kernels for the hot spots of SDXL inference (attention, GEGLU, GroupNorm, convolution), used when
//! the tensors are f32 on the CPU; other devices and dtypes take candle's own ops. Each kernel is checked against
//! the plain candle composition in its tests.

pub mod attention;
pub mod conv;
pub mod dot_linear;
pub mod geglu;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_i8;
pub mod group_norm;
pub mod linear;
pub mod vector;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// The bf16 weight format of the CPU's mixed precision (`--dtype bf16`): weights rounded to bf16 and packed once
/// for [`gemm_bf16`], each input rounded to bf16 too, sums in f32. Linear layers ([`linear::LinearBf16`]) and
/// convolutions ([`conv::Conv2dBf16`]) take it.
#[derive(Debug)]
pub struct Bf16;

/// The int8 weight format (`--dtype int8`): weights quantized per output channel once for [`gemm_i8`], each input
/// per row (linear) or per output pixel (convolution), sums exact in i32 ([`linear::LinearI8`],
/// [`conv::Conv2dI8`]).
#[derive(Debug)]
pub struct Int8;

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

/// Calls `f` with the f32 elements of a CPU tensor, converted and made contiguous only when it is not already (a
/// weight read straight from its file is used in place).
pub(crate) fn with_f32_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("kernel: expected a CPU tensor");
    };
    Ok(f(contiguous_f32(storage, layout)?))
}

/// A new buffer of `len` elements written chunk by chunk over rayon's pool by `fill(i, chunk)`, for chunk `i`
/// (elements `i·chunk_len ..`). Saves the serial zeroing of `vec![0; len]` before outputs that are overwritten
/// anyway (a bias, packed operands).
///
/// # Safety
/// `fill` must write every element of the chunk it is given (or panic): the buffer is returned as initialised.
pub(crate) unsafe fn filled_par<T: Copy + Send + Sync>(
    len: usize,
    chunk_len: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len].par_chunks_mut(chunk_len.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: the first `len` elements were all written by `fill` (the caller's guarantee), and T is Copy (no drop
    // glue).
    unsafe { v.set_len(len) };
    v
}

/// `rows` copies of `row`, written in parallel.
pub(crate) fn repeated_rows(row: &[f32], rows: usize) -> Vec<f32> {
    let n = row.len();
    // SAFETY: chunks are whole rows (n · 64 elements, the last one fewer), each written element by element from the
    // row repeated.
    unsafe {
        filled_par(rows * n, n * 64, |_, chunk| {
            for (dst, &src) in chunk.iter_mut().zip(row.iter().cycle()) {
                dst.write(src);
            }
        })
    }
}

/// The rows and columns per task for an m × n product: at most (`mc`, `nc`), halved until every thread has
/// several tasks (a product split into few large tiles leaves one core busy with the last while the other idles),
/// but not below one micro-tile (`mr`, `nr`).
fn task_tiles((m, n): (usize, usize), (mut mc, mut nc): (usize, usize), (mr, nr): (usize, usize)) -> (usize, usize) {
    let enough = 6 * rayon::current_num_threads();
    while m.div_ceil(mc) * n.div_ceil(nc) < enough && (mc > mr || nc > nr) {
        if nc > nr && (n.div_ceil(nc) <= m.div_ceil(mc) || mc == mr) {
            nc /= 2;
        } else {
            mc = (mc / 2).max(mr);
        }
    }
    (mc, nc)
}

/// Runs `tile(origin, size)` over rayon's pool for each task of an m × n product: tiles of at most `max_tile` rows
/// and columns (see [`task_tiles`]), multiples of the micro-tile `micro_tile`, disjoint and covering m × n (`size`
/// may reach past its edges; `origin` is the tile's first row and column).
pub(crate) fn par_tiles(
    (m, n): (usize, usize),
    max_tile: (usize, usize),
    micro_tile: (usize, usize),
    tile: impl Fn((usize, usize), (usize, usize)) + Sync + Send,
) {
    use rayon::prelude::*;
    let (mc, nc) = task_tiles((m, n), max_tile, micro_tile);
    let (row_tiles, col_tiles) = (m.div_ceil(mc), n.div_ceil(nc));
    (0..row_tiles * col_tiles)
        .into_par_iter()
        .for_each(|t| tile(((t / col_tiles) * mc, (t % col_tiles) * nc), (mc, nc)));
}

/// A raw pointer that rayon tasks may share, each writing its own disjoint part of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr<T>(pub(crate) *mut T);
// SAFETY: used only to hand disjoint parts of one buffer to rayon tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// `n` pseudo-random values in [-1, 1) from a 64-bit LCG (the kernels' tests' inputs).
#[cfg(test)]
pub(crate) fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
