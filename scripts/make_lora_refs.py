#!/usr/bin/env python3
"""Writes tiny LoRA / textual-inversion files for models/tiny-sdxl and diffusers' reference outputs with them.

Reads ``models/tiny-sdxl/`` (written by ``make_tiny_model.py``) and writes (paths relative to the repository root):

* ``models/tiny-sdxl-loras/*.safetensors``: LoRA files with random weights (fixed seeds, float16) in the formats
  found in the wild: kohya/A1111 with Stability's (SGM) UNet module names (``kohya_sgm``), kohya with diffusers'
  module names (``kohya_diffusers``), diffusers/PEFT as ``save_lora_weights`` writes it (``peft``, with
  ``lora_adapter_metadata``), the old diffusers ``lora.down``/``lora.up`` format (``old_diffusers``), and two files
  diffusers must refuse: an SD 1.5 LoRA (``sd15``) and a LyCORIS LoHa (``loha``).
* ``models/tiny-sdxl-loras/embeddings/tinycat.safetensors``: an SDXL textual-inversion embedding (civitai layout:
  ``clip_l`` and ``clip_g``, 2 vectors each).
* ``tests/fixtures/lora_refs.safetensors`` + ``lora_refs.json``: images (uint8) and final latents of
  ``StableDiffusionXLPipeline`` with those files, and what diffusers said about each file.
* ``tests/fixtures/lora_keys.json``: for every LoRA key prefix of every loadable file, the module diffusers/PEFT
  patched with it, the rank, alpha and scale PEFT uses: read from the loaded pipeline (the file's down/up tensors
  are found again, bit for bit, in the PEFT layers' ``lora_A``/``lora_B``), not from a mapping of ours.

Checked on every run (assertions): every tensor of every loadable file lands in exactly one PEFT layer and every
PEFT layer of the adapter comes from the file (nothing silently unused or invented), no warning from diffusers /
transformers / PEFT while loading (but the two that any second adapter gives, see ``benign``), the scales diffusers
uses are the formats' (kohya alpha / rank, PEFT metadata, 1 without alpha), each LoRA moves the image by at least
10/255 (mean absolute), the base image equals ``e2e.euler_w96h64_neg`` of ``tests/fixtures/reference.safetensors``
(to within 1/255: other CPUs round differently), disabling the LoRAs gives the base image back bit for bit, one
adapter loaded alone into a fresh pipeline gives the same image as with all adapters loaded, and ``sd15`` /
``loha`` (and the ``base_model.model.``-prefixed PEFT variant, not written) are refused or ignored as recorded.

Deterministic: fixed seeds, one CPU thread; re-running rewrites byte-identical files.

Usage: ``/path/to/venv/bin/python scripts/make_lora_refs.py [--root REPO_ROOT]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import diffusers
import peft
import safetensors
import transformers
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgm_layout  # noqa: E402
from make_tiny_model import SCHEDULERS, make_scheduler  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# Cases (edit here)
# ---------------------------------------------------------------------------------------------------------------------

MODEL = "models/tiny-sdxl"
LORA_DIR = "models/tiny-sdxl-loras"
EMBEDDING_FILE = "models/tiny-sdxl-loras/embeddings/tinycat.safetensors"
REFS = "tests/fixtures/lora_refs"
KEYS_JSON = "tests/fixtures/lora_keys.json"
BASE_REFERENCE = ("tests/fixtures/reference.safetensors", "e2e.euler_w96h64_neg.images")

PROMPT_CAT = "a photo of a Grumpy cat, 8k!"
NEGATIVE = "blurry, low quality, watermark, text"
TI_TOKEN = "tinycat"
PROMPT_TI = f"a photo of {TI_TOKEN}, 8k!"
NEGATIVE_TI = f"{TI_TOKEN}, blurry, low quality, watermark, text"

BASE_REQUEST = {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "Euler",
                "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 42, "img_width": 96, "img_height": 64}

# The least mean absolute difference (uint8 units) each LoRA / embedding case must make to the base image.
MIN_EFFECT = 10.0

# LoRA files. `unet` / `te`: which modules get a LoRA; `linear` / `conv`: (rank, alpha) of linear layers and 1x1
# convolutions / of 3x3 convolutions (kohya's network_dim/network_alpha and conv_dim/conv_alpha); alpha None = no
# alpha in the file. `gain`: std of the effective weight change (scale * up @ down) times sqrt(fan_in).
KOHYA_TARGETS = "kohya"  # kohya's LoCon targets: Transformer2DModel linears + ResnetBlock2D/Down/Upsample layers
LORA_FILES = {
    "kohya_sgm": {"format": "kohya", "unet_names": "sgm", "seed": 101, "unet": KOHYA_TARGETS, "te": "all",
                  "linear": (4, 3.0), "conv": (2, 1.0), "te_linear": (4, 3.0), "gain": 0.5},
    "kohya_diffusers": {"format": "kohya", "unet_names": "diffusers", "seed": 102, "unet": KOHYA_TARGETS,
                        "te": "all", "linear": (2, 4.0), "conv": (4, 1.0), "te_linear": (2, 4.0), "gain": 0.5},
    "peft": {"format": "peft", "seed": 103, "gain": 0.5},
    "old_diffusers": {"format": "old_diffusers", "seed": 104, "unet": "attention", "te": "all",
                      "linear": (4, None), "te_linear": (4, None), "gain": 0.5},
}
# PEFT file: LoraConfig per component, written as diffusers' `lora_adapter_metadata` (LoraConfig.to_dict()), as the
# diffusers training scripts pass it to save_lora_weights. Short target names (PEFT matches `(.*\.)?name$`).
PEFT_CONFIGS = {
    "unet": dict(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                 rank_pattern={"conv1": 2}, alpha_pattern={"to_out.0": 6}),
    "text_encoder": dict(r=2, lora_alpha=3, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
    "text_encoder_2": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                              "fc2"]),
}
EMBEDDING = {"seed": 105, "vectors": 2, "std": 0.5}

# Reference cases: (name, LoRAs [(file stem, weight)], embedding loaded?, request overrides).
CASES = [
    ("base", [], False, {}),
    ("kohya_sgm", [("kohya_sgm", 1.0)], False, {}),
    ("kohya_diffusers", [("kohya_diffusers", 1.0)], False, {}),
    ("peft", [("peft", 1.0)], False, {}),
    ("old_diffusers", [("old_diffusers", 1.0)], False, {}),
    ("kohya_sgm_0.6_peft_0.8", [("kohya_sgm", 0.6), ("peft", 0.8)], False, {}),
    ("kohya_sgm_neg0.7", [("kohya_sgm", -0.7)], False, {}),
    ("ti_prompt", [], True, {"prompt": PROMPT_TI}),
    ("ti_negative", [], True, {"negative_prompt": NEGATIVE_TI}),
]
# The same requests without the embedding loaded ("tinycat" read as plain text), to show what the embedding does.
TI_PLAIN_CASES = ["ti_prompt", "ti_negative"]
# Checked: this adapter alone in a fresh pipeline gives the same image as selected among all adapters.
FRESH_PIPELINE_CHECK = "kohya_sgm"

# safetensors header metadata: one entry unless the format needs more (then the header is rewritten with sorted
# metadata: safetensors writes several entries in random order, a Rust HashMap).
METADATA = {"format": "pt"}

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# diffusers module names (UNet) / transformers-4 module names (text encoders) that get a LoRA.
_UNET_BLOCK = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)"
UNET_TARGET_RES = {
    # kohya's LoCon targets (networks/lora.py): every Linear / Conv2d inside Transformer2DModel, ResnetBlock2D,
    # Downsample2D and Upsample2D; 1x1 convolutions and linears take network_dim/alpha, 3x3 ones conv_dim/alpha.
    KOHYA_TARGETS: [
        _UNET_BLOCK + r"\.attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|"
                      r"to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))",
        _UNET_BLOCK + r"\.resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)",
        r"down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv",
    ],
    "attention": [_UNET_BLOCK + r"\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"],
}
TE_TARGET_RES = {
    "all": [r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"],
}
TE_KOHYA_PREFIX = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
                "text_encoder_2": "text_encoder_2/model.safetensors"}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_json_rows(path: Path, obj, row_key: str) -> None:
    """As write_json, but every list under `row_key` with one compact entry per line."""
    rows: dict[str, list] = {}

    def walk(o):
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if k == row_key:
                    out[k] = f"@@rows{len(rows)}@@"
                    rows[out[k]] = v
                else:
                    out[k] = walk(v)
            return out
        return [walk(v) for v in o] if isinstance(o, list) else o

    text = json.dumps(walk(obj), indent=2, sort_keys=True)
    for token, v in rows.items():
        indent = re.search(rf'^( *)"{row_key}": "{token}"', text, re.M).group(1)
        body = ",\n".join(indent + "  " + json.dumps(r, sort_keys=True) for r in v)
        text = text.replace(f'"{token}"', "[\n" + body + "\n" + indent + "]")
    assert json.loads(text) == obj
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save, then the header's metadata entries put in sorted order (deterministic bytes)."""
    metadata = dict(METADATA if metadata is None else metadata)
    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), k
    raw = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n
    text += b" " * (n - len(text))  # same length as safetensors wrote (its padding to 8 bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + text + body)
    back = load_file(str(path))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors), path
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata, path


