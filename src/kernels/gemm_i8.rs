//! int8 matrix product for the CPU (`--dtype int8`): both operands quantized symmetrically to int8 with one f32
//! scale per row of the left operand and per column of the right one, products summed exactly in i32, and each
//! sum scaled back to f32: `c += scale_a[i] · scale_b[j] · Σₖ qa[i,k] · qb[k,j]`.
//!
//! A linear layer's weight is the right operand, quantized once per output channel when the model loads (1 byte
//! per weight); its input is the left operand, quantized per row (token) on each call. A convolution's weight is
//! the left operand (per output channel) and its im2col band the right (per output pixel).
//!
//! Two micro-kernel families, each with the operand layout it streams ([`Kernel`] says which; operands are packed
//! for one kernel):
//! - **pairs** (AVX2, and the portable loop): `vpmaddwd` multiplies pairs of int16 (the int8 values sign-extended):
//!   16 products per instruction, twice the multiplications of an f32 FMA, with no saturation (unlike
//!   `vpmaddubsw` on u8 × i8, which would need 7-bit operands). A right micro-panel is stored as int8 and widened
//!   as it is loaded; a left one is stored already widened, so that each row is one broadcast load.
//! - **quads** (AVX512-VNNI, and a portable loop that checks the layout on any CPU): `vpdpbusd` sums four u8 × i8
//!   products into each i32 lane: 64 products per instruction, four times an f32 FMA's, loaded without widening.
//!   Its first operand must be unsigned, so the right operand is stored offset by 128 (`q + 128` in 1..=255) and
//!   the left one as it is (a broadcast slot of four i8). `Σ a·(b + 128) = Σ a·b + 128·Σ a`, so each left row
//!   carries `128·Σ a` per k block, which starts its accumulators negated: the sums come out exact, as with pairs.
//!
//! Both families split k into the same blocks (`KC`, 1024 values) and scale each block's exact sum into c in the
//! same order, so every kernel gives the same bits.

use rayon::prelude::*;

use super::SyncPtr;

/// k values per cache block, in every layout. Partial sums stay exact in i32 for any k a model has (|q| ≤ 127:
/// 127² per product, and at most 255 · 127 per quad product, so up to 66 000 k), and a block's sum is exact in
/// f32 for pairs (1024 · 127² < 2²⁴). 1024 (512 pairs) was 2–7 % faster than 256 or 512 on Zen 3's AVX2 kernel
/// (BENCHMARKS.md); a quad right micro-panel of one block (256 quads × 32 columns, 32 KiB) streams through L1.
const KC: usize = 1024;
/// Left rows per task (a multiple of every layout's micro-tile rows).
const MC: usize = 96;
/// Right columns per task (a multiple of every layout's micro-tile columns).
const NC: usize = 256;
/// The largest micro-tile of any layout: the size of the sums buffer.
const MAX_MR: usize = 12;
const MAX_NR: usize = 32;

/// The largest magnitude of a quantized value.
const QMAX: f32 = 127.0;

/// How a kernel's operands are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Pairs of consecutive k: a left slot holds two i16, a right column two i8; 6 × 16 micro-tiles (AVX2's 16
    /// registers: 12 accumulators, 2 right vectors, a broadcast and a product).
    Pairs,
    /// Quads of consecutive k: a left slot holds four i8, a right column four u8 (q + 128); 12 × 32 micro-tiles
    /// (AVX-512's 32 registers: 24 accumulators, 2 right vectors, broadcasts).
    Quads,
}

impl Layout {
    /// Consecutive k values per slot.
    const fn group(self) -> usize {
        match self {
            Layout::Pairs => 2,
            Layout::Quads => 4,
        }
    }

    /// Left rows per micro-tile.
    const fn mr(self) -> usize {
        match self {
            Layout::Pairs => 6,
            Layout::Quads => 12,
        }
    }

    /// Right columns per micro-tile.
    const fn nr(self) -> usize {
        match self {
            Layout::Pairs => 16,
            Layout::Quads => 32,
        }
    }

