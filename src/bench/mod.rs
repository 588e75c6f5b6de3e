//! Scheduler benchmarking: which scheduler gives the best image for the fewest model evaluations, on a given model
//! and prompt?
//!
//! Every scheduler × step count runs with the same prompt, seed and settings, and a high-step reference run (by
//! default Heun at 100 steps) is made once. The prompt is encoded once for the whole benchmark; only the denoising
//! loop and the VAE decode repeat ([`Pipeline::condition`] once, [`Pipeline::denoise`] and [`Pipeline::decode`] per
//! run). Each run records its wall time, time per step, model evaluations (NFE: the length of the scheduler's
//! `timesteps()`, so a Heun run of n steps counts 2n − 1) and its distance to the reference: RMSE of the latents,
//! PSNR and SSIM of the images (see [`metrics`]).
//!
//! [`write_outputs`] writes into the output folder:
//! - `results.csv` and `results.json`: one row / object per run, the reference first (`reference` true). A PSNR of
//!   identical images is infinite: `inf` in the CSV and `null` in the JSON (JSON has no infinity).
//! - `images/<scheduler-slug>_<steps>.png` for every run and `images/reference_<scheduler-slug>_<steps>.png`.
//! - `grid.png`: the labelled contact sheet (rows = schedulers, columns = step counts, see [`grid`]).
//! - `convergence.png`: distance to the reference against NFE, one line per scheduler (see [`chart`]).

pub mod chart;
pub mod grid;
pub mod metrics;
pub mod text;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use crate::conditioning::ConditioningSchedule;
use crate::output::{a1111_parameters, save_png};
use crate::schedulers::{self, SchedulerConfig};
use crate::{Control, Error, GenerateRequest, Pipeline, Progress, Result};

/// Step counts benchmarked when none are given.
pub const DEFAULT_STEPS: &[usize] = &[10, 20, 30, 50];
/// The reference run's scheduler and step count when none are given.
pub const DEFAULT_REFERENCE_SCHEDULER: &str = "Heun";
pub const DEFAULT_REFERENCE_STEPS: usize = 100;

/// What the metrics are, written into `results.json`.
pub const METRIC_DOCS: [(&str, &str); 3] = [
    (
        "latent_rmse",
        "root-mean-square difference between the run's denoised latents and the reference run's (latent space, \
         before the VAE scaling-factor division); 0 = identical",
    ),
    (
        "pixel_psnr_db",
        "PSNR in dB of the 8-bit RGB image against the reference image, peak 255, MSE over all channels; \
         null in JSON and inf in CSV when the images are identical (infinite PSNR)",
    ),
    (
        "pixel_ssim",
        "SSIM (Wang et al. 2004) of the 8-bit image against the reference image: Gaussian 11x11 window, sigma 1.5, \
         K1 0.01, K2 0.03, L 255, computed per RGB channel and averaged, over window positions inside the image; \
         1 = identical",
    ),
];

/// Parses a comma-separated list of step counts (`"10,20,30,50"`): sorted ascending, duplicates dropped. An item
/// that is not a whole number ≥ 1 is an error that names it.
pub fn parse_steps(list: &str) -> Result<Vec<usize>> {
    let mut steps = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        match item.parse::<usize>() {
            Ok(n) if n >= 1 => steps.push(n),
            _ => {
                return Err(Error::invalid(
                    "steps",
                    format!(
                        "list {list:?}: {item:?} is not a whole number of steps ≥ 1 (expected e.g. \"10,20,30,50\")"
                    ),
                ))
            }
        }
    }
    steps.sort_unstable();
    steps.dedup();
    Ok(steps)
}

/// The registered spelling of a scheduler name, when it is one (aliases are kept as given).
fn canonical(name: &str) -> String {
    let name = name.trim();
    schedulers::names().into_iter().find(|n| n.eq_ignore_ascii_case(name)).unwrap_or(name).to_string()
}

