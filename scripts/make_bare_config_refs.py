"""End-to-end references for scheduler configs that lack optional keys (diffusers' class defaults apply).

Many SDXL fine-tunes ship a scheduler config written for another class (DEIS, DPM-Solver, Euler) that lacks keys the
chosen class reads: `clip_sample`, `set_alpha_to_one`, `skip_prk_steps`, `timestep_spacing`, ... diffusers then uses
each class's own `__init__` defaults (DDIM: `clip_sample=True`, `set_alpha_to_one=True`; PNDM: `skip_prk_steps=False`;
...). This script runs the tiny model's pipeline with such configs and records images and final latents for
tests/parity_pipeline.rs:

- `stripped`: the tiny model's (Dreamshaper's) DEIS config without `clip_sample`, `set_alpha_to_one`,
  `skip_prk_steps` and `interpolation_type`; `stripped_clip`: the same with `"clip_sample": true` written out;
- `bare`: only the keys that define the model's noise schedule (`num_train_timesteps`, `beta_start`, `beta_end`,
  `beta_schedule`): every other key is the class's default.

Besides the images and final latents, every case records each scheduler step diffusers took on the real UNet:
the sample it started from, the (guided) model output and the sample it returned. The tests replay our scheduler on
exactly those inputs ("teacher forcing"), which checks its arithmetic step for step whatever the model's float
rounding. That matters for DDIM with `clip_sample` on this random tiny model: once x0 is clipped, the sample carries
almost no information forward and the UNet's output passes through with weight ~1, so a float32 difference of 1e-6 in
one UNet output grows about threefold per step. After 23 steps diffusers' own image moves by ~45/255 when its initial
latents are perturbed by 1e-6 (relative); the script measures that and records it as `self_sensitivity` (in 1/255)
for each case, so the tests know which free-running images can be compared at all.

The scheduler is built as the other references build it (`Class.from_config(pipe.scheduler.config, **options)` with
the DEIS-only keys dropped). Deterministic (one thread, fixed seeds): reruns write identical files.
Run: `venv/bin/python scripts/make_bare_config_refs.py` (see scripts/README.md).
"""

import inspect
import json
import math
import os
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-sdxl"
OUT_JSON = ROOT / "tests" / "fixtures" / "bare_config.json"
OUT_TENSORS = ROOT / "tests" / "fixtures" / "bare_config.safetensors"

BASE = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
STRIPPED = {k: v for k, v in BASE.items() if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps",
                                                        "interpolation_type")}
CONFIGS = {
    "stripped": STRIPPED,
    "stripped_clip": {**STRIPPED, "clip_sample": True},
    "bare": {"_class_name": BASE["_class_name"], **{k: BASE[k] for k in SCHEDULE_KEYS}},
}

# API name -> (diffusers class, from_config options), and the DEIS-only keys the other classes drop: shared with
# the scheduler references.
from make_scheduler_refs import DEIS_ONLY_KEYS, PIPELINE_ETA, SCHEDULERS  # noqa: E402

PROMPT = "a photo of a Grumpy cat, 8k!"
NEGATIVE = "blurry, low quality, watermark, text"


def request(scheduler, steps, seed, width=96, height=64, negative=NEGATIVE):
    return {"prompt": PROMPT, "negative_prompt": negative, "samples": 1, "scheduler": scheduler,
            "num_inference_steps": steps, "guidance_scale": 7.5, "seed": seed, "img_width": width,
            "img_height": height}


CASES = [
    # The case of the DDIM clip_sample report: 23 steps, 96 x 160, seed 5.
    {"name": "ddim_stripped", "config": "stripped", "request": request("DDIM", 23, 5, 96, 160, "")},
    {"name": "ddim_stripped_clip", "config": "stripped_clip", "request": request("DDIM", 23, 5, 96, 160, "")},
    {"name": "ddpm_stripped", "config": "stripped", "request": request("DDPM", 12, 5)},
    {"name": "pndm_stripped_prk", "config": "stripped", "request": request("PNDM", 6, 3)},
] + [
    {"name": f"{name.lower().replace(' ', '_').replace('+', 'p')}_bare", "config": "bare",
     "request": request(name, 6 if name != "PNDM" else 5, 11)}
    for name in SCHEDULERS
]


def json_safe(value):
    """Non-finite floats (e.g. `lambda_min_clipped: -inf`) as strings: JSON has no infinity."""
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else value


def make_scheduler(scheduler_config, api_name, seed):
    class_name, options = SCHEDULERS[api_name]
    config = dict(scheduler_config)
    if class_name != "DEISMultistepScheduler":
        for key in DEIS_ONLY_KEYS:
            config.pop(key, None)
    if "noise_sampler_seed" in options:  # the engine seeds DPM++ SDE's Brownian tree with the request's seed
        options = {**options, "noise_sampler_seed": seed}
    return getattr(diffusers, class_name).from_config(config, **options)


