#!/usr/bin/env python3
"""Writes ``tests/fixtures/sdxl_keys_manifest.tsv``: every tensor of a full-size SDXL base single file.

The four SDXL base networks are built with diffusers / transformers from hand-written configs (the values of
stabilityai/stable-diffusion-xl-base-1.0) on the meta device (no weights, no memory). For every diffusers tensor
the manifest gives the key and shape it has in Stability's original (SGM) layout, as civitai / A1111 files store
it, and the transform from the stored tensor to the diffusers one (rules in ``sgm_layout.py``). Rows for the SGM
keys that carry no diffusers tensor follow.

Proof (asserted every run): diffusers' own SGM -> diffusers conversion functions, run on a state dict of meta
tensors with exactly the manifest's SGM keys and shapes, give exactly the key set and shapes of the diffusers
models; diffusers classifies that state dict as ``xl_base`` and picks CLIP-L / bigG for the two text encoders.

Format (tab-separated, one header line, no comments, ``\\n`` line ends):

    sgm_key  sgm_shape  component  diffusers_key  diffusers_shape  transform  inference

* ``sgm_shape`` / ``diffusers_shape``: ``[d0,d1,…]``, ``[]`` for a 0-d tensor.
* ``component``: ``unet``, ``vae``, ``text_encoder`` (CLIP-L), ``text_encoder_2`` (OpenCLIP bigG), ``-`` when the
  SGM key carries no diffusers tensor (then ``diffusers_key`` and ``diffusers_shape`` are ``-`` too).
* ``diffusers_key``: the key in the diffusers repository's weight file of that component; text encoders in the
  transformers-4 layout that real repositories have (``text_model.…``; bigG's ``text_projection.weight``).
* ``transform``: ``identity``; ``transpose`` (diffusers = stored.T); ``in_proj_q`` / ``in_proj_k`` / ``in_proj_v``
  (diffusers = stored[i*h:(i+1)*h] along dim 0, i = 0/1/2, h = stored.shape[0]/3; three rows share the SGM key);
  ``conv1x1_to_linear`` (diffusers = stored[:, :, 0, 0]); ``unused`` (no diffusers tensor).
* ``inference``: ``yes`` if inference needs it (text-to-image; the VAE encoder and ``quant_conv`` for
  image-to-image); ``no`` for unused keys.

Rows: UNet, VAE, CLIP-L, bigG in the diffusers models' parameter order, then the unused keys.

Usage: ``/path/to/venv/bin/python scripts/make_sdxl_key_manifest.py [--root REPO_ROOT]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, is_clip_sdxl_model, is_open_clip_sdxl_model,
                                                 infer_diffusers_model_type)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sgm_layout  # noqa: E402

OUTPUT = "tests/fixtures/sdxl_keys_manifest.tsv"
COLUMNS = ["sgm_key", "sgm_shape", "component", "diffusers_key", "diffusers_shape", "transform", "inference"]

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (same key set as models/tiny-sdxl/unet/config.json).
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # the SDXL quirk: heads per block (64 channels each)
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids * 256
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

SDXL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-05, bos_token_id=0,
                    eos_token_id=2, pad_token_id=1, attention_dropout=0.0, dropout=0.0)
CLIP_L_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu", projection_dim=768, **_CLIP_COMMON)
CLIP_G_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280, **_CLIP_COMMON)


def file_layout_shapes(model: torch.nn.Module, add_text_model_prefix: bool = False) -> dict[str, tuple[int, ...]]:
    """key -> shape as the diffusers repository's file has it (transformers 5's CLIPTextModel drops the
    ``text_model.`` prefix that real files carry; ``position_ids`` is a non-persistent buffer, not in files)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if add_text_model_prefix and not k.startswith("text_model."):
            k = "text_model." + k
        out[k] = tuple(v.shape)
    return out


def build_meta_models():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_CONFIG))
    for m in (unet, vae, te1, te2):
        assert all(p.device.type == "meta" for p in m.parameters())
    return unet, vae, te1, te2


