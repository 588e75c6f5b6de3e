//! The `dreamshaper` command: a thin layer over the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use dreamshaper::adapters::LoraSpec;
use dreamshaper::bench::{self, BenchEvent, BenchOptions};
use dreamshaper::loading::{load_taesd, DEFAULT_MODEL, DEFAULT_TAESD};
use dreamshaper::output::{a1111_parameters, output_paths, save_png};
use dreamshaper::preview::{LatentRgb, Previewer};
use dreamshaper::sampling::StepLatents;
use dreamshaper::server::{self, ApiKeys, Ranges, Server, ServerConfig};
use dreamshaper::{
    Control, Emphasis, FinalDecoder, GenerateRequest, Pipeline, PipelineOptions, Progress, PromptSyntax, Residency,
    VaeTiling,
};
use indicatif::{ProgressBar, ProgressStyle};

/// Lets CPU weight tensors share the model files' memory maps (zero-copy loading, `dreamshaper::loading::mapped`).
#[global_allocator]
static ALLOCATOR: dreamshaper::loading::mapped::MappedAwareAllocator =
    dreamshaper::loading::mapped::MappedAwareAllocator;

#[derive(Parser)]
#[command(
    name = "dreamshaper",
    version,
    about = "Local Stable Diffusion XL (Dreamshaper XL) inference, matching diffusers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(GenerateArgs),
    /// Serve the hosted text-to-image API locally (POST /v1/sdxl1.0-dreamshaper).
    Serve(ServeArgs),
    /// Compare schedulers × step counts against a high-step reference run: timings, model evaluations, distances,
    /// images, a labelled grid and a convergence chart.
    BenchSchedulers(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
    /// CPU only: Linear and Conv2d weights quantized to int8 per output channel, their inputs per row, products
    /// summed in i32; the rest in f32.
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum SyntaxArg {
    A1111,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum EmphasisArg {
    Original,
    NoNorm,
}

#[derive(Args)]
struct ModelArgs {
    /// A diffusers model folder, a Hugging Face hub id, or a single-file checkpoint (`.safetensors`).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// For a single-file checkpoint: a diffusers folder or hub id whose config files (not weights) describe it.
    #[arg(long)]
    config: Option<String>,
    /// Replacement VAE (folder, hub id or .safetensors file), e.g. an f16-safe one.
    #[arg(long)]
    vae: Option<String>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Default: f32 on CPU, f16 on GPUs. On the CPU, bf16 and int8 are mixed precision: the matrix products of
    /// Linear and Conv2d layers in bf16 or int8, everything else in f32.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Decode with the VAE layer by layer in bands of rows whatever the image size: the same picture as the whole-
    /// image decode in less memory (by default only images larger than the VAE's `sample_size`, 1024 px for SDXL).
    #[arg(long, conflicts_with = "no_vae_tiling")]
    vae_tiling: bool,
    /// Never decode in bands (each layer over the whole image at once, however large).
    #[arg(long)]
    no_vae_tiling: bool,
    /// A LoRA file (kohya/A1111 or diffusers/PEFT) merged into the model, with its weight (default 1). Repeatable;
    /// the updates of several LoRAs add up.
    #[arg(long = "lora", value_name = "PATH[:WEIGHT]")]
    loras: Vec<String>,
    /// Where LoRAs named by `<lora:NAME:WEIGHT>` prompt tags and a request's `loras` field are found
    /// (`DIR/NAME.safetensors`; names cannot leave this folder).
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// Textual-inversion embeddings (SDXL `.safetensors` with `clip_l` and `clip_g`): a prompt word equal to a file's
    /// stem is read as its vectors in both text encoders.
    #[arg(long)]
    embeddings_dir: Option<PathBuf>,
    /// What decodes the final images: the model's VAE, or TAESD-XL (a fast draft decode, softer in fine detail;
    /// its weights from --preview-vae, by default madebyollin/taesdxl).
    #[arg(long, value_enum, default_value = "vae")]
    vae_decoder: DecoderArg,
    /// TAESD-XL weights (diffusers `AutoencoderTiny`: a folder or hub id such as madebyollin/taesdxl) for
    /// `--preview` images and `--vae-decoder taesd`. Without it, previews use a fixed linear latent→RGB map.
    #[arg(long, value_name = "DIR|HUB_ID")]
    preview_vae: Option<String>,
}

impl ModelArgs {
    /// The pipeline options these flags say (residency aside).
    fn pipeline_options(&self, residency: Residency) -> anyhow::Result<PipelineOptions> {
        let (device, dtype) = device_and_dtype(self)?;
        let loras = self.loras.iter().map(|l| LoraSpec::parse(l)).collect::<dreamshaper::Result<_>>()?;
        Ok(PipelineOptions {
            device,
            dtype,
            vae: self.vae.clone(),
            config: self.config.clone(),
            residency,
            vae_tiling: self.vae_tiling(),
            loras,
            lora_dir: self.lora_dir.clone(),
            embeddings_dir: self.embeddings_dir.clone(),
            decoder: match self.vae_decoder {
                DecoderArg::Vae => FinalDecoder::Vae,
                DecoderArg::Taesd => {
                    FinalDecoder::Taesd(self.preview_vae.clone().unwrap_or_else(|| DEFAULT_TAESD.to_string()))
                }
            },
        })
    }

    fn vae_tiling(&self) -> VaeTiling {
        match (self.vae_tiling, self.no_vae_tiling) {
            (true, _) => VaeTiling::Always,
            (_, true) => VaeTiling::Never,
            _ => VaeTiling::Auto,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DecoderArg {
    Vae,
    Taesd,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A hosted-API request body (JSON); flags given beside it override its fields.
    #[arg(long)]
    request: Option<PathBuf>,
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    samples: Option<u32>,
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    num_inference_steps: Option<u32>,
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// -1 for a random seed (the seed used is printed).
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<i64>,
    #[arg(long)]
    img_width: Option<u32>,
    #[arg(long)]
    img_height: Option<u32>,
    /// How prompts are read: A1111's syntax (weights, editing, alternation, BREAK, long prompts) or none
    /// (diffusers: literal text cut to 77 tokens). Default: a1111, or the request file's `prompt_syntax`.
    #[arg(long, value_enum)]
    prompt_syntax: Option<SyntaxArg>,
    /// With A1111 syntax, how weights apply: original (A1111's default) or no-norm.
    #[arg(long, value_enum)]
    emphasis: Option<EmphasisArg>,
    /// A scheduler config key on top of the model's `scheduler_config.json`, as diffusers'
    /// `Class.from_config(config, **options)` takes it (`timestep_spacing=trailing`, `use_karras_sigmas=true`);
    /// VALUE is read as JSON when it parses, else as a string. Repeatable.
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE")]
    scheduler_options: Vec<String>,
    /// Image to image: the input image (PNG, JPEG, WebP, …; both sides multiples of 8). The output has its size.
    /// Overrides a request file's `image`.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Inpainting (with --image): the mask, the image's size; white repaints, black keeps (its grey level is
    /// binarised at 0.5). Overrides a request file's `mask`.
    #[arg(long, value_name = "PATH", requires = "image")]
    mask: Option<PathBuf>,
    /// Image to image: how far the input is re-noised, in (0, 1] (the fraction of the steps that run; default 0.3).
    #[arg(long)]
    strength: Option<f64>,
    /// A1111's hires fix: generate, enlarge the latents F times (bilinear, A1111's "Latent" upscaler), then run image
    /// to image over them at the larger size.
    #[arg(long, value_name = "F")]
    hires_scale: Option<f64>,
    /// The hires fix's denoising strength, in (0, 1] (default 0.7).
    #[arg(long, value_name = "F", requires = "hires_scale")]
    hires_strength: Option<f64>,
    /// The hires fix's steps (default: --num-inference-steps).
    #[arg(long, value_name = "N", requires = "hires_scale")]
    hires_steps: Option<u32>,
    /// η, the noise weight of DDIM (default 0: deterministic) and TCD (its γ, default 0.3); other schedulers
    /// refuse it.
    #[arg(long)]
    eta: Option<f64>,
    /// Print how the prompts are read (texts per step, weighted fragments, 77-token chunks). Without an explicit
    /// --output, stop there; with one, generate too.
    #[arg(long)]
    explain_prompt: bool,
    /// Output PNG (default out.png); with several samples, `out_0.png`, `out_1.png`, …
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Keep rewriting this PNG with the picture the run is heading to (the current x₀ prediction of the first
    /// sample; TAESD-XL with --preview-vae, else a linear latent→RGB map), so an image viewer shows it forming; it
    /// ends as the final image.
    #[arg(long, value_name = "PATH")]
    preview: Option<PathBuf>,
    /// Rewrite the preview every N model evaluations (default 1).
    #[arg(long, value_name = "N", requires = "preview", value_parser = clap::value_parser!(u32).range(1..))]
    preview_every: Option<u32>,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Listening address; loopback by default.
    #[arg(long, default_value = server::DEFAULT_ADDR)]
    addr: SocketAddr,
    /// Require this key in the `x-api-key` header (or set DREAMSHAPER_API_KEY, which `ps` does not show).
    #[arg(long, conflicts_with = "api_keys_file", env = "DREAMSHAPER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Require one of the keys in this file (one per line, `#` comments) in the `x-api-key` header.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// How many requests may wait while one generates; more are answered 429.
    #[arg(long, default_value_t = server::DEFAULT_MAX_QUEUE)]
    max_queue: usize,
    /// Larger request bodies are answered 413.
    #[arg(long, default_value_t = server::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// For few-step models (Turbo, Lightning, LCM): steps 1–100, guidance 0–25 and sizes from 64 (everything else
    /// as hosted). `--relaxed-ranges` is an alias.
    #[arg(long, alias = "relaxed-ranges")]
    open_ranges: bool,
    /// Fetch `image` / `mask` sent as http(s) URLs (as the hosted API accepts them); never from loopback, private or
    /// other non-public addresses. Without it such requests get 400.
    #[arg(long)]
    allow_image_urls: bool,
    /// Open connections at most (default: half the open-file limit, at most 1024). At the cap the oldest idle
    /// connection is closed to make room; only if every one has a request in progress is a new one refused (503).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive connection stays open.
    #[arg(long, default_value_t = server::connections::DEFAULT_HEADER_TIMEOUT.as_secs_f64())]
    header_timeout: f64,
    /// Larger request heads (request line and headers) are answered 431.
    #[arg(long, default_value_t = server::connections::DEFAULT_MAX_HEADER_BYTES)]
    max_header_bytes: usize,
    /// Host names answered besides loopback ones, comma-separated (`*`: any). Without it, a server without an API
    /// key answers only `Host: localhost / 127.0.0.1 / [::1]` (a defence against DNS rebinding); with a key, any.
    #[arg(long, value_delimiter = ',')]
    allowed_hosts: Option<Vec<String>>,
    /// Also serve `GET /metrics` (Prometheus) without a key on this address; on the main address it needs the key.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Log lines as text or as one JSON object per line.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// The server's URL as clients reach it (`https://gpu.example`), for the absolute URLs the v2 job API answers
    /// with; without it they are built from the request's `Host`.
    #[arg(long)]
    public_url: Option<String>,
    /// Seconds a finished v2 job's result is kept; later polls get 404.
    #[arg(long, default_value_t = server::jobs::DEFAULT_JOB_TTL.as_secs())]
    job_ttl: u64,
    /// The most v2 jobs kept, finished or not (the oldest finished ones make room first).
    #[arg(long, default_value_t = server::jobs::DEFAULT_MAX_JOBS)]
    max_jobs: usize,
    /// Keep v2 jobs in Redis (`redis://HOST:PORT/DB`) rather than in memory: replicas sharing it behave as one
    /// service (submit on one, poll on another; each pulls queued jobs while idle). `--max-jobs` then bounds the
    /// jobs queued in Redis.
    #[arg(long)]
    job_store: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Comma-separated scheduler names, or `all` for every registered scheduler.
    #[arg(long, default_value = "all")]
    schedulers: String,
    /// Comma-separated step counts; every scheduler runs at each.
    #[arg(long, default_value = "10,20,30,50")]
    steps: String,
    /// One seed for every run; -1 picks a random one (printed and recorded in results.json).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    seed: i64,
    /// Step count of the reference run.
    #[arg(long, default_value_t = bench::DEFAULT_REFERENCE_STEPS)]
    reference_steps: usize,
    /// Scheduler of the reference run.
    #[arg(long, default_value = bench::DEFAULT_REFERENCE_SCHEDULER)]
    reference_scheduler: String,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long, default_value_t = 1024)]
    img_width: u32,
    #[arg(long, default_value_t = 1024)]
    img_height: u32,
    /// Compare the schedulers on image to image from this input (its size replaces --img-width/--img-height).
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Image to image's strength, in (0, 1] (default 0.3).
    #[arg(long, requires = "image")]
    strength: Option<f64>,
    /// Output folder: results.csv, results.json, images/, grid.png, convergence.png.
    #[arg(long)]
    out: PathBuf,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

/// Moves the progress display to `done` of `total`, first turning the start-up spinner into a counting bar.
fn count_on(bar: &ProgressBar, counting: &mut bool, template: &str, done: usize, total: usize) {
    if !*counting {
        *counting = true;
        bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
        bar.set_length(total as u64);
        bar.reset_elapsed();
    }
    bar.set_position(done as u64);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(args),
        Command::BenchSchedulers(args) => bench_schedulers(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn device_and_dtype(args: &ModelArgs) -> anyhow::Result<(Device, DType)> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?,
        DeviceArg::Metal => Device::new_metal(0).map_err(|e| anyhow::anyhow!("--device metal: {e}"))?,
    };
    let dtype = match (args.dtype, &device) {
        (Some(DtypeArg::F32), _) => DType::F32,
        (Some(DtypeArg::F16), _) => DType::F16,
        (Some(DtypeArg::Bf16), _) => DType::BF16,
        (Some(DtypeArg::Int8), Device::Cpu) => dreamshaper::models::layers::INT8_WEIGHTS,
        (Some(DtypeArg::Int8), _) => anyhow::bail!("--dtype int8 runs on the CPU only (--device cpu)"),
        (None, Device::Cpu) => DType::F32,
        (None, _) => DType::F16,
    };
    Ok((device, dtype))
}

fn build_request(args: &GenerateArgs) -> anyhow::Result<GenerateRequest> {
    let mut request = match &args.request {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--request {}: {e}", path.display()))?;
            let mut value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("--request {}: invalid JSON: {e}", path.display()))?;
            // A request file may leave the prompt to the command line.
            if let (Some(prompt), Some(obj)) = (&args.prompt, value.as_object_mut()) {
                obj.insert("prompt".into(), prompt.clone().into());
            }
            serde_json::from_value(value).map_err(|e| anyhow::anyhow!("--request {}: {e}", path.display()))?
        }
        None => GenerateRequest::new(
            args.prompt
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--prompt is required (or give --request with a prompt)"))?,
        ),
    };
    if let Some(v) = &args.prompt {
        request.prompt = v.clone();
    }
    if let Some(v) = &args.negative_prompt {
        request.negative_prompt = v.clone();
    }
    if let Some(v) = &args.scheduler {
        request.scheduler = v.clone();
    }
    request.samples = args.samples.unwrap_or(request.samples);
    request.num_inference_steps = args.num_inference_steps.unwrap_or(request.num_inference_steps);
    request.guidance_scale = args.guidance_scale.unwrap_or(request.guidance_scale);
    request.seed = args.seed.unwrap_or(request.seed);
    request.img_width = args.img_width.unwrap_or(request.img_width);
    request.img_height = args.img_height.unwrap_or(request.img_height);
    request.eta = args.eta.or(request.eta);
    request.strength = args.strength.or(request.strength);
    if let Some(path) = &args.image {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("--image {}: {e}", path.display()))?;
        request.image = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if let Some(scale) = args.hires_scale {
        let mut hires = request.hires.unwrap_or(dreamshaper::request::HiresFix { scale, strength: 0.7, steps: 0 });
        hires.scale = scale;
        hires.strength = args.hires_strength.unwrap_or(hires.strength);
        hires.steps = args.hires_steps.unwrap_or(hires.steps);
        request.hires = Some(hires);
    }
    if let Some(path) = &args.mask {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("--mask {}: {e}", path.display()))?;
        request.mask = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if request.image.is_some() {
        let default = if request.mask.is_some() {
            dreamshaper::request::DEFAULT_INPAINT_STRENGTH
        } else {
            dreamshaper::request::DEFAULT_IMG2IMG_STRENGTH
        };
        request.strength.get_or_insert(default);
    }
    if let Some(v) = args.prompt_syntax {
        request.prompt_syntax = match v {
            SyntaxArg::A1111 => PromptSyntax::A1111,
            SyntaxArg::None => PromptSyntax::None,
        };
    }
    if let Some(v) = args.emphasis {
        request.emphasis = match v {
            EmphasisArg::Original => Emphasis::Original,
            EmphasisArg::NoNorm => Emphasis::NoNorm,
        };
    }
    for option in &args.scheduler_options {
        let Some((key, value)) = option.split_once('=') else {
            anyhow::bail!("--scheduler-option {option:?}: expected KEY=VALUE (e.g. timestep_spacing=trailing)");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        request.scheduler_options.insert(key.trim().to_string(), value);
    }
    Ok(request)
}

fn model_name(model: &str) -> String {
    model.trim_end_matches('/').rsplit('/').next().unwrap_or(model).to_string()
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let request = build_request(&args)?;
    let show = !args.quiet && std::io::stderr().is_terminal();
    let mut pipeline = Pipeline::load(&args.model.model, args.model.pipeline_options(Residency::Sequential)?)?;
    pipeline.validate(&request)?;
    if args.explain_prompt {
        print!("{}", pipeline.explain_prompt(&request)?);
        if args.output.is_none() {
            return Ok(());
        }
    }
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from("out.png"));

    let mut preview = match &args.preview {
        Some(path) => {
            let previewer = match &args.model.preview_vae {
                Some(spec) => Previewer::Taesd(load_taesd(spec, pipeline.dtype(), pipeline.device())?),
                None => Previewer::LatentRgb(LatentRgb::sdxl(pipeline.vae_scale_factor())),
            };
            Some(LivePreview::new(previewer, path.clone(), args.preview_every.unwrap_or(1) as usize))
        }
        None => None,
    };

    let bar = if show { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    let mut bar_is_steps = false;
    let mut on_progress = |p: &Progress| {
        if let (Some(preview), Progress::Step { evaluation, evaluations, latents: Some(state), .. }) = (&mut preview, p)
        {
            preview.step(*evaluation, *evaluations, state);
        }
        match p {
            Progress::Stage(name) => {
                if !bar_is_steps {
                    bar.set_message(*name);
                    bar.tick();
                }
            }
            Progress::Part { stage, done, total } => {
                if !bar_is_steps {
                    bar.set_message(format!("{stage} {done}/{total}"));
                    bar.tick();
                }
            }
            Progress::Step { step, steps, evaluation, evaluations, .. } => {
                let template = "{bar:30} step {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]";
                count_on(&bar, &mut bar_is_steps, template, *evaluation, *evaluations);
                let evals = if evaluations != steps {
                    format!(" ({evaluation}/{evaluations} model evals)")
                } else {
                    String::new()
                };
                bar.set_message(format!("{step}/{steps}{evals}"));
            }
        }
        Control::Continue
    };
    let generation = pipeline.generate_with_loras(&request, &mut on_progress)?;
    bar.finish_and_clear();
    for warning in &generation.warnings {
        eprintln!("warning: {warning}");
    }

    let mut request = request;
    if let Some(first) = generation.images.first() {
        // Image to image's output has the input's size, the hires fix's the first pass's (A1111 records that).
        if request.hires.is_none() {
            (request.img_width, request.img_height) = first.dimensions();
        }
    }
    let parameters = a1111_parameters(&request, generation.seed, &model_name(&args.model.model), &generation.loras);
    let paths = output_paths(&output, generation.images.len());
    for (image, path) in generation.images.iter().zip(&paths) {
        save_png(image, path, &parameters)?;
        println!("{}", path.display());
    }
    if let Some(preview) = preview {
        preview.finish(&generation.images[0]);
    }
    eprintln!("seed: {}", generation.seed);
    Ok(())
}

/// The longest side of a TAESD live preview (see `Previewer::preview_at_most`): the final image is full size.
const PREVIEW_MAX_SIDE: usize = 512;

/// `--preview`: rewrites a PNG with the current x₀ every `every` model evaluations.
struct LivePreview {
    previewer: Previewer,
    path: PathBuf,
    every: usize,
    /// The first failure, reported once (a preview never stops the generation).
    failed: bool,
}

impl LivePreview {
    fn new(previewer: Previewer, path: PathBuf, every: usize) -> Self {
        Self { previewer, path, every, failed: false }
    }

    fn step(&mut self, evaluation: usize, evaluations: usize, state: &StepLatents) {
        if self.failed || (!evaluation.is_multiple_of(self.every) && evaluation != evaluations) {
            return;
        }
        let written = state
            .denoised()
            .and_then(|x0| self.previewer.preview_at_most(&x0, PREVIEW_MAX_SIDE))
            .map_err(anyhow::Error::from);
        if let Err(e) = written.and_then(|image| self.write(&image)) {
            eprintln!("warning: --preview {}: {e:#} (no further previews)", self.path.display());
            self.failed = true;
        }
    }

    /// Writes beside the file and renames over it, so a viewer never reads a half-written PNG.
    fn write(&self, image: &image::RgbImage) -> anyhow::Result<()> {
        let mut partial = self.path.clone().into_os_string();
        partial.push(".partial.png");
        let partial = PathBuf::from(partial);
        image.save(&partial).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", partial.display()))?;
        std::fs::rename(&partial, &self.path)
            .map_err(|e| anyhow::anyhow!("cannot replace {}: {e}", self.path.display()))
    }

    /// The preview ends as the final (first) image.
    fn finish(self, image: &image::RgbImage) {
        if let Err(e) = self.write(image) {
            eprintln!("warning: --preview {}: {e:#}", self.path.display());
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    server::logging::init(match args.log_format {
        LogFormatArg::Text => server::LogFormat::Text,
        LogFormatArg::Json => server::LogFormat::Json,
    });
    // Before the default connection cap is taken from it.
    server::connections::raise_open_file_limit();
    if !(args.header_timeout.is_finite() && args.header_timeout > 0.0 && args.header_timeout <= 3600.0) {
        anyhow::bail!("--header-timeout must be a number of seconds in (0, 3600], got {}", args.header_timeout);
    }
    if args.max_header_bytes < 1024 {
        anyhow::bail!("--max-header-bytes must be at least 1024, got {}", args.max_header_bytes);
    }
    if args.max_connections == Some(0) {
        anyhow::bail!("--max-connections must be at least 1");
    }
    let limits = server::Limits {
        max_connections: args.max_connections.unwrap_or_else(server::connections::default_max_connections),
        header_timeout: std::time::Duration::from_secs_f64(args.header_timeout),
        max_header_bytes: args.max_header_bytes,
        body_timeout: server::connections::DEFAULT_BODY_TIMEOUT,
    };
    let api_keys = match (&args.api_key, &args.api_keys_file) {
        (Some(key), _) => ApiKeys::new([key]).map_err(|e| anyhow::anyhow!("--api-key: {e}"))?,
        (None, Some(path)) => ApiKeys::from_file(path).map_err(anyhow::Error::msg)?,
        (None, None) => ApiKeys::none(),
    };
    if let Some(url) = &args.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!("--public-url must be an http:// or https:// URL, got {url:?}");
        }
    }
    if args.max_jobs == 0 {
        anyhow::bail!("--max-jobs must be at least 1");
    }
    let config = ServerConfig {
        addr: args.addr,
        api_keys,
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        ranges: if args.open_ranges { Ranges::Open } else { Ranges::Hosted },
        allow_image_urls: args.allow_image_urls,
        // A hub id's or a file's name: `/health` is unauthenticated and must not show file-system paths.
        model_name: model_name(&args.model.model),
        limits,
        allowed_hosts: args.allowed_hosts.clone(),
        metrics_addr: args.metrics_addr,
        shutdown_grace: server::DEFAULT_SHUTDOWN_GRACE,
        handle_signals: true,
        lora_dir: args.model.lora_dir.clone(),
        public_url: args.public_url.clone(),
        job_ttl: std::time::Duration::from_secs(args.job_ttl),
        max_jobs: args.max_jobs,
        job_store: args.job_store.clone(),
    };
    let model = args.model.model.clone();
    let options = args.model.pipeline_options(Residency::Resident)?;
    let load = move || Pipeline::load(&model, options);
    Ok(Server::start(config, load)?.wait()?)
}

fn bench_schedulers(args: BenchArgs) -> anyhow::Result<()> {
    // Everything that can be checked without the model is checked before loading it.
    let schedulers = bench::parse_schedulers(&args.schedulers).map_err(|e| anyhow::anyhow!("--schedulers: {e}"))?;
    let steps = bench::parse_steps(&args.steps).map_err(|e| anyhow::anyhow!("--steps: {e}"))?;
    let reference_scheduler = bench::check_reference_scheduler(&args.reference_scheduler)?;
    if args.reference_steps == 0 {
        anyhow::bail!("--reference-steps must be at least 1");
    }
    let mut request = GenerateRequest::new(args.prompt.clone());
    request.negative_prompt = args.negative_prompt.clone();
    request.guidance_scale = args.guidance_scale;
    request.seed = args.seed;
    request.img_width = args.img_width;
    request.img_height = args.img_height;
    if let Some(path) = &args.image {
        let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("--image {}: {e}", path.display()))?;
        let image = base64::engine::general_purpose::STANDARD.encode(bytes);
        (request.img_width, request.img_height) = dreamshaper::input_image::base64_dimensions("image", &image)?;
        request.image = Some(image);
        request.strength = Some(args.strength.unwrap_or(dreamshaper::request::DEFAULT_IMG2IMG_STRENGTH));
    }
    let mut options = BenchOptions::new(request, &args.out);
    options.schedulers = schedulers;
    options.steps = steps;
    options.reference_scheduler = reference_scheduler;
    options.reference_steps = args.reference_steps;
    options.model_name = model_name(&args.model.model);
    bench::prepare_output_dir(&args.out)?;

    // Check the plan against the model's configs (cheap) before loading its weights.
    bench::prepare(&Pipeline::load(&args.model.model, args.model.pipeline_options(Residency::Sequential)?)?, &options)?;
    let show = !args.quiet && std::io::stderr().is_terminal();
    let bar = if show { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    bar.set_message("loading the model");
    bar.tick();
    // Resident: the UNet and VAE are loaded once, not once per run.
    let pipeline = Pipeline::load(&args.model.model, args.model.pipeline_options(Residency::Resident)?)?;

    let (mut bar_is_steps, mut running) = (false, false);
    let mut on_event = |event: &BenchEvent| {
        match event {
            // Loading and prompt encoding; once the runs start, the message names the run instead.
            BenchEvent::Stage(name) => {
                if !running {
                    bar.set_message(*name);
                    bar.tick();
                }
            }
            BenchEvent::RunStarted { index, runs, run } => {
                running = true;
                let what = if run.reference { "reference " } else { "" };
                bar.set_message(format!("run {}/{runs}: {what}{} × {} steps", index + 1, run.scheduler, run.steps));
            }
            BenchEvent::Evaluations { done, total } => {
                let template = "{bar:30} {pos}/{len} model evals [{elapsed_precise}<{eta_precise}] {msg}";
                count_on(&bar, &mut bar_is_steps, template, *done, *total);
            }
            BenchEvent::RunFinished { .. } => {}
            BenchEvent::Writing => bar.set_message("writing results"),
        }
        Control::Continue
    };
    let report = bench::run(&pipeline, &options, &mut on_event)?;
    bar.finish_and_clear();

    print!("{}", report.summary_table());
    println!();
    for name in ["results.csv", "results.json", "grid.png", "convergence.png"] {
        println!("{}", args.out.join(name).display());
    }
    eprintln!("seed: {}", report.seed);
    Ok(())
}
