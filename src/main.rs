//! The `dreamshaper` command: a thin layer over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};
use dreamshaper::loading::DEFAULT_MODEL;
use dreamshaper::output::{a1111_parameters, output_paths, save_png};
use dreamshaper::{Control, Emphasis, GenerateRequest, Pipeline, PipelineOptions, Progress, PromptSyntax, Residency};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// Default: f32 on CPU, f16 on GPUs.
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
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
    /// Print how the prompts are read (texts per step, weighted fragments, 77-token chunks). Without an explicit
    /// --output, stop there; with one, generate too.
    #[arg(long)]
    explain_prompt: bool,
    /// Output PNG (default out.png); with several samples, `out_0.png`, `out_1.png`, …
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
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
    Ok(request)
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let request = build_request(&args)?;
    let (device, dtype) = device_and_dtype(&args.model)?;
    let show = !args.quiet && std::io::stderr().is_terminal();
    let pipeline = Pipeline::load(
        &args.model.model,
        PipelineOptions {
            device,
            dtype,
            vae: args.model.vae.clone(),
            config: args.model.config.clone(),
            residency: Residency::Sequential,
        },
    )?;
    pipeline.validate(&request)?;
    if args.explain_prompt {
        print!("{}", pipeline.explain_prompt(&request)?);
        if args.output.is_none() {
            return Ok(());
        }
    }
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from("out.png"));

    let bar = if show { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
    let mut bar_is_steps = false;
    let mut on_progress = |p: &Progress| {
        match p {
            Progress::Stage(name) => {
                if !bar_is_steps {
                    bar.set_message(*name);
                    bar.tick();
                }
            }
            Progress::Step { step, steps, evaluation, evaluations } => {
                if !bar_is_steps {
                    bar_is_steps = true;
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30} step {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
                        )
                        .expect("valid template"),
                    );
                    bar.set_length(*evaluations as u64);
                    bar.reset_elapsed();
                }
                bar.set_position(*evaluation as u64);
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
    let generation = pipeline.generate(&request, &mut on_progress)?;
    bar.finish_and_clear();
    for warning in &generation.warnings {
        eprintln!("warning: {warning}");
    }

    let model_name = args.model.model.trim_end_matches('/').rsplit('/').next().unwrap_or(&args.model.model).to_string();
    let parameters = a1111_parameters(&request, generation.seed, &model_name);
    let paths = output_paths(&output, generation.images.len());
    for (image, path) in generation.images.iter().zip(&paths) {
        save_png(image, path, &parameters)?;
        println!("{}", path.display());
    }
    eprintln!("seed: {}", generation.seed);
    Ok(())
}
