//! diffusers' Brownian-tree noise (DPM++ SDE) against the references written by `scripts/make_brownian_refs.py`:
//! numpy's `SeedSequence`, Python's `round(x, 6)`, torch's `randint`, and `BrownianTreeNoiseSampler` outputs for
//! several seeds, sample shapes and query sequences (the ones diffusers' DPMSolverSDEScheduler asks at 1, 2, 7 and
//! 20 Karras steps, and hand-written ones: out of order, clamped, closer than the tolerance).

use dreamshaper::rng::TorchRng;
use dreamshaper::schedulers::brownian::{BrownianTreeNoiseSampler, SeedSequence};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/brownian.json");
    let text = std::fs::read_to_string(path).expect("read tests/fixtures/brownian.json");
    serde_json::from_str(&text).expect("parse tests/fixtures/brownian.json")
}

/// Whether this CPU runs torch's AVX2 normal kernel, the one the fixture was generated with (see tests/rng.rs): the
/// numbers must then agree bit for bit, otherwise within float32 rounding of the math functions.
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

fn big(v: &Value) -> u128 {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn seed_sequence_matches_numpy() {
    let cases = fixture()["seed_sequences"].as_array().unwrap().clone();
    assert!(cases.len() >= 50);
    for case in cases {
        let entropy = big(&case["entropy"]);
        let spawn_key: Vec<u128> = case["spawn_key"].as_array().unwrap().iter().map(big).collect();
        let pool_size = case["pool_size"].as_u64().unwrap() as usize;
        let want: Vec<u32> = case["state"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = SeedSequence::new(entropy, &spawn_key, pool_size).generate_state(want.len());
        assert_eq!(got, want, "entropy {entropy}, spawn key {spawn_key:?}, pool {pool_size}");
    }
}

#[test]
fn randint_matches_torch() {
    for case in fixture()["randint"].as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut rng = TorchRng::new(seed);
        for want in case["values"].as_array().unwrap() {
            assert_eq!(rng.randint(0, i64::MAX), want.as_i64().unwrap(), "seed {seed}");
        }
    }
    // Ranges under 2^32 take one 32-bit draw each.
    let mut rng = TorchRng::new(0);
    assert!((0..100).all(|_| (3..10).contains(&rng.randint(3, 10))));
}

/// The sum of the float32 bit patterns, as the fixture's `bits_sum`.
fn bits_sum(values: &[f32]) -> u64 {
    values.iter().map(|v| u64::from(v.to_bits())).sum()
}

/// The tree's increments bit for bit; the noise (increment / √|σ_next − σ|) bit for bit where our correctly rounded
/// square root equals torch's MKL one, else within 1 ulp of the divisor, and bit for bit once divided by torch's.
#[test]
fn noise_sampler_matches_diffusers() {
    let fixture = fixture();
    let sets = fixture["query_sets"].as_array().unwrap();
    let exact = expect_bit_exact();
    let (mut outputs, mut cases, mut other_roots) = (0, 0, 0);
    let f32_of = |v: &Value| v.as_f64().unwrap() as f32;
    for case in fixture["samplers"].as_array().unwrap() {
        let seed: u64 = case["seed"].as_str().unwrap().parse().unwrap();
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let set = sets.iter().find(|s| s["name"] == case["queries"]).unwrap();
        let (min, max) = (f32_of(&set["sigma_min"]), f32_of(&set["sigma_max"]));
        let mut sampler = BrownianTreeNoiseSampler::new(shape.iter().product(), min, max, seed).unwrap();
        // The same queries through `noise`, on a sampler of its own.
        let mut noise_sampler = BrownianTreeNoiseSampler::new(shape.iter().product(), min, max, seed).unwrap();
        let queries = set["queries"].as_array().unwrap();
        let wants = case["outputs"].as_array().unwrap();
        assert_eq!(queries.len(), wants.len());
        for (i, (query, want)) in queries.iter().zip(wants).enumerate() {
            let what = format!("seed {seed}, shape {shape:?}, {} query {i} {query}", set["name"]);
            let (sigma, sigma_next) = (f32_of(&query[0]), f32_of(&query[1]));
            let w = sampler.increment(sigma, sigma_next).unwrap();
            let first: Vec<f32> = want["w"]["first"].as_array().unwrap().iter().map(f32_of).collect();
            let sum: f64 = w.iter().map(|&v| v as f64).sum();
            let want_sum = want["w"]["sum"].as_f64().unwrap();
            assert!((sum - want_sum).abs() <= 1e-4 * (w.len() as f64).sqrt(), "{what}: sum {sum} vs {want_sum}");
            let noise = noise_sampler.noise(sigma, sigma_next).unwrap();
            let torch_divisor = f32_of(&want["divisor"]);
            let divided: Vec<f32> = w.iter().map(|v| v / torch_divisor).collect();
            let divisor = (sigma_next - sigma).abs().sqrt();
            if exact {
                assert_eq!(&w[..first.len()], &first[..], "{what}");
                assert_eq!(bits_sum(&w), want["w"]["bits_sum"].as_u64().unwrap(), "{what}: increment bit patterns");
                assert_eq!(bits_sum(&divided), want["noise"]["bits_sum"].as_u64().unwrap(), "{what}: w / divisor");
                if divisor == torch_divisor {
                    assert_eq!(noise, divided, "{what}: noise");
                }
            } else {
                for (g, w) in w.iter().zip(&first) {
                    assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: {g} vs {w}");
                }
            }
            if divisor != torch_divisor {
                other_roots += 1;
                // torch's root is 1 ulp off the correctly rounded one.
                assert_eq!(divisor.to_bits().abs_diff(torch_divisor.to_bits()), 1, "{what}: divisor");
                for (n, d) in noise.iter().zip(&divided) {
                    assert!((n - d).abs() <= 3e-7 * d.abs(), "{what}: noise {n} vs {d}");
                }
            }
            outputs += 1;
        }
        cases += 1;
    }
    eprintln!(
        "{outputs} noise outputs in {cases} sampler cases match diffusers (bit-exact: {exact}; torch's MKL square root \
         differs from the correctly rounded one in {other_roots})"
    );
    assert!(cases >= 20 && outputs >= 200);
}

/// Queries closer than the tree's 1e-6 tolerance that torchsde cannot answer (it recurses until Python's limit):
/// an error here, not a hang or a stack overflow.
#[test]
fn queries_torchsde_cannot_answer_are_errors() {
    for case in fixture()["failing"].as_array().unwrap() {
        let f = |v: &Value| v.as_f64().unwrap() as f32;
        let mut sampler = BrownianTreeNoiseSampler::new(4, f(&case["sigma_min"]), f(&case["sigma_max"]), 0).unwrap();
        let e = sampler.noise(f(&case["query"][0]), f(&case["query"][1])).unwrap_err().to_string();
        assert!(e.contains("tolerance"), "{e}");
    }
}

#[test]
fn the_same_seed_gives_the_same_noise_and_another_seed_other_noise() {
    let run = |seed| {
        let mut s = BrownianTreeNoiseSampler::new(96, 0.03, 14.6, seed).unwrap();
        [(14.6, 7.0), (7.0, 3.0), (14.6, 3.0)].map(|(a, b)| s.noise(a, b).unwrap())
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}