/// A scheduler and its config options from a `--schedulers` item: `NAME` or `NAME[KEY=VALUE,…]` (VALUE read as JSON
/// when it parses, else as a string), e.g. `Euler[timestep_spacing=trailing]`. A key the scheduler's diffusers class
/// does not read is an error naming it.
pub fn scheduler_variant(label: &str) -> Result<(schedulers::Kind, serde_json::Map<String, serde_json::Value>)> {
    let label = label.trim();
    let (name, options) = match label.split_once('[') {
        Some((name, rest)) => {
            let inner = rest.strip_suffix(']').ok_or_else(|| {
                Error::invalid(
                    "schedulers",
                    format!("{label:?}: options go between [ and ], as Euler[timestep_spacing=trailing]"),
                )
            })?;
            (name.trim(), inner)
        }
        None => (label, ""),
    };
    let kind = schedulers::lookup(name)?;
    let mut map = serde_json::Map::new();
    for option in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| Error::invalid("schedulers", format!("{label:?}: option {option:?} is not KEY=VALUE")))?;
        let value =
            serde_json::from_str(value.trim()).unwrap_or_else(|_| serde_json::Value::String(value.trim().into()));
        map.insert(key.trim().to_string(), value);
    }
    kind.configure(&SchedulerConfig::default(), &map)?;
    Ok((kind, map))
}

/// `request` set up for one run: its scheduler variant (see [`scheduler_variant`]) and step count.
pub fn run_request(request: &GenerateRequest, label: &str, steps: usize) -> Result<GenerateRequest> {
    let (kind, options) = scheduler_variant(label)?;
    let mut request = request.clone();
    request.scheduler = kind.name().to_string();
    request.scheduler_options = options;
    request.num_inference_steps =
        u32::try_from(steps).map_err(|_| Error::invalid("num_inference_steps", "step count too large"))?;
    Ok(request)
}

/// Splits a list on the commas outside `[…]`.
fn split_items(list: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
}