    /// What a right operand stores for the quantized value q.
    #[inline(always)]
    fn right_byte(self, q: i8) -> u8 {
        match self {
            Layout::Pairs => q as u8,
            Layout::Quads => q as u8 ^ 0x80,
        }
    }

    /// The quantized value a right operand's byte stands for.
    fn right_value(self, byte: u8) -> i8 {
        match self {
            Layout::Pairs => byte as i8,
            Layout::Quads => (byte ^ 0x80) as i8,
        }
    }

    /// The left slot of `group` quantized values (missing ones are 0).
    #[inline(always)]
    fn left_slot(self, q: impl Fn(usize) -> i8) -> u32 {
        match self {
            Layout::Pairs => (q(1) as i16 as u16 as u32) << 16 | q(0) as i16 as u16 as u32,
            Layout::Quads => u32::from_le_bytes([q(0) as u8, q(1) as u8, q(2) as u8, q(3) as u8]),
        }
    }

    /// Value t of a left slot.
    fn left_value(self, slot: u32, t: usize) -> i8 {
        match self {
            Layout::Pairs => (slot >> (16 * t)) as u16 as i16 as i8,
            Layout::Quads => (slot >> (8 * t)) as u8 as i8,
        }
    }
}

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

/// A left operand: `count` rows by `k`, quantized per row, in blocks of the layout's micro-tile rows; for each
/// group of consecutive k a block holds one `u32` slot per row, ready to broadcast.
#[derive(Debug, Clone)]
pub struct LeftI8 {
    data: Vec<u32>,
    scales: Vec<f32>,
    /// Quads only: `128 · Σ q` over each k block, per (row block, k block, row in block); empty for pairs.
    corrections: Vec<i32>,
    count: usize,
    k: usize,
    layout: Layout,
}

