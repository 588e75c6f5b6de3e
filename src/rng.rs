//! torch-compatible CPU random numbers.
//!
//! [`TorchRng`] reproduces `torch.Generator("cpu").manual_seed(seed)` followed by `torch.randn(shape, generator=g)`
//! (float32), which is how diffusers draws SDXL's initial latents and the noise of stochastic schedulers.
//!
//! What torch does (checked against torch 2.15, bit for bit):
//!
//! * Engine: 32-bit Mersenne Twister (mt19937) seeded with the low 32 bits of the seed.
//! * `n >= 16` values: `n` float32 uniforms `(x & 0xFFFFFF) * 2^-24` are drawn into the output, then every full block
//!   of 16 is turned into normals by Box–Muller in place (`u1 = 1 - d[j]`, `u2 = d[j + 8]`, `j < 8`); when `n` is not
//!   a multiple of 16, 16 fresh uniforms are drawn into the last 16 slots and that block is transformed again.
//!   On x86 CPUs with AVX2 + FMA (torch's `AVX2` and `AVX512` kernels) the transform uses torch's vectorised
//!   Cephes-style `log`/`sincos` (compiled by GCC, which fuses some multiply–adds); elsewhere torch uses the C
//!   library's `logf`/`cosf`/`sinf` with a double-precision angle. Both kernels are reproduced here and picked the way
//!   torch picks them. (torch builds from other compilers, e.g. MSVC on Windows, may fuse differently and then differ
//!   in the last bit of some values; the scalar kernel also inherits the platform's libm.)
//! * `n < 16` values: a scalar double-precision path. Each value is one half of a Box–Muller pair built from two
//!   53-bit uniforms (each from two 32-bit draws); the second half of a pair is cached in the generator and returned by
//!   the next scalar draw, even across calls. Drawing 16 or more values neither uses nor clears that cache;
//!   reseeding clears it.

use candle_core::{Device, Tensor};

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The 32-bit Mersenne Twister as torch implements it (`at::mt19937`).
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; MT_N]>,
    /// Index of the next state word to temper; `MT_N` means the state must be regenerated first.
    next: usize,
    seed: u32,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937").field("seed", &self.seed).field("next", &self.next).finish_non_exhaustive()
    }
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Self { state, next: MT_N, seed }
    }

    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..MT_N {
            let y = (s[i] & UPPER_MASK) | (s[(i + 1) % MT_N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            s[i] = s[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Which of torch's float32 Box–Muller kernels to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NormalKernel {
    /// torch's AVX2 specialisation (used by its AVX2 and AVX512 CPU capabilities).
    Avx2,
    /// torch's portable scalar kernel (`DEFAULT` capability, non-x86 CPUs).
    Scalar,
}

impl NormalKernel {
    /// The kernel torch would dispatch to on this CPU (torch needs AVX2 and FMA for its AVX2 kernels).
    fn detect() -> Self {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return NormalKernel::Avx2;
            }
        }
        NormalKernel::Scalar
    }

    /// Box–Muller on 16 uniforms in place, as torch's `normal_fill_16` with mean 0 and std 1.
    fn fill16(self, d: &mut [f32]) {
        debug_assert_eq!(d.len(), 16);
        for j in 0..8 {
            let u1 = 1.0 - d[j];
            let u2 = d[j + 8];
            let (cos_part, sin_part) = match self {
                NormalKernel::Avx2 => {
                    let radius = (-2.0 * cephes::log(u1)).sqrt();
                    let (s, c) = cephes::sincos(std::f32::consts::TAU * u2);
                    (radius * c, radius * s)
                }
                NormalKernel::Scalar => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    // torch computes `2.0f * pi<double> * u2` in double and stores it as float.
                    let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
                    (radius * theta.cos(), radius * theta.sin())
                }
            };
            // torch finishes with fma(x, std = 1, mean = 0), which only turns -0.0 into +0.0.
            d[j] = cos_part + 0.0;
            d[j + 8] = sin_part + 0.0;
        }
    }
}

/// torch's AVX2 `log256_ps` / `sincos256_ps` (Cephes single-precision polynomials) evaluated one lane at a time.
/// torch's Linux wheels are built by GCC, which contracts a multiply feeding a single add into an FMA; the
/// `mul_add` calls below sit exactly where that happens, so the results agree with torch bit for bit.
mod cephes {
    // The constants are written as double literals converted to float, as in the C source.
    const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_P: [f32; 9] = [
        7.037_683_629_2E-2_f64 as f32,
        -1.151_461_031_0E-1_f64 as f32,
        1.167_699_874_0E-1_f64 as f32,
        -1.242_014_084_6E-1_f64 as f32,
        1.424_932_278_7E-1_f64 as f32,
        -1.666_805_766_5E-1_f64 as f32,
        2.000_071_476_5E-1_f64 as f32,
        -2.499_999_399_3E-1_f64 as f32,
        3.333_333_117_4E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.121_944_40e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693_359_375_f64 as f32;

    const FOUR_OVER_PI: f32 = 1.273_239_544_735_16_f64 as f32;
    const NEG_DP1: f32 = -0.785_156_25_f64 as f32;
    const NEG_DP2: f32 = -2.418_756_484_985_351_6e-4_f64 as f32;
    const NEG_DP3: f32 = -3.774_894_977_445_941e-8_f64 as f32;
    const SIN_P: [f32; 3] =
        [-1.951_529_589_1E-4_f64 as f32, 8.332_160_873_6E-3_f64 as f32, -1.666_665_461_1E-1_f64 as f32];
    const COS_P: [f32; 3] = [
        2.443_315_711_809_948E-5_f64 as f32,
        -1.388_731_625_493_765E-3_f64 as f32,
        4.166_664_568_298_827E-2_f64 as f32,
    ];

    /// Natural logarithm; NaN for `x <= 0` or NaN, denormals treated as the smallest normal.
    pub(super) fn log(x: f32) -> f32 {
        if x.is_nan() || x <= 0.0 {
            return f32::NAN;
        }
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        // Exponent such that x = m * 2^e with m in [0.5, 1).
        let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
        let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let r = if m < SQRT_HALF {
            e -= 1.0;
            (m - 1.0) + m
        } else {
            m - 1.0
        };
        let z = r * r;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(r, p);
        }
        let y = (y * r).mul_add(z, e * LOG_Q1);
        let y = y - z * 0.5;
        e.mul_add(LOG_Q2, r + y)
    }

