"""Reference for tests/vae_tiling.rs: diffusers' untiled and tiled VAE decodes (`vae.enable_tiling()`) of the tiny model.

Our banded decode must give the untiled image; the tiled one is kept to show (in the test's output) how far
diffusers' tile-local statistics move the picture.

A seeded latent of 40 × 28 (a 320 × 224 image) is decoded by `models/tiny-sdxl/vae` with tiling on: its tiles are
`sample_size` = 128 px (16 latent pixels) with 25 % overlap, so 4 × 3 tiles. Writes the latent (already divided by
the scaling factor, what `vae.decode` takes), the tiled decode and the untiled decode to `tests/fixtures/vae_tiling.safetensors`.
Run: `/path/to/venv/bin/python scripts/make_vae_tiling_refs.py`.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent

vae = AutoencoderKL.from_pretrained(ROOT / "models" / "tiny-sdxl" / "vae", torch_dtype=torch.float32).eval()
vae.enable_tiling()
assert vae.tile_sample_min_size == 128 and vae.tile_latent_min_size == 16
z = torch.randn((1, 4, 40, 28), generator=torch.Generator().manual_seed(7)) * 3.0
with torch.inference_mode():
    image = vae.decode(z).sample
    vae.disable_tiling()
    whole = vae.decode(z).sample
save_file({"z": z.contiguous(), "tiled": image.contiguous(), "untiled": whole.contiguous()}, str(ROOT / "tests" / "fixtures" / "vae_tiling.safetensors"),
          metadata={"tile_sample_min_size": "128", "tile_latent_min_size": "16", "tile_overlap_factor": "0.25"})
print("image", tuple(image.shape))
