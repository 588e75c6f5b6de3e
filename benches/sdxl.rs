//! Benchmarks of the engine's parts on a full-size SDXL model (random weights made by `benches/make_full_model.py`).
//!
//! `cargo bench --bench sdxl -- --case CASE [--model DIR] [--size PX] [--iters N] [--warmup N] [--dtype f32|f16|bf16]
//! [--lora FILE] [--taesd DIR]`
//!
//! Cases (each is meant to run in its own process, so that the peak resident memory printed is the case's own):
//! - `unet-cfg`: one classifier-free-guidance UNet call (batch 2) on a `size`² image's latents;
//! - `text-encoders`: CLIP-L + bigG on a prompt and a negative prompt (encoders loaded once, excluded);
//! - `vae-decode`: decoding one `size`² image's latents (`vae-decode-bands`: in bands, as large images are);
//! - `vae-encode`: encoding one `size`² image to its latent distribution (whole, or in bands as `Auto` chooses);
//! - `scheduler-step`: the scheduler update alone on `size`² latents, for several schedulers (no model);
//! - `gemm`: f32 against bf16 matrix products on the UNet's shapes (no model needed);
//! - `lora-merge`: loading the UNet with and without a LoRA (`--lora FILE`, e.g. from `benches/make_full_lora.py`):
//!   the difference is the merge;
//! - `startup`: `Pipeline::load` + a 1-step generation, reporting the time from process start to the first
//!   denoising step (text encoders loaded, run and freed, UNet loaded);
//! - `taesd-decode`: TAESD-XL decoding one `size`² image's latents: the TAESD at `--taesd DIR` (a folder or hub id),
//!   else random weights made in-process with madebyollin/taesdxl's config (no model needed);
//! - `preview-linear`: the linear latent → RGB preview of one `size`² image, up to the 8-bit image (no model needed).
//!
//! Prints one JSON object per line: case, settings, min / median / mean seconds, peak resident memory (GB).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use dreamshaper::adapters::LoraSpec;
use dreamshaper::models::unet::AddedConditioning;
use dreamshaper::rng::TorchRng;
use dreamshaper::sampling::{Control, Progress};
use dreamshaper::schedulers::{self, SchedulerConfig};
use dreamshaper::{GenerateRequest, Pipeline, PipelineOptions, Residency};
use serde_json::json;

/// Lets CPU weight tensors share the model files' memory maps (zero-copy loading, `dreamshaper::loading::mapped`).
#[global_allocator]
static ALLOCATOR: dreamshaper::loading::mapped::MappedAwareAllocator =
    dreamshaper::loading::mapped::MappedAwareAllocator;

struct Args {
    case: String,
    model: PathBuf,
    size: usize,
    iters: usize,
    warmup: usize,
    dtype: DType,
    /// A LoRA file for `lora-merge`.
    lora: Option<PathBuf>,
    /// A TAESD folder or hub id for `taesd-decode` (random weights without it).
    taesd: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let default_model = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/dreamshaper/bench/sdxl-random-f32"))
        .unwrap_or_default();
    let mut args = Args {
        case: String::new(),
        model: default_model,
        size: 512,
        iters: 3,
        warmup: 1,
        dtype: DType::F32,
        lora: None,
        taesd: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--case" => args.case = value()?,
            "--model" => args.model = PathBuf::from(value()?),
            "--lora" => args.lora = Some(PathBuf::from(value()?)),
            "--taesd" => args.taesd = Some(value()?),
            "--size" => args.size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--iters" => args.iters = value()?.parse().map_err(|e| format!("--iters: {e}"))?,
            "--warmup" => args.warmup = value()?.parse().map_err(|e| format!("--warmup: {e}"))?,
            "--dtype" => {
                args.dtype = match value()?.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    "int8" => dreamshaper::models::layers::INT8_WEIGHTS,
                    other => return Err(format!("--dtype {other}: use f32, f16, bf16 or int8")),
                }
            }
            // cargo bench passes --bench to harness-less benches.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.case.is_empty() {
        return Err(
            "--case is required (unet-cfg, text-encoders, vae-decode, vae-decode-bands, scheduler-step, startup, gemm, \
             lora-merge, taesd-decode, preview-linear)"
                .into(),
        );
    }
    if args.size == 0 || !args.size.is_multiple_of(8) {
        return Err(format!("--size {}: a positive multiple of 8", args.size));
    }
    Ok(args)
}

