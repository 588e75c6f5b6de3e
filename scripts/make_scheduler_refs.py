"""Reference tables and sampling loops from diffusers' schedulers, for tests/schedulers.rs.

Every hosted-API scheduler name is built as diffusers builds it: `Class.from_config(model config, **options)`, from
Dreamshaper XL's own scheduler config (a DEIS config) and variations of it. For each name, config variation and step
count this records the timesteps, sigmas (where the class has them), `init_noise_sigma`, and a full sampling loop
driven by a deterministic stand-in model (a fixed function of sample and timestep), seeded like the pipeline for the
stochastic schedulers. Run: `/path/to/venv/bin/python scripts/make_scheduler_refs.py` (see scripts/README.md).
"""

import json
import math
from pathlib import Path

import diffusers
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "schedulers.json"

# Dreamshaper XL's scheduler config (the tiny test model ships the same).
BASE = json.loads((ROOT / "models" / "tiny-sdxl" / "scheduler" / "scheduler_config.json").read_text())

# The seed of the stochastic schedulers' generator, and of DPMSolverSDEScheduler's Brownian tree (the pipeline sets
# its noise_sampler_seed to the request's seed).
SEED = 1234

# API name -> (diffusers class, options beyond the model's config)
SCHEDULERS = {
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM Multi": ("DPMSolverMultistepScheduler", {}),
    "DPM Single": ("DPMSolverSinglestepScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    ),
    # Few-step and stochastic additions beyond the hosted API's names.
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 3M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    ),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": SEED}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"noise_sampler_seed": SEED}),
}

# The model config's `algorithm_type: deis` / `solver_type: logrho` only mean something to DEIS; for the other
# classes diffusers intends its defaults (it maps deis -> dpmsolver++ and logrho -> midpoint / bh2 with a warning,
# or, for DPM Multi in 0.42, crashes). We build the other classes as intended: without those two keys.
DEIS_ONLY_KEYS = ("algorithm_type", "solver_type")

# The keys that define the model's noise schedule. The "bare" variations start from these alone, so every other key
# takes the diffusers class's own `__init__` default (DDIM: clip_sample=True, set_alpha_to_one=True; PNDM:
# skip_prk_steps=False; each class's default timestep_spacing and steps_offset 0; ...), as it does for the many
# fine-tunes whose scheduler config was written for another class.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
BARE = {k: BASE[k] for k in SCHEDULE_KEYS}
BARE_VARIATIONS = ("bare", "bare_clip_sample", "bare_img2img")

VARIATIONS = {
    "dreamshaper": {},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "v_prediction": {"prediction_type": "v_prediction"},
    "prk": {"skip_prk_steps": False},
    "bare": {},
    "bare_clip_sample": {"clip_sample": True},
    "eta_0": {},
    "eta_1": {},
    "img2img": {},
    "bare_img2img": {},
}

# Image-to-image (the "img2img" variations, on the model's config and on the bare one): as the SDXL img2img pipeline runs a scheduler at `strength`
# (`get_timesteps`, `set_begin_index`, `add_noise` of a clean sample with noise from its own seeded generator).
IMG2IMG_VARIATIONS = ("img2img", "bare_img2img")
STRENGTH = 0.6
IMG2IMG_NOISE_SEED = 99

# The η a request without `eta` runs with, where it is not the SDXL pipeline's default 0.0: TCD keeps its own step
# default γ = 0.3 (as its model cards use it). The references pass it to the pipeline explicitly.
PIPELINE_ETA = {"TCD": 0.3}

# Variations that pass `eta` to `step` (as the SDXL pipeline passes its `eta` argument) rather than change the config.
STEP_ETA = {"eta_0": 0.0, "eta_1": 1.0}

# Variations that only mean something to some classes (PNDM's Runge-Kutta warm-up); the others run for every name.
VARIATION_ONLY_FOR = {
    "prk": ["PNDM"],
    "bare_clip_sample": ["DDIM", "DDPM", "Heun"],
    "eta_0": ["TCD"],
    "eta_1": ["TCD", "DDIM"],
}

STEPS = [1, 2, 7, 20, 35, 100]
SHAPE = (1, 4, 4, 6)


