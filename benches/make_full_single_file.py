#!/usr/bin/env python3
"""Writes the full-size random SDXL model (diffusers layout) as one single-file checkpoint in Stability's SGM layout.

For stable-diffusion.cpp (``sd -m FILE``) and our own single-file loader in ``benches/compare_diffusers.py``: reads
``~/.cache/dreamshaper/bench/sdxl-random-f32/`` (written by ``benches/make_full_model.py``) and writes
``~/.cache/dreamshaper/bench/sdxl-random-f32.safetensors`` with the same float32 tensors under the keys a civitai /
A1111 SDXL file uses. The key rules are those of ``scripts/sgm_layout.py`` (shared with ``make_single_file.py``,
which checks them against diffusers' own conversion on the tiny model).

Streams: the header is planned from the source files' shapes, then each tensor is read (memory-mapped), transformed
and appended in turn, so the process holds one tensor (at most one fused q/k/v ``in_proj``) at a time, not 13 GB.
The text encoders' keys are accepted both with and without transformers-4's ``text_model.`` prefix.

Usage: ``/path/to/venv/bin/python benches/make_full_single_file.py [--model DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sgm_layout  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache/dreamshaper/bench/sdxl-random-f32"
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def component_files(model: Path, component: str) -> list[Path]:
    folder = model / component
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [folder / f for f in files]
    return sorted(folder.glob("*.safetensors"))


def text_key(component: str, key: str) -> str:
    """transformers-4 layout (``text_model.…``) of a text-encoder key, whichever layout the file has."""
    if component.startswith("text_encoder") and not key.startswith("text_model.") and key != "text_projection.weight":
        return "text_model." + key
    return key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=None, help="default: MODEL.safetensors next to the folder")
    args = ap.parse_args()
    model = args.model
    out = args.out or model.with_name(model.name + ".safetensors")
    started = time.perf_counter()

    # Where each (component, transformers-4 key) lives, and its shape and dtype.
    where: dict[tuple[str, str], tuple[Path, str]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    dtypes = set()
    for c in sgm_layout.COMPONENTS:
        shapes[c] = {}
        for f in component_files(model, c):
            with safe_open(str(f), framework="pt") as s:
                for k in s.keys():
                    if k.endswith("position_ids"):
                        continue
                    sl = s.get_slice(k)
                    key = text_key(c, k)
                    shapes[c][key] = tuple(sl.get_shape())
                    dtypes.add(sl.get_dtype())
                    where[(c, key)] = (f, k)
    assert len(dtypes) == 1, dtypes
    float_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtypes.pop()]
    unet_config = json.loads((model / "unet/config.json").read_text())
    vae_config = json.loads((model / "vae/config.json").read_text())
    te2_config = json.loads((model / "text_encoder_2/config.json").read_text())
    rows = sgm_layout.sgm_rows(shapes, unet_config, vae_config, te2_config.get("max_position_embeddings", 77))

    # Plan: one entry per SGM key, in row order (a fused in_proj at its first row).
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r.sgm_key, []).append(r)
    header: dict[str, dict] = {}
    offset = 0
    for key, rs in by_key.items():
        r = rs[0]
        if key == sgm_layout.POSITION_IDS_KEY:
            dtype = torch.int64
        else:
            dtype = float_dtype
        n = 1
        for d in r.sgm_shape:
            n *= d
        size = n * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(r.sgm_shape), "data_offsets": [offset,
                                                                                                      offset + size]}
        offset += size
    header_bytes = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    handles: dict[Path, object] = {}

    def load(component: str, key: str) -> torch.Tensor:
        f, k = where[(component, key)]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt").__enter__()
        return handles[f].get_tensor(k)

    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as w:
        w.write(len(header_bytes).to_bytes(8, "little"))
        w.write(header_bytes)
        for i, (key, rs) in enumerate(by_key.items()):
            r = rs[0]
            if r.transform == "unused":
                v = sgm_layout.UNUSED_VALUES[key](*r.sgm_shape[1:]) if key == sgm_layout.POSITION_IDS_KEY else \
                    sgm_layout.UNUSED_VALUES[key]()
                s = v if not v.dtype.is_floating_point else v.to(float_dtype)
            elif r.transform.startswith("in_proj_"):
                parts = {x.transform[-1]: load(x.component, x.diffusers_key) for x in rs}
                s = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
            else:
                assert len(rs) == 1, key
                t = load(r.component, r.diffusers_key)
                assert tuple(t.shape) == r.diffusers_shape, (r, t.shape)
                s = {"identity": lambda: t, "transpose": lambda: t.T,
                     "conv1x1_to_linear": lambda: t.reshape(r.sgm_shape)}[r.transform]()
            s = s.contiguous()
            assert tuple(s.shape) == r.sgm_shape and SAFETENSORS_DTYPE[s.dtype] == header[key]["dtype"], key
            data = s.numpy().tobytes()
            b, e = header[key]["data_offsets"]
            assert len(data) == e - b, key
            w.write(data)
            if i % 200 == 0:
                print(f"  {i}/{len(by_key)} tensors, {w.tell() / 1e9:.1f} GB", file=sys.stderr, flush=True)
    for h in handles.values():
        h.__exit__(None, None, None)
    os.replace(tmp, out)

    # Check: the file opens and holds exactly the planned keys, shapes and dtypes.
    with safe_open(str(out), framework="pt") as s:
        assert set(s.keys()) == set(header), "key set differs"
        for k in s.keys():
            sl = s.get_slice(k)
            assert list(sl.get_shape()) == header[k]["shape"] and sl.get_dtype() == header[k]["dtype"], k
    print(f"wrote {out}: {len(header)} tensors, {out.stat().st_size / 1e9:.2f} GB, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
