//! Every registered scheduler against diffusers (tests/fixtures/schedulers.json, made by
//! scripts/make_scheduler_refs.py): timestep and sigma tables, `init_noise_sigma`, `scale_model_input`, and a full
//! sampling loop driven by a deterministic stand-in model, for Dreamshaper XL's config and variations of it, at
//! 1, 2, 7, 20, 35 and 100 steps. The "bare" variations start from the four keys of the noise schedule alone, so
//! every other key is the diffusers class's own default (DDIM's `clip_sample=True`, PNDM's Runge–Kutta warm-up, each
//! class's default spacing, …). Where diffusers rejects a combination, we must reject it too.

mod common;

use candle_core::{Device, Tensor};
use dreamshaper::rng::TorchRng;
use dreamshaper::schedulers::{self, SchedulerConfig};
use serde_json::Value;

const TABLE_TOLERANCE: f64 = 1e-5;
const SAMPLE_TOLERANCE: f64 = 1e-4;

/// DPM++ SDE's samples against diffusers. Its noise comes from a Brownian tree queried at times that diffusers
/// computes with torch's float32 `exp`/`log` — on the CPU, Intel MKL's, which are not always correctly rounded (about
/// one query time in twenty is 1 ulp off ours) — and torchsde rounds query times to 6 decimals, so such a 1-ulp
/// difference can move a query across that grid and change a step's noise by about √(1e-6)/√Δσ. On the committed
/// references that gives up to 7.6e-4 (most cases agree to 1e-6); everything else is held to float32 rounding by
/// `dpm_sde_matches_diffusers_with_correctly_rounded_math`.
const SDE_SAMPLE_TOLERANCE: f64 = 2e-3;
const SDE_NAMES: [&str; 2] = ["DPM++ SDE Karras", "DPM++ SDE"];

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

/// Options of the reference script's `SCHEDULERS` that the pipeline sets for each run rather than the scheduler's
/// name implying them: DPMSolverSDEScheduler's `noise_sampler_seed`, which the pipeline sets to the request's seed
/// (the script passes its generator seed). The other options (`use_karras_sigmas`, `algorithm_type`) are part of the
/// name: the registry's builder must imply them, so they are not applied here.
const RUN_OPTIONS: &[&str] = &["noise_sampler_seed"];

/// `config(fixture, variation)` with the run options of `name`'s reference (see [`RUN_OPTIONS`]).
fn run_config(fixture: &Value, name: &str, variation: &str) -> SchedulerConfig {
    let mut config = config(fixture, variation);
    for (key, value) in fixture["schedulers"][name]["options"].as_object().unwrap() {
        if RUN_OPTIONS.contains(&key.as_str()) {
            assert_eq!(value, &fixture["seed"], "{name}: {key} is the run's seed, as the pipeline sets it");
            config = config.with(key, value.clone());
        }
    }
    config
}

