//! bf16 matrix product for the CPU: both operands rounded to bf16 (round to nearest even), products summed in f32.
//! On CPUs with AVX512-BF16 the micro-kernel is `vdpbf16ps` (two bf16 products per f32 lane and instruction, twice
//! the f32 FMA rate, half the weight bytes); elsewhere a portable loop computes the same products.
//!
//! Operands are packed once into the layout the micro-kernel streams: a [`Packed`] matrix is a list of blocks of
//! `width` rows (or columns), each holding, for every pair of consecutive k indices, one `u32` per row with the two
//! bf16 values (the lower k in the low half). Weights are packed when a model loads; activations per call.

use rayon::prelude::*;

use super::SyncPtr;

/// Rows of the left operand per micro-tile (each broadcast to all lanes).
pub const MR: usize = 12;
/// Columns of the right operand per micro-tile (two 16-lane vectors).
pub const NR: usize = 32;
/// k pairs per cache block: a right micro-panel (KC × NR pairs, 32 KiB) streams through L1 (256 was faster than
/// 128 or 192 on the UNet's shapes, see BENCHMARKS.md).
const KC: usize = 256;
/// Left rows per task (a left block of MC × KC pairs, 96 KiB, stays in L2).
const MC: usize = 8 * MR;
/// Right columns per task.
const NC: usize = 8 * NR;

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    (to_bf16(hi) as u32) << 16 | to_bf16(lo) as u32
}

#[inline(always)]
fn unpair(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xffff_0000))
}

/// A matrix of `count` rows (left operand) or columns (right operand) by `k`, in bf16 pairs, blocks of `width`.
#[derive(Debug, Clone)]
pub struct Packed {
    data: Vec<u32>,
    count: usize,
    k: usize,
    width: usize,
}

impl Packed {
    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    /// Rows (left operand) or columns (right operand).
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn k(&self) -> usize {
        self.k
    }

    fn block(&self, b: usize) -> &[u32] {
        let len = self.pairs() * self.width;
        &self.data[b * len..(b + 1) * len]
    }

    /// Packs a row-major `count × k` matrix whose rows are the packed rows: a left operand (`width` = [`MR`]), or
    /// a right operand given transposed, as a linear layer's weight (`width` = [`NR`]).
    pub fn from_rows(src: &[f32], count: usize, k: usize, width: usize) -> Self {
        assert_eq!(src.len(), count * k, "gemm_bf16: {count}×{k} matrix from {} elements", src.len());
        let (pairs, blocks) = (k.div_ceil(2), count.div_ceil(width));
        // SAFETY: each block's `pairs × width` slots are all written: a pair for every (k pair, row), zeros for the
        // padding rows of the last block.
        let data = unsafe {
            super::filled_par(blocks * pairs * width, pairs * width, |b, block| {
                let rows = width.min(count - b * width);
                for l in 0..width {
                    if l >= rows {
                        // Padding rows of the last block.
                        for p in 0..pairs {
                            block[p * width + l].write(0);
                        }
                        continue;
                    }
                    let row = &src[(b * width + l) * k..(b * width + l + 1) * k];
                    for (p, two) in row.chunks(2).enumerate() {
                        block[p * width + l].write(pair(two[0], two.get(1).copied().unwrap_or(0.0)));
                    }
                }
            })
        };
        Self { data, count, k, width }
    }

    /// Packs a right operand whose k runs down the rows: element (kk, j) of the `k × count` row-major matrix is
    /// `src[kk * count + j]`; `fill(kk, row)` writes row `kk` (all `count` columns), so that callers (im2col)
    /// can produce rows on the fly.
    pub fn from_row_writer(count: usize, k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let (pairs, blocks) = (k.div_ceil(2), count.div_ceil(NR));
        let block_len = pairs * NR;
        let len = blocks * block_len;
        let mut data: Vec<u32> = Vec::with_capacity(len);
        // Pairs of k rows in parallel; each writes one NR-wide slot of every block (zeros past the last column).
        let out = SyncPtr(data.as_mut_ptr());
        (0..pairs).into_par_iter().for_each_init(
            || (vec![0f32; count], vec![0f32; count]),
            |(lo, hi), p| {
                fill(2 * p, lo);
                if 2 * p + 1 < k {
                    fill(2 * p + 1, hi);
                } else {
                    hi.fill(0.0);
                }
                for b in 0..blocks {
                    let cols = NR.min(count - b * NR);
                    // SAFETY: slot (b, p) lies inside the allocation and is written by this task only (p is its
                    // own).
                    let slot = unsafe { out.get().add(b * block_len + p * NR) };
                    for l in 0..NR {
                        let v = if l < cols { pair(lo[b * NR + l], hi[b * NR + l]) } else { 0 };
                        // SAFETY: as above.
                        unsafe { slot.add(l).write(v) };
                    }
                }
            },
        );
        // SAFETY: every (block, pair, lane) slot of the `len` elements was written above.
        unsafe { data.set_len(len) };
        Self { data, count, k, width: NR }
    }

