"""diffusers layout -> Stability's original SGM layout for SDXL (the key layout of civitai / A1111 single files).

Shared by ``make_single_file.py`` (writes the tiny single-file fixture) and ``make_sdxl_key_manifest.py`` (writes
the full-size key manifest). Written independently of diffusers' own SGM -> diffusers conversion
(``diffusers/loaders/single_file_utils.py``) so that running that conversion on our output is a real check.

Everything works on key -> shape maps, so the same rules serve meta-device models and real tensors:

* :func:`sgm_rows` lists one :class:`Row` per diffusers tensor (plus rows for the SGM keys that carry no diffusers
  tensor), each saying which SGM key holds it and how (``Row.transform``).
* :func:`build_sgm_state_dict` applies the rows to real diffusers tensors and returns the SGM state dict.

Transforms, read from the SGM side (what a loader does to the stored tensor to get the diffusers tensor):

* ``identity``: same tensor.
* ``transpose``: diffusers = SGM.T (OpenCLIP's ``text_projection`` is stored [hidden, proj] and used as ``x @ P``;
  diffusers' ``text_projection.weight`` is a Linear weight [proj, hidden]).
* ``in_proj_q`` / ``in_proj_k`` / ``in_proj_v``: diffusers = SGM[i*h:(i+1)*h] along dim 0 with i = 0/1/2 and
  h = SGM.shape[0] / 3 (OpenCLIP's fused ``attn.in_proj_weight`` [3h, h] / ``attn.in_proj_bias`` [3h], q then k then v).
* ``conv1x1_to_linear``: diffusers = SGM[:, :, 0, 0] (the VAE mid-block attention q/k/v/proj_out are stored as 1x1
  convolutions [c, c, 1, 1]; diffusers uses Linear [c, c]).
* ``unused``: an SGM key with no diffusers tensor (``position_ids``, ``logit_scale``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

# SGM keys that real SDXL files carry but that no diffusers tensor comes from. Values as in sd_xl_base_1.0:
# CLIP-L's position_ids buffer (int64 [1, 77], 0..76) and OpenCLIP's logit_scale (a 0-d float, ln(100) = 4.6052,
# 4.6055 in float16). diffusers ignores both (position_ids is a non-persistent buffer in transformers 5).
POSITION_IDS_KEY = CLIP_L_PREFIX + "text_model.embeddings.position_ids"
LOGIT_SCALE_KEY = CLIP_G_PREFIX + "logit_scale"


@dataclass(frozen=True)
class Row:
    sgm_key: str
    sgm_shape: tuple[int, ...]
    component: str | None  # unet / vae / text_encoder / text_encoder_2, None for an unused SGM key
    diffusers_key: str | None  # key in the diffusers repository's file (text encoders: transformers-4 layout)
    diffusers_shape: tuple[int, ...] | None
    transform: str
    inference: bool  # needed for inference: text-to-image, and image-to-image's VAE encoder (False: unused keys)


class UnmappedKey(KeyError):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str, table: dict[str, str], key: str) -> str:
    module, _, tail = rest.partition(".")
    if module not in table:
        raise UnmappedKey(key)
    return f"{table[module]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """SGM key (without ``model.diffusion_model.``) of a diffusers UNet2DConditionModel key."""
    lpb = config["layers_per_block"]
    assert isinstance(lpb, int), "per-block layers_per_block lists are not SDXL"
    for d, s in _UNET_TOP.items():
        if key.startswith(d + "."):
            return s + key[len(d):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + b * (lpb + 1) + l
        return f"input_blocks.{n}.0.{_resnet(rest, _UNET_RESNET, key)}" if kind == "resnets" else \
            f"input_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET, key)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, l, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = b * (lpb + 1) + l  # up blocks have layers_per_block + 1 layers
        return f"output_blocks.{n}.0.{_resnet(rest, _UNET_RESNET, key)}" if kind == "resnets" else \
            f"output_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        n = b * (lpb + 1) + lpb  # the level's last output block
        # The upsampler follows the resnet (.0) and, in cross-attention levels, the transformer (.1).
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        return f"output_blocks.{n}.{slot}.conv.{m[2]}"
    raise UnmappedKey(key)


# ---------------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------------

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, config: dict) -> tuple[str, str]:
    """(SGM key without ``first_stage_model.``, transform) of a diffusers AutoencoderKL key."""
    n_up = len(config["up_block_types"])
    if m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key, "identity"
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key):
        return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{m[3]}", "identity"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET, key)}", "identity"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "identity"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET, key)}", "identity"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                         r"(weight|bias)", key):
        t = "conv1x1_to_linear" if m[2] != "group_norm" and m[3] == "weight" else "identity"
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", t
    # The decoder's up blocks are numbered the other way round: diffusers up_blocks.i = SGM up.(n-1-i).
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET, key)}", "identity"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", "identity"
    raise UnmappedKey(key)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------------------

_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def clip_l_key(key: str) -> str:
    """SGM key of a CLIP-L key in the transformers-4 file layout (``text_model.…``): the same under a prefix."""
    if not key.startswith("text_model."):
        raise UnmappedKey(key)
    return CLIP_L_PREFIX + key


def open_clip_key(key: str) -> tuple[str, str]:
    """(SGM key without ``conditioner.embedders.1.model.``, transform) of a bigG key (transformers-4 layout)."""
    fixed = {
        "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", "identity"),
        "text_model.embeddings.position_embedding.weight": ("positional_embedding", "identity"),  # no ".weight"
        "text_model.final_layer_norm.weight": ("ln_final.weight", "identity"),
        "text_model.final_layer_norm.bias": ("ln_final.bias", "identity"),
        "text_projection.weight": ("text_projection", "transpose"),  # no ".weight", stored transposed
    }
    if key in fixed:
        return fixed[key]
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", f"in_proj_{m[2]}"
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        if m[2] in _OPENCLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", "identity"
    raise UnmappedKey(key)


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------


def _sgm_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform in ("identity",):
        return shape
    if transform == "transpose":
        assert len(shape) == 2
        return (shape[1], shape[0])
    if transform.startswith("in_proj_"):
        return (3 * shape[0],) + tuple(shape[1:])
    if transform == "conv1x1_to_linear":
        assert len(shape) == 2
        return tuple(shape) + (1, 1)
    raise ValueError(transform)


def sgm_rows(shapes: dict[str, dict[str, tuple[int, ...]]], unet_config: dict, vae_config: dict,
             max_position_embeddings: int = 77) -> list[Row]:
    """One row per diffusers tensor of the four components, then the unused SGM keys.

    ``shapes[component][diffusers_key] = shape``; text-encoder keys in the transformers-4 file layout
    (``text_model.…``, bigG's ``text_projection.weight``), without ``position_ids``.
    """
    assert set(shapes) == set(COMPONENTS), sorted(shapes)
    rows: list[Row] = []
    for key, shape in shapes["unet"].items():
        rows.append(Row(UNET_PREFIX + unet_key(key, unet_config), tuple(shape), "unet", key, tuple(shape),
                        "identity", True))
    for key, shape in shapes["vae"].items():
        sk, t = vae_key(key, vae_config)
        rows.append(Row(VAE_PREFIX + sk, _sgm_shape(t, tuple(shape)), "vae", key, tuple(shape), t, True))
    for key, shape in shapes["text_encoder"].items():
        rows.append(Row(clip_l_key(key), tuple(shape), "text_encoder", key, tuple(shape), "identity", True))
    for key, shape in shapes["text_encoder_2"].items():
        sk, t = open_clip_key(key)
        rows.append(Row(CLIP_G_PREFIX + sk, _sgm_shape(t, tuple(shape)), "text_encoder_2", key, tuple(shape), t,
                        True))
    rows.append(Row(POSITION_IDS_KEY, (1, max_position_embeddings), None, None, None, "unused", False))
    rows.append(Row(LOGIT_SCALE_KEY, (), None, None, None, "unused", False))

    # Consistency: one diffusers tensor per row, a fused in_proj has exactly its q, k and v rows, shapes agree.
    by_sgm: dict[str, list[Row]] = {}
    for r in rows:
        by_sgm.setdefault(r.sgm_key, []).append(r)
    for k, rs in by_sgm.items():
        if len(rs) > 1:
            assert sorted(r.transform for r in rs) == ["in_proj_k", "in_proj_q", "in_proj_v"], (k, rs)
        assert len({r.sgm_shape for r in rs}) == 1, (k, rs)
    dkeys = [(r.component, r.diffusers_key) for r in rows if r.component]
    assert len(dkeys) == len(set(dkeys))
    return rows


UNUSED_VALUES = {
    POSITION_IDS_KEY: lambda n=77: torch.arange(n, dtype=torch.int64)[None],
    LOGIT_SCALE_KEY: lambda: torch.tensor(math.log(100.0), dtype=torch.float32),
}


def build_sgm_state_dict(rows: list[Row], tensors: dict[str, dict[str, torch.Tensor]],
                         float_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Applies the rows to the diffusers tensors (``tensors[component][key]``): the SGM state dict."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for r in rows:
        if r.transform == "unused":
            v = UNUSED_VALUES[r.sgm_key](*r.sgm_shape[1:]) if r.sgm_key == POSITION_IDS_KEY else \
                UNUSED_VALUES[r.sgm_key]()
            out[r.sgm_key] = v.to(float_dtype) if v.dtype.is_floating_point else v
            continue
        t = tensors[r.component][r.diffusers_key]
        assert tuple(t.shape) == r.diffusers_shape, (r, t.shape)
        if r.transform == "identity":
            s = t
        elif r.transform == "transpose":
            s = t.T
        elif r.transform == "conv1x1_to_linear":
            s = t.reshape(r.sgm_shape)
        elif r.transform.startswith("in_proj_"):
            fused.setdefault(r.sgm_key, {})[r.transform[-1]] = t
            if len(fused[r.sgm_key]) < 3:
                continue
            parts = fused.pop(r.sgm_key)
            s = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            raise ValueError(r.transform)
        assert r.sgm_key not in out, r.sgm_key
        assert tuple(s.shape) == r.sgm_shape, (r, s.shape)
        out[r.sgm_key] = s.contiguous().clone()
    assert not fused, sorted(fused)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' own SGM -> diffusers conversion, for the checks
# ---------------------------------------------------------------------------------------------------------------------


def diffusers_conversion(sgm: dict[str, torch.Tensor], unet_config: dict, vae_config: dict,
                         te2_model) -> dict[str, dict[str, torch.Tensor]]:
    """Runs diffusers' single-file conversion functions on an SGM state dict, per component.

    The text encoders come back in the transformers-4 file layout (``text_model.…``). CLIP-L's output still holds
    ``text_model.embeddings.position_ids`` (diffusers passes every key under the prefix through; the loader then
    skips it because transformers 5 has it as a non-persistent buffer). ``te2_model`` is only read for its config.
    """
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    return {
        "unet": convert_ldm_unet_checkpoint(dict(sgm), unet_config),
        "vae": convert_ldm_vae_checkpoint(dict(sgm), vae_config),
        "text_encoder": convert_ldm_clip_checkpoint(dict(sgm)),
        "text_encoder_2": convert_open_clip_checkpoint(te2_model, dict(sgm), prefix=CLIP_G_PREFIX),
    }


def fmt_shape(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"