def model_shapes(root: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module name: weight shape}} of the tiny model's files (text encoders: transformers-4 names)."""
    out = {}
    for c, rel in WEIGHT_FILES.items():
        with safetensors.safe_open(str(root / MODEL / rel), "pt") as f:
            out[c] = {k[:-len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight")}
    return out


def select(shapes: dict[str, tuple[int, ...]], patterns: list[str]) -> list[str]:
    return sorted(m for m in shapes if any(re.fullmatch(p, m) for p in patterns) and len(shapes[m]) in (2, 4))


def kind(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "linear"
    assert len(shape) == 4 and shape[2] == shape[3] in (1, 3), shape
    return "conv1x1" if shape[2] == 1 else "conv3x3"


def lora_pair(g: torch.Generator, shape: tuple[int, ...], rank: int, scale: float, gain: float):
    """(down, up) float16: down [r, in(, k, k)] ~ N(0, 1/fan_in), up [out, r(, 1, 1)] sized so that
    scale * up @ down has std gain / sqrt(fan_in)."""
    out_f, in_f = shape[0], shape[1]
    k = shape[2] if len(shape) == 4 else None
    fan_in = in_f * (k * k if k else 1)
    down = torch.randn((rank, in_f) + ((k, k) if k else ()), generator=g) / math.sqrt(fan_in)
    up = torch.randn((out_f, rank) + ((1, 1) if k else ()), generator=g) * (gain / (scale * math.sqrt(rank)))
    return down.to(torch.float16), up.to(torch.float16)


def kohya_unet_name(module: str, unet_config: dict, names: str) -> str:
    if names == "sgm":
        sgm = sgm_layout.unet_key(module + ".weight", unet_config)  # Stability's name of the module's weight
        return "lora_unet_" + sgm[:-len(".weight")].replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


# ---------------------------------------------------------------------------------------------------------------------
# A. The files
# ---------------------------------------------------------------------------------------------------------------------


def make_kohya(spec: dict, shapes: dict, unet_config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """kohya/A1111 LoRA (LoCon): `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (0-d), float16.
    Also returns {name: (component, module)}: the module each name was made for."""
    g = torch.Generator("cpu").manual_seed(spec["seed"])
    sd, intended = {}, {}
    plan = [("unet", m) for m in select(shapes["unet"], UNET_TARGET_RES[spec["unet"]])]
    for c in ("text_encoder", "text_encoder_2"):
        plan += [(c, m) for m in select(shapes[c], TE_TARGET_RES[spec["te"]])]
    for c, m in plan:
        shape = shapes[c][m]
        if c == "unet":
            name = kohya_unet_name(m, unet_config, spec["unet_names"])
            rank, alpha = spec["conv"] if kind(shape) == "conv3x3" else spec["linear"]
        else:
            name = TE_KOHYA_PREFIX[c] + m.replace(".", "_")
            rank, alpha = spec["te_linear"]
        down, up = lora_pair(g, shape, rank, alpha / rank, spec["gain"])
        assert name + ".lora_down.weight" not in sd, name
        sd[name + ".lora_down.weight"] = down
        sd[name + ".lora_up.weight"] = up
        sd[name + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
        intended[name] = (c, m)
    return sd, intended


def peft_module_params(config: dict, module: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives `module` under `config` (its own pattern lookup)."""
    from peft.utils.other import get_pattern_key
    rp, ap = config.get("rank_pattern", {}), config.get("alpha_pattern", {})
    r = rp.get(get_pattern_key(rp.keys(), module), config["r"])
    alpha = ap.get(get_pattern_key(ap.keys(), module), config["lora_alpha"])
    return r, alpha


def peft_targets(shapes: dict[str, tuple[int, ...]], targets: list[str]) -> list[str]:
    # PEFT's rule for a list of names: the module name equals one or ends with "." + one.
    return sorted(m for m in shapes if any(m == t or m.endswith("." + t) for t in targets))


def make_peft(spec: dict, shapes: dict, tmp: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """diffusers/PEFT format written by StableDiffusionXLPipeline.save_lora_weights, with adapter metadata."""
    g = torch.Generator("cpu").manual_seed(spec["seed"])
    layers, metadata, intended = {}, {}, {}
    for c in COMPONENTS:
        cfg = PEFT_CONFIGS[c]
        sd = {}
        for m in peft_targets(shapes[c], cfg["target_modules"]):
            r, alpha = peft_module_params(cfg, m)
            down, up = lora_pair(g, shapes[c][m], r, alpha / r, spec["gain"])
            sd[m + ".lora_A.weight"], sd[m + ".lora_B.weight"] = down, up
            intended[f"{c}.{m}"] = (c, m)
        layers[c] = sd
        meta = LoraConfig(**cfg).to_dict()
        # sets -> sorted lists (save_lora_weights would list() them in hash order).
        metadata[c] = {k: sorted(v) if isinstance(v, set) else v for k, v in meta.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=metadata["unet"],
        text_encoder_lora_adapter_metadata=metadata["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metadata["text_encoder_2"], weight_name="peft.safetensors")
    path = tmp / "peft.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        file_meta = f.metadata()
    return load_file(str(path)), file_meta, intended


def make_old_diffusers(spec: dict, shapes: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers' pre-PEFT format (LoRACompatibleLinear / text-encoder monkey patch, diffusers <= 0.24):
    `unet.<module>.lora.down.weight` / `.lora.up.weight`, `text_encoder(_2).<module>.lora_linear_layer.down.weight`
    / `.up.weight`; no alphas (scale 1)."""
    g = torch.Generator("cpu").manual_seed(spec["seed"])
    sd, intended = {}, {}
    for c in COMPONENTS:
        pats = UNET_TARGET_RES[spec["unet"]] if c == "unet" else TE_TARGET_RES[spec["te"]]
        rank, alpha = spec["linear"] if c == "unet" else spec["te_linear"]
        assert alpha is None
        infix = "lora" if c == "unet" else "lora_linear_layer"
        for m in select(shapes[c], pats):
            down, up = lora_pair(g, shapes[c][m], rank, 1.0, spec["gain"])
            sd[f"{c}.{m}.{infix}.down.weight"], sd[f"{c}.{m}.{infix}.up.weight"] = down, up
            intended[f"{c}.{m}"] = (c, m)
    return sd, intended


def make_sd15() -> dict[str, torch.Tensor]:
    """A kohya SD 1.5 LoRA: diffusers-named UNet modules of SD 1.5 (widths 320/640/1280, cross-attention 768, conv
    proj_in), `lora_te_` CLIP-L modules of 768 width and 12 layers. Some modules do not exist in the tiny SDXL
    (down_blocks.0.attentions, text layer 11), the others have other widths."""
    g = torch.Generator("cpu").manual_seed(106)
    modules = [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (320, 320)),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (320, 768)),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", (320, 320, 1, 1)),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", (640, 640)),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", (1280, 5120)),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0", (320, 320)),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768)),
        ("lora_te_text_model_encoder_layers_11_mlp_fc1", (3072, 768)),
    ]
    sd = {}
    for name, shape in modules:
        down, up = lora_pair(g, shape, 2, 0.5, 0.5)
        sd[name + ".lora_down.weight"], sd[name + ".lora_up.weight"] = down, up
        sd[name + ".alpha"] = torch.tensor(1.0, dtype=torch.float16)
    return sd