impl LeftI8 {
    /// Quantizes a row-major `count × k` matrix, each row with its own scale, packed for `kernel`.
    pub fn from_rows(src: &[f32], count: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(src.len(), count * k, "gemm_i8: {count}×{k} matrix from {} elements", src.len());
        let layout = kernel.layout();
        let (mr, g) = (layout.mr(), layout.group());
        let (groups, blocks) = (k.div_ceil(g), count.div_ceil(mr));
        let scales = row_scales(src, count, k);
        // SAFETY: each block's `groups × mr` slots are all written: a slot for every (k group, row), zeros for the
        // padding rows of the last block.
        let data = unsafe {
            super::filled_par(blocks * groups * mr, groups * mr, |b, block| {
                for l in 0..mr {
                    let i = b * mr + l;
                    if i >= count {
                        for p in 0..groups {
                            block[p * mr + l].write(0);
                        }
                        continue;
                    }
                    let inv = 1.0 / scales[i];
                    let row = &src[i * k..(i + 1) * k];
                    for (p, values) in row.chunks(g).enumerate() {
                        let slot = layout.left_slot(|t| values.get(t).map_or(0, |&v| quantize(v, inv)));
                        block[p * mr + l].write(slot);
                    }
                }
            })
        };
        let corrections = match layout {
            Layout::Pairs => Vec::new(),
            Layout::Quads => {
                let k_blocks = k.div_ceil(KC);
                let mut corrections = vec![0i32; blocks * k_blocks * mr];
                if k > 0 {
                    corrections.par_chunks_mut(k_blocks * mr).enumerate().for_each(|(b, block)| {
                        for i in (b * mr)..count.min((b + 1) * mr) {
                            let inv = 1.0 / scales[i];
                            for (kb, values) in src[i * k..(i + 1) * k].chunks(KC).enumerate() {
                                let sum: i32 = values.iter().map(|&v| quantize(v, inv) as i32).sum();
                                block[kb * mr + i % mr] = 128 * sum;
                            }
                        }
                    });
                }
                corrections
            }
        };
        Self { data, scales, corrections, count, k, layout }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The dequantized value of element (i, kk) (for tests and references).
    pub fn get(&self, i: usize, kk: usize) -> f32 {
        let (mr, g) = (self.layout.mr(), self.layout.group());
        let slot = self.data[(i / mr) * self.k.div_ceil(g) * mr + kk / g * mr + i % mr];
        self.layout.left_value(slot, kk % g) as f32 * self.scales[i]
    }

    fn block(&self, b: usize) -> &[u32] {
        let len = self.k.div_ceil(self.layout.group()) * self.layout.mr();
        &self.data[b * len..(b + 1) * len]
    }

    /// Row block `b`'s corrections for k block `kb` (one per row of the block), or an empty slice for pairs.
    fn corrections(&self, b: usize, kb: usize) -> &[i32] {
        if self.corrections.is_empty() {
            return &[];
        }
        let mr = self.layout.mr();
        let start = (b * self.k.div_ceil(KC) + kb) * mr;
        &self.corrections[start..start + mr]
    }
}

/// A right operand: `count` columns by `k`, quantized per column, in blocks of the layout's micro-tile columns;
/// for each group of consecutive k a block holds `group` bytes per column (the lower k first).
#[derive(Debug, Clone)]
pub struct RightI8 {
    data: Vec<u8>,
    scales: Vec<f32>,
    count: usize,
    k: usize,
    layout: Layout,
}

/// Writes the quantized bytes of `G` rows (`rows[t · count + j]` is row t, column j) interleaved: `G` per column.
#[inline(always)]
fn interleave<const G: usize>(rows: &[f32], count: usize, inv: &[f32], layout: Layout, out: &mut [u8]) {
    let rows: [&[f32]; G] = std::array::from_fn(|t| &rows[t * count..(t + 1) * count]);
    // right_byte(q) is q's bits XOR this (0 or 0x80): no branch in the loop.
    let offset = layout.right_byte(0);
    for (j, (column, &inv)) in out[..G * count].chunks_exact_mut(G).zip(&inv[..count]).enumerate() {
        for (byte, row) in column.iter_mut().zip(rows) {
            *byte = quantize(row[j], inv) as u8 ^ offset;
        }
    }
}

impl RightI8 {
    /// Quantizes a matrix given transposed, `count × k` row-major (a linear layer's weight, (n, k)), each of its
    /// rows (our columns) with its own scale, packed for `kernel`.
    pub fn from_rows(src: &[f32], count: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(src.len(), count * k, "gemm_i8: {count}×{k} matrix from {} elements", src.len());
        let layout = kernel.layout();
        let (nr, g) = (layout.nr(), layout.group());
        let (groups, blocks) = (k.div_ceil(g), count.div_ceil(nr));
        let scales = row_scales(src, count, k);
        let block_len = groups * nr * g;
        // SAFETY: every byte of each block is written: `g` per (k group, column), zeros for padding columns and
        // for the missing k of the last group.
        let data = unsafe {
            super::filled_par(blocks * block_len, block_len, |b, block| {
                for l in 0..nr {
                    let j = b * nr + l;
                    let (inv, row) = match j < count {
                        true => (1.0 / scales[j], &src[j * k..(j + 1) * k]),
                        false => (1.0, &[][..]),
                    };
                    for p in 0..groups {
                        for t in 0..g {
                            let q = row.get(p * g + t).map_or(0, |&v| quantize(v, inv));
                            block[(p * nr + l) * g + t].write(layout.right_byte(q));
                        }
                    }
                }
            })
        };
        Self { data, scales, count, k, layout }
    }

