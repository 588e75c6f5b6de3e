//! Element-wise f32 math over slices, written so that LLVM vectorises it, compiled once for the baseline CPU and
//! once with AVX2 + FMA (picked at run time), so the binary stays portable.

/// Runs `$body` (a generic inline function over slices) with AVX2 + FMA when the CPU has them.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    /// `$body` compiled for AVX2 with fused multiply-adds.
                    ///
                    /// # Safety
                    /// The CPU must support AVX2 and FMA.
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in a part exact in few bits and a remainder (Cody–Waite), so `x − n·ln 2` loses nothing.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude < 2²² to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// eˣ to about 1 ulp over the normal range; 0 below −87 (where eˣ is subnormal) and +∞ above 88.3 (the last
/// 0.4 before f32 overflow is given up so that 2ⁿ stays a normal number).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-87.0, 88.3);
    // After adding ROUND_MAGIC the low mantissa bits hold n = round(x·log₂e) in two's complement; no float → int
    // conversion (which would not vectorise).
    let shifted = clamped * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // Taylor series of eʳ to degree 7 for |r| ≤ ln2/2: truncation error < 2e-9 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ⁿ: the biased exponent n + 127 (in 1..=254 after the clamp) moved into place; the magic's own bits shift out.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    let y = p * scale;
    let y = if x < -87.0 { 0.0 } else { y };
    if x > 88.3 {
        f32::INFINITY
    } else {
        y
    }
}

/// erf(x) as PyTorch's vectorised CPU kernels compute it (Abramowitz & Stegun 7.1.26: |error| ≤ 1.5e-7), so GELU
/// matches torch's `F.gelu` as closely as possible.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r = (((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6;
    let y = 1.0 - r * t * exp(-a * a);
    y.copysign(x)
}

/// Exact (erf) GELU: x·½·(1 + erf(x/√2)).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// x·σ(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Lanes of the independent partial sums / maxima below: they vectorise, and summing in 16 interleaved lanes
/// keeps the rounding error of long rows small (like a pairwise sum).
const LANES: usize = 16;

#[inline(always)]
fn softmax_in_place_body(row: &mut [f32], scale: f32) {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in maxima.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&maxima).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk) {
            *v = exp((*v - max) * scale);
            *s += *v;
        }
    }
    let mut sum: f64 = sums.iter().map(|&s| s as f64).sum();
    for v in chunks.into_remainder() {
        *v = exp((*v - max) * scale);
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    /// softmax(row · scale) in place (scale > 0).
    pub fn softmax_in_place(row: &mut [f32], scale: f32) => softmax_in_place_body
}

#[inline(always)]
fn geglu_body(hidden: &[f32], gate: &[f32], out: &mut [f32]) {
    for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
        *o = h * gelu(g);
    }
}

multiversion! {
    /// out = hidden · GELU(gate), element-wise.
    pub fn geglu(hidden: &[f32], gate: &[f32], out: &mut [f32]) => geglu_body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let (ours, reference) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((ours - reference).abs() / reference);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
    }

    #[test]
    fn erf_and_gelu_are_within_torch_tolerance() {
        let mut x = -3.0f32;
        while x < 3.0 {
            // erf(x) to 1.5e-7 absolute (A&S 7.1.26) plus the f32 rounding of 1 − r·t·e^(−x²) near 0.
            let reference = libm_erf(x as f64);
            assert!((erf(x) as f64 - reference).abs() < 6e-7, "erf({x}) = {} vs {reference}", erf(x));
            x += 0.001;
        }
        for x in [3.5f32, 4.0, 6.0, 10.0, 1e6] {
            assert!(erf(x) <= 1.0 && erf(x) > 0.999_999 && erf(-x) == -erf(x), "erf({x})");
        }
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    }

    /// erf in f64 from the complementary error function's continued fraction / series (reference only).
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz & Stegun 7.1.5 series; for |x| ≤ 3 its largest term is < 1e4, so f64 keeps ~1e-12.
        let (mut term, mut sum, mut n) = (x, x, 0f64);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) && n < 200.0 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        (sum * 2.0 / std::f64::consts::PI.sqrt()).clamp(-1.0, 1.0)
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let original = row.clone();
        softmax_in_place(&mut row, 0.125);
        let sum: f64 = row.iter().map(|&v| v as f64).sum();
        assert!((sum - 1.0).abs() < 1e-5);
        let max = original.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let denominator: f64 = original.iter().map(|&v| (((v - max) * 0.125) as f64).exp()).sum();
        for (o, p) in original.iter().zip(&row) {
            let reference = (((o - max) * 0.125) as f64).exp() / denominator;
            assert!((*p as f64 - reference).abs() <= 1e-6 * reference + 1e-12);
        }
    }
}