fn config(fixture: &Value, variation: &str) -> SchedulerConfig {
    let bare = fixture["bare_variations"].as_array().unwrap().iter().any(|v| v == variation);
    let base = if bare { &fixture["bare_config"] } else { &fixture["base_config"] };
    let mut config = SchedulerConfig::from_json(&base.to_string()).unwrap();
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
        let img2img = variation.ends_with("img2img");
        let built = schedulers::create(name, &run_config(&fixture, name, variation), steps).and_then(|s| {
            let begin =
                if img2img { schedulers::img2img_start(s.as_ref(), fixture["strength"].as_f64().unwrap())? } else { 0 };
            Ok((s, begin))
        });
        if let Some(diffusers_error) = case.get("error") {
            // diffusers rejects this combination (PNDM's Runge–Kutta warm-up below 4 steps, a strength that leaves no
            // step): we must refuse it too, with an error that names the parameter.
            let e = built.err().unwrap_or_else(|| panic!("{what}: diffusers failed ({diffusers_error}), we did not"));
            let field = if diffusers_error.as_str().unwrap().contains("strength 0.6") {
                "strength"
            } else {
                "num_inference_steps"
            };
            assert!(e.to_string().contains(field), "{what}: unclear error {e}");
            refused += 1;
            continue;
        }
        let (mut s, begin) = built.unwrap();
        if let Some(eta) = case.get("eta") {
            // The reference passed `eta` to `step`, as the pipeline passes the request's `eta`.
            assert!(s.set_eta(eta.as_f64().unwrap()).unwrap(), "{what}: the scheduler must take eta");
        }

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
            let err = relative(ours, &floats(theirs));
            assert!(err <= TABLE_TOLERANCE, "{what}: sigmas {ours:?} vs {theirs}");
        }

        let tolerance = if SDE_NAMES.contains(&name) { SDE_SAMPLE_TOLERANCE } else { SAMPLE_TOLERANCE };
        let mut rng = TorchRng::new(seed);
        let mut x = (initial_sample(&shape) * init).unwrap();
        if img2img {
            // The clean sample noised to the first evaluation's level, with noise from its own generator.
            assert_eq!(begin as u64, case["begin"].as_u64().unwrap(), "{what}: first evaluation");
            let noise = TorchRng::new(case["noise_seed"].as_u64().unwrap()).randn_tensor(&shape, &Device::Cpu).unwrap();
            x = s.add_noise(&initial_sample(&shape), &noise, begin).unwrap();
            let ours: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
            let err = relative(&ours, &floats(&case["noised_sample"]));
            assert!(err <= SAMPLE_TOLERANCE, "{what}: add_noise relative error {err:e}");
        }
        let scaled_refs = case["scaled_inputs"].as_array().unwrap();
        for (index, &t) in timesteps.iter().enumerate().skip(begin) {
            let input = s.scale_model_input(x.clone(), index).unwrap();
            if let Some(reference) = scaled_refs.get(index - begin) {
                let ours: Vec<f64> =
                    input.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
                let err = relative(&ours, &floats(reference));
                assert!(err <= tolerance, "{what}: scale_model_input at {index}: relative error {err:e}");
            }
            let out = stand_in_model(&input, t);
            x = s.step(&out, index, &x, &mut rng).unwrap();
        }
        let ours: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let err = relative(&ours, &floats(&case["final_sample"]));
        assert!(err <= tolerance, "{what}: final sample relative error {err:e}");
        checked += 1;
    }
    eprintln!(
        "{checked} scheduler cases match diffusers, {refused} refused like diffusers ({} registered: {registered:?})",
        registered.len()
    );
    for name in &registered {
        let cases = fixture["cases"].as_array().unwrap().iter().filter(|c| c["name"] == *name).count();
        assert!(cases >= 30, "{name}: {cases} reference cases, want 5 variations × 6 step counts");
    }
    assert!(checked >= registered.len() * 25, "every registered scheduler is checked in 5 variations");
    let bare = fixture["cases"].as_array().unwrap().iter().filter(|c| c["variation"] == "bare").count();
    assert_eq!(bare, registered.len() * 6, "a bare-config case for every scheduler at every step count");
}

