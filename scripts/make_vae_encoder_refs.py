"""Reference for tests/vae_encoder.rs: diffusers' VAE encoder (`AutoencoderKL.encode`) on the tiny model, and the image
latents of `StableDiffusionXLImg2ImgPipeline.prepare_latents` with the generator's draw order.

Writes `tests/fixtures/vae_encoder.safetensors` (float32):

* `image.a` (1, 3, 64, 96) and `image.b` (2, 3, 64, 64): deterministic images in [-1, 1] (smooth waves plus seeded
  noise, clamped);
* for each image X: `X.mean`, `X.logvar`, `X.std` of `vae.encode(image).latent_dist` (untiled) and `X.sample`, its
  `.sample(generator=torch.Generator().manual_seed(SEED[X]))`;
* `img2img.init_latents`, `img2img.noise` (2, 4, 8, 12): what `prepare_latents(image.a, t, batch_size=1,
  num_images_per_prompt=2, generator=torch.Generator().manual_seed(IMG2IMG_SEED))` hands to `scheduler.add_noise`
  (captured), i.e. the scaled posterior sample repeated for both samples and then the noise drawn after it.

The VAE is `models/tiny-sdxl/vae` in float32. The single-file tiny model (`models/tiny-sdxl-single`, loaded with
diffusers' `from_single_file` and the config folder `models/tiny-sdxl-config`) holds the same VAE bit for bit: the
script checks that it encodes the same numbers, so the Rust test compares the single file's encoder with these
references too.

Deterministic: one thread, fixed seeds. Run: `/path/to/venv/bin/python scripts/make_vae_encoder_refs.py`.
"""

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SEED = {"a": 11, "b": 12}
IMG2IMG_SEED = 21
IMG2IMG_TIMESTEP = 500

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def image(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth colour waves with seeded noise, in [-1, 1]."""
    y = torch.linspace(0, 1, height).view(1, 1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, width)
    phase = torch.arange(batch * 3, dtype=torch.float32).view(batch, 3, 1, 1)
    waves = 0.6 * torch.sin(2 * math.pi * (1.5 * x + 0.7 * y) + phase) * torch.cos(2 * math.pi * 0.8 * y - phase / 2)
    noise = torch.randn((batch, 3, height, width), generator=torch.Generator().manual_seed(seed))
    return (waves + 0.3 * noise).clamp(-1, 1).contiguous()


vae = AutoencoderKL.from_pretrained(ROOT / "models" / "tiny-sdxl" / "vae", torch_dtype=torch.float32).eval()
single = AutoencoderKL.from_single_file(
    str(ROOT / "models" / "tiny-sdxl-single" / "tiny-sdxl.safetensors"),
    config=str(ROOT / "models" / "tiny-sdxl-config"),
    subfolder="vae",
    torch_dtype=torch.float32,
).eval()
assert not vae.use_tiling and not vae.use_slicing

out = {}
with torch.inference_mode():
    for name, shape, seed in (("a", (1, 64, 96), 1), ("b", (2, 64, 64), 2)):
        x = image(*shape, seed)
        dist = vae.encode(x).latent_dist
        assert torch.equal(single.encode(x).latent_dist.mean, dist.mean), "single-file VAE encodes differently"
        out[f"image.{name}"] = x
        out[f"{name}.mean"] = dist.mean.contiguous()
        out[f"{name}.logvar"] = dist.logvar.contiguous()
        out[f"{name}.std"] = dist.std.contiguous()
        out[f"{name}.sample"] = dist.sample(generator=torch.Generator().manual_seed(SEED[name])).contiguous()

    # The img2img pipeline's own prepare_latents, with add_noise captured to see what it draws and in which order.
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(ROOT / "models" / "tiny-sdxl", torch_dtype=torch.float32)
    captured = {}

    def add_noise(latents, noise, timestep):
        captured["init_latents"], captured["noise"] = latents.clone(), noise.clone()
        return latents + noise

    pipe.scheduler.add_noise = add_noise
    pipe.prepare_latents(out["image.a"], torch.tensor([IMG2IMG_TIMESTEP]), batch_size=1, num_images_per_prompt=2,
                         dtype=torch.float32, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(IMG2IMG_SEED), add_noise=True)
    # The same by hand: one posterior sample of the single image, scaled, repeated; then the noise.
    g = torch.Generator().manual_seed(IMG2IMG_SEED)
    z = vae.config.scaling_factor * vae.encode(out["image.a"]).latent_dist.sample(g)
    assert torch.equal(captured["init_latents"], torch.cat([z, z])), "init latents: not one sample repeated"
    assert torch.equal(captured["noise"], torch.randn((2, 4, 8, 12), generator=g)), "noise: not the next draw"
    out["img2img.init_latents"] = captured["init_latents"].contiguous()
    out["img2img.noise"] = captured["noise"].contiguous()

metadata = {f"seed.{k}": str(v) for k, v in SEED.items()}
metadata.update({"img2img.seed": str(IMG2IMG_SEED), "img2img.timestep": str(IMG2IMG_TIMESTEP),
                 "scaling_factor": str(vae.config.scaling_factor)})
save_file(out, str(ROOT / "tests" / "fixtures" / "vae_encoder.safetensors"), metadata=metadata)
for k, v in out.items():
    print(k, tuple(v.shape))
