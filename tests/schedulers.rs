//! Every registered scheduler against diffusers (tests/fixtures/schedulers.json, made by
//! scripts/make_scheduler_refs.py): timestep and sigma tables, `init_noise_sigma`, `scale_model_input`, and a full
//! sampling loop driven by a deterministic stand-in model, for Dreamshaper XL's config and variations of it, at
//! 1, 2, 7, 20, 35 and 100 steps. Where diffusers rejects a combination, we must reject it too.

mod common;

use candle_core::{Device, Tensor};
use dreamshaper::rng::TorchRng;
use dreamshaper::schedulers::{self, SchedulerConfig};
use serde_json::Value;

const TABLE_TOLERANCE: f64 = 1e-5;
const SAMPLE_TOLERANCE: f64 = 1e-4;

fn fixture() -> Value {
    let path = common::root().join("tests/fixtures/schedulers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// max |a − b| / max(max |b|, 1e-12).
fn relative(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ: {} vs {}", a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The stand-in model of the reference script, in f32: 0.3·x·cos(t/300) + 0.1·sin(t/100 + k).
fn stand_in_model(x: &Tensor, t: f64) -> Tensor {
    let t = t as f32;
    let n = x.elem_count();
    let k: Vec<f32> = (0..n).map(|k| (t / 100.0 + k as f32).sin() * 0.1).collect();
    let k = Tensor::from_vec(k, x.shape(), x.device()).unwrap();
    ((x * (0.3f32 * (t / 300.0).cos()) as f64).unwrap() + k).unwrap()
}

fn initial_sample(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|k| (k as f32 * 0.37).sin() * 2.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn config(fixture: &Value, variation: &str) -> SchedulerConfig {
    let mut config = SchedulerConfig::from_json(&fixture["base_config"].to_string()).unwrap();
    for (k, v) in fixture["variations"][variation].as_object().unwrap() {
        config = config.with(k, v.clone());
    }
    config
}

#[test]
fn registered_schedulers_match_diffusers() {
    let fixture = fixture();
    let shape: Vec<usize> = fixture["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let seed = fixture["seed"].as_u64().unwrap();
    let registered = schedulers::names();
    let (mut checked, mut refused) = (0, 0);
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if !registered.contains(&name) {
            continue;
        }
        let variation = case["variation"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let what = format!("{name} / {variation} / {steps} steps");
        let built = schedulers::create(name, &config(&fixture, variation), steps);
        if let Some(diffusers_error) = case.get("error") {
            // diffusers rejects this combination (PNDM's Runge–Kutta warm-up below 4 steps): we must refuse it too,
            // with an error that says why.
            let e = built.err().unwrap_or_else(|| panic!("{what}: diffusers failed ({diffusers_error}), we did not"));
            assert!(e.to_string().contains("num_inference_steps"), "{what}: unclear error {e}");
            refused += 1;
            continue;
        }
        let mut s = built.unwrap();

        let timesteps = s.timesteps().to_vec();
        let err = relative(&timesteps, &floats(&case["timesteps"]));
        assert!(err <= TABLE_TOLERANCE, "{what}: timesteps {timesteps:?} vs {}", case["timesteps"]);
        let init = s.init_noise_sigma();
        let want = case["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (init - want).abs() <= TABLE_TOLERANCE * want.abs().max(1.0),
            "{what}: init_noise_sigma {init} vs {want}"
        );
        if let (Some(ours), Some(theirs)) = (s.sigmas(), case.get("sigmas")) {
            let err = relative(&ours, &floats(theirs));
            assert!(err <= TABLE_TOLERANCE, "{what}: sigmas {ours:?} vs {theirs}");
        }

        let mut rng = TorchRng::new(seed);
        let mut x = (initial_sample(&shape) * init).unwrap();
        let scaled_refs = case["scaled_inputs"].as_array().unwrap();
        for (index, &t) in timesteps.iter().enumerate() {
            let input = s.scale_model_input(x.clone(), index).unwrap();
            if let Some(reference) = scaled_refs.get(index) {
                let ours: Vec<f64> =
                    input.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
                let err = relative(&ours, &floats(reference));
                assert!(err <= SAMPLE_TOLERANCE, "{what}: scale_model_input at {index}: relative error {err:e}");
            }
            let out = stand_in_model(&input, t);
            x = s.step(&out, index, &x, &mut rng).unwrap();
        }
        let ours: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let err = relative(&ours, &floats(&case["final_sample"]));
        assert!(err <= SAMPLE_TOLERANCE, "{what}: final sample relative error {err:e}");
        checked += 1;
    }
    eprintln!(
        "{checked} scheduler cases match diffusers, {refused} refused like diffusers ({} registered: {registered:?})",
        registered.len()
    );
    assert!(checked >= registered.len() * 24, "every registered scheduler has 24 reference cases");
}

#[test]
fn names_are_case_insensitive_and_unknown_names_list_the_valid_ones() {
    let config = SchedulerConfig::from_json(&fixture()["base_config"].to_string()).unwrap();
    for name in ["ddim", "DDIMScheduler", "EULER", "EulerDiscreteScheduler"] {
        schedulers::create(name, &config, 10).unwrap();
    }
    let e = schedulers::create("Nope", &config, 10).err().unwrap().to_string();
    assert!(e.contains("Nope") && schedulers::names().iter().all(|n| e.contains(n)), "{e}");
    let e = schedulers::create("Euler", &config, 0).err().unwrap().to_string();
    assert!(e.contains("num_inference_steps"), "{e}");
    let e = schedulers::create("Euler", &config, 1001).err().unwrap().to_string();
    assert!(e.contains("num_inference_steps") && e.contains("1000"), "{e}");
}

/// The hosted API's scheduler names, exactly as its docs spell them.
const HOSTED_NAMES: [&str; 15] = [
    "UniPC",
    "DDIM",
    "DPM Multi",
    "DPM Single",
    "Euler a",
    "Euler",
    "Heun",
    "DPM2 a Karras",
    "DPM2 Karras",
    "LMS",
    "PNDM",
    "DDPM",
    "DEIS",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE Karras",
];

#[test]
fn every_hosted_name_is_registered_with_its_evaluation_count() {
    let config = SchedulerConfig::from_json(&fixture()["base_config"].to_string()).unwrap();
    let mut registered = schedulers::names();
    registered.sort();
    let mut hosted = HOSTED_NAMES.to_vec();
    hosted.sort();
    assert_eq!(registered, hosted);
    for steps in [1, 2, 20, 35] {
        for name in HOSTED_NAMES {
            let s = schedulers::create(name, &config, steps).unwrap();
            assert_eq!(s.num_inference_steps(), steps, "{name}");
            let evaluations = match name {
                // A second (corrector / midpoint) evaluation on every step but the last.
                "Heun" | "DPM2 Karras" | "DPM2 a Karras" => 2 * steps - 1,
                // skip_prk_steps: the first step is evaluated twice (when there is a second step to go to).
                "PNDM" if steps > 1 => steps + 1,
                _ => steps,
            };
            assert_eq!(s.timesteps().len(), evaluations, "{name} at {steps} steps");
        }
    }
}

#[test]
fn stochastic_schedulers_follow_the_seed_and_deterministic_ones_ignore_it() {
    let fixture = fixture();
    let config = config(&fixture, "dreamshaper");
    let run = |name: &str, seed: u64| {
        let mut s = schedulers::create(name, &config, 7).unwrap();
        let mut rng = TorchRng::new(seed);
        let mut x = (initial_sample(&[1, 4, 4, 6]) * s.init_noise_sigma()).unwrap();
        for (index, &t) in s.timesteps().to_vec().iter().enumerate() {
            let input = s.scale_model_input(x.clone(), index).unwrap();
            x = s.step(&stand_in_model(&input, t), index, &x, &mut rng).unwrap();
        }
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for name in HOSTED_NAMES {
        let (a, b) = (run(name, 1), run(name, 2));
        let stochastic = ["Euler a", "DPM2 a Karras", "DDPM", "DPM++ 2M SDE Karras"].contains(&name);
        assert_eq!(a != b, stochastic, "{name}: does the result depend on the seed?");
        assert_eq!(a, run(name, 1), "{name}: same seed, same result");
    }
}
