//! int8 matrix product for the CPU (`--dtype int8`): both operands quantized symmetrically to int8 with one f32
//! scale per row of the left operand and per column of the right one, products summed exactly in i32, and each
//! sum scaled back to f32: `c += scale_a[i] · scale_b[j] · Σₖ qa[i,k] · qb[k,j]`.
//!
//! A linear layer's weight is the right operand, quantized once per output channel when the model loads (1 byte
//! per weight); its input is the left operand, quantized per row (token) on each call. A convolution's weight is
//! the left operand (per output channel) and its im2col band the right (per output pixel).
//!
//! The micro-kernel multiplies pairs of int16 (the int8 values sign-extended) with `vpmaddwd`: 16 products per
//! instruction, twice the multiplications of an f32 FMA, with no saturation (unlike `vpmaddubsw` on u8 × i8,
//! which would need 7-bit operands). A right micro-panel is stored as int8 and widened as it is loaded; a left one
//! is stored already widened, so that each row is one broadcast load. (On CPUs with AVX512-VNNI the same layout
//! suits `vpdpwssd`; only the AVX2 kernel is written and tested, on the AVX2 machine these figures come from.)

use rayon::prelude::*;

use super::SyncPtr;

/// Rows of the left operand per micro-tile (each broadcast to all lanes): 6 × 2 accumulators + 2 right vectors +
/// 1 broadcast + 1 product fill AVX2's 16 registers.
pub const MR: usize = 6;
/// Columns of the right operand per micro-tile (two vectors of 8 i32 lanes).
pub const NR: usize = 16;
/// k pairs per cache block (512 was 2–7 % faster than 256 and 128 on the UNet's shapes, see BENCHMARKS.md). Partial
/// sums stay exact in i32 for any k a model has (|q| ≤ 127: 2·127² per pair, so up to 66 000 pairs), and a
/// block's sum is exact in f32 (512 pairs · 32 258 < 2²⁴).
const KC: usize = 512;
/// Left rows per task.
const MC: usize = 16 * MR;
/// Right columns per task.
const NC: usize = 16 * NR;

/// The largest magnitude of a quantized value.
const QMAX: f32 = 127.0;

/// The symmetric scale that maps `max_abs` to 127 (1 for an all-zero vector, whose values all quantize to 0).
#[inline]
pub fn scale_for(max_abs: f32) -> f32 {
    if max_abs > 0.0 && max_abs.is_finite() {
        max_abs / QMAX
    } else {
        1.0
    }
}