    /// The bf16-rounded value of element (i, kk), as f32 (for tests and references).
    pub fn get(&self, i: usize, kk: usize) -> f32 {
        let v = self.block(i / self.width)[kk / 2 * self.width + i % self.width];
        let (lo, hi) = unpair(v);
        if kk.is_multiple_of(2) {
            lo
        } else {
            hi
        }
    }
}

/// Which micro-kernel runs: one that this CPU executes. A `Kernel` can only be obtained from [`Kernel::detect`] or
/// [`Kernel::available`], which check the CPU's features, so holding one proves that its instructions run here: that
/// is what makes [`gemm()`] safe to call with any `Kernel`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Kernel(Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// `vdpbf16ps` (x86-64 with AVX512-BF16).
    Avx512Bf16,
    /// The bf16 values widened to f32 and multiplied with AVX2 FMA (x86-64 without AVX512-BF16).
    Avx2Fma,
    /// Plain Rust, any CPU.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        *Self::available().last().expect("the portable kernel runs everywhere")
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel(Isa::Portable)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                kernels.push(Kernel(Isa::Avx2Fma));
            }
            if has!("avx512f") && has!("avx512bf16") {
                kernels.push(Kernel(Isa::Avx512Bf16));
            }
        }
        kernels
    }

    /// `"Avx512Bf16"`, `"Avx2Fma"` or `"Portable"` (also the `Debug` form).
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Avx512Bf16 => "Avx512Bf16",
            Isa::Avx2Fma => "Avx2Fma",
            Isa::Portable => "Portable",
        }
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// c (m × n, row stride `ldc`) += a (m × k, packed by rows, width [`MR`]) · b (k × n, packed by columns, width
/// [`NR`]), split over rayon's pool.
pub fn gemm(c: &mut [f32], ldc: usize, a: &Packed, b: &Packed, kernel: Kernel) {
    let (m, n, k) = (a.count, b.count, a.k);
    assert!(a.width == MR && b.width == NR, "gemm_bf16: operands packed with the wrong widths");
    assert_eq!(b.k, k, "gemm_bf16: inner dimensions {k} and {} differ", b.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "gemm_bf16: destination of {m}×{n} exceeds {}", c.len());
    let c_ptr = SyncPtr(c.as_mut_ptr());
    super::par_tiles((m, n), (MC, NC), (MR, NR), |origin, size| {
        // SAFETY: the tiles are disjoint and within m × n, which fits c (checked above).
        unsafe { tile(c_ptr.get(), ldc, a, b, origin, size, (m, n), kernel) }
    });
}

#[allow(clippy::too_many_arguments)]
/// One mc × nc tile of c: for each k block, each right micro-panel against each left micro-block.
///
/// # Safety
/// `c` must point to an m × n matrix (m = `a.count`, n = `b.count`) of writable f32 with row stride `ldc ≥ n`, and
/// no other thread may read or write the tile's elements (rows `row0..row0 + mc`, columns `col0..col0 + nc`, within
/// m × n) during the call. `a` and `b` must be packed with widths [`MR`] and [`NR`] and the same k (the packed data
/// itself is read with bounds checks).
unsafe fn tile(
    c: *mut f32,
    ldc: usize,
    a: &Packed,
    b: &Packed,
    (row0, col0): (usize, usize),
    (mc, nc): (usize, usize),
    (m, n): (usize, usize),
    kernel: Kernel,
) {
    let pairs = a.pairs();
    let row_blocks = (row0 / MR)..(m.min(row0 + mc)).div_ceil(MR);
    let col_blocks = (col0 / NR)..(n.min(col0 + nc)).div_ceil(NR);
    let mut edge = [0f32; MR * NR];
    let mut p0 = 0;
    while p0 < pairs {
        let kc = KC.min(pairs - p0);
        for jb in col_blocks.clone() {
            let b_panel = &b.block(jb)[p0 * NR..(p0 + kc) * NR];
            for ib in row_blocks.clone() {
                let a_panel = &a.block(ib)[p0 * MR..(p0 + kc) * MR];
                let (rows, cols) = (MR.min(m - ib * MR), NR.min(n - jb * NR));
                let c_tile = c.add(ib * MR * ldc + jb * NR);
                if rows == MR && cols == NR {
                    micro(kernel, kc, a_panel, b_panel, c_tile, ldc);
                } else {
                    for r in 0..rows {
                        std::ptr::copy_nonoverlapping(c_tile.add(r * ldc), edge.as_mut_ptr().add(r * NR), cols);
                    }
                    micro(kernel, kc, a_panel, b_panel, edge.as_mut_ptr(), NR);
                    for r in 0..rows {
                        std::ptr::copy_nonoverlapping(edge.as_ptr().add(r * NR), c_tile.add(r * ldc), cols);
                    }
                }
            }
        }
        p0 += kc;
    }
}