/// Parses `--schedulers`: `all` (every registered scheduler) or a comma-separated list of names (case-insensitive;
/// hosted-API, diffusers-class or A1111 names), each optionally with config options as `NAME[KEY=VALUE,…]` (each
/// variant its own run, label and line in the charts). Unknown names are an error listing the valid ones.
pub fn parse_schedulers(list: &str) -> Result<Vec<String>> {
    if list.trim().eq_ignore_ascii_case("all") {
        return Ok(schedulers::names().into_iter().map(String::from).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for item in split_items(list) {
        if item.trim().is_empty() {
            return Err(Error::invalid(
                "schedulers",
                format!("list {list:?} has an empty item; valid names: {}", schedulers::names().join(", ")),
            ));
        }
        let item = item.trim();
        let (_, options) = scheduler_variant(item)?;
        let name = if options.is_empty() { canonical(item) } else { item.to_string() };
        if !out.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Checks the reference scheduler's name and returns its registered spelling; an unknown name is an error listing
/// the valid ones.
pub fn check_reference_scheduler(name: &str) -> Result<String> {
    schedulers::lookup(name).map_err(|_| {
        Error::invalid(
            "reference_scheduler",
            format!("reference scheduler {name:?} is unknown; pick one of: {}", schedulers::names().join(", ")),
        )
    })?;
    Ok(canonical(name))
}

/// A file-name-safe form of a scheduler name: lower case, `+` → `p`, other runs of non-alphanumerics → `-`
/// (`"DPM++ 2M Karras"` → `"dpmpp-2m-karras"`).
pub fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if c == '+' {
            out.push('p');
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("scheduler");
    }
    out
}

/// [`slug`], numbered (`-2`, `-3`, …) when another name already took it (`"Euler a"` and `"euler_a"`).
fn unique_slug(name: &str, taken: &mut Vec<String>) -> String {
    let base = slug(name);
    let unique = std::iter::once(base.clone())
        .chain((2..).map(|i| format!("{base}-{i}")))
        .find(|s| !taken.contains(s))
        .expect("an unused name");
    taken.push(unique.clone());
    unique
}

/// Creates `dir` and `dir/images` and checks that files can be written there; the error names the folder.
pub fn prepare_output_dir(dir: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::output(dir, format!("the output directory is not writable: {e}"));
    std::fs::create_dir_all(dir.join("images")).map_err(fail)?;
    let probe = dir.join(".dreamshaper-write-test");
    std::fs::write(&probe, b"").map_err(fail)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt, negative prompt, guidance scale, seed (-1: one random seed for all runs) and image size; with an
    /// `image` (and `strength`), every run is image to image from it. Its scheduler, step count and sample count are
    /// ignored (one image per run).
    pub request: GenerateRequest,
    pub schedulers: Vec<String>,
    /// Step counts, each run with every scheduler.
    pub steps: Vec<usize>,
    pub reference_scheduler: String,
    pub reference_steps: usize,
    /// Output folder.
    pub out: PathBuf,
    /// The model's name, written into the PNGs' parameters and the report.
    pub model_name: String,
}

impl BenchOptions {
    /// The defaults: every registered scheduler at 10, 20, 30 and 50 steps against Heun at 100 steps.
    pub fn new(request: GenerateRequest, out: impl Into<PathBuf>) -> Self {
        Self {
            request,
            schedulers: schedulers::names().into_iter().map(String::from).collect(),
            steps: DEFAULT_STEPS.to_vec(),
            reference_scheduler: DEFAULT_REFERENCE_SCHEDULER.into(),
            reference_steps: DEFAULT_REFERENCE_STEPS,
            out: out.into(),
            model_name: String::new(),
        }
    }
}

/// One planned run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedRun {
    pub scheduler: String,
    pub steps: usize,
    /// Model evaluations: the length of the scheduler's `timesteps()` at this step count.
    pub nfe: usize,
    pub reference: bool,
    /// The image's path relative to the output folder.
    pub image: String,
}

/// The runs of a benchmark: the reference, then every scheduler × step count (scheduler-major).
#[derive(Debug, Clone)]
pub struct Plan {
    pub reference: PlannedRun,
    pub runs: Vec<PlannedRun>,
}

impl Plan {
    /// Builds every scheduler for the model's config to count its model evaluations (and reject step counts the
    /// model cannot do).
    pub fn new(options: &BenchOptions, config: &SchedulerConfig) -> Result<Self> {
        if options.schedulers.is_empty() {
            return Err(Error::invalid("schedulers", "is empty: nothing to benchmark"));
        }
        if options.steps.is_empty() {
            return Err(Error::invalid("steps", "is empty: nothing to benchmark"));
        }
        let nfe = |name: &str, steps: usize| -> Result<usize> {
            let built = scheduler_variant(name)
                .and_then(|(kind, options)| kind.build(&kind.configure(config, &options)?, steps));
            let scheduler = built.map_err(|e| match e {
                Error::UnknownScheduler { .. } => e,
                Error::InvalidRequest { message, .. } => {
                    Error::invalid("steps", format!("{name} at {steps} steps: {message}"))
                }
                e => Error::invalid("schedulers", format!("{name} at {steps} steps: {e}")),
            })?;
            // Image to image runs only the evaluations from its strength's start.
            let start = match (&options.request.image, options.request.strength) {
                (Some(_), Some(strength)) => schedulers::img2img_start(scheduler.as_ref(), strength)
                    .map_err(|e| Error::invalid("steps", format!("{name} at {steps} steps: {e}")))?,
                _ => 0,
            };
            Ok(scheduler.timesteps().len() - start)
        };
        let reference_name = check_reference_scheduler(&options.reference_scheduler)?;
        let reference = PlannedRun {
            nfe: nfe(&reference_name, options.reference_steps)?,
            image: format!("images/reference_{}_{}.png", slug(&reference_name), options.reference_steps),
            scheduler: reference_name,
            steps: options.reference_steps,
            reference: true,
        };
        let mut runs = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut slugs: Vec<String> = Vec::new();
        for name in &options.schedulers {
            schedulers::lookup(name)?;
            let name = canonical(name);
            if names.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
                continue;
            }
            names.push(name.clone());
            let file_slug = unique_slug(&name, &mut slugs);
            for &steps in &options.steps {
                runs.push(PlannedRun {
                    nfe: nfe(&name, steps)?,
                    image: format!("images/{file_slug}_{steps}.png"),
                    scheduler: name.clone(),
                    steps,
                    reference: false,
                });
            }
        }
        Ok(Self { reference, runs })
    }

    /// Whether a run is the reference run again (same scheduler and steps): it is then not repeated.
    pub fn repeats_reference(&self, run: &PlannedRun) -> bool {
        run.steps == self.reference.steps && run.scheduler.eq_ignore_ascii_case(&self.reference.scheduler)
    }

    /// Model evaluations of the whole benchmark (runs that repeat the reference are not counted twice).
    pub fn total_nfe(&self) -> usize {
        self.reference.nfe + self.runs.iter().filter(|r| !self.repeats_reference(r)).map(|r| r.nfe).sum::<usize>()
    }

    /// Number of runs, the reference included.
    pub fn run_count(&self) -> usize {
        1 + self.runs.len()
    }
}

/// The measurements of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunResult {
    pub scheduler: String,
    pub steps: usize,
    /// Model evaluations (`timesteps().len()`).
    pub nfe: usize,
    /// Whether this is the reference run.
    pub reference: bool,
    /// Denoising loop + VAE decode.
    pub wall_seconds: f64,
    pub denoise_seconds: f64,
    pub decode_seconds: f64,
    /// Denoising time per inference step.
    pub seconds_per_step: f64,
    /// Denoising time per model evaluation.
    pub seconds_per_nfe: f64,
    /// Distances to the reference run (see [`METRIC_DOCS`]).
    pub latent_rmse: f64,
    /// `None`: identical images (infinite PSNR).
    pub pixel_psnr_db: Option<f64>,
    pub pixel_ssim: f64,
    /// The image's path relative to the output folder.
    pub image: String,
}

