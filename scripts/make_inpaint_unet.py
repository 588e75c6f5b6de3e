"""A tiny 9-channel inpainting UNet (`tests/fixtures/inpaint_unet/`), for tests/img2img.rs.

SDXL inpainting checkpoints (Dreamshaper's, diffusers/stable-diffusion-xl-1.0-inpainting-0.1) take the latents, the
mask and the masked image's latents concatenated: `in_channels` 9. This writes such a UNet in the real layout, sized
down (two blocks) but with the tiny model's text/time conditioning sizes, so the tests can pair it with
`models/tiny-sdxl`'s other components. Float16 weights, perturbed random (as make_tiny_model.py's), deterministic.
Run: `venv/bin/python scripts/make_inpaint_unet.py` (then `make_img2img_refs.py` for the references).
"""

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from make_tiny_model import UNET_CONFIG, perturb_

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "inpaint_unet"
SEED = 9

CONFIG = {
    **UNET_CONFIG,
    "in_channels": 9,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 1],
    "attention_head_dim": [1, 2],
    "layers_per_block": 1,
}


def main():
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**CONFIG)
    with torch.no_grad():
        perturb_(unet, SEED + 1000)
        for name, p in unet.named_parameters():
            if ".time_emb_proj." in name:
                p.mul_(3.0)
    OUT.mkdir(parents=True, exist_ok=True)
    config = dict(unet.config)
    config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in config.items() if not k.startswith("_")}}
    (OUT / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in unet.state_dict().items()}
    save_file(state, str(OUT / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    print(f"{len(state)} tensors -> {OUT}")


if __name__ == "__main__":
    main()