/// DPM++ SDE against diffusers run with correctly rounded float32 `exp`/`log`/`expm1`/`sqrt` (the
/// `correctly_rounded_runs` of tests/fixtures/brownian.json, made by scripts/make_brownian_refs.py): with torch's MKL
/// rounding out of the way (see [`SDE_SAMPLE_TOLERANCE`]) the whole loop, Brownian noise included, agrees to float32
/// rounding.
#[test]
fn dpm_sde_matches_diffusers_with_correctly_rounded_math() {
    let fixture = fixture();
    let path = common::root().join("tests/fixtures/brownian.json");
    let runs: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let shape: Vec<usize> = fixture["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let seed = fixture["seed"].as_u64().unwrap();
    let mut checked = 0;
    for run in runs["correctly_rounded_runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let variation = run["variation"].as_str().unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let mut s = schedulers::create(name, &run_config(&fixture, name, variation), steps).unwrap();
        let mut rng = TorchRng::new(seed);
        let mut x = (initial_sample(&shape) * s.init_noise_sigma()).unwrap();
        for (index, &t) in s.timesteps().to_vec().iter().enumerate() {
            let input = s.scale_model_input(x.clone(), index).unwrap();
            x = s.step(&stand_in_model(&input, t), index, &x, &mut rng).unwrap();
        }
        let ours: Vec<f64> = x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let err = relative(&ours, &floats(&run["final_sample"]));
        assert!(err <= 1e-6, "{name} / {variation} / {steps} steps: final sample relative error {err:e}");
        checked += 1;
    }
    assert!(checked >= 20);
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

/// Names beyond the hosted API's: few-step and stochastic schedulers, and A1111's names for diffusers'
/// `DPMSolverSDEScheduler` (see [`SDE_NAMES`]).
const EXTRA_NAMES: [&str; 6] = ["LCM", "TCD", "DPM++ 2M SDE", "DPM++ 3M SDE Karras", "DPM++ SDE Karras", "DPM++ SDE"];

#[test]
fn every_hosted_name_is_registered_with_its_evaluation_count() {
    let config = SchedulerConfig::from_json(&fixture()["base_config"].to_string()).unwrap();
    let mut registered = schedulers::names();
    registered.sort();
    let mut expected: Vec<&str> = HOSTED_NAMES.iter().chain(&EXTRA_NAMES).copied().collect();
    expected.sort();
    assert_eq!(registered, expected);
    for steps in [1, 2, 20, 35] {
        for name in HOSTED_NAMES.iter().chain(&EXTRA_NAMES).copied() {
            let s = schedulers::create(name, &config, steps).unwrap();
            assert_eq!(s.num_inference_steps(), steps, "{name}");
            let evaluations = match name {
                // A second (corrector / midpoint) evaluation on every step but the last.
                "Heun" | "DPM2 Karras" | "DPM2 a Karras" | "DPM++ SDE Karras" | "DPM++ SDE" => 2 * steps - 1,
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
    let run = |config: &SchedulerConfig, name: &str, seed: u64| {
        let mut s = schedulers::create(name, config, 7).unwrap();
        let mut rng = TorchRng::new(seed);
        let mut x = (initial_sample(&[1, 4, 4, 6]) * s.init_noise_sigma()).unwrap();
        for (index, &t) in s.timesteps().to_vec().iter().enumerate() {
            let input = s.scale_model_input(x.clone(), index).unwrap();
            x = s.step(&stand_in_model(&input, t), index, &x, &mut rng).unwrap();
        }
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for name in HOSTED_NAMES.iter().chain(&EXTRA_NAMES).copied() {
        let (a, b) = (run(&config, name, 1), run(&config, name, 2));
        // DPM++ SDE draws its Brownian tree's seed from the generator when the config has no `noise_sampler_seed`.
        let stochastic = [
            "Euler a",
            "DPM2 a Karras",
            "DDPM",
            "DPM++ 2M SDE Karras",
            "LCM",
            "TCD",
            "DPM++ 2M SDE",
            "DPM++ 3M SDE Karras",
            "DPM++ SDE Karras",
            "DPM++ SDE",
        ]
        .contains(&name);
        assert_eq!(a != b, stochastic, "{name}: does the result depend on the seed?");
        assert_eq!(a, run(&config, name, 1), "{name}: same seed, same result");
    }
    // DPM++ SDE's noise comes from a Brownian tree seeded by `noise_sampler_seed` (the pipeline sets it to the
    // request's seed, as here), not from the generator: the result follows that seed and ignores the generator's.
    let seeded = |seed: u64| config.clone().with("noise_sampler_seed", seed.into());
    for name in SDE_NAMES {
        let (a, b) = (run(&seeded(1), name, 1), run(&seeded(2), name, 2));
        assert_ne!(a, b, "{name}: the result depends on the seed");
        assert_eq!(a, run(&seeded(1), name, 1), "{name}: same seed, same result");
        assert_eq!(a, run(&seeded(1), name, 2), "{name}: the generator is not used when noise_sampler_seed is set");
        assert_ne!(a, run(&seeded(2), name, 1), "{name}: another noise_sampler_seed, other noise");
    }
}

#[test]
fn lookup_finds_every_alias_once_and_names_the_valid_ones_otherwise() {
    for kind in schedulers::all() {
        assert_eq!(schedulers::lookup(kind.name()).unwrap(), kind);
        assert_eq!(schedulers::lookup(&format!("  {}  ", kind.name().to_uppercase())).unwrap(), kind);
    }
    assert_eq!(schedulers::lookup("k_euler_a").unwrap().name(), "Euler a");
    assert_eq!(schedulers::lookup("DPMSolverMultistepScheduler").unwrap().name(), "DPM Multi");
    assert_eq!(schedulers::lookup("k_dpmpp_sde_karras").unwrap().name(), "DPM++ SDE Karras");
    assert_eq!(schedulers::lookup("dpmsolversdescheduler").unwrap().name(), "DPM++ SDE");
    match schedulers::lookup("Euler b") {
        Err(dreamshaper::Error::UnknownScheduler { name, valid }) => {
            assert_eq!(name, "Euler b");
            assert_eq!(valid, schedulers::names());
        }
        other => panic!("expected UnknownScheduler, got {other:?}"),
    }
}

/// Config values a class does not implement are refused when the scheduler is built (not inside `step`), naming the
/// key; keys a class does not read are ignored, as diffusers ignores them.
#[test]
fn unsupported_config_values_are_refused_at_build_time_naming_the_key() {
    let base = SchedulerConfig::from_json(&fixture()["base_config"].to_string()).unwrap();
    let refused = [
        ("Euler", "prediction_type", Value::from("flow")),
        ("Euler a", "prediction_type", Value::from("sample")),
        ("DDIM", "prediction_type", Value::from("x0")),
        ("PNDM", "prediction_type", Value::from("sample")),
        ("DPM2 Karras", "prediction_type", Value::from("sample")),
        ("DDIM", "timestep_spacing", Value::from("evenly")),
        ("UniPC", "timestep_spacing", Value::from("evenly")),
        ("LMS", "beta_schedule", Value::from("sigmoid")),
        ("DDIM", "thresholding", Value::from(true)),
        ("DDPM", "variance_type", Value::from("learned")),
        ("DPM Multi", "solver_order", Value::from(4)),
        ("LCM", "thresholding", Value::from(true)),
        ("TCD", "rescale_betas_zero_snr", Value::from(true)),
        ("LCM", "original_inference_steps", Value::from(2000)),
        ("DPM Multi", "algorithm_type", Value::from("dpmsolver")),
        ("DPM++ 2M Karras", "final_sigmas_type", Value::from("denoise_to_zero")),
        ("DEIS", "use_flow_sigmas", Value::from(true)),
        ("Euler", "use_karras_sigmas", Value::from(true)),
        ("Euler", "timestep_type", Value::from("continuous")),
        ("Heun", "use_karras_sigmas", Value::from(true)),
        ("UniPC", "rescale_betas_zero_snr", Value::from(true)),
        ("UniPC", "solver_p", Value::from("DPMSolverMultistepScheduler")),
        ("DPM++ SDE", "prediction_type", Value::from("sample")),
        ("DPM++ SDE", "use_exponential_sigmas", Value::from(true)),
        ("DPM++ SDE Karras", "use_beta_sigmas", Value::from(true)),
        ("DPM++ SDE", "noise_sampler_seed", Value::from(-1)),
        ("DPM++ SDE Karras", "noise_sampler_seed", Value::from(1.5)),
        ("DPM++ SDE", "noise_sampler_seed", Value::from("42")),
    ];
    for (name, key, value) in refused {
        let config = base.clone().with(key, value.clone());
        match schedulers::create(name, &config, 10) {
            Err(dreamshaper::Error::UnsupportedSchedulerConfig { key: k, accepted, .. }) => {
                assert_eq!(k, key, "{name}: {key} = {value}");
                assert!(!accepted.is_empty());
            }
            Err(e) => panic!("{name}: {key} = {value}: expected an unsupported-config error, got {e}"),
            Ok(_) => panic!("{name}: {key} = {value} was accepted"),
        }
    }
    // Keys the class does not read: ignored, as diffusers ignores them.
    for (name, key) in [("Euler a", "use_karras_sigmas"), ("DDIM", "use_karras_sigmas"), ("PNDM", "thresholding")] {
        schedulers::create(name, &base.clone().with(key, Value::from(true)), 10)
            .unwrap_or_else(|e| panic!("{name} does not read {key}, yet refused it: {e}"));
    }
    // What the classes do implement is accepted.
    for (name, key, value) in [
        ("Euler", "prediction_type", "sample"),
        ("LMS", "prediction_type", "sample"),
        ("DDIM", "prediction_type", "sample"),
        ("DPM Multi", "solver_type", "heun"),
        ("DPM Multi", "final_sigmas_type", "sigma_min"),
        ("DPM++ SDE", "prediction_type", "v_prediction"),
    ] {
        schedulers::create(name, &base.clone().with(key, Value::from(value)), 10)
            .unwrap_or_else(|e| panic!("{name}: {key} = {value} refused: {e}"));
    }
}

/// Scheduler options (`--scheduler-option`, the request's `scheduler_options`) go on top of the model's config as
/// diffusers' `from_config(config, **options)`: Lightning's recipe (Euler, trailing spacing) equals the trailing
/// reference cases; a key the class does not read is an error naming the key and the scheduler.
#[test]
fn options_go_on_top_of_the_model_config() {
    let fixture = fixture();
    let base = SchedulerConfig::from_json(&fixture["base_config"].to_string()).unwrap();
    let options = |pairs: &[(&str, Value)]| pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    let euler = schedulers::lookup("Euler").unwrap();
    let trailing = euler.configure(&base, &options(&[("timestep_spacing", Value::from("trailing"))])).unwrap();
    for steps in [2, 7, 20] {
        let reference = fixture["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "Euler" && c["variation"] == "trailing" && c["steps"] == steps)
            .unwrap();
        let s = euler.build(&trailing, steps as usize).unwrap();
        assert!(relative(s.timesteps(), &floats(&reference["timesteps"])) <= TABLE_TOLERANCE);
        assert!(relative(s.sigmas().unwrap(), &floats(&reference["sigmas"])) <= TABLE_TOLERANCE);
    }
    // DPM Multi with use_karras_sigmas is "DPM++ 2M Karras".
    let multi = schedulers::lookup("DPM Multi").unwrap();
    let karras = multi.configure(&base, &options(&[("use_karras_sigmas", Value::from(true))])).unwrap();
    let named = schedulers::create("DPM++ 2M Karras", &base, 20).unwrap();
    assert_eq!(multi.build(&karras, 20).unwrap().timesteps(), named.timesteps());
    // DPM++ SDE with use_karras_sigmas is "DPM++ SDE Karras"; noise_sampler_seed is one of its keys.
    let sde = schedulers::lookup("DPMSolverSDEScheduler").unwrap();
    let karras = sde
        .configure(&base, &options(&[("use_karras_sigmas", Value::from(true)), ("noise_sampler_seed", Value::from(7))]))
        .unwrap();
    let named = schedulers::create("DPM++ SDE Karras", &base, 20).unwrap();
    assert_eq!(sde.build(&karras, 20).unwrap().timesteps(), named.timesteps());
    // Keys the class does not read.
    for (name, key) in [("Euler a", "use_karras_sigmas"), ("DDIM", "solver_order"), ("UniPC", "no_such_key")] {
        let e = schedulers::lookup(name).unwrap().configure(&base, &options(&[(key, Value::from(true))])).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(key) && text.contains(name) && text.contains("scheduler_options"), "{text}");
    }
}

/// η (the request's `eta`, diffusers' `step(eta=…)`) is taken by DDIM and TCD only, within their ranges.
#[test]
fn eta_is_taken_by_ddim_and_tcd_within_their_ranges() {
    let config = SchedulerConfig::from_json(&fixture()["base_config"].to_string()).unwrap();
    let mut tcd = schedulers::create("TCD", &config, 4).unwrap();
    assert!(tcd.set_eta(0.0).unwrap() && tcd.set_eta(1.0).unwrap());
    for bad in [-0.1, 1.5, f64::NAN] {
        let e = tcd.set_eta(bad).unwrap_err().to_string();
        assert!(e.contains("eta") && e.contains("between 0 and 1"), "{e}");
    }
    let mut ddim = schedulers::create("DDIM", &config, 4).unwrap();
    assert!(ddim.set_eta(0.5).unwrap());
    assert!(ddim.set_eta(-1.0).unwrap_err().to_string().contains("eta"));
    for name in ["Euler", "LCM", "DPM++ 2M SDE Karras"] {
        assert!(!schedulers::create(name, &config, 4).unwrap().set_eta(0.5).unwrap(), "{name} takes no eta");
    }
}