/// The process's peak resident memory (VmHWM) in GB.
fn peak_rss_gb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kb / 1e6
}

fn time(warmup: usize, iters: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    (0..iters)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .collect()
}

fn report(case: &str, args: &Args, mut seconds: Vec<f64>, extra: serde_json::Value) {
    seconds.sort_by(f64::total_cmp);
    let mean = seconds.iter().sum::<f64>() / seconds.len().max(1) as f64;
    let line = json!({
        "case": case,
        "size": args.size,
        "dtype": if args.dtype == dreamshaper::models::layers::INT8_WEIGHTS {
            "int8".to_string()
        } else {
            format!("{:?}", args.dtype).to_lowercase()
        },
        "iters": seconds.len(),
        "min_s": seconds.first(),
        "median_s": seconds.get(seconds.len() / 2),
        "mean_s": mean,
        "peak_rss_gb": peak_rss_gb(),
        "threads": rayon::current_num_threads(),
        "extra": extra,
    });
    println!("{line}");
}

fn options(args: &Args) -> PipelineOptions {
    PipelineOptions { dtype: args.dtype, ..Default::default() }
}

/// `vae-encode`: one `size`² image (random values in [-1, 1]) encoded to its latent distribution, with the VAE's
/// automatic choice of a whole or banded encode (whole up to its `sample_size`, 1024 for SDXL); encoder load excluded.
fn vae_encode(args: &Args, model: &str) -> Result<(), Box<dyn std::error::Error>> {
    use dreamshaper::models::vae_bands::{BandPlan, VaeTiling};
    let pipeline = Pipeline::load(model, options(args))?;
    let load = Instant::now();
    let vae = pipeline.load_vae_encoder()?;
    let load_s = load.elapsed().as_secs_f64();
    let image = Tensor::rand(-1f32, 1., (1, 3, args.size, args.size), &Device::Cpu)?;
    let plan = BandPlan::for_vae(VaeTiling::Auto, &vae.config);
    let banded = plan.in_bands(args.size / 8, args.size / 8);
    let seconds = time(args.warmup, args.iters, || {
        vae.encode_planned(&image, &plan, &mut |_, _| Ok(())).expect("VAE encode");
    });
    report("vae-encode", args, seconds, json!({ "encoder_load_s": load_s, "in_bands": banded }));
    Ok(())
}