    /// Quantizes a `k × count` matrix produced row by row (`fill(kk, row)` writes row `kk`, all columns; im2col),
    /// with the column scales given (`scales[j]` must cover column j's largest magnitude, else values clamp),
    /// packed for `kernel`.
    pub fn from_row_writer(
        count: usize,
        k: usize,
        scales: Vec<f32>,
        kernel: Kernel,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        assert_eq!(scales.len(), count, "gemm_i8: {} scales for {count} columns", scales.len());
        let layout = kernel.layout();
        let (nr, g) = (layout.nr(), layout.group());
        let (groups, blocks) = (k.div_ceil(g), count.div_ceil(nr));
        let block_len = groups * nr * g;
        let len = blocks * block_len;
        let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        let mut data: Vec<u8> = Vec::with_capacity(len);
        let out = SyncPtr(data.as_mut_ptr());
        // Groups of k rows in parallel; each writes its `g` bytes of every column slot of every block.
        (0..groups).into_par_iter().for_each_init(
            // The group's rows, then their values quantized and interleaved (`g` per column; zeros past the last
            // column up to a whole block).
            || (vec![0f32; g * count], vec![layout.right_byte(0); blocks * nr * g]),
            |(rows, interleaved), p| {
                for (t, row) in rows.chunks_exact_mut(count.max(1)).enumerate() {
                    match p * g + t < k {
                        true => fill(p * g + t, row),
                        false => row.fill(0.0),
                    }
                }
                let columns = &mut interleaved[..count * g];
                match layout {
                    Layout::Pairs => interleave::<2>(rows, count, &inv, layout, columns),
                    Layout::Quads => interleave::<4>(rows, count, &inv, layout, columns),
                }
                for (b, block_slot) in interleaved.chunks_exact(nr * g).enumerate() {
                    // SAFETY: slot (b, p), nr · g bytes, lies inside the allocation and is written by this task
                    // only (p is its own); the source is a separate buffer.
                    unsafe {
                        let slot = out.get().add(b * block_len + p * nr * g);
                        std::ptr::copy_nonoverlapping(block_slot.as_ptr(), slot, nr * g);
                    }
                }
            },
        );
        // SAFETY: every (block, group, column) slot of the `len` bytes was written above.
        unsafe { data.set_len(len) };
        Self { data, scales, count, k, layout }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The dequantized value of element (kk, j) (for tests and references).
    pub fn get(&self, j: usize, kk: usize) -> f32 {
        let (nr, g) = (self.layout.nr(), self.layout.group());
        let byte = self.data[((j / nr) * self.k.div_ceil(g) * nr + kk / g * nr + j % nr) * g + kk % g];
        self.layout.right_value(byte) as f32 * self.scales[j]
    }

    fn block(&self, b: usize) -> &[u8] {
        let len = self.k.div_ceil(self.layout.group()) * self.layout.nr() * self.layout.group();
        &self.data[b * len..(b + 1) * len]
    }
}

/// Which micro-kernel runs; only obtainable from [`Kernel::detect`] or [`Kernel::available`], which check the
/// CPU's features, so holding one proves its instructions run here (what makes [`gemm()`] safe to call).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Kernel(Isa);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// Pairs, plain Rust, any CPU.
    Portable,
    /// Quads, plain Rust, any CPU (the layout's check where the CPU lacks AVX512-VNNI).
    PortableQuads,
    /// Pairs, `vpmaddwd` on AVX2.
    Avx2,
    /// Quads, `vpdpbusd` on AVX512-VNNI.
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        *Self::available().last().expect("the portable kernel runs everywhere")
    }