def make_loha(shapes: dict, unet_config: dict) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa (kohya names, SGM UNet): `hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a`, `hada_w2_b`,
    `alpha`; delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r."""
    g = torch.Generator("cpu").manual_seed(107)
    plan = [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
            ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    sd, r = {}, 4
    for c, m in plan:
        out_f, in_f = shapes[c][m]
        name = kohya_unet_name(m, unet_config, "sgm") if c == "unet" else TE_KOHYA_PREFIX[c] + m.replace(".", "_")
        for w in ("w1", "w2"):
            sd[f"{name}.hada_{w}_a"] = (torch.randn((out_f, r), generator=g) * 0.5).to(torch.float16)
            sd[f"{name}.hada_{w}_b"] = (torch.randn((r, in_f), generator=g) / math.sqrt(in_f)).to(torch.float16)
        sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    return sd


def make_peft_prefixed(peft_sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's own `base_model.model.` prefix (a PeftModel's state dict) in the two places it could go. Not written:
    diffusers loads neither (checked)."""
    return {
        "base_model.model.<component>.": {"base_model.model." + k: v for k, v in peft_sd.items()},
        "<component>.base_model.model.": {
            re.sub(r"^(unet|text_encoder_2|text_encoder)\.", r"\1.base_model.model.", k): v
            for k, v in peft_sd.items()},
    }


