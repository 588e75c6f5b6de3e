#!/usr/bin/env python3
"""Writes a full-size SDXL base model with random weights, in the real diffusers layout, for the benchmarks.

The four networks are built by diffusers / transformers from the configs of stabilityai/stable-diffusion-xl-base-1.0
(kept in ``scripts/make_sdxl_key_manifest.py``), seeded, and saved with ``save_pretrained`` (safetensors), one
component at a time so that only one network is in memory. Tokenizers and the scheduler config are the bundled tiny
model's (the real CLIP BPE files; Dreamshaper XL's DEIS scheduler config). Nothing is downloaded. The same folder feeds
diffusers and our engine in ``benches/compare_diffusers.py``.

Usage: ``python benches/make_full_model.py [--out DIR] [--dtype f32|f16] [--force]``
(default DIR: ``~/.cache/dreamshaper/bench/sdxl-random-<dtype>``; about 14 GB in f32, 7 GB in f16).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
COMPLETE = ".complete"


def sdxl_configs():
    spec = importlib.util.spec_from_file_location("manifest", ROOT / "scripts" / "make_sdxl_key_manifest.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))
    spec.loader.exec_module(module)
    return module.SDXL_UNET_CONFIG, module.SDXL_VAE_CONFIG, module.CLIP_L_CONFIG, module.CLIP_G_CONFIG


def default_dir(dtype: str) -> Path:
    return Path.home() / ".cache" / "dreamshaper" / "bench" / f"sdxl-random-{dtype}"


def main() -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--force", action="store_true", help="rewrite even if the folder is complete")
    args = ap.parse_args()
    out = args.out or default_dir(args.dtype)
    if (out / COMPLETE).exists() and not args.force:
        print(f"{out}: complete, reused", file=sys.stderr)
        return out
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch_dtype = {"f32": torch.float32, "f16": torch.float16}[args.dtype]
    unet_config, vae_config, clip_l, clip_g = sdxl_configs()
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE).unlink(missing_ok=True)
    builders = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**clip_l)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)),
        "vae": lambda: AutoencoderKL.from_config(vae_config),
        "unet": lambda: UNet2DConditionModel.from_config(unet_config),
    }
    for seed, (name, build) in enumerate(builders.items()):
        started = time.time()
        torch.manual_seed(seed)
        model = build().to(torch_dtype).eval()
        model.save_pretrained(out / name, safe_serialization=True)
        params = sum(p.numel() for p in model.parameters())
        del model
        print(f"{name}: {params / 1e6:.0f} M parameters, {time.time() - started:.0f} s", file=sys.stderr)
    tiny = ROOT / "models" / "tiny-sdxl"
    for name in ["tokenizer", "tokenizer_2", "scheduler"]:
        shutil.copytree(tiny / name, out / name, dirs_exist_ok=True)
    index = json.loads((tiny / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / COMPLETE).write_text("written by benches/make_full_model.py\n")
    print(f"{out}: written", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
