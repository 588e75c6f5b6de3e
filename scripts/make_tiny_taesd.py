#!/usr/bin/env python3
"""Writes a tiny random-weight TAESD-XL (diffusers ``AutoencoderTiny``) and diffusers' decodes with it.

Outputs (paths relative to the repository root):

* ``models/tiny-taesdxl/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` laid out like the hub's
  ``madebyollin/taesdxl`` (same files, same ``encoder.layers.N…`` / ``decoder.layers.N…`` keys, same structure:
  4 decoder stages of [3, 3, 3, 1] blocks, ReLU, nearest 2× upsampling, ``scaling_factor`` 1.0), but 8 channels
  instead of 64. float32 weights, as the hub file stores them.
* ``tests/fixtures/taesd_refs.safetensors``: seeded SDXL latents and what the SDXL pipeline's decode step computes
  with that model in float32 (``vae.decode(latents / vae.config.scaling_factor)``, raw output in about [-1, 1]):

  - ``a.latents`` (1, 4, 12, 16) -> ``a.image`` (1, 3, 96, 128)
  - ``b.latents`` (2, 4, 8, 8)   -> ``b.image`` (2, 3, 64, 64)

Deterministic: fixed seeds, one CPU thread, ``torch.use_deterministic_algorithms(True)``; rerunning rewrites
byte-identical files (check with ``git status --short models/tiny-taesdxl tests/fixtures``).

Usage: ``/path/to/venv/bin/python scripts/make_tiny_taesd.py [--root REPO_ROOT]``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import diffusers
from diffusers import AutoencoderTiny
from safetensors.torch import load_file, save_file

WEIGHT_SEED = 2024
LATENT_SEEDS = {"a": 11, "b": 12}
LATENT_SHAPES = {"a": (1, 4, 12, 16), "b": (2, 4, 8, 8)}
# SDXL latents (before / 0.13025) have a standard deviation of about 1; ×2 puts some of them beyond the decoder's
# tanh clamp at ±3, so the clamp is exercised.
LATENT_SCALE = 2.0

FINAL_CONV_GAIN = 3.0
FINAL_CONV_SHIFT = 0.6

# madebyollin/taesdxl's structure with 8 channels instead of 64.
CONFIG = {
    "act_fn": "relu",
    "decoder_block_out_channels": [8, 8, 8, 8],
    "encoder_block_out_channels": [8, 8, 8, 8],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}
# Keys diffusers >= 0.29 writes that the hub's taesdxl config (saved by diffusers 0.20) does not carry; dropped so
# that the tiny config has the hub's key set and our loader is tested on their defaults.
NEWER_KEYS = ("upsample_fn", "shift_factor")


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter off its default init (biases + 0.1·randn, weights + randn·0.5/sqrt(fan_in)), so that
    loading mistakes show and no tensor is all-zero."""
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1:
            p.copy_(p + 0.1 * noise)
        else:
            p.copy_(p + noise * (0.5 / math.sqrt(p[0].numel())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    args = ap.parse_args()
    root = Path(args.root)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    torch.manual_seed(WEIGHT_SEED)
    model = AutoencoderTiny(**CONFIG).eval()
    with torch.no_grad():
        perturb_(model, WEIGHT_SEED + 1)
        # Random weights leave the image far below 0 (black after clamping); centre it around a mid grey with a
        # usable spread, as the real decoder's [0, 1] output is before `.mul(2).sub(1)`.
        last = model.decoder.layers[-1]
        last.weight.mul_(FINAL_CONV_GAIN)
        last.bias.add_(FINAL_CONV_SHIFT)

    out = root / "models" / "tiny-taesdxl"
    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "AutoencoderTiny", "_diffusers_version": diffusers.__version__}
    config.update(sorted(model.config.items()))
    config = {k: v for k, v in config.items() if not k.startswith("_") or k in ("_class_name", "_diffusers_version")}
    for key in NEWER_KEYS:
        config.pop(key, None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for k, v in weights.items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all() and (v != 0).any(), k
    save_file(weights, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    # The references come from the folder loaded back, as a user would load it.
    vae = AutoencoderTiny.from_pretrained(out, torch_dtype=torch.float32).eval()
    loaded = vae.state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert vae.config.upsample_fn == "nearest" and vae.config.scaling_factor == 1.0

    refs = {}
    with torch.inference_mode():
        for case, shape in LATENT_SHAPES.items():
            g = torch.Generator("cpu").manual_seed(LATENT_SEEDS[case])
            latents = torch.randn(shape, generator=g, dtype=torch.float32) * LATENT_SCALE
            # StableDiffusionXLPipeline's decode step (no latents_mean / latents_std in an AutoencoderTiny config).
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            refs[f"{case}.latents"] = latents.contiguous()
            refs[f"{case}.image"] = image.contiguous()
            beyond = (latents.abs() > 3).float().mean().item()
            print(f"{case}: latents {tuple(shape)} ({beyond:.1%} beyond ±3), image {tuple(image.shape)}, "
                  f"mean {image.mean():.3f} std {image.std():.3f} min {image.min():.3f} max {image.max():.3f}")
    fixtures = root / "tests" / "fixtures"
    save_file(refs, str(fixtures / "taesd_refs.safetensors"), metadata={"format": "pt"})
    assert all(torch.equal(v, refs[k]) for k, v in load_file(fixtures / "taesd_refs.safetensors").items())
    print(f"wrote {out} ({sum(v.numel() for v in weights.values())} parameters) and {fixtures / 'taesd_refs.safetensors'}")


if __name__ == "__main__":
    main()