def make_embedding(shapes: dict) -> dict[str, torch.Tensor]:
    """civitai's SDXL embedding layout: `clip_l` [n, 768] for text_encoder, `clip_g` [n, 1280] for text_encoder_2
    (here n = 2 vectors of the tiny hidden size 32), float16."""
    g = torch.Generator("cpu").manual_seed(EMBEDDING["seed"])
    n = EMBEDDING["vectors"]
    out = {}
    for key, c in (("clip_g", "text_encoder_2"), ("clip_l", "text_encoder")):
        width = shapes[c]["text_model.embeddings.token_embedding"][1]
        out[key] = (torch.randn((n, width), generator=g) * EMBEDDING["std"]).to(torch.float16)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# B. Loading with diffusers, and what it did
# ---------------------------------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def collect_warnings():
    """Warnings of diffusers', transformers' and PEFT's loggers and Python warnings raised inside the block."""
    handler = _Collect()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
            handler.messages += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def load_pipeline(root: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root / MODEL), torch_dtype=torch.float32,
                                                     add_watermarker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_layers(pipe, adapter: str):
    """(component, module name in the pipeline's model, PEFT layer) of every layer holding `adapter`."""
    for c in COMPONENTS:
        for name, mod in getattr(pipe, c).named_modules():
            if isinstance(mod, BaseTunerLayer) and adapter in getattr(mod, "lora_A", {}):
                yield c, name, mod


_PAIR_PATTERNS = [  # (down suffix, up suffix) of the LoRA formats written here
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
]


def file_pairs(sd: dict[str, torch.Tensor]) -> list[dict]:
    """The file's LoRA modules: key prefix, down/up keys, alpha key. Every key must belong to one."""
    pairs, used = [], set()
    for k in sorted(sd):
        for d, u in _PAIR_PATTERNS:
            if k.endswith(d):
                prefix = k[:-len(d)]
                alpha = prefix + ".alpha" if prefix + ".alpha" in sd else None
                pairs.append({"key_prefix": prefix, "down_key": k, "up_key": prefix + u, "alpha_key": alpha})
                used |= {k, prefix + u} | ({alpha} if alpha else set())
    assert used == set(sd), sorted(set(sd) - used)[:5]
    return pairs


def f16_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float16).contiguous().numpy().tobytes()


def model_file_index(root: Path) -> dict[str, dict[tuple, str]]:
    """{component: {(shape, float16 bytes): key}} of the tiny model's weight files, to name a base layer by value."""
    out = {}
    for c, rel in WEIGHT_FILES.items():
        idx = {}
        for k, v in load_file(str(root / MODEL / rel)).items():
            if v.ndim >= 2:
                idx[(tuple(v.shape), v.numpy().tobytes())] = k
        out[c] = idx
    return out