def record_steps(scheduler, steps: list):
    """Wraps `scheduler.step` to record each call's sample, model output and returned sample (float32 copies)."""
    step = scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        out = step(model_output, timestep, sample, *args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        steps.append({"samples": sample.detach().clone(), "model_outputs": model_output.detach().clone(),
                      "prev_samples": prev.detach().clone()})
        return out

    # The pipeline passes `generator` (and `eta`) only to a `step` whose signature names them.
    recording_step.__signature__ = inspect.signature(step)
    scheduler.step = recording_step


PERTURBATION = 1e-6


def self_sensitivity(pipe, model_scheduler, r) -> float:
    """How far diffusers' own image moves (mean absolute, in 1/255) when the initial latents are perturbed by
    PERTURBATION relative: the float noise any two implementations differ by, amplified by the sampling run. Both
    runs are given their initial latents, drawn from the request's generator as the pipeline draws them."""

    def run(perturbation):
        generator = torch.Generator("cpu").manual_seed(r["seed"])
        shape = (r["samples"], 4, r["img_height"] // 8, r["img_width"] // 8)
        latents = torch.randn(shape, generator=generator)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1))
        pipe.scheduler = make_scheduler(model_scheduler.config, r["scheduler"], r["seed"])
        images = pipe(
            prompt=r["prompt"], negative_prompt=r["negative_prompt"] or None, num_images_per_prompt=r["samples"],
            num_inference_steps=r["num_inference_steps"], guidance_scale=r["guidance_scale"], width=r["img_width"],
            height=r["img_height"], latents=latents * (1 + perturbation * noise), generator=generator,
            output_type="np", **pipeline_eta(r),
        ).images
        return (images * 255).round()

    return round(float(abs(run(PERTURBATION) - run(0.0)).mean()), 4)


def pipeline_eta(r) -> dict:
    """The `eta` argument the engine's default amounts to for this request's scheduler (none: the pipeline's 0.0)."""
    return {"eta": PIPELINE_ETA[r["scheduler"]]} if r["scheduler"] in PIPELINE_ETA else {}


def load_pipeline(config: dict, workdir: Path) -> StableDiffusionXLPipeline:
    """The tiny model with `config` as its scheduler config file (other components linked)."""
    folder = workdir / "model"
    if folder.exists():
        (folder / "scheduler" / "scheduler_config.json").unlink()
    else:
        (folder / "scheduler").mkdir(parents=True)
        for entry in MODEL.iterdir():
            if entry.name != "scheduler":
                os.symlink(entry, folder / entry.name)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32, add_watermarker=False)


@torch.no_grad()
def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.set_verbosity_error()
    tensors, cases = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for config_name, config in CONFIGS.items():
            pipe = load_pipeline(config, Path(tmp))
            pipe.set_progress_bar_config(disable=True)
            model_scheduler = pipe.scheduler
            for case in [c for c in CASES if c["config"] == config_name]:
                r, name = case["request"], case["name"]
                pipe.scheduler = make_scheduler(model_scheduler.config, r["scheduler"], r["seed"])
                seen, steps = [], []
                record_steps(pipe.scheduler, steps)

                def grab(p, i, t, kw):
                    seen.append(float(t))
                    tensors[f"{name}.latents"] = kw["latents"].detach().clone().contiguous()
                    return kw

                images = pipe(
                    prompt=r["prompt"],
                    negative_prompt=r["negative_prompt"] or None,
                    num_images_per_prompt=r["samples"],
                    num_inference_steps=r["num_inference_steps"],
                    guidance_scale=r["guidance_scale"],
                    width=r["img_width"],
                    height=r["img_height"],
                    generator=torch.Generator("cpu").manual_seed(r["seed"]),
                    output_type="np",
                    callback_on_step_end=grab,
                    callback_on_step_end_tensor_inputs=["latents"],
                    **pipeline_eta(r),
                ).images
                u8 = (images * 255).round().astype("uint8")
                assert u8.std() > 5, (name, float(u8.std()))
                tensors[f"{name}.images"] = torch.from_numpy(u8).contiguous()
                for key in ("samples", "model_outputs", "prev_samples"):
                    tensors[f"{name}.steps.{key}"] = torch.stack([s[key] for s in steps]).contiguous()
                sensitivity = self_sensitivity(pipe, model_scheduler, r)
                cases.append({
                    "name": name,
                    "config": config_name,
                    "request": r,
                    "scheduler_class": type(pipe.scheduler).__name__,
                    "scheduler_config_used": {k: json_safe(v) for k, v in pipe.scheduler.config.items()
                                              if not k.startswith("_")},
                    "unet_timesteps_seen": seen,
                    "self_sensitivity": sensitivity,
                    "steps": {k: f"{name}.steps.{k}" for k in ("samples", "model_outputs", "prev_samples")},
                    "images": f"{name}.images",
                    "latents": f"{name}.latents",
                })
                print(f"{name}: {len(seen)} evaluations, self-sensitivity {sensitivity:.4f}/255")
    doc = {
        "description": "end-to-end references for scheduler configs lacking optional keys (see the script)",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "configs": CONFIGS,
        "cases": cases,
    }
    OUT_JSON.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    save_file(tensors, OUT_TENSORS, metadata={"format": "pt"})
    print(f"{len(cases)} cases -> {OUT_JSON.name}, {OUT_TENSORS.name} ({OUT_TENSORS.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