/// Everything a benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub guidance_scale: f64,
    pub width: u32,
    pub height: u32,
    pub device: String,
    pub dtype: String,
    pub reference_scheduler: String,
    pub reference_steps: usize,
    /// Scheduler rows and step-count columns of the grid, in order.
    pub schedulers: Vec<String>,
    pub steps: Vec<usize>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Prompt encoding (once for the whole benchmark).
    pub conditioning_seconds: f64,
    pub total_nfe: usize,
    pub total_seconds: f64,
    /// The reference run first, then every scheduler × step count.
    pub runs: Vec<RunResult>,
    /// The images of `runs`, in the same order.
    #[serde(skip)]
    pub images: Vec<RgbImage>,
}

/// What [`run`] reports to its callback.
#[derive(Debug, Clone)]
pub enum BenchEvent<'a> {
    /// A pipeline stage starts (`"loading text encoders"`, `"encoding prompt"`, `"denoising"`, `"decoding"`, …).
    Stage(&'static str),
    /// Run `index` of `runs` (0 is the reference) starts.
    RunStarted { index: usize, runs: usize, run: &'a PlannedRun },
    /// `done` of the benchmark's `total` model evaluations have finished.
    Evaluations { done: usize, total: usize },
    /// Run `index` of `runs` finished (its image is written).
    RunFinished { index: usize, runs: usize, result: &'a RunResult },
    /// The results files are being written.
    Writing,
}

/// The callback type of [`run`]: return [`Control::Stop`] to cancel (the benchmark ends with [`Error::Cancelled`]).
pub type BenchEventFn<'a> = dyn FnMut(&BenchEvent) -> Control + 'a;

fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

fn send(on_event: &mut BenchEventFn, event: &BenchEvent) -> Result<()> {
    match on_event(event) {
        Control::Continue => Ok(()),
        Control::Stop => Err(Error::Cancelled),
    }
}

struct RunOutput {
    latents: Tensor,
    image: RgbImage,
    denoise_seconds: f64,
    decode_seconds: f64,
}

/// The request every run shares (one sample, the reference's scheduler and steps), checked against the model,
/// and the plan: everything that can go wrong before the first run.
pub fn prepare(pipeline: &Pipeline, options: &BenchOptions) -> Result<(GenerateRequest, Plan)> {
    let plan = Plan::new(options, &pipeline.configs.scheduler)?;
    let mut request = run_request(&options.request, &plan.reference.scheduler, plan.reference.steps)?;
    request.samples = 1;
    pipeline.validate(&request)?;
    Ok((request, plan))
}

/// Runs the benchmark on a loaded pipeline (load it with [`crate::Residency::Resident`] so that the UNet and VAE
/// are not reloaded for every run) and writes everything into `options.out` (see the module docs).
pub fn run(pipeline: &Pipeline, options: &BenchOptions, on_event: &mut BenchEventFn) -> Result<BenchReport> {
    let started = Instant::now();
    let (request, plan) = prepare(pipeline, options)?;
    prepare_output_dir(&options.out)?;
    let seed = request.resolve_seed();
    let total = plan.total_nfe();

    let t = Instant::now();
    let conditioning = pipeline.condition(&request, &mut |p: &Progress| match p {
        Progress::Stage(name) => on_event(&BenchEvent::Stage(name)),
        Progress::Step { .. } | Progress::Part { .. } => Control::Continue,
    })?;
    let conditioning_seconds = t.elapsed().as_secs_f64();

    let mut report = BenchReport {
        model: options.model_name.clone(),
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        seed,
        guidance_scale: request.guidance_scale,
        width: request.img_width,
        height: request.img_height,
        device: device_name(pipeline.device()).into(),
        dtype: pipeline.dtype().as_str().into(),
        reference_scheduler: plan.reference.scheduler.clone(),
        reference_steps: plan.reference.steps,
        schedulers: Vec::new(),
        steps: options.steps.clone(),
        metrics: METRIC_DOCS.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect(),
        conditioning_seconds,
        total_nfe: total,
        total_seconds: 0.0,
        runs: Vec::new(),
        images: Vec::new(),
    };
    for run in &plan.runs {
        if !report.schedulers.contains(&run.scheduler) {
            report.schedulers.push(run.scheduler.clone());
        }
    }

    let mut done = 0;
    let runs = plan.run_count();
    let mut reference: Option<(Tensor, RunResult)> = None;
    for (index, planned) in std::iter::once(&plan.reference).chain(&plan.runs).enumerate() {
        send(on_event, &BenchEvent::RunStarted { index, runs, run: planned })?;
        let (result, image) = match &reference {
            Some((_, reference_result)) if plan.repeats_reference(planned) => {
                let result = RunResult { reference: false, image: planned.image.clone(), ..reference_result.clone() };
                let image = report.images[0].clone();
                let text = parameters(&request, planned, seed, options, pipeline.active_loras());
                save_png(&image, &options.out.join(&planned.image), &text)?;
                (result, image)
            }
            _ => {
                let output = execute(pipeline, &request, &conditioning, seed, planned, (done, total), on_event)?;
                done += planned.nfe;
                save_png(
                    &output.image,
                    &options.out.join(&planned.image),
                    &parameters(&request, planned, seed, options, pipeline.active_loras()),
                )?;
                let (reference_latents, reference_image) = match &reference {
                    Some((latents, _)) => (latents, &report.images[0]),
                    None => (&output.latents, &output.image),
                };
                let result = RunResult {
                    scheduler: planned.scheduler.clone(),
                    steps: planned.steps,
                    nfe: planned.nfe,
                    reference: planned.reference,
                    wall_seconds: output.denoise_seconds + output.decode_seconds,
                    denoise_seconds: output.denoise_seconds,
                    decode_seconds: output.decode_seconds,
                    seconds_per_step: output.denoise_seconds / planned.steps as f64,
                    seconds_per_nfe: output.denoise_seconds / planned.nfe.max(1) as f64,
                    latent_rmse: metrics::latent_rmse(&output.latents, reference_latents)?,
                    pixel_psnr_db: metrics::psnr(&output.image, reference_image)?,
                    pixel_ssim: metrics::ssim(&output.image, reference_image)?,
                    image: planned.image.clone(),
                };
                if reference.is_none() {
                    reference = Some((output.latents, result.clone()));
                }
                (result, output.image)
            }
        };
        send(on_event, &BenchEvent::RunFinished { index, runs, result: &result })?;
        report.runs.push(result);
        report.images.push(image);
    }
    drop(conditioning);

    send(on_event, &BenchEvent::Writing)?;
    report.total_seconds = started.elapsed().as_secs_f64();
    write_outputs(&report, &options.out)?;
    Ok(report)
}

fn parameters(
    request: &GenerateRequest,
    run: &PlannedRun,
    seed: u64,
    options: &BenchOptions,
    loras: &[(String, f64, String)],
) -> String {
    // The label names the variant (`Euler[timestep_spacing=trailing]`) where the scheduler name alone would not.
    let mut request = request.clone();
    request.scheduler = run.scheduler.clone();
    request.num_inference_steps = run.steps as u32;
    a1111_parameters(&request, seed, &options.model_name, loras)
}

/// One denoising loop and decode, timed.
fn execute(
    pipeline: &Pipeline,
    request: &GenerateRequest,
    conditioning: &ConditioningSchedule,
    seed: u64,
    run: &PlannedRun,
    (done, total): (usize, usize),
    on_event: &mut BenchEventFn,
) -> Result<RunOutput> {
    let request = run_request(request, &run.scheduler, run.steps)?;
    let mut progress = |p: &Progress| match p {
        Progress::Stage(name) => on_event(&BenchEvent::Stage(name)),
        Progress::Step { evaluation, .. } => on_event(&BenchEvent::Evaluations { done: done + evaluation, total }),
        Progress::Part { .. } => Control::Continue,
    };
    let t = Instant::now();
    let latents = pipeline.denoise(&request, conditioning, seed, &mut progress)?;
    pipeline.device().synchronize()?;
    let denoise_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut images = pipeline.decode(&latents, &mut progress)?;
    let decode_seconds = t.elapsed().as_secs_f64();
    let image = images
        .pop()
        .ok_or_else(|| Error::Tensor(candle_core::Error::Msg("the VAE decode returned no image".into())))?;
    Ok(RunOutput { latents: latents.to_dtype(DType::F32)?, image, denoise_seconds, decode_seconds })
}

/// CSV field: quoted when it holds a comma, quote or line break (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The columns of `results.csv`.
pub const CSV_HEADER: &str = "scheduler,steps,nfe,reference,wall_seconds,denoise_seconds,decode_seconds,\
                              seconds_per_step,seconds_per_nfe,latent_rmse,pixel_psnr_db,pixel_ssim,image";

impl BenchReport {
    /// `results.csv`: [`CSV_HEADER`], then one row per run; an infinite PSNR is written `inf`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(CSV_HEADER);
        out.push('\n');
        for r in &self.runs {
            let psnr = r.pixel_psnr_db.map_or("inf".to_string(), |v| v.to_string());
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&r.scheduler),
                r.steps,
                r.nfe,
                r.reference,
                r.wall_seconds,
                r.denoise_seconds,
                r.decode_seconds,
                r.seconds_per_step,
                r.seconds_per_nfe,
                r.latent_rmse,
                psnr,
                r.pixel_ssim,
                csv_field(&r.image)
            );
        }
        out
    }

    /// `results.json`: the settings, the metric definitions and the runs; an infinite PSNR is `null`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serialises") + "\n"
    }

    /// The terminal summary: one line per run, the reference first.
    pub fn summary_table(&self) -> String {
        let label =
            |r: &RunResult| if r.reference { format!("{} (reference)", r.scheduler) } else { r.scheduler.clone() };
        let width = self.runs.iter().map(|r| label(r).chars().count()).max().unwrap_or(9).max(9);
        let mut out = format!(
            "{:<width$}  {:>5}  {:>5}  {:>9}  {:>8}  {:>11}  {:>9}  {:>6}\n",
            "scheduler", "steps", "NFE", "time (s)", "s/step", "latent RMSE", "PSNR (dB)", "SSIM"
        );
        for r in &self.runs {
            let psnr = r.pixel_psnr_db.map_or("inf".to_string(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "{:<width$}  {:>5}  {:>5}  {:>9.2}  {:>8.3}  {:>11.5}  {:>9}  {:>6.4}",
                label(r),
                r.steps,
                r.nfe,
                r.wall_seconds,
                r.seconds_per_step,
                r.latent_rmse,
                psnr,
                r.pixel_ssim
            );
        }
        out
    }

    /// The runs that are not the reference, with their images.
    fn grid_runs(&self) -> impl Iterator<Item = (&RunResult, &RgbImage)> {
        self.runs.iter().zip(&self.images).filter(|(r, _)| !r.reference)
    }

    /// The labelled contact sheet (rows = schedulers, columns = step counts).
    pub fn grid(&self) -> RgbImage {
        let rows: Vec<String> = self.schedulers.clone();
        let cols: Vec<String> = self.steps.iter().map(|s| format!("{s} steps")).collect();
        let mut cells: Vec<Vec<Option<grid::Cell>>> =
            rows.iter().map(|_| cols.iter().map(|_| None).collect()).collect();
        for (run, image) in self.grid_runs() {
            let row = self.schedulers.iter().position(|s| *s == run.scheduler);
            let col = self.steps.iter().position(|s| *s == run.steps);
            if let (Some(row), Some(col)) = (row, col) {
                let psnr = run.pixel_psnr_db.map_or("∞".to_string(), |v| format!("{v:.1}"));
                let caption = format!("NFE {} · {psnr} dB · SSIM {:.3}", run.nfe, run.pixel_ssim);
                cells[row][col] = Some(grid::Cell { image, caption });
            }
        }
        grid::contact_sheet(&rows, &cols, &cells)
    }

    /// The convergence chart: latent RMSE and pixel PSNR against NFE, one line per scheduler.
    pub fn chart(&self) -> Result<RgbImage> {
        let series = |value: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<chart::Series> {
            self.schedulers
                .iter()
                .map(|name| {
                    let mut points: Vec<(f64, f64)> = self
                        .grid_runs()
                        .filter(|(r, _)| r.scheduler == *name)
                        .filter_map(|(r, _)| value(r).map(|v| (r.nfe as f64, v)))
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    chart::Series { name: name.clone(), points }
                })
                .collect()
        };
        let rmse = series(&|r| Some(r.latent_rmse));
        let psnr = series(&|r| r.pixel_psnr_db);
        let title = format!(
            "Distance to the reference ({} × {} steps) vs model evaluations",
            self.reference_scheduler, self.reference_steps
        );
        chart::convergence_chart(
            &title,
            &[
                chart::Panel {
                    caption: "Latent RMSE (lower is better)",
                    y_label: "latent RMSE",
                    series: &rmse,
                    legend: plotters::chart::SeriesLabelPosition::UpperRight,
                    from_zero: true,
                },
                chart::Panel {
                    caption: "Pixel PSNR (higher is better)",
                    y_label: "PSNR (dB)",
                    series: &psnr,
                    legend: plotters::chart::SeriesLabelPosition::LowerRight,
                    from_zero: false,
                },
            ],
        )
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

fn write_image(path: &Path, image: &RgbImage) -> Result<()> {
    image.save(path).map_err(|e| Error::output(path, e))
}

/// Writes `results.csv`, `results.json`, `grid.png` and `convergence.png` into `dir` (the run images are written
/// by [`run`] as each run finishes).
pub fn write_outputs(report: &BenchReport, dir: &Path) -> Result<()> {
    write_file(&dir.join("results.csv"), &report.to_csv())?;
    write_file(&dir.join("results.json"), &report.to_json())?;
    write_image(&dir.join("grid.png"), &report.grid())?;
    write_image(&dir.join(chart::FILE_NAME), &report.chart()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn scheduler_variants_are_their_own_runs_with_their_options() {
        let list = parse_schedulers(
            "Euler, Euler[timestep_spacing=trailing], DPM Multi[use_karras_sigmas=true,solver_order=1]",
        )
        .unwrap();
        assert_eq!(
            list,
            ["Euler", "Euler[timestep_spacing=trailing]", "DPM Multi[use_karras_sigmas=true,solver_order=1]"]
        );
        let base = GenerateRequest::new("x");
        let r = run_request(&base, &list[2], 7).unwrap();
        assert_eq!((r.scheduler.as_str(), r.num_inference_steps), ("DPM Multi", 7));
        assert_eq!(r.scheduler_options["use_karras_sigmas"], serde_json::json!(true));
        assert_eq!(r.scheduler_options["solver_order"], serde_json::json!(1));
        for bad in ["Euler[no_such_key=1]", "Euler[timestep_spacing]", "Euler[timestep_spacing=trailing"] {
            assert!(parse_schedulers(bad).is_err(), "{bad}");
        }
        assert_ne!(slug(&list[0]), slug(&list[1]));
    }

    use super::*;

    #[test]
    fn steps_lists() {
        assert_eq!(parse_steps("10,20,30,50").unwrap(), vec![10, 20, 30, 50]);
        assert_eq!(parse_steps(" 30, 10 ,10").unwrap(), vec![10, 30]);
        for (bad, item) in [("10,x,30", "\"x\""), ("10,0", "\"0\""), ("10,,20", "\"\""), ("-5", "\"-5\"")] {
            let e = parse_steps(bad).unwrap_err().to_string();
            assert!(e.contains(item), "{bad}: {e}");
        }
    }

    #[test]
    fn scheduler_lists() {
        assert_eq!(parse_schedulers("all").unwrap(), schedulers::names());
        assert_eq!(parse_schedulers("euler, DDIM,Euler").unwrap(), vec!["Euler", "DDIM"]);
        let e = parse_schedulers("Euler,NoSuchSampler").unwrap_err().to_string();
        assert!(e.contains("NoSuchSampler") && e.contains("DDIM") && e.contains("Euler"), "{e}");
        assert!(parse_schedulers("Euler,").is_err());
        let e = check_reference_scheduler("NoSuchSampler").unwrap_err().to_string();
        assert!(e.contains("reference scheduler") && e.contains("Euler"), "{e}");
        assert_eq!(check_reference_scheduler("ddim").unwrap(), "DDIM");
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("DPM++ 2M Karras"), "dpmpp-2m-karras");
        assert_eq!(slug("Euler a"), "euler-a");
        assert_eq!(slug("  UniPC "), "unipc");
        assert_eq!(slug("+++"), "ppp");
        assert_eq!(slug("///"), "scheduler");
        let mut taken = Vec::new();
        let slugs: Vec<String> =
            ["Euler a", "euler_a", "DDIM", "Euler-A"].iter().map(|n| unique_slug(n, &mut taken)).collect();
        assert_eq!(slugs, ["euler-a", "euler-a-2", "ddim", "euler-a-3"]);
    }

    #[test]
    fn plan_counts_model_evaluations_from_timesteps() {
        let config = SchedulerConfig::default();
        let mut options = BenchOptions::new(GenerateRequest::new("x"), "out");
        options.schedulers = vec!["euler".into(), "DDIM".into()];
        options.steps = vec![2, 5];
        options.reference_scheduler = "DDIM".into();
        options.reference_steps = 5;
        let plan = Plan::new(&options, &config).unwrap();
        assert_eq!(plan.run_count(), 5);
        assert_eq!(plan.reference.image, "images/reference_ddim_5.png");
        for run in std::iter::once(&plan.reference).chain(&plan.runs) {
            let expected = schedulers::create(&run.scheduler, &config, run.steps).unwrap().timesteps().len();
            assert_eq!(run.nfe, expected, "{run:?}");
        }
        assert_eq!(plan.runs[0].scheduler, "Euler");
        options.schedulers.push("EULER".into());
        assert_eq!(Plan::new(&options, &config).unwrap().runs.len(), 4, "duplicate names run once");
        options.schedulers.pop();
        assert_eq!(plan.runs[1].image, "images/euler_5.png");
        // DDIM × 5 repeats the reference and is not run (or counted) twice.
        assert!(plan.repeats_reference(&plan.runs[3]));
        assert_eq!(plan.total_nfe(), 5 + (2 + 5) + 2);
        options.steps = vec![2000];
        let e = Plan::new(&options, &config).unwrap_err().to_string();
        assert!(e.contains("2000"), "{e}");
    }

    #[test]
    fn csv_quotes_and_infinity() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("Euler"), "Euler");
    }
}