def applied_mapping(pipe, adapter: str, sd: dict[str, torch.Tensor], file_index) -> list[dict]:
    """For each LoRA module of the file: the PEFT layer that holds its down/up tensors (found by value), with r,
    lora_alpha and scaling as PEFT has them. Asserts a one-to-one match between the file's modules and the
    adapter's layers."""
    by_down = {}
    for c, name, layer in adapter_layers(pipe, adapter):
        key = f16_bytes(layer.lora_A[adapter].weight)
        assert key not in by_down, (adapter, name)
        by_down[key] = (c, name, layer)
    entries = []
    for p in file_pairs(sd):
        down, up = sd[p["down_key"]], sd[p["up_key"]]
        hit = by_down.pop(f16_bytes(down), None)
        assert hit is not None, f"{adapter}: {p['key_prefix']} not applied to any module"
        c, name, layer = hit
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        assert torch.equal(a, down.float()) and torch.equal(b, up.float()), (adapter, p["key_prefix"])
        base = layer.get_base_layer()
        weight_key = file_index[c][(tuple(base.weight.shape), f16_bytes(base.weight))]
        r, lora_alpha, scale = layer.r[adapter], layer.lora_alpha[adapter], layer.scaling[adapter]
        assert scale == lora_alpha / r, (adapter, name)
        assert not layer.use_dora.get(adapter, False) and not layer.use_rslora.get(adapter, False), (adapter, name)
        # The weight change PEFT merges (fuse_lora) = scale * up @ down, a 3x3 down conv with a 1x1 up conv flattened
        # to [out, r] @ [r, in*k*k] and reshaped to the base conv's [out, in, k, k].
        delta = scale * (up.float().flatten(1) @ down.float().flatten(1)).reshape(base.weight.shape)
        assert torch.allclose(layer.get_delta_weight(adapter), delta, rtol=1e-5, atol=1e-7), (adapter, name)
        entry = dict(p)
        entry.update({
            "file_alpha": float(sd[p["alpha_key"]]) if p["alpha_key"] else None,
            "down_shape": list(down.shape), "up_shape": list(up.shape),
            "component": c, "module": f"{c}.{name}", "module_class": type(base).__name__,
            "weight_key": weight_key, "weight_shape": list(base.weight.shape),
            "rank": int(r), "lora_alpha": float(lora_alpha), "scale": float(scale),
        })
        if isinstance(base, torch.nn.Conv2d):
            entry["base_conv"] = {"kernel_size": list(base.kernel_size), "stride": list(base.stride),
                                  "padding": list(base.padding)}
            la, lb = layer.lora_A[adapter], layer.lora_B[adapter]
            entry["peft_convs"] = {
                "lora_A": {"kernel_size": list(la.kernel_size), "stride": list(la.stride), "padding": list(la.padding),
                           "bias": la.bias is not None},
                "lora_B": {"kernel_size": list(lb.kernel_size), "stride": list(lb.stride), "padding": list(lb.padding),
                           "bias": lb.bias is not None}}
        else:
            assert layer.lora_B[adapter].bias is None
        entries.append(entry)
    assert not by_down, f"{adapter}: PEFT layers not from the file: {[v[1] for v in by_down.values()][:5]}"
    return entries


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def benign(msg: str, earlier: list[str]) -> bool:
    """The two messages a second adapter's load gives that say nothing about it (checked: the earlier adapters'
    weights stay as loaded): PEFT's note that the UNet already has a peft_config, and transformers' load report of
    a text encoder that lists only the earlier adapters' LoRA weights as "MISSING" (not in this file)."""
    if msg.startswith("UserWarning: Already found a `peft_config` attribute in the model."):
        return bool(earlier)
    if "LOAD REPORT" in msg:
        rows = [ln for ln in msg.splitlines() if "|" in ln and not ln.startswith(("Key", "-"))]
        return bool(rows) and all("| MISSING" in ln and any(f".{a}.weight" in ln for a in earlier) for ln in rows)
    return False


def check_scales(stem: str, entries: list[dict]) -> None:
    """What the formats mean: kohya scale = the file's alpha / rank; PEFT file: r and lora_alpha of its LoraConfig
    (rank_pattern / alpha_pattern by PEFT's own lookup); old diffusers format: scale 1."""
    fmt = LORA_FILES[stem]["format"]
    for e in entries:
        if fmt == "kohya":
            want = (e["down_shape"][0], e["file_alpha"])
        elif fmt == "peft":
            name = e["module"].split(".", 1)[1]
            want = peft_module_params(PEFT_CONFIGS[e["component"]], name)
        else:
            want = (e["down_shape"][0], float(e["down_shape"][0]))
        assert (e["rank"], e["lora_alpha"]) == want, (stem, e["key_prefix"], e["rank"], e["lora_alpha"], want)


def load_lora(pipe, lora_dir: Path, stem: str, earlier: list[str] | None = None) -> list[str]:
    """pipe.load_lora_weights; returns the (benign) warnings, fails on any other."""
    with collect_warnings() as msgs:
        pipe.load_lora_weights(str(lora_dir), weight_name=f"{stem}.safetensors", adapter_name=stem)
    msgs = [_ANSI.sub("", m) for m in msgs]
    bad = [m for m in msgs if not benign(m, earlier or [])]
    assert not bad, (stem, bad)
    return msgs


def tidy(msg: str, limit: int = 600) -> str:
    """A message as recorded: ANSI colours removed, Python set literals sorted (their order follows the per-process
    string hash), cut to `limit` characters."""
    msg = _ANSI.sub("", msg)
    if "LOAD REPORT" in msg:  # transformers' table: rows in set order -> sorted, kept whole
        lines = msg.splitlines()
        rows = [i for i, ln in enumerate(lines) if "|" in ln and i > 2]
        lines[rows[0]:rows[-1] + 1] = sorted(lines[rows[0]:rows[-1] + 1])
        msg, limit = "\n".join(lines), max(limit, 4000)
    msg = re.sub(r"\{('[^{}]*')\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", msg)
    return msg if len(msg) <= limit else msg[:limit] + f"... ({len(msg)} characters)"


def try_load(pipe, what, adapter: str, **kw) -> dict:
    """Loads a LoRA that diffusers should refuse or ignore; returns what happened."""
    out: dict = {}
    with collect_warnings() as msgs:
        try:
            pipe.load_lora_weights(what, adapter_name=adapter, **kw)
            out["raised"] = None
        except Exception as e:  # noqa: BLE001 - recorded
            out["raised"] = type(e).__name__
            out["message"] = tidy(str(e))
    out["warnings"] = [tidy(m) for m in msgs]
    out["layers_with_adapter"] = sum(1 for _ in adapter_layers(pipe, adapter))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# C. Reference runs
# ---------------------------------------------------------------------------------------------------------------------


class Refs:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, t: torch.Tensor) -> str:
        assert name not in self.tensors, name
        t = t.detach().cpu().contiguous().clone()
        if t.dtype.is_floating_point:
            t = t.to(torch.float32)
            assert torch.isfinite(t).all(), name
        self.tensors[name] = t
        return name


def diffusers_call(r: dict) -> dict:
    """The pipeline arguments of a request (negative_prompt "" -> None, as make_tiny_model.py)."""
    return dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"] or None, num_images_per_prompt=r["samples"],
                num_inference_steps=r["num_inference_steps"], guidance_scale=r["guidance_scale"],
                width=r["img_width"], height=r["img_height"], output_type="np")


