//! `dreamshaper bench-schedulers` and the `bench` library module on the bundled tiny model: files written, one CSV
//! row per run with the right model-evaluation count, grid size, the reference's zero distance to itself, errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{tiny_model, TempDir};
use dreamshaper::bench::{self, grid::GridLayout, BenchEvent, BenchOptions};
use dreamshaper::schedulers::{self, SchedulerConfig};
use dreamshaper::{Control, GenerateRequest, Pipeline, PipelineOptions, Residency};

fn temp_dir(name: &str) -> TempDir {
    TempDir::new(&format!("bench-{name}"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dreamshaper"))
        .arg("bench-schedulers")
        .arg("--model")
        .arg(tiny_model())
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn scheduler_config() -> SchedulerConfig {
    SchedulerConfig::from_file(&tiny_model().join("scheduler/scheduler_config.json")).unwrap()
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn parse_csv(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect::<Vec<_>>();
    // Scheduler names here have no commas or quotes, so a plain split is enough.
    let rows = lines.map(|l| l.split(',').map(String::from).collect::<Vec<_>>()).collect();
    (header, rows)
}

#[test]
fn cli_writes_results_images_grid_and_chart() {
    let dir = temp_dir("cli");
    let out = dir.join("bench");
    // Heun evaluates the model twice for all but its last step (2n − 1).
    let schedulers = ["Euler", "DDIM", "Heun"];
    let list = schedulers.join(",");
    let o = run(&[
        "--prompt",
        "a photo of a Grumpy cat",
        "--negative-prompt",
        "blurry",
        "--schedulers",
        &list,
        "--steps",
        "3,2",
        "--reference-scheduler",
        "DDIM",
        "--reference-steps",
        "8",
        "--seed",
        "5",
        "--img-width",
        "64",
        "--img-height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Not a terminal: no progress display, just the seed.
    assert_eq!(stderr(&o).trim(), "seed: 5");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("latent RMSE") && stdout.contains("DDIM (reference)"), "{stdout}");

    for file in ["results.csv", "results.json", "grid.png", "convergence.png", "images/reference_ddim_8.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }

    // One CSV row per run: the reference, then every scheduler × step count.
    let (header, rows) = parse_csv(&std::fs::read_to_string(out.join("results.csv")).unwrap());
    assert_eq!(header.join(","), bench::CSV_HEADER);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("column {name}"));
    let (sched, steps, nfe, reference, rmse, psnr, ssim, image) = (
        col("scheduler"),
        col("steps"),
        col("nfe"),
        col("reference"),
        col("latent_rmse"),
        col("pixel_psnr_db"),
        col("pixel_ssim"),
        col("image"),
    );
    assert_eq!(rows.len(), 1 + schedulers.len() * 2);
    let reference_row = &rows[0];
    assert_eq!((reference_row[sched].as_str(), reference_row[steps].as_str()), ("DDIM", "8"));
    assert_eq!(reference_row[reference], "true");
    // The reference's distance to itself: RMSE 0, PSNR infinite, SSIM 1.
    assert_eq!(reference_row[rmse].parse::<f64>().unwrap(), 0.0);
    assert_eq!(reference_row[psnr], "inf");
    assert_eq!(reference_row[ssim].parse::<f64>().unwrap(), 1.0);

    let config = scheduler_config();
    let mut seen = Vec::new();
    for row in &rows[1..] {
        let n: usize = row[steps].parse().unwrap();
        let evaluations: usize = row[nfe].parse().unwrap();
        // NFE = model evaluations = the scheduler's timesteps at that step count.
        let expected = schedulers::create(&row[sched], &config, n).unwrap().timesteps().len();
        assert_eq!(evaluations, expected, "{row:?}");
        match row[sched].as_str() {
            "DDIM" | "Euler" => assert_eq!(evaluations, n, "{row:?}"),
            "Heun" => assert_eq!(evaluations, 2 * n - 1, "Heun at n steps: 2n − 1 model calls {row:?}"),
            _ => {}
        }
        assert_eq!(row[reference], "false");
        // Fewer steps than the reference: a real, finite distance.
        assert!(row[rmse].parse::<f64>().unwrap() > 0.0, "{row:?}");
        let p: f64 = row[psnr].parse().unwrap();
        assert!(p.is_finite() && p > 0.0, "{row:?}");
        let s: f64 = row[ssim].parse().unwrap();
        assert!(s > -1.0 && s < 1.0, "{row:?}");
        assert!(out.join(&row[image]).is_file(), "{row:?}");
        seen.push((row[sched].clone(), n));
    }
    let mut expected: Vec<(String, usize)> =
        schedulers.iter().flat_map(|s| [2, 3].map(|n| (s.to_string(), n))).collect();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
    assert!(out.join("images/euler_2.png").is_file() && out.join("images/ddim_3.png").is_file());
    assert_eq!(png_size(&out.join("images/euler_3.png")), (64, 64));

    // JSON: the same runs; infinite PSNR is null.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), rows.len());
    assert_eq!(runs[0]["reference"], true);
    assert!(runs[0]["pixel_psnr_db"].is_null());
    assert_eq!(runs[0]["latent_rmse"], 0.0);
    assert_eq!(json["seed"], 5);
    assert_eq!((json["width"].as_u64(), json["height"].as_u64()), (Some(64), Some(64)));
    assert_eq!(json["negative_prompt"], "blurry");
    for (run, row) in runs.iter().zip(&rows).skip(1) {
        assert_eq!(run["nfe"].as_u64().unwrap().to_string(), row[nfe]);
        assert!(run["pixel_psnr_db"].as_f64().is_some());
        let (wall, per_step) = (run["wall_seconds"].as_f64().unwrap(), run["seconds_per_step"].as_f64().unwrap());
        assert!(wall > 0.0 && per_step > 0.0 && per_step <= wall);
    }
    for metric in ["latent_rmse", "pixel_psnr_db", "pixel_ssim"] {
        assert!(json["metrics"][metric].is_string(), "{metric} described");
    }

    // Grid: rows = schedulers, columns = the two step counts, 64×64 images shown at 256×256.
    let layout = GridLayout::new(schedulers.len(), 2, 64, 64);
    assert_eq!(layout.size(), (200 + 2 * (256 + 4), 32 + schedulers.len() as u32 * (256 + 20 + 4)));
    assert_eq!(png_size(&out.join("grid.png")), layout.size());
    assert_eq!(png_size(&out.join("convergence.png")), (bench::chart::CHART_WIDTH, bench::chart::CHART_HEIGHT));
}

#[test]
fn library_runs_once_per_nfe_and_does_not_repeat_the_reference() {
    let dir = temp_dir("lib");
    let pipeline = Pipeline::load(
        tiny_model().to_str().unwrap(),
        PipelineOptions { residency: Residency::Resident, ..PipelineOptions::default() },
    )
    .unwrap();
    let mut request = GenerateRequest::new("a lighthouse");
    request.seed = 11;
    request.img_width = 64;
    request.img_height = 48;
    let mut options = BenchOptions::new(request, dir.join("out"));
    options.schedulers = vec!["euler".into()];
    options.steps = vec![2, 4];
    options.reference_scheduler = "Euler".into();
    options.reference_steps = 4;

    let mut events = Vec::new();
    let mut stages = 0;
    let report = bench::run(&pipeline, &options, &mut |e: &BenchEvent| {
        match e {
            BenchEvent::Evaluations { done, total } => events.push((*done, *total)),
            BenchEvent::Stage(_) => stages += 1,
            _ => {}
        }
        Control::Continue
    })
    .unwrap();
    assert!(stages > 0);
    // Euler × 4 is the reference again: run once. 4 + 2 model evaluations in all, reported in order.
    assert_eq!(report.total_nfe, 6);
    assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    assert!(events.iter().all(|e| e.1 == 6));
    assert_eq!(report.runs.len(), 3);
    assert_eq!(report.schedulers, vec!["Euler"]);
    let again = &report.runs[2];
    assert_eq!((again.scheduler.as_str(), again.steps, again.reference), ("Euler", 4, false));
    assert_eq!((again.latent_rmse, again.pixel_psnr_db, again.pixel_ssim), (0.0, None, 1.0));
    assert_eq!(report.images[2], report.images[0]);
    let fewer = &report.runs[1];
    assert!(fewer.latent_rmse > 0.0 && fewer.pixel_psnr_db.unwrap() > 0.0);
    assert_eq!(report.images[1].dimensions(), (64, 48));
    let out = dir.join("out");
    assert_eq!(
        std::fs::read(out.join("images/euler_4.png")).unwrap().len(),
        std::fs::read(out.join("images/reference_euler_4.png")).unwrap().len()
    );
    assert_eq!(png_size(&out.join("grid.png")), GridLayout::new(1, 2, 64, 48).size());
    // The same seed and settings from `generate` give the reference image.
    let mut single = options.request.clone();
    single.scheduler = "Euler".into();
    single.num_inference_steps = 4;
    let generation = pipeline.generate(&single, &mut |_| Control::Continue).unwrap();
    assert_eq!(generation.images[0], report.images[0]);

    // Cancelling stops the benchmark.
    let e = bench::run(&pipeline, &options, &mut |e: &BenchEvent| match e {
        BenchEvent::Evaluations { .. } => Control::Stop,
        _ => Control::Continue,
    })
    .unwrap_err();
    assert!(matches!(e, dreamshaper::Error::Cancelled), "{e}");
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = temp_dir("bad");
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let unwritable = file.join("out");
    let out = dir.join("out");
    let base = ["--prompt", "x", "--img-height", "64"];
    let cases: Vec<(Vec<&str>, Vec<&str>, &Path)> = vec![
        (vec!["--schedulers", "Euler,NoSuchSampler"], vec!["NoSuchSampler", "DDIM", "Euler"], &out),
        (vec!["--steps", "10,abc,30"], vec!["--steps", "\"abc\""], &out),
        (vec!["--steps", "10,0"], vec!["--steps", "\"0\""], &out),
        (vec!["--reference-scheduler", "Nope"], vec!["reference scheduler", "Nope", "DDIM"], &out),
        (vec!["--img-width", "100"], vec!["img_width"], &out),
        (vec!["--steps", "5000"], vec!["5000"], &out),
        (vec![], vec!["not writable", unwritable.to_str().unwrap()], &unwritable),
    ];
    for (args, needles, target) in cases {
        let mut all: Vec<&str> = base.to_vec();
        all.extend(&args);
        for (flag, default) in [("--steps", "2"), ("--reference-scheduler", "DDIM"), ("--img-width", "64")] {
            if !args.contains(&flag) {
                all.extend([flag, default]);
            }
        }
        all.extend(["--out", target.to_str().unwrap()]);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
        assert!(!out.join("results.csv").exists());
    }
}

/// `--image PATH --strength F`: every scheduler on image to image from the input, at its size, counting only the
/// model evaluations that run; each run's image is what `generate` makes for the same request.
#[test]
fn image_to_image_comparison() {
    let dir = temp_dir("img2img");
    let out = dir.join("bench");
    let input = common::root().join("tests/fixtures/img2img_input.png");
    let o = run(&[
        "--prompt",
        "a photo of a Grumpy cat",
        "--schedulers",
        "Euler,Heun",
        "--steps",
        "4",
        "--reference-scheduler",
        "DDIM",
        "--reference-steps",
        "6",
        "--seed",
        "9",
        "--image",
        input.to_str().unwrap(),
        "--strength",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out.join("images/euler_4.png")), (96, 64));
    let (header, rows) = parse_csv(&std::fs::read_to_string(out.join("results.csv")).unwrap());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let nfe: Vec<(String, String)> =
        rows.iter().map(|r| (r[col("scheduler")].clone(), r[col("nfe")].clone())).collect();
    // DDIM 6 steps at 0.5: 3 run; Euler 4 steps: 2; Heun 4 steps (2n − 1 = 7 evaluations), from 2·2: 3.
    assert_eq!(nfe, [("DDIM", "3"), ("Euler", "2"), ("Heun", "3")].map(|(a, b)| (a.to_string(), b.to_string())));
    let generate = Command::new(env!("CARGO_BIN_EXE_dreamshaper"))
        .args(["generate", "--model", tiny_model().to_str().unwrap(), "--prompt", "a photo of a Grumpy cat"])
        .args(["--scheduler", "Euler", "--num-inference-steps", "4", "--seed", "9", "--strength", "0.5"])
        .args(["--image", input.to_str().unwrap(), "--output", dir.join("gen.png").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(generate.status.success(), "{}", stderr(&generate));
    let a = image::open(out.join("images/euler_4.png")).unwrap().to_rgb8();
    let b = image::open(dir.join("gen.png")).unwrap().to_rgb8();
    // (The bench keeps its models resident, whose text encoders multiply in another order: float rounding only.)
    let diff = common::mean_abs_pixel_diff(a.as_raw(), b.as_raw());
    assert!(diff <= 0.5, "bench-schedulers runs what generate runs: {diff}/255 apart");
}