/// c (MR × NR, row stride ldc) += a_panel (kc pairs × MR) · b_panel (kc pairs × NR).
///
/// # Safety
/// `c` must point to MR rows of NR writable f32 with row stride `ldc`, which no other thread uses during the call;
/// `a` must hold at least kc·MR values and `b` kc·NR (the AVX-512 kernel reads them through raw pointers). The
/// kernel's instructions run on this CPU because a [`Kernel`] exists only for those that do.
#[inline(always)]
unsafe fn micro(kernel: Kernel, kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize) {
    debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    match kernel.0 {
        // SAFETY (both arms): a Kernel of this ISA was made only after its CPU features were detected.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => avx512::micro(kc, a.as_ptr(), b.as_ptr(), c, ldc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => micro_avx2_fma(kc, a, b, c, ldc),
        _ => micro_widened::<false>(kc, a, b, c, ldc),
    }
}

/// [`micro_widened`] compiled for AVX2 with fused multiply-adds.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `c` must be as [`micro`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2_fma(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize) {
    micro_widened::<true>(kc, a, b, c, ldc)
}

/// The micro-kernel on bf16 values widened to f32, vectorised by the compiler for the caller's target features
/// (`FMA`: fused multiply-adds, only where the CPU has them, else `mul_add` would be a library call).
///
/// # Safety
/// `c` must point to MR rows of NR writable f32 with row stride `ldc`, which no other thread uses during the call
/// (`a` and `b` are read with bounds checks).
#[inline(always)]
unsafe fn micro_widened<const FMA: bool>(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize) {
    let mut acc = [[0f32; NR]; MR];
    for (r, row) in acc.iter_mut().enumerate() {
        std::ptr::copy_nonoverlapping(c.add(r * ldc), row.as_mut_ptr(), NR);
    }
    for p in 0..kc {
        let mut b_lo = [0f32; NR];
        let mut b_hi = [0f32; NR];
        for j in 0..NR {
            (b_lo[j], b_hi[j]) = unpair(b[p * NR + j]);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let (a_lo, a_hi) = unpair(a[p * MR + r]);
            for j in 0..NR {
                row[j] = if FMA {
                    a_hi.mul_add(b_hi[j], a_lo.mul_add(b_lo[j], row[j]))
                } else {
                    row[j] + a_lo * b_lo[j] + a_hi * b_hi[j]
                };
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), NR);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX512F and AVX512-BF16; `a` must be valid for reading kc·MR values and `b` kc·NR, and `c`
    /// must point to MR rows of NR writable f32 with row stride `ldc`, which no other thread uses during the call.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro(kc: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = _mm512_loadu_ps(c.add(r * ldc));
            row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
        }
        for p in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for (r, row) in acc.iter_mut().enumerate() {
                let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ar, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ar, b1);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), row[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lcg;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: goes up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), half::bf16::from_f32(-2.5).to_bits());
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        for x in lcg(3, 1000) {
            let x = x * 1e3;
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }

    /// Every shape class: exact multiples, ragged edges in m, n and odd k, k smaller than one pair.
    #[test]
    fn every_kernel_matches_an_f64_product_of_the_rounded_operands() {
        let kernels = Kernel::available();
        eprintln!("kernels: {kernels:?}");
        for &(m, n, k) in &[(12, 32, 2), (1, 1, 1), (13, 33, 7), (100, 70, 300), (2 * MC + 5, NC + 3, 2 * KC * 2 + 3)] {
            let a = lcg(1, m * k);
            let bt = lcg(2, n * k); // b transposed: n × k
            let c0 = lcg(4, m * n);
            let pa = Packed::from_rows(&a, m, k, MR);
            let pb = Packed::from_rows(&bt, n, k, NR);
            // The same right operand packed from its k × n form, as im2col does.
            let pb2 = Packed::from_row_writer(n, k, |kk, row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = bt[j * k + kk];
                }
            });
            assert_eq!(pb.data, pb2.data, "{m}×{n}×{k}: the two right-operand packings differ");
            let mut want = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k).map(|kk| pa.get(i, kk) as f64 * pb.get(j, kk) as f64).sum();
                    want[i * n + j] = c0[i * n + j] as f64 + dot;
                }
            }
            for &kernel in &kernels {
                let mut c = c0.clone();
                gemm(&mut c, n, &pa, &pb, kernel);
                for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt() + 1e-6 * w.abs();
                    assert!((got as f64 - w).abs() <= tol, "{kernel:?} {m}×{n}×{k} at {idx}: {got} vs {w}");
                }
            }
        }
    }

    #[test]
    fn rounded_operands_stay_close_to_the_f32_product() {
        let (m, n, k) = (20, 40, 512);
        let (a, bt) = (lcg(5, m * k), lcg(6, n * k));
        let mut c = vec![0f32; m * n];
        gemm(&mut c, n, &Packed::from_rows(&a, m, k, MR), &Packed::from_rows(&bt, n, k, NR), Kernel::detect());
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * bt[j * k + kk] as f64).sum();
                // Each operand carries a relative rounding error ≤ 2^-9; random signs: ~√k · 2^-8 · |a||b|.
                assert!((c[i * n + j] as f64 - exact).abs() < 0.1, "({i},{j}): {} vs {exact}", c[i * n + j]);
            }
        }
    }
}