    /// `(sin x, cos x)` for moderate `|x|` (the Box–Muller angle is in `[0, 2π)`).
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_in = x.to_bits() & 0x8000_0000;
        let ax = x.abs();
        // Octant index rounded up to even; `as` truncates like cvttps for the range used here.
        let j = ((ax * FOUR_OVER_PI) as i32 + 1) & !1;
        let y = j as f32;
        let sin_sign = sign_in ^ (((j & 4) as u32) << 29);
        let cos_sign = ((!(j - 2) & 4) as u32) << 29;
        let r = y.mul_add(NEG_DP3, y.mul_add(NEG_DP2, y.mul_add(NEG_DP1, ax)));
        let z = r * r;
        let cos_poly = COS_P[0].mul_add(z, COS_P[1]).mul_add(z, COS_P[2]);
        let cos_poly = (cos_poly * z).mul_add(z, -(z * 0.5)) + 1.0;
        let sin_poly = SIN_P[0].mul_add(z, SIN_P[1]).mul_add(z, SIN_P[2]);
        let sin_poly = (sin_poly * z).mul_add(r, r);
        // The vector code blends the two polynomials by masking and adding a +0.0.
        let (s, c) = if j & 2 == 0 { (sin_poly, cos_poly) } else { (cos_poly, sin_poly) };
        let s = f32::from_bits((s + 0.0).to_bits() ^ sin_sign);
        let c = f32::from_bits((c + 0.0).to_bits() ^ cos_sign);
        (s, c)
    }
}

/// A CPU random generator that produces the same numbers as `torch.Generator("cpu").manual_seed(seed)`.
#[derive(Clone, Debug)]
pub struct TorchRng {
    mt: Mt19937,
    /// The second half of the last scalar (double) Box–Muller pair, as `CPUGeneratorImpl::next_double_normal_sample`.
    cached_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`; like torch, only the low 32 bits of `seed` are used.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::detect())
    }

    fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self { mt: Mt19937::new(seed as u32), cached_normal: None, kernel }
    }

    /// The same numbers as `torch.randn(n, generator=g)` (float32); the generator's state carries on.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.scalar_normal() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            self.kernel.fill16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            self.kernel.fill16(tail);
        }
        data
    }

    /// The same numbers as `torch.randn(shape, generator=g)`: a contiguous f32 tensor on `device`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn(n), shape, device)
    }

    /// The same number as `torch.randint(low, high, [], generator=g).item()` (`low < high`): one 32-bit draw reduced
    /// modulo the range, or, for ranges of 2^32 or more, one 64-bit draw (two 32-bit draws, the first the high word).
    pub fn randint(&mut self, low: i64, high: i64) -> i64 {
        assert!(low < high, "randint: empty range [{low}, {high})");
        let range = high.abs_diff(low);
        let value = if range >= 1 << 32 {
            let hi = u64::from(self.mt.next_u32());
            let lo = u64::from(self.mt.next_u32());
            ((hi << 32) | lo) % range
        } else {
            u64::from(self.mt.next_u32()) % range
        };
        low.wrapping_add(value as i64)
    }

    /// A float32 uniform in [0, 1) from one 32-bit draw (24 random bits).
    fn uniform_f32(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// A double uniform in [0, 1) from two 32-bit draws (the first is the high word; 53 bits are kept).
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.mt.next_u32());
        let lo = u64::from(self.mt.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One standard normal from torch's scalar `normal_distribution<double>`.
    fn scalar_normal(&mut self) -> f64 {
        // `value * std + mean` with std 1 and mean 0.
        if let Some(v) = self.cached_normal.take() {
            return v + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos() + 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The 10000th output of the default-seeded (5489) mt19937 is 4123659995 (C++ [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn cephes_functions_are_accurate() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((cephes::log(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0), "log({x})");
            let t = x * std::f32::consts::TAU;
            let (s, c) = cephes::sincos(t);
            assert!((s - t.sin()).abs() < 3e-7 && (c - t.cos()).abs() < 3e-7, "sincos({t})");
        }
        assert!(cephes::log(0.0).is_nan() && cephes::log(-1.0).is_nan());
    }

    /// The portable kernel against torch run with `ATEN_CPU_CAPABILITY=default` (stored by
    /// `scripts/make_rng_token_refs.py`), whatever CPU this test runs on.
    #[test]
    fn scalar_kernel_matches_torch_default_capability() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng_tokens.json");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = json["rng_default_capability"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let seed = case["seed"].as_u64().unwrap();
            let n = case["n"].as_u64().unwrap() as usize;
            let got = TorchRng::with_kernel(seed, NormalKernel::Scalar).randn(n);
            let bits_sum: u64 = got.iter().map(|v| u64::from(v.to_bits())).sum();
            assert_eq!(bits_sum, case["bits_sum"].as_u64().unwrap(), "seed {seed} n {n}");
            let first: Vec<f32> =
                case["first"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(&got[..first.len()], &first[..], "seed {seed} n {n}");
        }
    }
}