/// `x / scale` clamped to ±127 and rounded to the nearest integer, ties to even (a NaN `x` gives an unspecified
/// value; the scales, taken with `f32::max`, ignore NaNs).
#[inline(always)]
fn quantize(x: f32, inv_scale: f32) -> i8 {
    // Adding 1.5 · 2²³ to a v in ±127 rounds it to an integer in the (nearest-even) rounding mode and leaves that
    // integer in the low mantissa bits: bits(v + 1.5 · 2²³) = 0x4B40_0000 + round(v). Integer operations only, so
    // the loops over a row vectorise (`round` is a library call on baseline x86-64, and `as i8` a saturating
    // conversion).
    const ROUND: f32 = 12_582_912.0;
    let v = (x * inv_scale).clamp(-QMAX, QMAX);
    (v + ROUND).to_bits().wrapping_sub(0x4B40_0000) as i8
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// One scale per row of a row-major `count × k` matrix, computed over rayon's pool.
fn row_scales(src: &[f32], count: usize, k: usize) -> Vec<f32> {
    if k == 0 {
        return vec![1.0; count];
    }
    src.par_chunks(k).map(|row| scale_for(max_abs(row))).collect()
}

/// A left operand: `count` rows by `k`, quantized per row, in blocks of [`MR`] rows; for each pair of consecutive
/// k a block holds one `u32` per row with the two values sign-extended to i16 (the lower k in the low half), ready
/// to broadcast.
#[derive(Debug, Clone)]
pub struct LeftI8 {
    data: Vec<u32>,
    scales: Vec<f32>,
    count: usize,
    k: usize,
}

#[inline(always)]
fn widened_pair(lo: i8, hi: i8) -> u32 {
    (hi as i16 as u16 as u32) << 16 | lo as i16 as u16 as u32
}

impl LeftI8 {
    /// Quantizes a row-major `count × k` matrix, each row with its own scale.
    pub fn from_rows(src: &[f32], count: usize, k: usize) -> Self {
        assert_eq!(src.len(), count * k, "gemm_i8: {count}×{k} matrix from {} elements", src.len());
        let (pairs, blocks) = (k.div_ceil(2), count.div_ceil(MR));
        let scales = row_scales(src, count, k);
        // SAFETY: each block's `pairs × MR` slots are all written: a pair for every (k pair, row), zeros for the
        // padding rows of the last block.
        let data = unsafe {
            super::filled_par(blocks * pairs * MR, pairs * MR, |b, block| {
                for l in 0..MR {
                    let i = b * MR + l;
                    if i >= count {
                        for p in 0..pairs {
                            block[p * MR + l].write(0);
                        }
                        continue;
                    }
                    let inv = 1.0 / scales[i];
                    let row = &src[i * k..(i + 1) * k];
                    for (p, two) in row.chunks(2).enumerate() {
                        let hi = two.get(1).map_or(0, |&v| quantize(v, inv));
                        block[p * MR + l].write(widened_pair(quantize(two[0], inv), hi));
                    }
                }
            })
        };
        Self { data, scales, count, k }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The dequantized value of element (i, kk) (for tests and references).
    pub fn get(&self, i: usize, kk: usize) -> f32 {
        let v = self.data[(i / MR) * self.k.div_ceil(2) * MR + kk / 2 * MR + i % MR];
        let q = if kk.is_multiple_of(2) { v as u16 as i16 } else { (v >> 16) as u16 as i16 };
        q as f32 * self.scales[i]
    }

    fn block(&self, b: usize) -> &[u32] {
        let len = self.k.div_ceil(2) * MR;
        &self.data[b * len..(b + 1) * len]
    }
}

/// A right operand: `count` columns by `k`, quantized per column, in blocks of [`NR`] columns; for each pair of
/// consecutive k a block holds two int8 per column (the lower k first).
#[derive(Debug, Clone)]
pub struct RightI8 {
    data: Vec<i8>,
    scales: Vec<f32>,
    count: usize,
    k: usize,
}

impl RightI8 {
    /// Quantizes a matrix given transposed, `count × k` row-major (a linear layer's weight, (n, k)), each of its
    /// rows (our columns) with its own scale.
    pub fn from_rows(src: &[f32], count: usize, k: usize) -> Self {
        assert_eq!(src.len(), count * k, "gemm_i8: {count}×{k} matrix from {} elements", src.len());
        let (pairs, blocks) = (k.div_ceil(2), count.div_ceil(NR));
        let scales = row_scales(src, count, k);
        let block_len = pairs * NR * 2;
        // SAFETY: every byte of each block is written: two per (k pair, column), zeros for padding columns and the
        // missing upper half of an odd k.
        let data = unsafe {
            super::filled_par(blocks * block_len, block_len, |b, block| {
                for l in 0..NR {
                    let j = b * NR + l;
                    if j >= count {
                        for p in 0..pairs {
                            block[(p * NR + l) * 2].write(0);
                            block[(p * NR + l) * 2 + 1].write(0);
                        }
                        continue;
                    }
                    let inv = 1.0 / scales[j];
                    let row = &src[j * k..(j + 1) * k];
                    for (p, two) in row.chunks(2).enumerate() {
                        block[(p * NR + l) * 2].write(quantize(two[0], inv));
                        block[(p * NR + l) * 2 + 1].write(two.get(1).map_or(0, |&v| quantize(v, inv)));
                    }
                }
            })
        };
        Self { data, scales, count, k }
    }

    /// Quantizes a `k × count` matrix produced row by row (`fill(kk, row)` writes row `kk`, all columns; im2col),
    /// with the column scales given (`scales[j]` must cover column j's largest magnitude, else values clamp).
    pub fn from_row_writer(count: usize, k: usize, scales: Vec<f32>, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        assert_eq!(scales.len(), count, "gemm_i8: {} scales for {count} columns", scales.len());
        let (pairs, blocks) = (k.div_ceil(2), count.div_ceil(NR));
        let block_len = pairs * NR * 2;
        let len = blocks * block_len;
        let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        let mut data: Vec<i8> = Vec::with_capacity(len);
        let out = SyncPtr(data.as_mut_ptr());
        // Pairs of k rows in parallel; each writes its two bytes of every column slot of every block.
        (0..pairs).into_par_iter().for_each_init(
            // The two rows of a pair, then their values quantized and interleaved ((lo, hi) per column, zeros past
            // the last column up to a whole block).
            || (vec![0f32; count], vec![0f32; count], vec![0i8; blocks * NR * 2]),
            |(lo, hi, pairs_row), p| {
                fill(2 * p, lo);
                if 2 * p + 1 < k {
                    fill(2 * p + 1, hi);
                } else {
                    hi.fill(0.0);
                }
                for (((two, &lo), &hi), &inv) in pairs_row.chunks_exact_mut(2).zip(lo.iter()).zip(hi.iter()).zip(&inv) {
                    two[0] = quantize(lo, inv);
                    two[1] = quantize(hi, inv);
                }
                for (b, block_pairs) in pairs_row.chunks_exact(NR * 2).enumerate() {
                    // SAFETY: slot (b, p), NR · 2 bytes, lies inside the allocation and is written by this task
                    // only (p is its own); the source is a separate buffer.
                    unsafe {
                        let slot = out.get().add(b * block_len + p * NR * 2);
                        std::ptr::copy_nonoverlapping(block_pairs.as_ptr(), slot, NR * 2);
                    }
                }
            },
        );
        // SAFETY: every (block, pair, column) byte pair of the `len` bytes was written above.
        unsafe { data.set_len(len) };
        Self { data, scales, count, k }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The dequantized value of element (kk, j) (for tests and references).
    pub fn get(&self, j: usize, kk: usize) -> f32 {
        let pairs = self.k.div_ceil(2);
        let q = self.data[((j / NR) * pairs * NR + kk / 2 * NR + j % NR) * 2 + kk % 2];
        q as f32 * self.scales[j]
    }

    fn block(&self, b: usize) -> &[i8] {
        let len = self.k.div_ceil(2) * NR * 2;
        &self.data[b * len..(b + 1) * len]
    }
}

/// Which micro-kernel runs; only obtainable from [`Kernel::detect`] or [`Kernel::available`], which check the
/// CPU's features, so holding one proves its instructions run here (what makes [`gemm()`] safe to call).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Kernel(Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// `vpmaddwd` on AVX2.
    Avx2,
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
        if std::arch::is_x86_feature_detected!("avx2") {
            kernels.push(Kernel(Isa::Avx2));
        }
        kernels
    }

    /// `"Avx2"` or `"Portable"` (also the `Debug` form).
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Avx2 => "Avx2",
            Isa::Portable => "Portable",
        }
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// c (m × n, row stride `ldc`) += a (m × k) · b (k × n), dequantized, split over rayon's pool.
pub fn gemm(c: &mut [f32], ldc: usize, a: &LeftI8, b: &RightI8, kernel: Kernel) {
    let (m, n, k) = (a.count, b.count, a.k);
    assert_eq!(b.k, k, "gemm_i8: inner dimensions {k} and {} differ", b.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "gemm_i8: destination of {m}×{n} exceeds {}", c.len());
    let (mc, nc) = super::gemm_bf16::task_tiles((m, n), (MC, NC), (MR, NR));
    let (row_tiles, col_tiles) = (m.div_ceil(mc), n.div_ceil(nc));
    let c_ptr = SyncPtr(c.as_mut_ptr());
    (0..row_tiles * col_tiles).into_par_iter().for_each(|t| {
        let (rt, ct) = (t / col_tiles, t % col_tiles);
        // SAFETY: tile (rt, ct) covers rows rt·mc.. and columns ct·nc.. of c, disjoint from every other task's.
        unsafe { tile(c_ptr.get(), ldc, a, b, (rt * mc, ct * nc), (mc, nc), (m, n), kernel) };
    });
}

#[allow(clippy::too_many_arguments)]
/// One mc × nc tile of c: for each k block, each right micro-panel against each left micro-block, each block's
/// exact i32 sums scaled and added to c.
///
/// # Safety
/// `c` must point to an m × n matrix of writable f32 with row stride `ldc ≥ n`, and no other thread may use the
/// tile's elements (rows `row0..row0 + mc`, columns `col0..col0 + nc`, within m × n) during the call.
unsafe fn tile(
    c: *mut f32,
    ldc: usize,
    a: &LeftI8,
    b: &RightI8,
    (row0, col0): (usize, usize),
    (mc, nc): (usize, usize),
    (m, n): (usize, usize),
    kernel: Kernel,
) {
    let pairs = a.k.div_ceil(2);
    let row_blocks = (row0 / MR)..(m.min(row0 + mc)).div_ceil(MR);
    let col_blocks = (col0 / NR)..(n.min(col0 + nc)).div_ceil(NR);
    let mut sums = [[0i32; NR]; MR];
    let mut p0 = 0;
    while p0 < pairs {
        let kc = KC.min(pairs - p0);
        for jb in col_blocks.clone() {
            let b_panel = &b.block(jb)[p0 * NR * 2..(p0 + kc) * NR * 2];
            let cols = NR.min(n - jb * NR);
            let b_scales = &b.scales[jb * NR..jb * NR + cols];
            for ib in row_blocks.clone() {
                let a_panel = &a.block(ib)[p0 * MR..(p0 + kc) * MR];
                micro(kernel, kc, a_panel, b_panel, &mut sums);
                let rows = MR.min(m - ib * MR);
                for (r, row) in sums.iter().enumerate().take(rows) {
                    let sa = a.scales[ib * MR + r];
                    let dst = std::slice::from_raw_parts_mut(c.add((ib * MR + r) * ldc + jb * NR), cols);
                    for ((d, &s), &sb) in dst.iter_mut().zip(row.iter()).zip(b_scales) {
                        *d += s as f32 * (sa * sb);
                    }
                }
            }
        }
        p0 += kc;
    }
}

/// sums (MR × NR) = a_panel (kc pairs × MR) · b_panel (kc pairs × NR), exact.
#[inline(always)]
fn micro(kernel: Kernel, kc: usize, a: &[u32], b: &[i8], sums: &mut [[i32; NR]; MR]) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR * 2, "gemm_i8: micro-panels shorter than {kc} pairs");
    match kernel.0 {
        // SAFETY: a Kernel of this ISA exists only where the CPU has AVX2, and the panels hold kc pairs (checked).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::micro(kc, a.as_ptr(), b.as_ptr(), sums) },
        _ => micro_portable(kc, a, b, sums),
    }
}