    /// Every kernel this CPU can run, slowest first.
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel(Isa::Portable), Kernel(Isa::PortableQuads)];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                kernels.push(Kernel(Isa::Avx2));
            }
            if has!("avx512f") && has!("avx512vnni") {
                kernels.push(Kernel(Isa::Avx512Vnni));
            }
        }
        kernels
    }

    /// `"Avx512Vnni"`, `"Avx2"`, `"PortableQuads"` or `"Portable"` (also the `Debug` form).
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Avx512Vnni => "Avx512Vnni",
            Isa::Avx2 => "Avx2",
            Isa::PortableQuads => "PortableQuads",
            Isa::Portable => "Portable",
        }
    }

    fn layout(self) -> Layout {
        match self.0 {
            Isa::Portable | Isa::Avx2 => Layout::Pairs,
            Isa::PortableQuads | Isa::Avx512Vnni => Layout::Quads,
        }
    }
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// c (m × n, row stride `ldc`) += a (m × k) · b (k × n), dequantized, split over rayon's pool. Both operands must
/// be packed for `kernel` (or for another kernel of the same layout).
pub fn gemm(c: &mut [f32], ldc: usize, a: &LeftI8, b: &RightI8, kernel: Kernel) {
    let (m, n, k) = (a.count, b.count, a.k);
    let layout = kernel.layout();
    assert!(a.layout == layout && b.layout == layout, "gemm_i8: operands packed for another kernel than {kernel:?}");
    assert_eq!(b.k, k, "gemm_i8: inner dimensions {k} and {} differ", b.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "gemm_i8: destination of {m}×{n} exceeds {}", c.len());
    let c_ptr = SyncPtr(c.as_mut_ptr());
    super::par_tiles((m, n), (MC, NC), (layout.mr(), layout.nr()), |origin, size| {
        // SAFETY: the tiles are disjoint and within m × n, which fits c (checked above).
        unsafe { tile(c_ptr.get(), ldc, a, b, origin, size, (m, n), kernel) }
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
    let layout = kernel.layout();
    let (mr, nr, g) = (layout.mr(), layout.nr(), layout.group());
    let groups = a.k.div_ceil(g);
    let row_blocks = (row0 / mr)..(m.min(row0 + mc)).div_ceil(mr);
    let col_blocks = (col0 / nr)..(n.min(col0 + nc)).div_ceil(nr);
    // The micro-tile's sums, row stride nr.
    let mut sums = [0i32; MAX_MR * MAX_NR];
    let (mut p0, mut kb) = (0, 0);
    while p0 < groups {
        let kc = (KC / g).min(groups - p0);
        for jb in col_blocks.clone() {
            let b_panel = &b.block(jb)[p0 * nr * g..(p0 + kc) * nr * g];
            let cols = nr.min(n - jb * nr);
            let b_scales = &b.scales[jb * nr..jb * nr + cols];
            for ib in row_blocks.clone() {
                let a_panel = &a.block(ib)[p0 * mr..(p0 + kc) * mr];
                micro(kernel, kc, a_panel, b_panel, a.corrections(ib, kb), &mut sums);
                let rows = mr.min(m - ib * mr);
                for (r, row) in sums.chunks_exact(nr).enumerate().take(rows) {
                    let sa = a.scales[ib * mr + r];
                    let dst = std::slice::from_raw_parts_mut(c.add((ib * mr + r) * ldc + jb * nr), cols);
                    for ((d, &s), &sb) in dst.iter_mut().zip(row.iter()).zip(b_scales) {
                        *d += s as f32 * (sa * sb);
                    }
                }
            }
        }
        p0 += kc;
        kb += 1;
    }
}

/// sums (mr × nr, row stride nr) = a_panel (kc groups × mr) · b_panel (kc groups × nr), exact; `corrections` are
/// the left rows' (quads only).
#[inline(always)]
fn micro(kernel: Kernel, kc: usize, a: &[u32], b: &[u8], corrections: &[i32], sums: &mut [i32; MAX_MR * MAX_NR]) {
    let layout = kernel.layout();
    assert!(
        a.len() >= kc * layout.mr() && b.len() >= kc * layout.nr() * layout.group(),
        "gemm_i8: micro-panels shorter than {kc} groups"
    );
    if layout == Layout::Quads {
        assert_eq!(corrections.len(), layout.mr(), "gemm_i8: a quad left block without its corrections");
    }
    match kernel.0 {
        // SAFETY: a Kernel of these ISAs exists only where the CPU has their features, and the panels hold kc
        // groups and the corrections mr rows (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::micro(kc, a.as_ptr(), b.as_ptr(), sums) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512_vnni::micro(kc, a.as_ptr(), b.as_ptr(), corrections.as_ptr(), sums) },
        Isa::PortableQuads => micro_quads_portable(kc, a, b, corrections, sums),
        _ => micro_pairs_portable(kc, a, b, sums),
    }
}

fn micro_pairs_portable(kc: usize, a: &[u32], b: &[u8], sums: &mut [i32; MAX_MR * MAX_NR]) {
    const MR: usize = Layout::Pairs.mr();
    const NR: usize = Layout::Pairs.nr();
    sums[..MR * NR].fill(0);
    for p in 0..kc {
        let b = &b[p * NR * 2..(p + 1) * NR * 2];
        for (r, row) in sums.chunks_exact_mut(NR).take(MR).enumerate() {
            let v = a[p * MR + r];
            let (a_lo, a_hi) = (v as u16 as i16 as i32, (v >> 16) as u16 as i16 as i32);
            for (j, s) in row.iter_mut().enumerate() {
                *s += a_lo * b[2 * j] as i8 as i32 + a_hi * b[2 * j + 1] as i8 as i32;
            }
        }
    }
}

fn micro_quads_portable(kc: usize, a: &[u32], b: &[u8], corrections: &[i32], sums: &mut [i32; MAX_MR * MAX_NR]) {
    const MR: usize = Layout::Quads.mr();
    const NR: usize = Layout::Quads.nr();
    for (row, &correction) in sums.chunks_exact_mut(NR).zip(corrections) {
        row.fill(-correction);
    }
    for p in 0..kc {
        let b = &b[p * NR * 4..(p + 1) * NR * 4];
        for (r, row) in sums.chunks_exact_mut(NR).take(MR).enumerate() {
            let a = a[p * MR + r].to_le_bytes();
            for (s, column) in row.iter_mut().zip(b.chunks_exact(4)) {
                *s += (0..4).map(|t| a[t] as i8 as i32 * column[t] as i32).sum::<i32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Layout, MAX_MR, MAX_NR};
    use std::arch::x86_64::*;

    const MR: usize = Layout::Pairs.mr();
    const NR: usize = Layout::Pairs.nr();

    /// # Safety
    /// The CPU must have AVX2; `a` must be valid for reading kc·MR values and `b` kc·NR·2 bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn micro(kc: usize, a: *const u32, b: *const u8, sums: &mut [i32; MAX_MR * MAX_NR]) {
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
        for (r, row) in acc.iter().enumerate() {
            _mm256_storeu_si256(sums.as_mut_ptr().add(r * NR) as *mut __m256i, row[0]);
            _mm256_storeu_si256(sums.as_mut_ptr().add(r * NR + 8) as *mut __m256i, row[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_vnni {
    use super::{Layout, MAX_MR, MAX_NR};
    use std::arch::x86_64::*;

    const MR: usize = Layout::Quads.mr();
    const NR: usize = Layout::Quads.nr();

    /// # Safety
    /// The CPU must have AVX512F and AVX512-VNNI; `a` must be valid for reading kc·MR values, `b` kc·NR·4 bytes
    /// and `corrections` MR values.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn micro(
        kc: usize,
        a: *const u32,
        b: *const u8,
        corrections: *const i32,
        sums: &mut [i32; MAX_MR * MAX_NR],
    ) {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        for (r, row) in acc.iter_mut().enumerate() {
            let start = _mm512_set1_epi32(-*corrections.add(r));
            *row = [start, start];
        }
        for p in 0..kc {
            // Columns 0–15 and 16–31, each lane the column's four u8 (q + 128) of this k quad.
            let b0 = _mm512_loadu_si512(b.add(p * NR * 4) as *const __m512i);
            let b1 = _mm512_loadu_si512(b.add(p * NR * 4 + 64) as *const __m512i);
            for (r, row) in acc.iter_mut().enumerate() {
                let ar = _mm512_set1_epi32(*a.add(p * MR + r) as i32);
                row[0] = _mm512_dpbusd_epi32(row[0], b0, ar);
                row[1] = _mm512_dpbusd_epi32(row[1], b1, ar);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            _mm512_storeu_si512(sums.as_mut_ptr().add(r * NR) as *mut __m512i, row[0]);
            _mm512_storeu_si512(sums.as_mut_ptr().add(r * NR + 16) as *mut __m512i, row[1]);
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
        for kernel in Kernel::available() {
            let q = LeftI8::from_rows(&row, 1, 5, kernel);
            assert!((q.scales[0] - 0.01).abs() < 1e-7);
            let got: Vec<f32> = (0..5).map(|kk| q.get(0, kk)).collect();
            for (g, w) in got.iter().zip([0.5, -1.27, 0.0, 0.01, 0.0]) {
                assert!((g - w).abs() < 1e-6, "{kernel:?}: {got:?}");
            }
            let r = RightI8::from_rows(&row, 1, 5, kernel);
            let got: Vec<f32> = (0..5).map(|kk| r.get(0, kk)).collect();
            for (g, w) in got.iter().zip([0.5, -1.27, 0.0, 0.01, 0.0]) {
                assert!((g - w).abs() < 1e-6, "{kernel:?}: {got:?}");
            }
            // An all-zero row quantizes to zeros with a finite scale.
            let z = RightI8::from_rows(&[0.0; 4], 1, 4, kernel);
            assert_eq!((z.scales[0], z.get(0, 3)), (1.0, 0.0));
        }
    }

    /// Every shape class: exact multiples, ragged edges in m and n, odd k and k not a multiple of 4, more than one
    /// k block, and a right operand packed both ways. The i32 sums are exact, so every kernel must match an f64
    /// product of the dequantized operands to f32 rounding, and all kernels, whatever their layout, the same bits.
    #[test]
    fn every_kernel_matches_an_f64_product_of_the_quantized_operands() {
        let kernels = Kernel::available();
        eprintln!("kernels: {kernels:?}");
        let shapes = [
            (12, 32, 4),
            (6, 16, 2),
            (1, 1, 1),
            (7, 17, 7),
            (13, 33, 6),
            (100, 70, 300),
            (2 * MC + 5, NC + 3, 2 * KC + 3),
        ];
        for (m, n, k) in shapes {
            let a = lcg(1, m * k);
            // Columns of growing magnitude: each its own scale.
            let bt: Vec<f32> = lcg(2, n * k).iter().enumerate().map(|(i, v)| v * (1 + i / k) as f32).collect();
            let c0 = lcg(4, m * n);
            let mut results = Vec::new();
            for &kernel in &kernels {
                let pa = LeftI8::from_rows(&a, m, k, kernel);
                let pb = RightI8::from_rows(&bt, n, k, kernel);
                let pb2 = RightI8::from_row_writer(n, k, pb.scales.clone(), kernel, |kk, row| {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = bt[j * k + kk];
                    }
                });
                assert_eq!(pb.data, pb2.data, "{kernel:?} {m}×{n}×{k}: the two right-operand packings differ");
                // The exact value and the magnitude of its terms (f32 rounding is relative to the terms).
                let mut want = vec![(0f64, 0f64); m * n];
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|kk| pa.get(i, kk) as f64 * pb.get(j, kk) as f64);
                        let (dot, size) = terms.fold((0.0, 0.0), |(d, s), t| (d + t, s + t.abs()));
                        want[i * n + j] = (c0[i * n + j] as f64 + dot, c0[i * n + j].abs() as f64 + size);
                    }
                }
                let mut c = c0.clone();
                gemm(&mut c, n, &pa, &pb, kernel);
                for (idx, (&got, &(w, size))) in c.iter().zip(&want).enumerate() {
                    let tol = 1e-6 * size * (1 + k.div_ceil(KC)) as f64;
                    assert!((got as f64 - w).abs() <= tol, "{kernel:?} {m}×{n}×{k} at {idx}: {got} vs {w}");
                }
                results.push(c);
            }
            // Exact integer sums and the same scaling order: every kernel gives the same bits.
            assert!(results.windows(2).all(|w| w[0] == w[1]), "{m}×{n}×{k}: kernels differ");
        }
    }

    #[test]
    fn operands_packed_for_another_layout_are_refused() {
        let (pairs, quads) = (Kernel(Isa::Portable), Kernel(Isa::PortableQuads));
        let a = LeftI8::from_rows(&[1.0; 8], 2, 4, pairs);
        let b = RightI8::from_rows(&[1.0; 8], 2, 4, quads);
        let refused = std::panic::catch_unwind(|| gemm(&mut [0.0; 4], 2, &a, &b, pairs));
        assert!(refused.is_err());
    }

    #[test]
    fn quantized_product_stays_close_to_the_f32_product() {
        let (m, n, k) = (20, 40, 512);
        let (a, bt) = (lcg(5, m * k), lcg(6, n * k));
        let kernel = Kernel::detect();
        let mut c = vec![0f32; m * n];
        gemm(&mut c, n, &LeftI8::from_rows(&a, m, k, kernel), &RightI8::from_rows(&bt, n, k, kernel), kernel);
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