fn run(args: &Args, process_start: Instant) -> Result<(), Box<dyn std::error::Error>> {
    match args.case.as_str() {
        "gemm" => {
            gemm_shapes(args);
            few_rows_shapes(args);
            return Ok(());
        }
        "taesd-decode" => return taesd_decode(args),
        "preview-linear" => return preview_linear(args),
        _ => {}
    }
    if !args.model.join("model_index.json").is_file() {
        return Err(format!(
            "no model at {}: create it with `python benches/make_full_model.py` (see BENCHMARKS.md)",
            args.model.display()
        )
        .into());
    }
    let model = args.model.to_string_lossy().to_string();
    let device = Device::Cpu;
    match args.case.as_str() {
        "lora-merge" => {
            let lora = args.lora.clone().ok_or("--case lora-merge needs --lora FILE (benches/make_full_lora.py)")?;
            let plain = Pipeline::load(&model, options(args))?;
            let without = time(args.warmup, args.iters, || drop(plain.load_unet().expect("UNet")));
            let started = Instant::now();
            let spec = LoraSpec { path: lora.clone(), weight: 1.0 };
            let with = Pipeline::load(&model, PipelineOptions { loras: vec![spec], ..options(args) })?;
            let read_s = started.elapsed().as_secs_f64();
            let seconds = time(args.warmup, args.iters, || drop(with.load_unet().expect("UNet with the LoRA")));
            let median = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let extra = json!({
                "lora": lora.display().to_string(),
                "lora_read_and_resolve_s": read_s,
                "unet_load_without_lora_median_s": median(&without),
                "merge_median_s": median(&seconds) - median(&without),
            });
            report("lora-merge", args, seconds, extra);
        }
        "unet-cfg" => {
            let pipeline = Pipeline::load(&model, options(args))?;
            let load = Instant::now();
            let unet = pipeline.load_unet()?;
            let load_s = load.elapsed().as_secs_f64();
            let latent = args.size / 8;
            let sample = Tensor::randn(0f32, 1., (2, 4, latent, latent), &device)?.to_dtype(unet.dtype())?;
            let context = Tensor::randn(0f32, 1., (2, 77, 2048), &device)?.to_dtype(unet.dtype())?;
            let s = args.size as f32;
            let added = AddedConditioning {
                text_embeds: Tensor::randn(0f32, 1., (2, 1280), &device)?,
                time_ids: Tensor::new(&[[s, s, 0., 0., s, s]; 2], &device)?,
            };
            let seconds = time(args.warmup, args.iters, || {
                unet.forward(&sample, 500.0, &context, &added).expect("UNet call");
            });
            report("unet-cfg", args, seconds, json!({ "unet_load_s": load_s }));
        }
        "text-encoders" => {
            let options = PipelineOptions { residency: Residency::Resident, ..options(args) };
            let pipeline = Pipeline::load(&model, options)?;
            let request = GenerateRequest {
                negative_prompt: "blurry, low quality".into(),
                ..GenerateRequest::new("a photo of an astronaut riding a horse on mars, highly detailed, 8k")
            };
            let seconds = time(args.warmup, args.iters, || {
                pipeline.condition(&request, &mut |_| Control::Continue).expect("conditioning");
            });
            report("text-encoders", args, seconds, json!({}));
        }
        "vae-decode" | "vae-decode-bands" => {
            let pipeline = Pipeline::load(&model, options(args))?;
            let vae = pipeline.load_vae()?;
            let latent = args.size / 8;
            let dtype = dreamshaper::models::layers::compute_dtype(&device, pipeline.vae_dtype());
            let z = Tensor::randn(0f32, 1., (1, 4, latent, latent), &device)?.to_dtype(dtype)?;
            let z = vae.scale_latents(&z)?;
            let bands = args.case == "vae-decode-bands";
            let seconds = time(args.warmup, args.iters, || {
                if bands {
                    dreamshaper::models::vae_bands::decode_in_bands(&vae, &z, &mut |_, _| Ok(()))
                        .expect("VAE decode in bands");
                } else {
                    vae.decode(&z).expect("VAE decode");
                }
            });
            report(&args.case, args, seconds, json!({}));
        }
        "vae-encode" => vae_encode(args, &model)?,
        "scheduler-step" => {
            let config = SchedulerConfig::from_file(&args.model.join("scheduler/scheduler_config.json"))?;
            let latent = args.size / 8;
            for name in ["Euler", "Euler a", "DPM++ 2M Karras", "UniPC", "DPM2 a Karras"] {
                let mut per_step = Vec::new();
                for _ in 0..args.iters.max(1) {
                    let mut scheduler = schedulers::create(name, &config, 20)?;
                    let mut rng = TorchRng::new(0);
                    let mut x = Tensor::randn(0f32, 1., (1, 4, latent, latent), &device)?;
                    let out = Tensor::randn(0f32, 1., (1, 4, latent, latent), &device)?;
                    let timesteps = scheduler.timesteps().to_vec();
                    let started = Instant::now();
                    for index in 0..timesteps.len() {
                        let input = scheduler.scale_model_input(x.clone(), index)?;
                        drop(input);
                        x = scheduler.step(&out, index, &x, &mut rng)?;
                    }
                    per_step.push(started.elapsed().as_secs_f64() / timesteps.len() as f64);
                }
                report("scheduler-step", args, per_step, json!({ "scheduler": name, "steps": 20 }));
            }
        }
        "startup" => {
            let pipeline = Pipeline::load(&model, options(args))?;
            let request = GenerateRequest {
                num_inference_steps: 1,
                img_width: args.size as u32,
                img_height: args.size as u32,
                ..GenerateRequest::new("a photo of a cat")
            };
            let mut stages: Vec<(String, f64)> = Vec::new();
            let mut first_step: Option<Duration> = None;
            pipeline.generate(&request, &mut |p: &Progress| {
                match p {
                    Progress::Stage(name) => {
                        stages.push((name.to_string(), process_start.elapsed().as_secs_f64()));
                        if *name == "denoising" && first_step.is_none() {
                            first_step = Some(process_start.elapsed());
                        }
                    }
                    Progress::Step { .. } | Progress::Part { .. } => {}
                }
                Control::Continue
            })?;
            let to_first_step = first_step.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
            report("startup", args, vec![to_first_step], json!({ "stages_s_since_start": stages }));
        }
        other => return Err(format!("unknown case {other}").into()),
    }
    Ok(())
}