def initial_sample():
    k = torch.arange(math.prod(SHAPE), dtype=torch.float32)
    return (torch.sin(k * 0.37) * 2.0).reshape(SHAPE)


def stand_in_model(x, t):
    """A fixed function of sample and timestep (float32), defined identically in tests/schedulers.rs."""
    t = torch.tensor(float(t), dtype=torch.float32)
    k = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    return 0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(t / 100.0 + k)


def build(name, variation):
    class_name, options = SCHEDULERS[name]
    config = dict(BARE if variation in BARE_VARIATIONS else BASE)
    config.update(VARIATIONS[variation])
    if class_name != "DEISMultistepScheduler":
        for key in DEIS_ONLY_KEYS:
            config.pop(key, None)
    cls = getattr(diffusers, class_name)
    return cls.from_config(config, **options)


def floats(t):
    return [float(v) for v in t.detach().double().flatten().tolist()]


def img2img_start(s, steps):
    """diffusers' `get_timesteps(steps, STRENGTH)`: the begin index into `s.timesteps`."""
    init_timestep = min(int(steps * STRENGTH), steps)
    if init_timestep == 0:
        raise ValueError(f"strength {STRENGTH} leaves no step of {steps}")
    begin = max(steps - init_timestep, 0) * s.order
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(begin)
    return begin


def run(name, variation, steps):
    s = build(name, variation)
    s.set_timesteps(steps)
    case = {
        "name": name,
        "variation": variation,
        "steps": steps,
        "timesteps": floats(s.timesteps),
        "init_noise_sigma": float(s.init_noise_sigma),
    }
    sigmas = getattr(s, "sigmas", None)
    if sigmas is not None:
        case["sigmas"] = floats(torch.as_tensor(sigmas))
    generator = torch.Generator("cpu").manual_seed(SEED)
    x = initial_sample() * s.init_noise_sigma
    begin = 0
    if variation in IMG2IMG_VARIATIONS:
        begin = img2img_start(s, steps)
        noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(IMG2IMG_NOISE_SEED))
        x = s.add_noise(initial_sample(), noise, s.timesteps[begin : begin + 1])
        case.update(strength=STRENGTH, begin=begin, noise_seed=IMG2IMG_NOISE_SEED, noised_sample=floats(x))
    scaled = []
    for i, t in enumerate(s.timesteps[begin:]):
        inp = s.scale_model_input(x, t)
        if i < 3:
            scaled.append(floats(inp))
        out = stand_in_model(inp, t)
        kwargs = {"generator": generator} if "generator" in s.step.__code__.co_varnames else {}
        if variation in STEP_ETA:
            kwargs["eta"] = STEP_ETA[variation]
        x = s.step(out, t, x, **kwargs).prev_sample
    if variation in STEP_ETA:
        case["eta"] = STEP_ETA[variation]
    case["scaled_inputs"] = scaled
    case["final_sample"] = floats(x)
    return case


def main():
    cases = []
    for name in SCHEDULERS:
        for variation in VARIATIONS:
            if name not in VARIATION_ONLY_FOR.get(variation, [name]):
                continue
            for steps in STEPS:
                try:
                    cases.append(run(name, variation, steps))
                except Exception as e:  # some classes reject some combinations: record it, so we can match
                    cases.append({"name": name, "variation": variation, "steps": steps, "error": repr(e)})
    doc = {
        "description": "diffusers scheduler references: tables and stand-in sampling loops (see the script)",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "base_config": BASE,
        "variations": VARIATIONS,
        "bare_config": BARE,
        "bare_variations": list(BARE_VARIATIONS),
        "schedulers": {k: {"class": v[0], "options": v[1]} for k, v in SCHEDULERS.items()},
        "deis_only_keys": list(DEIS_ONLY_KEYS),
        "strength": STRENGTH,
        "shape": list(SHAPE),
        "seed": SEED,
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")))
    errors = [c for c in cases if "error" in c]
    print(f"{len(cases)} cases ({len(errors)} errors) -> {OUT} ({OUT.stat().st_size // 1024} KiB)")
    for c in errors:
        print("  ", c["name"], c["variation"], c["steps"], c["error"][:120])


if __name__ == "__main__":
    main()