fn micro_portable(kc: usize, a: &[u32], b: &[i8], sums: &mut [[i32; NR]; MR]) {
    *sums = [[0; NR]; MR];
    for p in 0..kc {
        let b = &b[p * NR * 2..(p + 1) * NR * 2];
        for (r, row) in sums.iter_mut().enumerate() {
            let v = a[p * MR + r];
            let (a_lo, a_hi) = (v as u16 as i16 as i32, (v >> 16) as u16 as i16 as i32);
            for (j, s) in row.iter_mut().enumerate() {
                *s += a_lo * b[2 * j] as i32 + a_hi * b[2 * j + 1] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2; `a` must be valid for reading kc·MR values and `b` kc·NR·2 bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn micro(kc: usize, a: *const u32, b: *const i8, sums: &mut [[i32; NR]; MR]) {
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        for p in 0..kc {
            // Columns 0–7 and 8–15, each lane the column's two i8 of this k pair widened to i16.
            let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(p * NR * 2) as *const __m128i));
            let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(p * NR * 2 + 16) as *const __m128i));
            for (r, row) in acc.iter_mut().enumerate() {
                let ar = _mm256_set1_epi32(*a.add(p * MR + r) as i32);
                row[0] = _mm256_add_epi32(row[0], _mm256_madd_epi16(ar, b0));
                row[1] = _mm256_add_epi32(row[1], _mm256_madd_epi16(ar, b1));
            }
        }
        for (row, out) in acc.iter().zip(sums.iter_mut()) {
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, row[0]);
            _mm256_storeu_si256(out.as_mut_ptr().add(8) as *mut __m256i, row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::lcg;

    #[test]
    fn quantization_rounds_to_the_nearest_step_and_keeps_the_largest_value() {
        let row = [0.5f32, -1.27, 0.004, 0.006, 0.0];
        let q = LeftI8::from_rows(&row, 1, 5);
        assert!((q.scales[0] - 0.01).abs() < 1e-7);
        let got: Vec<f32> = (0..5).map(|kk| q.get(0, kk)).collect();
        for (g, w) in got.iter().zip([0.5, -1.27, 0.0, 0.01, 0.0]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // An all-zero row quantizes to zeros with a finite scale.
        let z = RightI8::from_rows(&[0.0; 4], 1, 4);
        assert_eq!((z.scales[0], z.get(0, 3)), (1.0, 0.0));
    }

    /// Every shape class: exact multiples, ragged edges in m and n, odd k, more than one k block, and a right
    /// operand packed both ways. The i32 sums are exact, so every kernel must match an f64 product of the
    /// dequantized operands to f32 rounding.
    #[test]
    fn every_kernel_matches_an_f64_product_of_the_quantized_operands() {
        let kernels = Kernel::available();
        eprintln!("kernels: {kernels:?}");
        for &(m, n, k) in &[(MR, NR, 2), (1, 1, 1), (7, 17, 7), (100, 70, 300), (2 * MC + 5, NC + 3, 4 * KC + 3)] {
            let a = lcg(1, m * k);
            let bt: Vec<f32> = lcg(2, n * k).iter().enumerate().map(|(i, v)| v * (1 + i / k) as f32).collect();
            let c0 = lcg(4, m * n);
            let pa = LeftI8::from_rows(&a, m, k);
            let pb = RightI8::from_rows(&bt, n, k);
            let pb2 = RightI8::from_row_writer(n, k, pb.scales.clone(), |kk, row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = bt[j * k + kk];
                }
            });
            assert_eq!(pb.data, pb2.data, "{m}×{n}×{k}: the two right-operand packings differ");
            // The exact value and the magnitude of its terms (f32 rounding is relative to the terms).
            let mut want = vec![(0f64, 0f64); m * n];
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|kk| pa.get(i, kk) as f64 * pb.get(j, kk) as f64);
                    let (dot, size) = terms.fold((0.0, 0.0), |(d, s), t| (d + t, s + t.abs()));
                    want[i * n + j] = (c0[i * n + j] as f64 + dot, c0[i * n + j].abs() as f64 + size);
                }
            }
            let mut results = Vec::new();
            for &kernel in &kernels {
                let mut c = c0.clone();
                gemm(&mut c, n, &pa, &pb, kernel);
                for (idx, (&got, &(w, size))) in c.iter().zip(&want).enumerate() {
                    let tol = 1e-6 * size * (1 + k.div_ceil(2 * KC)) as f64;
                    assert!((got as f64 - w).abs() <= tol, "{kernel:?} {m}×{n}×{k} at {idx}: {got} vs {w}");
                }
                results.push(c);
            }
            // Exact integer sums and the same scaling order: every kernel gives the same bits.
            assert!(results.windows(2).all(|w| w[0] == w[1]), "{m}×{n}×{k}: kernels differ");
        }
    }

    #[test]
    fn quantized_product_stays_close_to_the_f32_product() {
        let (m, n, k) = (20, 40, 512);
        let (a, bt) = (lcg(5, m * k), lcg(6, n * k));
        let mut c = vec![0f32; m * n];
        gemm(&mut c, n, &LeftI8::from_rows(&a, m, k), &RightI8::from_rows(&bt, n, k), Kernel::detect());
        let mut worst = 0f64;
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|kk| a[i * k + kk] as f64 * bt[j * k + kk] as f64).sum();
                worst = worst.max((c[i * n + j] as f64 - exact).abs());
            }
        }
        // Each value carries a rounding error uniform within half a step (step ≈ 1/127 here, σ = step/√12), so
        // a product of k terms of magnitude ~1/√3 errs by σ ≈ √(2k/3)·step/√12 ≈ 0.04: its largest over 800
        // entries stays below 6σ, against the products' spread of √k/3 ≈ 7.5.
        assert!(worst < 0.25, "largest error {worst}");
    }
}
