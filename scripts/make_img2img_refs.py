"""Image-to-image and inpainting references from diffusers' `StableDiffusionXLImg2ImgPipeline` and
`StableDiffusionXLInpaintPipeline` on the tiny model (a regular 4-channel UNet), for tests/img2img.rs.

Writes `tests/fixtures/img2img_input.png` (a deterministic 96x64 picture) and `tests/fixtures/img2img_refs.json` +
`.safetensors`: for each case (request fields in the hosted API's names, `image` standing for that PNG), diffusers'
output images (uint8, as `VaeImageProcessor` quantises them) and its final latents. Three strengths, three schedulers
(one ancestral, one 2-evaluation), two samples per prompt. Deterministic: fixed seeds, one CPU thread.
Run: `venv/bin/python scripts/make_img2img_refs.py` (see scripts/README.md).
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import save_file

from make_scheduler_refs import DEIS_ONLY_KEYS, PIPELINE_ETA, SCHEDULERS

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny-sdxl"
FIXTURES = ROOT / "tests" / "fixtures"
INPUT = FIXTURES / "img2img_input.png"

PROMPT = "a photo of a Grumpy cat, 8k!"
NEGATIVE = "blurry, low quality, watermark, text"

CASES = [
    {"name": "euler_s03", "request": {"scheduler": "Euler", "strength": 0.3, "num_inference_steps": 10, "seed": 41}},
    {"name": "euler_a_s06_n2", "request": {"scheduler": "Euler a", "strength": 0.6, "num_inference_steps": 10,
                                           "seed": 42, "samples": 2}},
    {"name": "dpmpp_2m_karras_s09", "request": {"scheduler": "DPM++ 2M Karras", "strength": 0.9,
                                                "num_inference_steps": 8, "seed": 43}},
    {"name": "heun_s06", "request": {"scheduler": "Heun", "strength": 0.6, "num_inference_steps": 6, "seed": 44}},
    {"name": "ddim_s1_n2_noneg", "request": {"scheduler": "DDIM", "strength": 1.0, "num_inference_steps": 7,
                                             "seed": 45, "samples": 2, "negative_prompt": ""}},
    {"name": "unipc_s045", "request": {"scheduler": "UniPC", "strength": 0.45, "num_inference_steps": 9,
                                       "seed": 46}},
]
DEFAULTS = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "samples": 1, "guidance_scale": 6.0}

# Inpainting: `mask` names one of MASKS (written as tests/fixtures/inpaint_mask_<name>.png).
INPAINT_CASES = [
    {"name": "inpaint_hard_euler_a_s075_n2", "request": {"scheduler": "Euler a", "strength": 0.75, "mask": "hard",
                                                         "num_inference_steps": 8, "seed": 51, "samples": 2}},
    {"name": "inpaint_grey_dpmpp_2m_karras_default", "request": {"scheduler": "DPM++ 2M Karras", "mask": "grey",
                                                                 "num_inference_steps": 8, "seed": 52}},
    {"name": "inpaint_hard_ddim_s1_noneg", "request": {"scheduler": "DDIM", "strength": 1.0, "mask": "hard",
                                                       "num_inference_steps": 6, "seed": 53, "negative_prompt": ""}},
]


# Inpainting with a 9-channel inpainting UNet (tests/fixtures/inpaint_unet, scripts/make_inpaint_unet.py) in place of
# the tiny model's: the mask and the masked image's latents go into the UNet's input.
NINE_CHANNEL_CASES = [
    {"name": "inpaint9_hard_euler_a_s08_n2", "request": {"scheduler": "Euler a", "strength": 0.8, "mask": "hard",
                                                         "num_inference_steps": 8, "seed": 71, "samples": 2}},
    {"name": "inpaint9_grey_ddim_s1", "request": {"scheduler": "DDIM", "strength": 1.0, "mask": "grey",
                                                  "num_inference_steps": 6, "seed": 72}},
]
INPAINT_UNET = FIXTURES / "inpaint_unet"

# A1111's hires fix ("Latent" upscaler) composed of diffusers' pieces: a text-to-image pass to latents,
# `interpolate(mode="bilinear", antialias=False)` to `scale` × the size, then image to image over those latents
# (`image` with 4 channels is taken as the init latents) with a fresh generator from the same seed, `steps` steps of
# a `steps / min(strength, 0.999)` schedule (A1111's `setup_img2img_steps`).
HIRES_CASES = [
    {"name": "hires_euler_x15", "request": {"scheduler": "Euler", "num_inference_steps": 6, "seed": 61,
                                            "img_width": 64, "img_height": 64,
                                            "hires": {"scale": 1.5, "strength": 0.55, "steps": 4}}},
    {"name": "hires_dpmpp_2m_karras_x2_n2", "request": {"scheduler": "DPM++ 2M Karras", "num_inference_steps": 5,
                                                        "seed": 62, "img_width": 64, "img_height": 48,
                                                        "samples": 2, "hires": {"scale": 2.0, "strength": 0.7}}},
]


def masks() -> dict:
    """A hard black/white rectangle and a grey gradient (binarised at 0.5 by the pipeline), both 96x64."""
    h, w = 64, 96
    hard = np.zeros((h, w), np.uint8)
    hard[16:48, 24:72] = 255
    y, x = np.mgrid[0:h, 0:w]
    grey = np.clip(x * 255.0 / (w - 1) * 0.7 + y * 0.8, 0, 255).round().astype(np.uint8)
    return {"hard": Image.fromarray(hard, "L"), "grey": Image.fromarray(np.stack([grey] * 3, -1), "RGB")}


def input_image() -> Image.Image:
    """A smooth, colourful 96x64 picture (a cat it is not): gradients and a disc."""
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 128 + 100 * np.sin(x / 11.0)
    g = 128 + 100 * np.cos(y / 7.0)
    b = np.where((x - 40) ** 2 + (y - 30) ** 2 < 300, 230.0, 40.0)
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8), "RGB")


def make_scheduler(model_config, api_name):
    class_name, options = SCHEDULERS[api_name]
    config = dict(model_config)
    if class_name != "DEISMultistepScheduler":
        for key in DEIS_ONLY_KEYS:
            config.pop(key, None)
    return getattr(diffusers, class_name).from_config(config, **options)


@torch.no_grad()
def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.set_verbosity_error()
    image = input_image()
    image.save(INPUT)
    image = Image.open(INPUT)  # exactly what the tests read
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    model_config = pipe.scheduler.config
    tensors, cases = {}, []
    for case in CASES:
        r = {**DEFAULTS, **case["request"]}
        name = case["name"]
        pipe.scheduler = make_scheduler(model_config, r["scheduler"])
        final = {}

        def grab(p, i, t, kw):
            final.setdefault("timesteps", []).append(float(t))
            final["latents"] = kw["latents"].detach().clone().contiguous()
            return kw

        extra = {"eta": PIPELINE_ETA[r["scheduler"]]} if r["scheduler"] in PIPELINE_ETA else {}
        images = pipe(
            prompt=r["prompt"],
            negative_prompt=r["negative_prompt"] or None,
            image=image,
            strength=r["strength"],
            num_images_per_prompt=r["samples"],
            num_inference_steps=r["num_inference_steps"],
            guidance_scale=r["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
            output_type="np",
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"],
            **extra,
        ).images
        u8 = (images * 255).round().astype("uint8")
        assert u8.shape == (r["samples"], 64, 96, 3), u8.shape
        tensors[f"{name}.images"] = torch.from_numpy(u8).contiguous()
        tensors[f"{name}.latents"] = final["latents"]
        cases.append({"name": name, "request": r, "unet_timesteps_seen": final["timesteps"]})
        print(f"{name}: {len(final['timesteps'])} evaluations")
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(MODEL, torch_dtype=torch.float32,
                                                               add_watermarker=False)
    inpaint.set_progress_bar_config(disable=True)
    mask_images = {}
    for key, mask in masks().items():
        path = FIXTURES / f"inpaint_mask_{key}.png"
        mask.save(path)
        mask_images[key] = Image.open(path)
    unet9 = UNet2DConditionModel.from_pretrained(INPAINT_UNET, torch_dtype=torch.float32)
    inpaint9 = StableDiffusionXLInpaintPipeline.from_pretrained(MODEL, unet=unet9, torch_dtype=torch.float32,
                                                                add_watermarker=False)
    inpaint9.set_progress_bar_config(disable=True)
    for case in INPAINT_CASES + [dict(c, nine=True) for c in NINE_CHANNEL_CASES]:
        inpaint_pipe = inpaint9 if case.get("nine") else inpaint
        r = {**DEFAULTS, **case["request"]}
        name = case["name"]
        inpaint_pipe.scheduler = make_scheduler(model_config, r["scheduler"])
        final = {}

        def grab(p, i, t, kw):
            final.setdefault("timesteps", []).append(float(t))
            final["latents"] = kw["latents"].detach().clone().contiguous()
            return kw

        kwargs = {"strength": r["strength"]} if "strength" in r else {}
        images = inpaint_pipe(
            prompt=r["prompt"],
            negative_prompt=r["negative_prompt"] or None,
            image=image,
            mask_image=mask_images[r["mask"]],
            height=64,  # the inpainting pipeline otherwise resizes to the UNet's sample size; ours keeps the input's
            width=96,
            num_images_per_prompt=r["samples"],
            num_inference_steps=r["num_inference_steps"],
            guidance_scale=r["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
            output_type="np",
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"],
            **kwargs,
        ).images
        u8 = (images * 255).round().astype("uint8")
        assert u8.shape == (r["samples"], 64, 96, 3), u8.shape
        tensors[f"{name}.images"] = torch.from_numpy(u8).contiguous()
        tensors[f"{name}.latents"] = final["latents"]
        entry = {"name": name, "request": r, "unet_timesteps_seen": final["timesteps"]}
        if case.get("nine"):
            entry["unet"] = "tests/fixtures/inpaint_unet"
        cases.append(entry)
        print(f"{name}: {len(final['timesteps'])} evaluations")
    text2img = StableDiffusionXLPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, add_watermarker=False)
    text2img.set_progress_bar_config(disable=True)
    for case in HIRES_CASES:
        r = {**DEFAULTS, **case["request"]}
        name, hires = case["name"], r["hires"]
        common = dict(prompt=r["prompt"], negative_prompt=r["negative_prompt"] or None,
                      guidance_scale=r["guidance_scale"])
        text2img.scheduler = make_scheduler(model_config, r["scheduler"])
        first = text2img(**common, num_images_per_prompt=r["samples"], num_inference_steps=r["num_inference_steps"],
                         width=r["img_width"], height=r["img_height"],
                         generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="latent").images
        width = int(r["img_width"] * hires["scale"]) // 8 * 8
        height = int(r["img_height"] * hires["scale"]) // 8 * 8
        upscaled = torch.nn.functional.interpolate(first, size=(height // 8, width // 8), mode="bilinear",
                                                   antialias=False)
        steps = hires.get("steps") or r["num_inference_steps"]
        total = int(steps / min(hires["strength"], 0.999))
        pipe.scheduler = make_scheduler(model_config, r["scheduler"])
        final = {}

        def grab(p, i, t, kw):
            final.setdefault("timesteps", []).append(float(t))
            final["latents"] = kw["latents"].detach().clone().contiguous()
            return kw

        # One prompt, every first-pass sample as its own init latents (num_images_per_prompt=1 per latent).
        images = pipe(**{**common, "prompt": [r["prompt"]] * r["samples"],
                         "negative_prompt": [r["negative_prompt"]] * r["samples"] if r["negative_prompt"] else None},
                      image=upscaled, strength=hires["strength"], num_inference_steps=total,
                      generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np",
                      callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"]).images
        u8 = (images * 255).round().astype("uint8")
        assert u8.shape == (r["samples"], height, width, 3), u8.shape
        tensors[f"{name}.images"] = torch.from_numpy(u8).contiguous()
        tensors[f"{name}.latents"] = final["latents"]
        cases.append({"name": name, "request": r, "unet_timesteps_seen": final["timesteps"]})
        print(f"{name}: {len(final['timesteps'])} second-pass evaluations, {width}x{height}")
    doc = {
        "description": "diffusers StableDiffusionXLImg2ImgPipeline on models/tiny-sdxl (scripts/make_img2img_refs.py)",
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "input": INPUT.name,
        "cases": cases,
    }
    (FIXTURES / "img2img_refs.json").write_text(json.dumps(doc, indent=1) + "\n")
    save_file(tensors, str(FIXTURES / "img2img_refs.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
