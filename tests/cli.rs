//! The `dreamshaper` binary on the bundled tiny model: files written, PNG parameters, request files, errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{tiny_model, TempDir};

fn temp_dir(name: &str) -> TempDir {
    TempDir::new(&format!("cli-{name}"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dreamshaper"))
        .arg("generate")
        .arg("--model")
        .arg(tiny_model())
        .args(args)
        .output()
        .unwrap()
}

fn small(out: &Path) -> Vec<String> {
    ["--scheduler", "Euler", "--num-inference-steps", "3", "--img-width", "64", "--img-height", "96", "--output"]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect()
}

fn png_parameters(path: &Path) -> (u32, u32, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| info.utf8_text.iter().find(|c| c.keyword == "parameters").map(|c| c.get_text().unwrap()))
        .expect("parameters chunk");
    (info.width, info.height, text)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn writes_one_png_with_a1111_parameters() {
    let dir = temp_dir("one");
    let out = dir.join("out.png");
    let mut args = small(&out);
    args.extend(
        ["--prompt", "a photo of a Grumpy cat", "--negative-prompt", "blurry", "--seed", "7"].map(String::from),
    );
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (64, 96));
    assert!(text.starts_with("a photo of a Grumpy cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 64x96"), "{text}");
    // Not a terminal: no progress display on stderr, just the seed.
    assert_eq!(stderr(&o).trim(), "seed: 7");
}

#[test]
fn several_samples_are_numbered_and_random_seed_is_reported_and_reproducible() {
    let dir = temp_dir("many");
    let out = dir.join("img.png");
    let mut args = small(&out);
    args.extend(["--prompt", "a castle", "--samples", "2", "--seed", "-1"].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("img_0.png").is_file() && dir.join("img_1.png").is_file() && !out.exists());
    let seed: String = stderr(&o).trim().strip_prefix("seed: ").expect("seed line").to_string();
    let first = std::fs::read(dir.join("img_1.png")).unwrap();

    let again = dir.join("again.png");
    let mut args = small(&again);
    args.extend(["--prompt", "a castle", "--samples", "2", "--seed", seed.as_str()].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(dir.join("again_1.png")).unwrap(), first, "same seed, same image");
}

#[test]
fn request_file_with_overriding_flags() {
    let dir = temp_dir("request");
    let body = dir.join("body.json");
    std::fs::write(
        &body,
        r#"{"prompt": "a lighthouse", "negative_prompt": "fog", "samples": 1, "scheduler": "DDIM",
            "num_inference_steps": 2, "guidance_scale": 5, "seed": 11, "img_width": 64, "img_height": 64,
            "base64": false, "some_future_field": true}"#,
    )
    .unwrap();
    let out = dir.join("r.png");
    let o = run(&["--request", body.to_str().unwrap(), "--img-width", "96", "--output", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (96, 64));
    assert!(
        text.contains("Negative prompt: fog") && text.contains("Steps: 2, Sampler: DDIM, CFG scale: 5, Seed: 11"),
        "{text}"
    );
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = temp_dir("bad");
    let out = dir.join("x.png");
    for (args, needle) in [
        (vec!["--prompt", "x", "--img-width", "100"], "img_width"),
        (vec!["--prompt", "x", "--num-inference-steps", "0"], "num_inference_steps"),
        (vec!["--prompt", "x", "--scheduler", "NoSuchSampler"], "DDIM"),
        (vec!["--prompt", "x", "--seed", "-5"], "seed"),
        (vec!["--negative-prompt", "x"], "--prompt"),
        (vec!["--prompt", "x", "--request", "/no/such/body.json"], "/no/such/body.json"),
    ] {
        let mut all = args.clone();
        all.extend(["--output", out.to_str().unwrap()]);
        let o = run(&all);
        assert!(!o.status.success(), "{args:?} should fail");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
        assert!(!out.exists());
    }
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dreamshaper"))
        .current_dir(dir)
        .arg("generate")
        .arg("--model")
        .arg(tiny_model())
        .args(["--scheduler", "Euler", "--num-inference-steps", "4", "--img-width", "64", "--img-height", "64"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn explain_prompt_prints_the_reading_and_stops_without_output() {
    let dir = temp_dir("explain");
    let o = run_in(
        &dir,
        &[
            "--prompt",
            "a photo of (the Grumpy Cat:1.25), [deformed | disfigured], [bad : wrong] BREAK (mutated hands)",
            "--negative-prompt",
            "(worst quality:1.4), blurry",
            "--explain-prompt",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "Prompt (prompt syntax: a1111, emphasis: Original; 4 model evaluations; 2 texts, 2 chunks",
        "text 1 (steps 1–2, 4)",
        "\"the Grumpy Cat\" ×1.25",
        "\"bad : wrong\" ×0.9091",
        "BREAK (new chunk)",
        "\"mutated hands\" ×1.1",
        "Negative prompt (prompt syntax: a1111",
        "\"worst quality\" ×1.4",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing generated without --output");

    // With --output it explains, then generates.
    let png = dir.join("e.png");
    let o = run_in(&dir, &["--prompt", "(a cat:1.3)", "--explain-prompt", "--output", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"a cat\" ×1.3"));
    assert!(png.is_file());
}

#[test]
fn literal_syntax_warns_how_much_was_cut() {
    let dir = temp_dir("literal");
    let long = vec!["a very long tail of words"; 14].join(", ");
    let png = dir.join("l.png");
    let o =
        run_in(&dir, &["--prompt", &long, "--prompt-syntax", "none", "--seed", "1", "--output", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("warning: the prompt is 97 tokens long; CLIP reads the first 75, the last 22 are ignored"),
        "{err}"
    );
    // The default syntax reads it all, silently.
    let o = run_in(&dir, &["--prompt", &long, "--seed", "1", "--output", png.to_str().unwrap()]);
    assert!(o.status.success() && !stderr(&o).contains("warning"), "{}", stderr(&o));
    let (_, _, text) = png_parameters(&png);
    assert!(!text.contains("Emphasis"), "{text}");
    let o = run_in(&dir, &["--prompt", "(a cat:1.2)", "--emphasis", "no-norm", "--output", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png_parameters(&png).2.ends_with(", Emphasis: No norm"));
}

/// `--lora PATH:WEIGHT` and `<lora:NAME:W>` through `--lora-dir` give the same image; the PNG keeps the tag in the
/// prompt and records the LoRA's hash; a bad LoRA is a one-line error naming the file.
#[test]
fn loras_from_flags_and_prompt_tags() {
    let dir = temp_dir("lora");
    let loras = common::root().join("models/tiny-sdxl-loras");
    let (a, b) = (dir.join("flag.png"), dir.join("tag.png"));
    let mut args = small(&a);
    let lora = format!("{}:0.6", loras.join("kohya_sgm.safetensors").display());
    args.extend(["--prompt", "a photo of a Grumpy cat", "--seed", "7", "--lora", &lora].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let mut args = small(&b);
    let dir_arg = loras.display().to_string();
    args.extend(
        ["--prompt", "a photo of a Grumpy cat<lora:kohya_sgm:0.6>", "--seed", "7", "--lora-dir", &dir_arg]
            .map(String::from),
    );
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&a), pixels(&b), "the flag and the tag are the same LoRA");
    let (_, _, text) = png_parameters(&b);
    assert!(text.starts_with("a photo of a Grumpy cat<lora:kohya_sgm:0.6>\n"), "{text}");
    assert!(text.ends_with("Lora hashes: \"kohya_sgm: ba2b431c28a8\""), "{text}");

    let bad = loras.join("loha.safetensors").display().to_string();
    let mut args = small(&dir.join("bad.png"));
    args.extend(["--prompt", "x", "--lora", &bad].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("LoHa") && e.contains("loha.safetensors") && e.trim().lines().count() == 1, "{e}");
}

/// `--preview PATH`: the file appears while the run goes, is rewritten as the picture forms (watched from here), and
/// ends as the final image.
#[test]
fn preview_file_is_rewritten_while_generating_and_ends_as_the_final_image() {
    let dir = temp_dir("preview");
    let (out, preview) = (dir.join("out.png"), dir.join("preview.png"));
    let watcher = {
        let preview = preview.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let handle = std::thread::spawn(move || {
            let mut versions: Vec<Vec<u8>> = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&preview) {
                    if versions.last() != Some(&bytes) {
                        versions.push(bytes);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            versions
        });
        (done, handle)
    };
    let o = run(&[
        "--prompt",
        "a photo of a Grumpy cat",
        "--scheduler",
        "Euler a",
        "--num-inference-steps",
        "40",
        "--img-width",
        "128",
        "--img-height",
        "128",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
        "--preview",
        preview.to_str().unwrap(),
        "--preview-every",
        "2",
    ]);
    watcher.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let versions = watcher.1.join().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let fin = image::open(&out).unwrap().to_rgb8();
    let last = image::open(&preview).unwrap().to_rgb8();
    assert_eq!(last.as_raw(), fin.as_raw(), "the preview ends as the final image");
    // Every version seen is a whole PNG (written beside and renamed), and the picture changed along the run.
    let decoded: Vec<_> = versions.iter().map(|b| image::load_from_memory(b).expect("a whole PNG").to_rgb8()).collect();
    assert!(decoded.len() >= 3, "only {} preview versions seen", decoded.len());
    assert!(decoded.iter().all(|i| i.dimensions() == (128, 128)));
    assert!(!std::fs::exists(dir.join("preview.png.partial.png")).unwrap());
}

/// `--preview-vae` (TAESD-XL) makes the previews and, with `--vae-decoder taesd`, the final image: TAESD's decode,
/// not the VAE's; a TAESD that cannot be loaded is an error naming it.
#[test]
fn taesd_previews_and_final_decode() {
    let dir = temp_dir("taesd");
    let taesd = common::root().join("models/tiny-taesdxl");
    let (vae_out, taesd_out, preview) = (dir.join("vae.png"), dir.join("taesd.png"), dir.join("p.png"));
    let base =
        ["--prompt", "a photo of a Grumpy cat", "--scheduler", "LCM", "--num-inference-steps", "4", "--seed", "5"];
    let size = ["--img-width", "64", "--img-height", "64", "--guidance-scale", "1"];
    let o = run(&[&base[..], &size, &["--output", vae_out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        &base[..],
        &size,
        &["--output", taesd_out.to_str().unwrap(), "--vae-decoder", "taesd", "--preview-vae", taesd.to_str().unwrap()],
        &["--preview", preview.to_str().unwrap()],
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (image::open(&vae_out).unwrap().to_rgb8(), image::open(&taesd_out).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), b.dimensions());
    assert_ne!(a.as_raw(), b.as_raw(), "TAESD decodes differently from the VAE");
    assert_eq!(image::open(&preview).unwrap().to_rgb8().as_raw(), b.as_raw());

    let missing = dir.join("no-taesd");
    let o =
        run(&[&base[..], &size, &["--preview", preview.to_str().unwrap(), "--preview-vae", missing.to_str().unwrap()]]
            .concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-taesd"), "{}", stderr(&o));
}

/// `--image PATH --strength F`: image to image at the input's size, recorded as A1111 records it; the same pixels as
/// diffusers' (the request of tests/fixtures/img2img_refs.json's `euler_s03`).
#[test]
fn image_to_image_from_a_file() {
    let dir = temp_dir("img2img");
    let out = dir.join("out.png");
    let input = common::root().join("tests/fixtures/img2img_input.png");
    let o = run(&[
        "--prompt",
        "a photo of a Grumpy cat, 8k!",
        "--negative-prompt",
        "blurry, low quality, watermark, text",
        "--prompt-syntax",
        "none",
        "--scheduler",
        "Euler",
        "--num-inference-steps",
        "10",
        "--guidance-scale",
        "6",
        "--seed",
        "41",
        "--image",
        input.to_str().unwrap(),
        "--strength",
        "0.3",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (96, 64));
    assert!(text.contains("Size: 96x64") && text.contains("Denoising strength: 0.3"), "{text}");
    let refs = candle_core::safetensors::load(
        common::root().join("tests/fixtures/img2img_refs.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let expected = refs["euler_s03.images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let ours = image::open(&out).unwrap().to_rgb8();
    let diff = common::mean_abs_pixel_diff(ours.as_raw(), &expected);
    assert!(diff <= 0.5, "{diff}/255 from diffusers");

    // Inpainting from files: the same pixels as diffusers' (`inpaint_hard_ddim_s1_noneg`).
    let mask = common::root().join("tests/fixtures/inpaint_mask_hard.png");
    let inpainted = dir.join("inpainted.png");
    let o = run(&[
        "--prompt",
        "a photo of a Grumpy cat, 8k!",
        "--prompt-syntax",
        "none",
        "--scheduler",
        "DDIM",
        "--num-inference-steps",
        "6",
        "--guidance-scale",
        "6",
        "--seed",
        "53",
        "--image",
        input.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "--strength",
        "1",
        "--output",
        inpainted.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let expected = refs["inpaint_hard_ddim_s1_noneg.images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let diff = common::mean_abs_pixel_diff(image::open(&inpainted).unwrap().to_rgb8().as_raw(), &expected);
    assert!(diff <= 0.5, "inpainting: {diff}/255 from diffusers");

    let o = run(&["--prompt", "x", "--strength", "0.5", "--output", dir.join("no.png").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("strength"), "{}", stderr(&o));
    let o = run(&["--prompt", "x", "--image", dir.join("missing.png").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.png"), "{}", stderr(&o));
}

/// `--hires-scale F --hires-strength F --hires-steps N`: the image at the enlarged size, the first pass's size and the
/// hires settings in the PNG parameters as A1111 writes them; a scale ≤ 1 is refused naming it.
#[test]
fn hires_fix_enlarges_and_records_its_settings() {
    let dir = temp_dir("hires");
    let out = dir.join("out.png");
    let mut args = small(&out);
    args.extend(
        ["--prompt", "a cat", "--seed", "3", "--hires-scale", "1.5", "--hires-strength", "0.5"].map(String::from),
    );
    args.extend(["--hires-steps", "2"].map(String::from));
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (96, 144));
    assert!(
        text.contains("Size: 64x96")
            && text.contains("Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent"),
        "{text}"
    );
    let o = run(&["--prompt", "x", "--hires-scale", "1", "--output", dir.join("no.png").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hires.scale"), "{}", stderr(&o));
}