/// madebyollin/taesdxl's decoder config (the values of its hub `config.json`, which are also diffusers'
/// `AutoencoderTiny` defaults): 4 stages of 64 channels with [3, 3, 3, 1] blocks, ReLU, 2× nearest up-sampling.
const TAESDXL_CONFIG: &str = r#"{
  "_class_name": "AutoencoderTiny", "act_fn": "relu", "decoder_block_out_channels": [64, 64, 64, 64],
  "latent_channels": 4, "num_decoder_blocks": [3, 3, 3, 1], "out_channels": 3, "scaling_factor": 1.0,
  "upsampling_scaling_factor": 2
}"#;

/// `taesd-decode`: TAESD-XL's decode of one `size`² image's latents.
fn taesd_decode(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use dreamshaper::models::taesd::{TaesdConfig, TaesdDecoder};
    let device = Device::Cpu;
    // Kept alive while the random decoder is used: it owns the weights.
    let varmap = candle_nn::VarMap::new();
    let (taesd, weights) = match &args.taesd {
        Some(spec) => (dreamshaper::loading::load_taesd(spec, args.dtype, &device)?, spec.clone()),
        None => {
            let config: TaesdConfig = serde_json::from_str(TAESDXL_CONFIG)?;
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, args.dtype, &device);
            (TaesdDecoder::new(vb, &config)?, "random (madebyollin/taesdxl's config)".to_string())
        }
    };
    let latent = args.size / 8;
    let z = Tensor::randn(0f32, 1., (1, 4, latent, latent), &device)?;
    let mut shape = Vec::new();
    let seconds = time(args.warmup, args.iters, || {
        shape = taesd.decode_latents(&z).expect("TAESD decode").dims().to_vec();
    });
    report("taesd-decode", args, seconds, json!({ "taesd": weights, "image_shape": shape }));
    Ok(())
}

/// `preview-linear`: the linear latent → RGB preview of one `size`² image, from latents to the 8-bit image.
fn preview_linear(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use dreamshaper::preview::{LatentRgb, Previewer};
    let latent = args.size / 8;
    let z = Tensor::randn(0f32, 1., (1, 4, latent, latent), &Device::Cpu)?;
    let previewer = Previewer::LatentRgb(LatentRgb::sdxl(8));
    let decode_only = median(time(args.warmup, args.iters, || drop(previewer.decode(&z).expect("projection"))));
    let mut size = (0, 0);
    let seconds = time(args.warmup, args.iters, || {
        size = previewer.preview(&z).expect("preview").dimensions();
    });
    report("preview-linear", args, seconds, json!({ "image": [size.0, size.1], "tensor_only_median_s": decode_only }));
    Ok(())
}