def check_with_diffusers(rows: list[sgm_layout.Row], shapes: dict, te2) -> None:
    """diffusers' conversion of meta tensors with the manifest's SGM keys/shapes == the diffusers models."""
    sgm: dict[str, torch.Tensor] = {}
    for r in rows:
        dtype = torch.int64 if r.sgm_key == sgm_layout.POSITION_IDS_KEY else torch.float16
        if r.sgm_key in sgm:
            assert tuple(sgm[r.sgm_key].shape) == r.sgm_shape
        sgm[r.sgm_key] = torch.empty(r.sgm_shape, dtype=dtype, device="meta")

    assert infer_diffusers_model_type(sgm) == "xl_base", infer_diffusers_model_type(sgm)
    # create_diffusers_clip_model_from_ldm picks the converter per text encoder by these shape tests.
    pos = CHECKPOINT_KEY_NAMES["clip_sdxl"]
    assert is_clip_sdxl_model(sgm) and sgm[pos].shape[-1] == CLIP_L_CONFIG["hidden_size"]  # text_encoder: CLIP-L
    assert sgm[pos].shape[-1] != CLIP_G_CONFIG["hidden_size"]  # text_encoder_2 skips the CLIP-L branch ...
    assert is_open_clip_sdxl_model(sgm) and \
        sgm[CHECKPOINT_KEY_NAMES["open_clip_sdxl"]].shape[-1] == CLIP_G_CONFIG["hidden_size"]  # ... and takes bigG

    conv = sgm_layout.diffusers_conversion(sgm, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, te2)
    for c in sgm_layout.COMPONENTS:
        got = {k: tuple(v.shape) for k, v in conv[c].items()}
        if c == "text_encoder":
            assert got.pop("text_model.embeddings.position_ids") == (1, 77)
        want = shapes[c]
        assert set(got) == set(want), (c, sorted(set(got) ^ set(want))[:10])
        bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
        assert not bad, (c, bad[:10])
        print(f"{c}: diffusers' conversion gives all {len(want)} tensors with the right shapes", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    args = ap.parse_args()
    root = Path(args.root)
    diffusers.utils.logging.set_verbosity_error()

    tiny_unet = json.loads((root / "models/tiny-sdxl/unet/config.json").read_text())
    assert set(SDXL_UNET_CONFIG) == {k for k in tiny_unet if not k.startswith("_")}
    tiny_vae = json.loads((root / "models/tiny-sdxl/vae/config.json").read_text())
    assert set(SDXL_VAE_CONFIG) == {k for k in tiny_vae if not k.startswith("_")}

    unet, vae, te1, te2 = build_meta_models()
    shapes = {
        "unet": file_layout_shapes(unet),
        "vae": file_layout_shapes(vae),
        "text_encoder": file_layout_shapes(te1, add_text_model_prefix=True),
        "text_encoder_2": file_layout_shapes(te2),
    }
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in shapes["text_encoder_2"])
    rows = sgm_layout.sgm_rows(shapes, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, CLIP_L_CONFIG["max_position_embeddings"])
    check_with_diffusers(rows, shapes, te2)

    lines = ["\t".join(COLUMNS)]
    for r in rows:
        lines.append("\t".join([
            r.sgm_key, sgm_layout.fmt_shape(r.sgm_shape),
            r.component or "-", r.diffusers_key or "-",
            sgm_layout.fmt_shape(r.diffusers_shape) if r.diffusers_shape is not None else "-",
            r.transform, "yes" if r.inference else "no",
        ]))
    out = root / OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")

    sgm_keys = {r.sgm_key for r in rows}
    counts = {c: sum(r.component == c for r in rows) for c in sgm_layout.COMPONENTS}
    print(f"wrote {OUTPUT}: {len(rows)} rows, {len(sgm_keys)} SGM keys, {out.stat().st_size} bytes; diffusers "
          f"tensors per component {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
