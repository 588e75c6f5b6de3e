#!/usr/bin/env python3
"""Writes a typical SDXL LoRA for the full-size random model, for the merge-time benchmark (`--case lora-merge`).

Rank 32 on every attention projection of the UNet (`to_q`, `to_k`, `to_v`, `to_out.0` of `attn1` and `attn2` in every
transformer block), kohya layout with Stability's original (SGM) module names and an alpha, float16 — the shape of the
common civitai "style" LoRAs (~200 MB). The module list is read off the model's own UNet weight file, so the LoRA fits
whatever `benches/make_full_model.py` wrote. Random values, fixed seed.

Usage: ``python benches/make_full_lora.py [--model DIR] [--out FILE] [--rank 32]``
(default DIR: ``~/.cache/dreamshaper/bench/sdxl-random-f32``, FILE: ``DIR/../lora-rank32.safetensors``).
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def unet_shapes(model: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the UNet weight files' safetensors headers (one file or shards)."""
    shapes = {}
    for path in sorted((model / "unet").glob("diffusion_pytorch_model*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def sgm_prefix(module: str, layers: int = 2) -> str:
    """The SGM name of a diffusers UNet transformer module (SDXL: 3 levels, 2 layers per block)."""
    parts = module.split(".")
    if parts[0] == "down_blocks":
        b, l = int(parts[1]), int(parts[3])
        return f"input_blocks.{1 + b * (layers + 1) + l}.1." + ".".join(parts[4:])
    if parts[0] == "up_blocks":
        b, l = int(parts[1]), int(parts[3])
        return f"output_blocks.{b * (layers + 1) + l}.1." + ".".join(parts[4:])
    assert parts[0] == "mid_block", module
    return "middle_block.1." + ".".join(parts[3:])


def main():
    default_model = Path.home() / ".cache" / "dreamshaper" / "bench" / "sdxl-random-f32"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=default_model)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    out = args.out or args.model.parent / f"lora-rank{args.rank}.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in sorted(unet_shapes(args.model).items()):
        if not name.endswith(".weight") or ".attn" not in name:
            continue
        module = name[: -len(".weight")]
        if not module.split(".")[-1] in ("to_q", "to_k", "to_v") and not module.endswith("to_out.0"):
            continue
        out_features, in_features = shape
        key = "lora_unet_" + sgm_prefix(module).replace(".", "_")
        down = torch.randn((args.rank, in_features), generator=generator) / in_features**0.5
        up = torch.randn((out_features, args.rank), generator=generator) * 0.01
        tensors[f"{key}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{key}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{key}.alpha"] = torch.tensor(float(args.rank // 2), dtype=torch.float16)
    save_file(tensors, out)
    print(f"{len(tensors) // 3} modules, rank {args.rank}: {out} ({out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