@torch.no_grad()
def generate(pipe, r: dict) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images (N, H, W, 3), latents after the last step)."""
    default = pipe.scheduler
    pipe.scheduler = make_scheduler(pipe, r["scheduler"])
    final = {}

    def grab(p, i, t, kw):
        final["latents"] = kw["latents"].clone()
        return kw

    try:
        images = pipe(**diffusers_call(r), generator=torch.Generator("cpu").manual_seed(r["seed"]),
                      callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"]).images
    finally:
        pipe.scheduler = default
    u8 = (images * 255).round().astype("uint8")  # VaeImageProcessor.numpy_to_pil's quantisation
    assert u8.shape == (r["samples"], r["img_height"], r["img_width"], 3)
    return u8, final["latents"]


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def token_ids(pipe, text: str) -> dict:
    """What SDXL's encode_prompt feeds each text encoder: the prompt after maybe_convert_prompt, its ids (77)."""
    out = {}
    for tag, tok in (("tokenizer", pipe.tokenizer), ("tokenizer_2", pipe.tokenizer_2)):
        conv = pipe.maybe_convert_prompt(text, tok)
        ids = tok(conv, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        n = ids.index(tok.eos_token_id) + 1
        assert all(i == tok.pad_token_id for i in ids[n:]), tag
        out[tag] = {"text": conv, "ids": ids[:n], "then_padded_to": len(ids), "pad_id": tok.pad_token_id}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

FORMAT_NOTES = {
    "kohya_sgm": "kohya/A1111 (LoCon): <name>.lora_down.weight, <name>.lora_up.weight, <name>.alpha (0-d); UNet names "
                 "lora_unet_ + Stability's (SGM) module name with '.' -> '_', text encoders lora_te1_ / lora_te2_ + "
                 "transformers' module name; float16",
    "kohya_diffusers": "kohya/A1111 (LoCon) with UNet names lora_unet_ + diffusers' module name with '.' -> '_'; "
                       "float16",
    "peft": "diffusers/PEFT as StableDiffusionXLPipeline.save_lora_weights writes it: <component>.<module>.lora_A."
            "weight / .lora_B.weight, header metadata lora_adapter_metadata = JSON of each component's LoraConfig "
            "(keys '<component>.r', '<component>.lora_alpha', '<component>.rank_pattern', ...); text-encoder modules "
            "in the transformers-4 spelling (text_model.encoder...); float16",
    "old_diffusers": "diffusers' pre-PEFT format: unet.<module>.lora.down.weight / .lora.up.weight, "
                     "text_encoder(_2).<module>.lora_linear_layer.down.weight / .up.weight, no alphas; float16",
    "sd15": "kohya LoRA of an SD 1.5 model (lora_unet_down_blocks_0_attentions_..., lora_te_..., widths 320-1280/768)",
    "loha": "LyCORIS LoHa: <name>.hada_w1_a, .hada_w1_b, .hada_w2_a, .hada_w2_b, .alpha (kohya names, SGM UNet)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    root = Path(ap.parse_args().root)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    unet_config = json.loads((root / MODEL / "unet" / "config.json").read_text())
    shapes = model_shapes(root)

    # --- A. Files ---------------------------------------------------------------------------------------------------
    lora_dir = root / LORA_DIR
    if lora_dir.exists():
        shutil.rmtree(lora_dir)
    files: dict[str, tuple[dict, dict]] = {}  # stem -> (tensors, header metadata)
    intended: dict[str, dict] = {}  # stem -> {key prefix: (component, module it was made for)}
    for stem, spec in LORA_FILES.items():
        if spec["format"] == "kohya":
            sd, intended[stem] = make_kohya(spec, shapes, unet_config)
            files[stem] = (sd, METADATA)
        elif spec["format"] == "peft":
            with tempfile.TemporaryDirectory() as tmp:
                sd, meta, intended[stem] = make_peft(spec, shapes, Path(tmp))
            files[stem] = (sd, meta)
        elif spec["format"] == "old_diffusers":
            sd, intended[stem] = make_old_diffusers(spec, shapes)
            files[stem] = (sd, METADATA)
    refused = {"sd15": make_sd15(), "loha": make_loha(shapes, unet_config)}
    for stem, (sd, meta) in files.items():
        save_safetensors(sd, lora_dir / f"{stem}.safetensors", meta)
    for stem, sd in refused.items():
        save_safetensors(sd, lora_dir / f"{stem}.safetensors")
    embedding = make_embedding(shapes)
    save_safetensors(embedding, root / EMBEDDING_FILE)
    sizes = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(lora_dir.rglob("*.safetensors"))}
    for p, n in sizes.items():
        print(f"{p}: {n} bytes", file=sys.stderr)

    # --- B. Base pipeline -------------------------------------------------------------------------------------------
    pipe = load_pipeline(root)
    refs = Refs()
    cases: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}

    def record(name: str, request: dict, loras: list, embeddings: list, u8: np.ndarray, lat: torch.Tensor,
               **extra) -> dict:
        images[name] = u8
        entry = {"name": name, "request": request,
                 "loras": [{"file": f"{LORA_DIR}/{s}.safetensors", "adapter_name": s, "weight": w} for s, w in loras],
                 "embeddings": embeddings,
                 "diffusers_call": {**diffusers_call(request),
                                    "generator": f"torch.Generator('cpu').manual_seed({request['seed']})"},
                 "images": refs.add(f"lora.{name}.images", torch.from_numpy(u8)),
                 "latents": refs.add(f"lora.{name}.latents", lat),
                 "images_shape": list(u8.shape), "latents_shape": list(lat.shape), **extra}
        if "base" in images and name != "base":
            entry["mean_abs_diff_from_base"] = mean_abs(u8, images["base"])
            entry["max_abs_diff_from_base"] = int(np.abs(u8.astype(int) - images["base"].astype(int)).max())
        cases[name] = entry
        print(f"{name}: mean |image - base| = {entry.get('mean_abs_diff_from_base', 0.0):.3f}", file=sys.stderr)
        return entry

    requests = {name: {**BASE_REQUEST, **over} for name, _, _, over in CASES}
    u8, lat = generate(pipe, requests["base"])
    # The same request as make_tiny_model.py's euler_w96h64_neg. Bit-identical on the machine that wrote it; another
    # CPU (other matmul kernels) may round differently: up to 1/255 here is accepted and recorded.
    expected = load_file(str(root / BASE_REFERENCE[0]))[BASE_REFERENCE[1]].numpy()
    dev = int(np.abs(u8.astype(int) - expected.astype(int)).max())
    assert dev <= 1, f"base image differs from {BASE_REFERENCE[1]} by up to {dev}"
    print(f"base vs {BASE_REFERENCE[1]}: max |diff| {dev}, mean {mean_abs(u8, expected):.6f}", file=sys.stderr)
    record("base", requests["base"], [], [], u8, lat, same_request_as=f"{BASE_REFERENCE[0]}: {BASE_REFERENCE[1]}")

    # The textual-inversion requests before the embedding is loaded: "tinycat" is plain text.
    for name in TI_PLAIN_CASES:
        u8, lat = generate(pipe, requests[name])
        record(f"{name}_no_embedding", requests[name], [], [], u8, lat, tokens=token_ids(pipe, PROMPT_TI
               if requests[name]["prompt"] == PROMPT_TI else requests[name]["negative_prompt"]))

    # --- C. LoRAs ---------------------------------------------------------------------------------------------------
    file_index = model_file_index(root)
    keys_doc: dict[str, dict] = {}
    files_doc: dict[str, dict] = {}
    loaded: list[str] = []
    for stem, (sd, meta) in files.items():
        msgs = load_lora(pipe, lora_dir, stem, loaded)
        entries = applied_mapping(pipe, stem, sd, file_index)
        check_scales(stem, entries)
        # diffusers' reading of each name is the module the name was made for (for kohya_sgm: sgm_layout's
        # diffusers -> SGM naming agrees with diffusers' SGM -> diffusers conversion).
        got = {e["key_prefix"]: (e["component"], e["weight_key"]) for e in entries}
        assert got == {k: (c, m + ".weight") for k, (c, m) in intended[stem].items()}, stem
        keys_doc[stem] = {"file": f"{LORA_DIR}/{stem}.safetensors", "format": FORMAT_NOTES[stem],
                          "file_metadata": meta, "modules": entries,
                          "tensor_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})}
        files_doc[stem] = {"path": f"{LORA_DIR}/{stem}.safetensors", "format": FORMAT_NOTES[stem],
                           "tensors": len(sd), "lora_modules": len(entries),
                           "modules_per_component": {c: sum(e["component"] == c for e in entries) for c in COMPONENTS},
                           "diffusers": {"loaded_after": list(loaded), "warnings": [tidy(m) for m in msgs]}}
        loaded.append(stem)
        print(f"{stem}: {len(entries)} modules applied "
              f"({files_doc[stem]['modules_per_component']})", file=sys.stderr)

    for stem, (sd, _) in files.items():  # loading the later adapters left the earlier ones as they were
        assert applied_mapping(pipe, stem, sd, file_index) == keys_doc[stem]["modules"], stem

    for name, loras, with_emb, _ in CASES:
        if not loras:
            continue
        pipe.set_adapters([s for s, _ in loras], adapter_weights=[w for _, w in loras])
        # The scale each layer uses = weight * lora_alpha / r, text encoders and UNet alike.
        for s, w in loras:
            want = {e["module"]: w * e["lora_alpha"] / e["rank"] for e in keys_doc[s]["modules"]}
            for c, n, layer in adapter_layers(pipe, s):
                assert layer.scaling[s] == want[f"{c}.{n}"], (name, s, n, layer.scaling[s], want[f"{c}.{n}"])
                assert layer.active_adapters == [a for a, _ in loras], (n, layer.active_adapters)
        u8, lat = generate(pipe, requests[name])
        e = record(name, requests[name], loras, [], u8, lat)
        assert e["mean_abs_diff_from_base"] >= MIN_EFFECT, (name, e["mean_abs_diff_from_base"])

    pipe.disable_lora()
    assert np.array_equal(generate(pipe, requests["base"])[0], images["base"]), "disable_lora"
    pipe.unload_lora_weights()
    assert np.array_equal(generate(pipe, requests["base"])[0], images["base"]), "unload_lora_weights"

    # --- D. Textual inversion ---------------------------------------------------------------------------------------
    with collect_warnings() as msgs:
        state_dict = load_file(str(root / EMBEDDING_FILE))
        pipe.load_textual_inversion(state_dict["clip_g"], token=TI_TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        pipe.load_textual_inversion(state_dict["clip_l"], token=TI_TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    ti_warnings = [tidy(m) for m in msgs]
    emb_doc = {"file": EMBEDDING_FILE, "token": TI_TOKEN, "dtype": "float16",
               "tensors": {k: list(v.shape) for k, v in state_dict.items()}, "diffusers_load": [
                   "pipe.load_textual_inversion(state_dict['clip_g'], token='tinycat', "
                   "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
                   "pipe.load_textual_inversion(state_dict['clip_l'], token='tinycat', text_encoder=pipe.text_encoder,"
                   " tokenizer=pipe.tokenizer)"],
               "warnings": ti_warnings, "added_tokens": {}}
    for tag, tok, te, key in (("tokenizer", pipe.tokenizer, pipe.text_encoder, "clip_l"),
                              ("tokenizer_2", pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        added = {t: tok.convert_tokens_to_ids(t) for t in (TI_TOKEN, f"{TI_TOKEN}_1")}
        emb = te.get_input_embeddings().weight
        for i, (t, tid) in enumerate(added.items()):
            assert torch.equal(emb[tid], state_dict[key][i].float()), (tag, t)
        emb_doc["added_tokens"][tag] = {"ids": added, "embedding_rows": int(emb.shape[0])}
    assert np.array_equal(generate(pipe, requests["base"])[0], images["base"]), "base with the embedding loaded"
    for name, loras, with_emb, _ in CASES:
        if not with_emb:
            continue
        text = requests[name]["prompt"] if TI_TOKEN in requests[name]["prompt"] else requests[name]["negative_prompt"]
        u8, lat = generate(pipe, requests[name])
        e = record(name, requests[name], [], [{"file": EMBEDDING_FILE, "token": TI_TOKEN}], u8, lat,
                   tokens=token_ids(pipe, text))
        e["mean_abs_diff_from_no_embedding"] = mean_abs(u8, images[f"{name}_no_embedding"])
        assert e["mean_abs_diff_from_no_embedding"] >= MIN_EFFECT, (name, e["mean_abs_diff_from_no_embedding"])
    del pipe

    # --- E. One adapter alone in a fresh pipeline; the files diffusers refuses ------------------------------------
    pipe = load_pipeline(root)
    assert not load_lora(pipe, lora_dir, FRESH_PIPELINE_CHECK)
    assert np.array_equal(generate(pipe, requests[FRESH_PIPELINE_CHECK])[0], images[FRESH_PIPELINE_CHECK])
    del pipe
    not_loaded = {}
    for stem in refused:
        pipe = load_pipeline(root)
        out = try_load(pipe, str(lora_dir), stem, weight_name=f"{stem}.safetensors")
        print(f"{stem}: {out}", file=sys.stderr)
        assert out["raised"] and out["layers_with_adapter"] == 0, (stem, out)  # refused, nothing left behind
        files_doc[stem] = {"path": f"{LORA_DIR}/{stem}.safetensors", "format": FORMAT_NOTES[stem],
                           "tensors": len(refused[stem]), "diffusers": out}
        del pipe
    for variant, sd in make_peft_prefixed(files["peft"][0]).items():
        pipe = load_pipeline(root)
        out = try_load(pipe, sd, "peft_prefixed")
        print(f"peft with prefix {variant}: {out}", file=sys.stderr)
        assert out["layers_with_adapter"] == 0, (variant, out)  # if diffusers starts loading it: write the file
        not_loaded[variant] = out
        del pipe

    # --- Write ------------------------------------------------------------------------------------------------------
    versions = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__}
    fx = root / "tests" / "fixtures"
    tensors_file = f"{REFS}.safetensors"
    save_safetensors(refs.tensors, root / tensors_file)
    write_json(root / f"{REFS}.json", {
        "description": "diffusers' StableDiffusionXLPipeline with LoRA / textual-inversion files on the tiny SDXL "
                       "model: images uint8 (N, H, W, 3), latents float32 after the last step (before / "
                       "scaling_factor).",
        "generated_by": "scripts/make_lora_refs.py", "versions": versions, "tensors_file": tensors_file,
        "model": MODEL,
        "pipeline_load": f"StableDiffusionXLPipeline.from_pretrained('{MODEL}', torch_dtype=torch.float32, "
                         "add_watermarker=False)",
        "lora_load": "pipe.load_lora_weights('models/tiny-sdxl-loras', weight_name='<file>.safetensors', "
                     "adapter_name='<file>') for every loadable file, then per case pipe.set_adapters([names], "
                     "adapter_weights=[weights])",
        "scheduler": {"api_name": BASE_REQUEST["scheduler"], **SCHEDULERS[BASE_REQUEST["scheduler"]]},
        "mean_abs_diff": "mean over all pixels and channels of |image - other| in uint8 units",
        "files": files_doc, "embedding": emb_doc,
        "not_written": {"peft_prefixed": {
            "what": "the peft file's keys with PEFT's base_model.model. prefix (a PeftModel state dict), loaded "
                    "from memory", "diffusers": not_loaded}},
        "cases": list(cases.values()),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in sorted(refs.tensors.items())},
    })
    write_json_rows(root / KEYS_JSON, {
        "description": "For each loadable LoRA file: every LoRA module (key prefix, down/up/alpha keys) and what "
                       "diffusers + PEFT did with it, read from the loaded pipeline: the module it patches "
                       "(component.module path in the pipeline's models; text_encoder has no text_model. level in "
                       "transformers 5), the weight key of that module in the model folder's file, the PEFT layer's "
                       "r, lora_alpha and scale (= lora_alpha / r, at adapter weight 1.0).",
        "generated_by": "scripts/make_lora_refs.py", "versions": versions,
        "forward": "PEFT layer output = base(x) + sum over active adapters, in set_adapters order, of "
                   "lora_B(lora_A(x)) * scale * weight; linear: lora_A = Linear(in, r, no bias) with weight = down, "
                   "lora_B = Linear(r, out, no bias) with weight = up; conv: lora_A = Conv2d(in, r) with the base "
                   "conv's kernel, stride and padding and weight = down, lora_B = 1x1 Conv2d(r, out), weight = up",
        "files": keys_doc,
    }, row_key="modules")
    print(f"wrote {len(refs.tensors)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