/// f32 (the `gemm` crate) against the bf16 and int8 kernels on the UNet's matrix-product shapes at 512² (CFG batch 2):
/// GFLOP/s of each and their ratio. Needs no model.
fn gemm_shapes(args: &Args) {
    use dreamshaper::kernels::gemm::{matmul, View};
    use dreamshaper::kernels::gemm_bf16::{self, Kernel, Packed, MR};
    use dreamshaper::kernels::gemm_i8;
    let threads = rayon::current_num_threads();
    // (what, m, n, k): out (m × n) = a (m × k) · b (k × n).
    let shapes = [
        ("linear 32² tokens 640→640", 2048, 640, 640),
        ("linear context 2048→1280 (cross-attention K)", 154, 1280, 2048),
        ("linear 16² tokens 1280→10240 (GEGLU)", 512, 10240, 1280),
        ("linear 16² tokens 5120→1280 (FF out)", 512, 1280, 5120),
        ("conv 3×3 1280→1280 at 16²", 1280, 256, 11520),
        ("conv 3×3 640→640 at 32²", 640, 1024, 5760),
        ("conv 3×3 320→320 at 64²", 320, 4096, 2880),
    ];
    for (what, m, n, k) in shapes {
        let (a, b) = (random(m * k, 1), random(k * n, 2));
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        let f32_s = time(args.warmup, args.iters, || {
            matmul(&mut c, n, View::row_major(&a, k), View::row_major(&b, n), (m, n, k), false, threads)
        });
        // The right operand as a Linear's weight is stored, (n × k) row-major: b transposed.
        let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let f32_bt_s = time(args.warmup, args.iters, || {
            matmul(&mut c, n, View::row_major(&a, k), View::transposed(&b_t, k), (m, n, k), false, threads)
        });
        // The same product computed as cᵀ (n × m) = w (n × k) · aᵀ, so the weight is the left operand.
        let f32_swapped_s = time(args.warmup, args.iters, || unsafe {
            gemm::gemm(
                n,
                m,
                k,
                c.as_mut_ptr(),
                n as isize,
                1,
                false,
                b_t.as_ptr(),
                1,
                k as isize,
                a.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        });
        let pa = Packed::from_rows(&a, m, k, MR);
        let pack = Instant::now();
        let pb = Packed::from_row_writer(n, k, |kk, row| row.copy_from_slice(&b[kk * n..(kk + 1) * n]));
        let pack_s = pack.elapsed().as_secs_f64();
        let mut row = json!({
            "case": "gemm", "shape": what, "m": m, "n": n, "k": k, "f32_gflops": flops / median(f32_s) / 1e9,
            "f32_right_transposed_gflops": flops / median(f32_bt_s) / 1e9,
            "f32_swapped_gflops": flops / median(f32_swapped_s) / 1e9, "bf16_pack_right_s": pack_s,
        });
        for kernel in Kernel::available() {
            let s = median(time(args.warmup, args.iters, || gemm_bf16::gemm(&mut c, n, &pa, &pb, kernel)));
            row[format!("bf16_{kernel:?}_gflops")] = json!(flops / s / 1e9);
        }
        // int8: the left operand quantized per call (as a Linear's input is), the right one once (a weight).
        for kernel in gemm_i8::Kernel::available() {
            let qb = gemm_i8::RightI8::from_rows(&b_t, n, k, kernel);
            let s = median(time(args.warmup, args.iters, || {
                gemm_i8::gemm(&mut c, n, &gemm_i8::LeftI8::from_rows(&a, m, k, kernel), &qb, kernel)
            }));
            row[format!("int8_{kernel:?}_gflops")] = json!(flops / s / 1e9);
        }
        println!("{row}");
    }
}

/// Linear layers of few rows (the text encoders: 77 tokens × prompt and negative prompt) with the weight as stored:
/// the dot-product kernel against the `gemm` crate, GFLOP/s, to place `dot_linear::MAX_ROWS`.
fn few_rows_shapes(args: &Args) {
    use dreamshaper::kernels::dot_linear;
    use dreamshaper::kernels::gemm::{matmul, View};
    let threads = rayon::current_num_threads();
    for rows in [77, 154, 256, 320, 512] {
        for (what, n, k) in [
            ("bigG 1280→5120", 5120, 1280),
            ("bigG 5120→1280", 1280, 5120),
            ("bigG 1280→1280", 1280, 1280),
            ("CLIP-L 768→3072", 3072, 768),
        ] {
            let (x, w) = (random(rows * k, 1), random(n * k, 2));
            let mut c = vec![0f32; rows * n];
            let flops = 2.0 * (rows * n * k) as f64;
            let gemm_s = median(time(args.warmup, args.iters, || {
                matmul(&mut c, n, View::row_major(&x, k), View::transposed(&w, k), (rows, n, k), false, threads)
            }));
            // The dot-product kernel declines (None) where the CPU lacks its instructions or the rows are too many:
            // no rate then, rather than the rate of returning at once.
            let dot_gflops = dot_linear::linear(&x, &w, None, rows, n, k).map(|_| {
                let dot_s = median(time(args.warmup, args.iters, || {
                    dot_linear::linear(&x, &w, None, rows, n, k);
                }));
                flops / dot_s / 1e9
            });
            println!(
                "{}",
                json!({"case": "few-rows", "rows": rows, "shape": what, "gemm_gflops": flops / gemm_s / 1e9, "dot_gflops": dot_gflops})
            );
        }
    }
}

/// `n` deterministic pseudo-random values in [-1, 1) (the GEMM cases' inputs).
fn random(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 8388608.0 - 1.0).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let process_start = Instant::now();
    let result = parse_args().map_err(|e| e.into()).and_then(|args| run(&args, process_start));
    if let Err(e) = result {
        eprintln!("bench sdxl: {e}");
        std::process::exit(2);
    }
}
