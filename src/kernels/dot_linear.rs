//! out (rows × n) = x (rows × k) · Wᵀ with W as checkpoints store it, (n × k), for inputs of few rows.
//!
//! Each output is the dot product of two contiguous k-vectors, a row of x and a row of W, so the weight is read
//! where it lies. A general GEMM (the `gemm` crate) instead repacks W into column panels on every call, a strided
//! gather that costs as much as the product itself when x has few rows (a text encoder's 77 tokens per prompt).
//! Blocks of 4 rows of x × 4 rows of W keep 16 accumulators in AVX-512 registers; W is streamed once (split over the
//! threads by rows), x is re-read from cache.

use rayon::prelude::*;

/// Up to this many rows of x the dot-product kernel beats the `gemm` crate on W as stored (the text encoders' 77 and
/// 154 rows; `cargo bench --bench sdxl -- --case gemm`, see BENCHMARKS.md); from about 256 rows on, repacking W is
/// amortised and the `gemm` crate is as fast or faster.
pub const MAX_ROWS: usize = 200;

/// Rows of W per parallel task.
const W_ROWS_PER_TASK: usize = 64;

/// Rows of W per register block (× 4 rows of x: 16 accumulators in AVX-512 registers; 6 × 4 spills registers and is
/// slower).
const W_BLOCK: usize = 4;

/// Whether this CPU runs the kernel (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out` (rows × n, row-major) = x (rows × k) · Wᵀ (+ `bias` per column), W (n × k) row-major. `None` when the CPU
/// lacks AVX-512F (the caller then uses the general GEMM).
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    assert!(x.len() >= rows * k && w.len() >= n * k, "dot linear: operands shorter than {rows}×{k} and {n}×{k}");
    assert!(bias.is_none_or(|b| b.len() == n), "dot linear: bias of the wrong length");
    if !available() {
        return None;
    }
    // outᵀ (n × rows), one contiguous chunk per task of W rows, then transposed into `out` with the bias.
    let mut out_t = vec![0f32; n * rows];
    out_t.par_chunks_mut(W_ROWS_PER_TASK * rows.max(1)).enumerate().for_each(|(task, chunk)| {
        let first = task * W_ROWS_PER_TASK;
        let count = chunk.len() / rows.max(1);
        // SAFETY: AVX-512F was detected above; the row ranges are within `x` and `w` (asserted above).
        unsafe { task_dots(chunk, x, &w[first * k..(first + count) * k], rows, count, k) };
    });
    let mut out = vec![0f32; rows * n];
    out.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = out_t[j * rows + i] + bias.map_or(0.0, |b| b[j]);
        }
    });
    Some(out)
}

/// out_t (w_rows × rows) = W-rows · xᵀ.
///
/// # Safety
/// The CPU must support AVX-512F; `x` must hold at least `rows · k` values and `w` at least `w_rows · k` (they are
/// read through raw pointers; `out_t` is written with bounds checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn task_dots(out_t: &mut [f32], x: &[f32], w: &[f32], rows: usize, w_rows: usize, k: usize) {
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for j0 in (0..w_rows).step_by(W_BLOCK) {
        let w_block: [*const f32; W_BLOCK] = std::array::from_fn(|c| wp.add((j0 + c).min(w_rows - 1) * k));
        for i0 in (0..rows).step_by(4) {
            let x_block: [*const f32; 4] = std::array::from_fn(|r| xp.add((i0 + r).min(rows - 1) * k));
            let dots = block_dots(x_block, w_block, k);
            for (c, dots) in dots.iter().enumerate().take(w_rows - j0) {
                for (r, &d) in dots.iter().enumerate().take(rows - i0) {
                    out_t[(j0 + c) * rows + i0 + r] = d;
                }
            }
        }
    }
}

/// Never called: [`available`] is false off x86-64, so [`linear`] returns before. It exists for the call site to
/// compile there.
///
/// # Safety
/// None: it panics.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn task_dots(_: &mut [f32], _: &[f32], _: &[f32], _: usize, _: usize, _: usize) {
    unreachable!("dot linear: needs AVX-512F")
}

/// The `W_BLOCK` × 4 dot products of rows of W (`w`) with 4 rows of x (`x`), each `k` long:
/// result[c][r] = w_c · x_r.
///
/// # Safety
/// The CPU must support AVX-512F, and every pointer of `x` and `w` must be valid for reading `k` f32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_dots(x: [*const f32; 4], w: [*const f32; W_BLOCK], k: usize) -> [[f32; 4]; W_BLOCK] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 4]; W_BLOCK];
    let full = k / 16 * 16;
    let mut p = 0;
    while p < full {
        let xs: [__m512; 4] = std::array::from_fn(|r| _mm512_loadu_ps(x[r].add(p)));
        for c in 0..W_BLOCK {
            let wc = _mm512_loadu_ps(w[c].add(p));
            for r in 0..4 {
                acc[c][r] = _mm512_fmadd_ps(wc, xs[r], acc[c][r]);
            }
        }
        p += 16;
    }
    if full < k {
        let mask: __mmask16 = (1u32 << (k - full)).wrapping_sub(1) as __mmask16;
        let xs: [__m512; 4] = std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, x[r].add(full)));
        for c in 0..W_BLOCK {
            let wc = _mm512_maskz_loadu_ps(mask, w[c].add(full));
            for r in 0..4 {
                acc[c][r] = _mm512_fmadd_ps(wc, xs[r], acc[c][r]);
            }
        }
    }
    std::array::from_fn(|c| std::array::from_fn(|r| _mm512_reduce_add_ps(acc[c][r])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_dot_products_at_every_edge() {
        if !available() {
            return;
        }
        let value = |i: usize, seed: usize| ((i * 2654435761 + seed * 40503) % 1000) as f32 / 500.0 - 1.0;
        // Row counts and widths around the 4-row blocks, the 16-lane vectors and the 64-row tasks.
        for (rows, n, k) in [(1, 1, 1), (3, 5, 17), (4, 4, 16), (7, 130, 33), (154, 70, 768), (2, 64, 15)] {
            let x: Vec<f32> = (0..rows * k).map(|i| value(i, 1)).collect();
            let w: Vec<f32> = (0..n * k).map(|i| value(i, 2)).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i, 3)).collect();
            let out = linear(&x, &w, Some(&bias), rows, n, k).unwrap();
            for i in 0..rows {
                for j in 0..n {
                    let exact: f64 =
                        (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() + bias[j] as f64;
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * (1.0 + exact.abs()),
                        "{rows}×{n}×{k} at ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
            assert_eq!(linear(&x, &w, None, rows, n, k).unwrap().len(), rows * n);
        }
    }
}
