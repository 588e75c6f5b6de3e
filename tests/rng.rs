//! `TorchRng` against `torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed))`, from the reference
//! values written by `scripts/make_rng_token_refs.py`.

use candle_core::Device;
use dreamshaper::rng::TorchRng;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rng_tokens.json");
    let text = std::fs::read_to_string(path).expect("read tests/fixtures/rng_tokens.json");
    serde_json::from_str(&text).expect("parse tests/fixtures/rng_tokens.json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

/// Whether this CPU runs torch's AVX2 kernel, the one the fixture was generated with (AVX512 machines use it too),
/// in which case the numbers must agree bit for bit; otherwise within float32 rounding of the math functions.
fn expect_bit_exact() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

const TOL: f32 = 1e-6;

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL, "{what}[{i}]: got {g}, torch {w}");
        if expect_bit_exact() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, torch {w} (not bit-exact)");
        }
    }
}

/// Checks one draw against its stored summary (whole values, or first/last 16 + sums).
fn check_draw(got: &[f32], want: &Value, what: &str) {
    assert_eq!(got.len(), want["len"].as_u64().unwrap() as usize, "{what}: length");
    if let Some(values) = want.get("values") {
        assert_close(got, &floats(values), what);
    } else {
        let first = floats(&want["first"]);
        let last = floats(&want["last"]);
        assert_close(&got[..first.len()], &first, &format!("{what} first"));
        assert_close(&got[got.len() - last.len()..], &last, &format!("{what} last"));
    }
    let sum: f64 = got.iter().map(|&v| f64::from(v)).sum();
    let want_sum = want["sum"].as_f64().unwrap();
    assert!((sum - want_sum).abs() <= 1e-6 * got.len() as f64, "{what}: sum {sum} vs torch {want_sum}");
    if expect_bit_exact() {
        let bits_sum: u64 = got.iter().map(|v| u64::from(v.to_bits())).sum();
        assert_eq!(bits_sum, want["bits_sum"].as_u64().unwrap(), "{what}: float32 bit patterns differ");
    }
}

#[test]
fn randn_matches_torch() {
    let fx = fixture();
    let cases = fx["rng"].as_array().unwrap();
    assert!(cases.len() >= 100);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = TorchRng::new(seed);
        for (k, draw) in case["draws"].as_array().unwrap().iter().enumerate() {
            let shape = usizes(&draw["shape"]);
            let got = rng.randn(shape.iter().product());
            check_draw(&got, draw, &format!("seed {seed} draw {k} shape {shape:?}"));
        }
    }
}

#[test]
fn randn_tensor_matches_torch() {
    let fx = fixture();
    for case in fx["rng"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = TorchRng::new(seed);
        for (k, draw) in case["draws"].as_array().unwrap().iter().enumerate() {
            let shape = usizes(&draw["shape"]);
            let t = rng.randn_tensor(&shape, &Device::Cpu).unwrap();
            assert_eq!(t.dims(), &shape[..]);
            assert_eq!(t.dtype(), candle_core::DType::F32);
            assert!(t.is_contiguous());
            let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            check_draw(&got, draw, &format!("tensor seed {seed} draw {k} shape {shape:?}"));
        }
    }
}

#[test]
fn seed_uses_low_32_bits() {
    let a = TorchRng::new((1u64 << 33) + 17).randn(40);
    let b = TorchRng::new(17).randn(40);
    assert_eq!(a, b);
    let c = TorchRng::new(999_999_999_999_999).randn(5);
    let d = TorchRng::new(999_999_999_999_999 & 0xffff_ffff).randn(5);
    assert_eq!(c, d);
}

#[test]
fn state_carries_on_and_clone_forks() {
    let mut a = TorchRng::new(42);
    let first = a.randn(37);
    let mut b = a.clone();
    let second = a.randn(40);
    assert_ne!(&first[..16], &second[..16]);
    assert_eq!(b.randn(40), second);
    // Scalar draws cache the second half of a Box–Muller pair; a clone carries that too.
    let mut c = TorchRng::new(3);
    c.randn(1);
    let mut d = c.clone();
    assert_eq!(c.randn(3), d.randn(3));
    assert!(!format!("{c:?}").is_empty());
}

#[test]
fn empty_draws() {
    let mut rng = TorchRng::new(0);
    assert!(rng.randn(0).is_empty());
    let t = rng.randn_tensor(&[2, 0, 3], &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 0, 3]);
    // Drawing nothing consumes nothing.
    assert_eq!(rng.randn(16), TorchRng::new(0).randn(16));
}
