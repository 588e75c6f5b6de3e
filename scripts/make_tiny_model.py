#!/usr/bin/env python3
"""Writes the tiny random-weight SDXL test model and the diffusers reference tensors.

Outputs (paths relative to the repository root):

* ``models/tiny-sdxl/``: a diffusers-layout ``StableDiffusionXLPipeline`` folder laid out exactly like the real SDXL
  repositories (stabilityai/stable-diffusion-xl-base-1.0, Lykon/dreamshaper-xl-1-0): same files, same config keys,
  same safetensors key names (text encoders in the transformers-4 layout with the ``text_model.`` prefix), float16
  weights, a Dreamshaper-style DEIS scheduler config. Tiny sizes, random but perturbed weights.
* ``tests/fixtures/reference.safetensors`` + ``tests/fixtures/reference.json``: what diffusers computes with that
  folder loaded back in float32 (RNG latents, tokenizer ids, text-encoder states, ``encode_prompt``, one UNet call,
  one VAE decode, full pipeline runs). ``reference.json`` documents every tensor.

Deterministic: fixed seeds everywhere, one CPU thread; re-running rewrites byte-identical model files.

Usage: ``/path/to/venv/bin/python scripts/make_tiny_model.py [--root REPO_ROOT]``

To add a case: append a dict to ``E2E_CASES`` (request fields in the hosted API's names). To add a scheduler:
add an entry to ``SCHEDULERS`` (API name -> diffusers class name + ``from_config`` options). To add a model
variant (e.g. v-prediction): add an entry to ``MODEL_VARIANTS`` and name it in a case's ``model`` field.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
import safetensors
import scipy
import transformers
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from make_scheduler_refs import PIPELINE_ETA

# ---------------------------------------------------------------------------------------------------------------------
# Cases and registries (edit here)
# ---------------------------------------------------------------------------------------------------------------------

PROMPT_CAT = "a photo of a Grumpy cat, 8k!"
PROMPT_LONG = (
    "A highly detailed, ULTRA-realistic portrait of an old sea captain with a weathered face, deep wrinkles and a "
    "thick white beard, wearing a navy blue wool coat with shiny brass buttons, standing on the deck of a wooden "
    "ship during a violent storm at night, lightning in the sky, huge waves, dramatic rim lighting, 35mm "
    "photograph, f/1.8, bokeh, trending on ArtStation, octane render, 8k uhd, masterpiece, best quality, sharp "
    "focus, intricate details, by Greg Rutkowski and Alphonse Mucha"
)
NEGATIVE = "blurry, low quality, watermark, text"

# Prompts run through both tokenizers/text encoders one by one (te1.*/te2.* tensors).
TEXT_PROMPTS = [PROMPT_CAT, "", PROMPT_LONG]

# Seeds for the bare RNG check: torch.randn(LATENT_SHAPE, generator=torch.Generator("cpu").manual_seed(seed)).
LATENT_SEEDS = [0, 42, 1135424276, 2**33 + 17, 999999999999999]
LATENT_SHAPE = (2, 4, 8, 12)

# encode_prompt cases. negative_prompt None means "no negative prompt" (force_zeros_for_empty_prompt gives zeros);
# "" is an explicit empty negative prompt, which diffusers encodes like any other text.
ENCODE_CASES = [
    {"name": "a", "prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "num_images_per_prompt": 2,
     "do_classifier_free_guidance": True},
    {"name": "b", "prompt": PROMPT_CAT, "negative_prompt": None, "num_images_per_prompt": 1,
     "do_classifier_free_guidance": True},
    {"name": "c", "prompt": PROMPT_LONG, "negative_prompt": "", "num_images_per_prompt": 1,
     "do_classifier_free_guidance": True},
]

UNET_SAMPLE_SEED = 1234  # unet.sample = randn((2,4,8,12)) from this seed
UNET_TIMESTEPS = {"t999": 999.0, "t637_25": 637.25}  # tensor-name suffix -> timestep (0-d float32 tensor)
UNET_HW = (64, 96)  # (height, width) in pixels used for time_ids
VAE_LATENT_SEED = 4321  # vae.latents = randn((1,4,8,12)) from this seed

# API scheduler name -> diffusers scheduler class + extra options for `Class.from_config(pipe.scheduler.config, **opts)`.
SCHEDULERS = {
    "DDIM": {"class": "DDIMScheduler", "options": {}},
    "Euler": {"class": "EulerDiscreteScheduler", "options": {}},
    "UniPC": {"class": "UniPCMultistepScheduler", "options": {}},
    "DPM Multi": {"class": "DPMSolverMultistepScheduler", "options": {}},
    "DPM Single": {"class": "DPMSolverSinglestepScheduler", "options": {}},
    "DEIS": {"class": "DEISMultistepScheduler", "options": {}},
    "Euler a": {"class": "EulerAncestralDiscreteScheduler", "options": {}},
    "Heun": {"class": "HeunDiscreteScheduler", "options": {}},
    "DPM++ 2M Karras": {"class": "DPMSolverMultistepScheduler", "options": {"use_karras_sigmas": True}},
    "DPM++ 2M SDE Karras": {"class": "DPMSolverMultistepScheduler",
                            "options": {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}},
    "DPM2 Karras": {"class": "KDPM2DiscreteScheduler", "options": {"use_karras_sigmas": True}},
    "DPM2 a Karras": {"class": "KDPM2AncestralDiscreteScheduler", "options": {"use_karras_sigmas": True}},
    "LMS": {"class": "LMSDiscreteScheduler", "options": {}},
    "PNDM": {"class": "PNDMScheduler", "options": {}},
    "DDPM": {"class": "DDPMScheduler", "options": {}},
    "LCM": {"class": "LCMScheduler", "options": {}},
    "TCD": {"class": "TCDScheduler", "options": {}},
    "DPM++ 2M SDE": {"class": "DPMSolverMultistepScheduler", "options": {"algorithm_type": "sde-dpmsolver++"}},
    "DPM++ SDE Karras": {"class": "DPMSolverSDEScheduler", "options": {"use_karras_sigmas": True}},
    "DPM++ SDE": {"class": "DPMSolverSDEScheduler", "options": {}},
    "DPM++ 3M SDE Karras": {"class": "DPMSolverMultistepScheduler",
                            "options": {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++",
                                        "solver_order": 3}},
}


# Model variants written under models/<name>/. Every variant shares the same weights; `scheduler_overrides` changes
# scheduler/scheduler_config.json (e.g. {"prediction_type": "v_prediction"} for a v-prediction variant).
MODEL_VARIANTS = {
    "tiny-sdxl": {"scheduler_overrides": {}},
}

# End-to-end cases: `request` uses the hosted API's field names. negative_prompt "" means "no negative prompt" and is
# passed to diffusers as negative_prompt=None.
E2E_CASES = [
    {"name": "ddim_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DDIM",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 42, "img_width": 96, "img_height": 64}},
    {"name": "ddim_w96h64_noneg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DDIM",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 0, "img_width": 96, "img_height": 64}},
    {"name": "ddim_w64h128_neg_steps7", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_LONG, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "DDIM",
                 "num_inference_steps": 7, "guidance_scale": 7.5, "seed": 1135424276, "img_width": 64,
                 "img_height": 128}},
    {"name": "ddim_w64h128_noneg_g1_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "DDIM",
                 "num_inference_steps": 5, "guidance_scale": 1.0, "seed": 2**33 + 17, "img_width": 64,
                 "img_height": 128}},
    {"name": "euler_w96h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "Euler",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 42, "img_width": 96, "img_height": 64}},
    {"name": "euler_w96h64_noneg_g1_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "Euler",
                 "num_inference_steps": 5, "guidance_scale": 1.0, "seed": 999999999999999, "img_width": 96,
                 "img_height": 64}},
    {"name": "euler_w64h128_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "Euler",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 0, "img_width": 64, "img_height": 128}},
    {"name": "euler_w64h128_noneg_steps7", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_LONG, "negative_prompt": "", "samples": 1, "scheduler": "Euler",
                 "num_inference_steps": 7, "guidance_scale": 7.5, "seed": 1135424276, "img_width": 64,
                 "img_height": 128}},
    # Latent 10x9 is not a multiple of 4 (2 UNet downsamplings): the UNet forwards explicit upsample sizes.
    {"name": "ddim_w72h80_neg_oddlatent", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "DDIM",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 42, "img_width": 72, "img_height": 80}},
    # The hosted API's default scheduler.
    {"name": "unipc_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "UniPC",
                 "num_inference_steps": 6, "guidance_scale": 7.5, "seed": 42, "img_width": 96, "img_height": 64}},
    {"name": "unipc_w64h128_noneg_steps9", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "UniPC",
                 "num_inference_steps": 9, "guidance_scale": 5.0, "seed": 7, "img_width": 64, "img_height": 128}},
    {"name": "dpm_multi_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DPM Multi",
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 11, "img_width": 96, "img_height": 64}},
    {"name": "dpmpp_2m_karras_w64h128_noneg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DPM++ 2M Karras",
                 "num_inference_steps": 10, "guidance_scale": 7.5, "seed": 12, "img_width": 64, "img_height": 128}},
    {"name": "dpmpp_2m_sde_karras_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DPM++ 2M SDE Karras",
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 13, "img_width": 96, "img_height": 64}},
    {"name": "dpm_single_w96h64_g1", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DPM Single",
                 "num_inference_steps": 7, "guidance_scale": 1.0, "seed": 14, "img_width": 96, "img_height": 64}},
    {"name": "deis_w64h128_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "DEIS",
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 15, "img_width": 64, "img_height": 128}},
    {"name": "euler_a_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "Euler a",
                 "num_inference_steps": 6, "guidance_scale": 7.5, "seed": 19, "img_width": 96, "img_height": 64}},
    {"name": "heun_w64h128_noneg_steps5", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "Heun",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 20, "img_width": 64, "img_height": 128}},
    {"name": "ddpm_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DDPM",
                 "num_inference_steps": 6, "guidance_scale": 7.5, "seed": 21, "img_width": 96, "img_height": 64}},
    {"name": "lms_w64h128_noneg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "LMS",
                 "num_inference_steps": 7, "guidance_scale": 7.5, "seed": 22, "img_width": 64, "img_height": 128}},
    {"name": "dpm2_karras_w96h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "DPM2 Karras",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 23, "img_width": 96, "img_height": 64}},
    {"name": "dpm2_a_karras_w96h64_neg_n2", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DPM2 a Karras",
                 "num_inference_steps": 5, "guidance_scale": 7.5, "seed": 24, "img_width": 96, "img_height": 64}},
    {"name": "pndm_w64h128_noneg_g1", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "PNDM",
                 "num_inference_steps": 7, "guidance_scale": 1.0, "seed": 25, "img_width": 64, "img_height": 128}},
    {"name": "pndm_w96h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "PNDM",
                 "num_inference_steps": 6, "guidance_scale": 7.5, "seed": 26, "img_width": 96, "img_height": 64}},
    {"name": "dpm2_a_karras_vpred_w64h128_noneg", "model": "tiny-sdxl",
     "scheduler_config_overrides": {"prediction_type": "v_prediction"},
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DPM2 a Karras",
                 "num_inference_steps": 4, "guidance_scale": 7.5, "seed": 27, "img_width": 64, "img_height": 128}},
    # v-prediction models (the scheduler config says so): Euler and the DPM family.
    {"name": "euler_vpred_w96h64_neg", "model": "tiny-sdxl", "scheduler_config_overrides": {"prediction_type": "v_prediction"},
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "Euler",
                 "num_inference_steps": 6, "guidance_scale": 7.5, "seed": 16, "img_width": 96, "img_height": 64}},
    {"name": "dpmpp_2m_karras_vpred_w96h64_n2", "model": "tiny-sdxl",
     "scheduler_config_overrides": {"prediction_type": "v_prediction"},
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "DPM++ 2M Karras",
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 17, "img_width": 96, "img_height": 64}},
    # Few-step schedulers and recipes: LCM / TCD (γ default and overridden), the SDE multistep solvers, DDIM's η,
    # SDXL-Turbo's (Euler a, trailing, guidance 0, 1-4 steps) and SDXL-Lightning's (Euler, trailing, guidance <= 1).
    {"name": "lcm_w64h64_noguidance", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "LCM",
                 "num_inference_steps": 4, "guidance_scale": 1.0, "seed": 21, "img_width": 64, "img_height": 64}},
    {"name": "lcm_w96h64_neg_8steps", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "LCM",
                 "num_inference_steps": 8, "guidance_scale": 1.5, "seed": 22, "img_width": 96, "img_height": 64}},
    {"name": "tcd_w64h64_default_gamma", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "TCD",
                 "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 23, "img_width": 64, "img_height": 64}},
    {"name": "tcd_w64h96_neg_eta", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "TCD", "eta": 0.7,
                 "num_inference_steps": 6, "guidance_scale": 2.0, "seed": 24, "img_width": 64, "img_height": 96}},
    {"name": "ddim_eta_w64h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DDIM", "eta": 0.5,
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 25, "img_width": 64, "img_height": 64}},
    {"name": "dpmpp_2m_sde_w64h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DPM++ 2M SDE",
                 "num_inference_steps": 8, "guidance_scale": 7.5, "seed": 26, "img_width": 64, "img_height": 64}},
    {"name": "dpmpp_3m_sde_karras_w96h64", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DPM++ 3M SDE Karras",
                 "num_inference_steps": 10, "guidance_scale": 5.0, "seed": 27, "img_width": 96, "img_height": 64}},
    # DPM++ SDE's Brownian-tree noise is seeded with the request's seed (noise_sampler_seed), the Turbo/Lightning
    # cards' recommendation.
    {"name": "dpmpp_sde_karras_w64h64_neg", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 2, "scheduler": "DPM++ SDE Karras",
                 "num_inference_steps": 6, "guidance_scale": 2.0, "seed": 31, "img_width": 64, "img_height": 64}},
    {"name": "dpmpp_sde_w96h64", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "DPM++ SDE",
                 "num_inference_steps": 5, "guidance_scale": 5.0, "seed": 32, "img_width": 96, "img_height": 64}},
    {"name": "turbo_1step_w64h64", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 1, "scheduler": "Euler a",
                 "scheduler_options": {"timestep_spacing": "trailing"},
                 "num_inference_steps": 1, "guidance_scale": 0.0, "seed": 28, "img_width": 64, "img_height": 64}},
    {"name": "turbo_4steps_w64h64", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": "", "samples": 2, "scheduler": "Euler a",
                 "scheduler_options": {"timestep_spacing": "trailing"},
                 "num_inference_steps": 4, "guidance_scale": 0.0, "seed": 29, "img_width": 64, "img_height": 64}},
    {"name": "lightning_4steps_w96h64", "model": "tiny-sdxl",
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "Euler",
                 "scheduler_options": {"timestep_spacing": "trailing"},
                 "num_inference_steps": 4, "guidance_scale": 1.0, "seed": 30, "img_width": 96, "img_height": 64}},
    {"name": "unipc_vpred_w64h128_neg", "model": "tiny-sdxl",
     "scheduler_config_overrides": {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     "request": {"prompt": PROMPT_CAT, "negative_prompt": NEGATIVE, "samples": 1, "scheduler": "UniPC",
                 "num_inference_steps": 7, "guidance_scale": 7.5, "seed": 18, "img_width": 64, "img_height": 128}},
]

# ---------------------------------------------------------------------------------------------------------------------
# Model definition
# ---------------------------------------------------------------------------------------------------------------------

DIFFUSERS_VERSION = diffusers.__version__
TRANSFORMERS_VERSION = transformers.__version__
WEIGHT_SEED = {"unet": 1, "vae": 2, "text_encoder": 3, "text_encoder_2": 4}
PERTURB_SEED_OFFSET = 1000
# With 32 groups over 32/64 channels, GroupNorm cancels most of the per-channel time-embedding shift that each resnet
# adds; a larger gain on `time_emb_proj` keeps the timestep / text_embeds / time_ids clearly visible in the output.
TIME_EMB_PROJ_GAIN = 3.0

UNET_CONFIG = {
    # Exactly the key set of stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, tiny values.
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 4],  # SDXL quirk: this is the number of heads per block (num_attention_heads null)
    "block_out_channels": [32, 64, 64],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 64,
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
    "projection_class_embeddings_input_dim": 80,  # text_encoder_2.projection_dim (32) + 6 * addition_time_embed_dim
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 16,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

VAE_CONFIG = {
    # Key set of the SDXL VAE's vae/config.json, tiny values.
    "act_fn": "silu",
    "block_out_channels": [8, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 128,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_COMMON = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,  # old ids as in the real SDXL configs: eos_token_id 2 => pooled at argmax(input_ids)
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "pad_token_id": 1,
    "projection_dim": 32,
    "torch_dtype": "float16",
    "transformers_version": TRANSFORMERS_VERSION,
    "vocab_size": 49408,
}
TEXT_ENCODER_CONFIG = {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", **_CLIP_COMMON}
TEXT_ENCODER_2_CONFIG = {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", **_CLIP_COMMON}

SCHEDULER_CONFIG = {
    "_class_name": "DEISMultistepScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "algorithm_type": "deis",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "solver_order": 2,
    "solver_type": "logrho",
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "DEISMultistepScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _added_token(content: str, with_type: bool) -> dict:
    tok = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **tok} if with_type else tok


def tokenizer_files(pad_token: str) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json as in the real SDXL repos."""
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": _added_token("<|startoftext|>", True),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": _added_token("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token("<|endoftext|>", True),
    }
    special_tokens_map = {
        "bos_token": _added_token("<|startoftext|>", False),
        "eos_token": _added_token("<|endoftext|>", False),
        "pad_token": pad_token,
        "unk_token": _added_token("<|endoftext|>", False),
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    # Same formatting as diffusers' / transformers' to_json_string.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter away from its default init so that loading mistakes show.

    1-D weights (GroupNorm/LayerNorm scales): 1 + 0.1*randn. Biases: b + 0.1*randn. Other weights (linear, conv,
    embedding): w + randn * 0.5/sqrt(fan_in). No tensor stays all-zero (diffusers/torch zero-init norm biases).
    """
    g = torch.Generator("cpu").manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:
            p.copy_(p.float() + 0.1 * noise)
        else:
            fan_in = p[0].numel()
            p.copy_(p.float() + noise * (0.5 / math.sqrt(fan_in)))


def f16_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in model.state_dict().items():
        sd[prefix + k] = v.detach().to(torch.float16).contiguous().clone()
    return sd


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in sd.items():
        assert torch.isfinite(v).all(), k
        assert (v != 0).any(), f"all-zero tensor {k}"
    save_file(sd, str(path), metadata={"format": "pt"})


def diffusers_config(class_name: str, cfg: dict) -> dict:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **cfg}


# ---------------------------------------------------------------------------------------------------------------------
# A. The model folder
# ---------------------------------------------------------------------------------------------------------------------


def build_models():
    """Creates the four networks in float32 with perturbed random weights. Returns them (float32, unrounded)."""
    torch.manual_seed(WEIGHT_SEED["unet"])
    unet = UNet2DConditionModel(**UNET_CONFIG)
    perturb_(unet, WEIGHT_SEED["unet"] + PERTURB_SEED_OFFSET)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".time_emb_proj." in name:
                p.mul_(TIME_EMB_PROJ_GAIN)

    torch.manual_seed(WEIGHT_SEED["vae"])
    vae = AutoencoderKL(**VAE_CONFIG)
    perturb_(vae, WEIGHT_SEED["vae"] + PERTURB_SEED_OFFSET)

    def clip_cfg(cfg):
        c = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype",
                                                        "transformers_version")}
        return CLIPTextConfig(**c)

    torch.manual_seed(WEIGHT_SEED["text_encoder"])
    te1 = CLIPTextModel(clip_cfg(TEXT_ENCODER_CONFIG))
    perturb_(te1, WEIGHT_SEED["text_encoder"] + PERTURB_SEED_OFFSET)

    torch.manual_seed(WEIGHT_SEED["text_encoder_2"])
    te2 = CLIPTextModelWithProjection(clip_cfg(TEXT_ENCODER_2_CONFIG))
    perturb_(te2, WEIGHT_SEED["text_encoder_2"] + PERTURB_SEED_OFFSET)

    for m in (unet, vae, te1, te2):
        m.eval()
    return unet, vae, te1, te2


def text_encoder_state_dicts(te1, te2):
    """The real (transformers-4) key layout: `text_model.` prefix on everything but `text_projection`."""
    sd1 = {}
    for k, v in f16_state_dict(te1).items():
        if k.endswith("position_ids"):
            continue  # non-persistent buffer, absent in real checkpoints
        sd1[k if k.startswith("text_model.") else "text_model." + k] = v
    sd2 = {}
    for k, v in f16_state_dict(te2).items():
        if k.endswith("position_ids"):
            continue
        sd2[k] = v
    for k in sd2:
        assert k.startswith("text_model.") or k == "text_projection.weight", k
    return sd1, sd2


def find_tokenizer_files(root: Path, explicit: str | None) -> dict[str, bytes]:
    """vocab.json + merges.txt of the CLIP BPE tokenizer, read into memory (the source may be the output folder)."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [root.parent / "shared" / "clip-tokenizer", Path("/work/shared/clip-tokenizer"),
                   root / "models" / "tiny-sdxl" / "tokenizer"]
    for c in candidates:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            print(f"CLIP tokenizer files from {c}", file=sys.stderr)
            return {f: (c / f).read_bytes() for f in ("vocab.json", "merges.txt")}
    raise SystemExit(f"vocab.json/merges.txt not found in any of {[str(c) for c in candidates]}")


def write_model_folder(out: Path, unet, vae, te1, te2, tokenizer_bytes: dict[str, bytes],
                       scheduler_overrides: dict) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    write_json(out / "model_index.json", MODEL_INDEX)

    write_json(out / "unet" / "config.json", diffusers_config("UNet2DConditionModel", UNET_CONFIG))
    save_weights(f16_state_dict(unet), out / "unet" / "diffusion_pytorch_model.safetensors")

    write_json(out / "vae" / "config.json", diffusers_config("AutoencoderKL", VAE_CONFIG))
    save_weights(f16_state_dict(vae), out / "vae" / "diffusion_pytorch_model.safetensors")

    sd1, sd2 = text_encoder_state_dicts(te1, te2)
    write_json(out / "text_encoder" / "config.json", TEXT_ENCODER_CONFIG)
    save_weights(sd1, out / "text_encoder" / "model.safetensors")
    write_json(out / "text_encoder_2" / "config.json", TEXT_ENCODER_2_CONFIG)
    save_weights(sd2, out / "text_encoder_2" / "model.safetensors")

    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (out / sub).mkdir()
        for fname, data in tokenizer_bytes.items():
            (out / sub / fname).write_bytes(data)
        for fname, obj in tokenizer_files(pad).items():
            write_json(out / sub / fname, obj)

    write_json(out / "scheduler" / "scheduler_config.json", {**SCHEDULER_CONFIG, **scheduler_overrides})


# ---------------------------------------------------------------------------------------------------------------------
# Checks on the written folder
# ---------------------------------------------------------------------------------------------------------------------


def max_abs_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def check_model_folder(out: Path, pipe: StableDiffusionXLPipeline, unet, vae, te1, te2) -> None:
    """The reloaded pipeline must hold exactly the f16-rounded weights and compute what the in-memory models do."""
    # Key layout of the text encoders as written.
    k1 = set(load_file(str(out / "text_encoder" / "model.safetensors")).keys())
    k2 = set(load_file(str(out / "text_encoder_2" / "model.safetensors")).keys())
    assert all(k.startswith("text_model.") for k in k1), sorted(k1)[:5]
    assert "text_model.embeddings.token_embedding.weight" in k1
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in k1
    assert "text_model.final_layer_norm.weight" in k1
    assert "text_projection.weight" in k2 and "text_model.final_layer_norm.weight" in k2
    kv = set(load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors")).keys())
    assert "decoder.mid_block.attentions.0.to_q.weight" in kv and "decoder.mid_block.attentions.0.group_norm.weight" in kv
    assert not any(".query." in k or ".proj_attn." in k for k in kv)

    # Reloaded weights == f16-rounded in-memory weights, for every tensor.
    for name, mem, loaded in (("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("text_encoder", te1, pipe.text_encoder),
                              ("text_encoder_2", te2, pipe.text_encoder_2)):
        assert loaded.dtype == torch.float32, (name, loaded.dtype)
        msd = {k: v for k, v in mem.state_dict().items() if not k.endswith("position_ids")}
        lsd = {k: v for k, v in loaded.state_dict().items() if not k.endswith("position_ids")}
        assert set(msd) == set(lsd), (name, set(msd) ^ set(lsd))
        for k in msd:
            ref = msd[k].to(torch.float16).to(torch.float32)
            assert torch.equal(ref, lsd[k]), (name, k)
        for k, v in lsd.items():
            assert (v != 0).any(), (name, k)

    # Configs came back as written (nothing silently defaulted differently).
    for k, v in UNET_CONFIG.items():
        assert pipe.unet.config[k] == v, ("unet", k, pipe.unet.config[k], v)
    for k, v in VAE_CONFIG.items():
        assert pipe.vae.config[k] == v, ("vae", k, pipe.vae.config[k], v)
    for te, cfg in ((pipe.text_encoder, TEXT_ENCODER_CONFIG), (pipe.text_encoder_2, TEXT_ENCODER_2_CONFIG)):
        for k in ("hidden_act", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "projection_dim", "eos_token_id", "bos_token_id", "pad_token_id", "vocab_size"):
            assert getattr(te.config, k) == cfg[k], (k, getattr(te.config, k), cfg[k])
    assert type(pipe.scheduler).__name__ == "DEISMultistepScheduler"
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77

    # Outputs of the reloaded text encoders == in-memory ones (rounded to f16 weights) on a real prompt.
    ids = pipe.tokenizer(PROMPT_CAT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    r1 = copy.deepcopy(te1).to(torch.float16).to(torch.float32)
    r2 = copy.deepcopy(te2).to(torch.float16).to(torch.float32)
    a = r1(ids, output_hidden_states=True)
    b = pipe.text_encoder(ids, output_hidden_states=True)
    assert max_abs_diff(a.last_hidden_state, b.last_hidden_state) == 0.0
    assert max_abs_diff(a.hidden_states[-2], b.hidden_states[-2]) == 0.0
    a = r2(ids, output_hidden_states=True)
    b = pipe.text_encoder_2(ids, output_hidden_states=True)
    assert max_abs_diff(a.text_embeds, b.text_embeds) == 0.0
    assert max_abs_diff(a.hidden_states[-2], b.hidden_states[-2]) == 0.0
    print("model folder checks passed", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# B. Reference tensors
# ---------------------------------------------------------------------------------------------------------------------


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


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

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)


# Keys of Dreamshaper's DEIS config that only DEIS reads; diffusers intends the other classes' defaults for them (and
# 0.42 crashes building DPMSolverMultistepScheduler with them), so they are dropped for every other class.
DEIS_ONLY_KEYS = ("algorithm_type", "solver_type")


def make_scheduler(pipe, api_name: str, overrides: dict | None = None):
    entry = SCHEDULERS[api_name]
    cls = getattr(diffusers, entry["class"])
    config = dict(pipe.scheduler.config)
    if entry["class"] != "DEISMultistepScheduler":
        for key in DEIS_ONLY_KEYS:
            config.pop(key, None)
    config.update(overrides or {})
    return cls.from_config(config, **entry["options"])


@torch.no_grad()
def compute_references(pipe: StableDiffusionXLPipeline, refs: Refs) -> dict:
    doc: dict = {}

    # --- RNG ------------------------------------------------------------------------------------------------------
    doc["latents"] = []
    for seed in LATENT_SEEDS:
        n = refs.add(f"latents.seed{seed}", randn(LATENT_SHAPE, seed))
        doc["latents"].append({"seed": seed, "shape": refs.shape(n), "tensor": n})
    n = refs.add("latents16.seed42", randn((1, 4, 16, 16), 42))
    doc["latents"].append({"seed": 42, "shape": refs.shape(n), "tensor": n})

    # --- Tokenizers and text encoders -----------------------------------------------------------------------------
    doc["text_encoders"] = []
    for i, text in enumerate(TEXT_PROMPTS):
        entry = {"index": i, "prompt": text}
        for tag, tok, te in (("te1", pipe.tokenizer, pipe.text_encoder), ("te2", pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            untrunc = tok(text, padding="longest", return_tensors="pt").input_ids
            out = te(ids, output_hidden_states=True)
            entry[f"{tag}_ids"] = refs.add(f"{tag}.ids.{i}", ids.to(torch.int64))
            entry[f"{tag}_hidden"] = refs.add(f"{tag}.hidden.{i}", out.hidden_states[-2])
            entry[f"{tag}_num_tokens_untruncated"] = int(untrunc.shape[-1])
            if tag == "te2":
                entry["te2_pooled"] = refs.add(f"te2.pooled.{i}", out.text_embeds)
        entry["truncated"] = entry["te1_num_tokens_untruncated"] > 77
        doc["text_encoders"].append(entry)

    # --- encode_prompt --------------------------------------------------------------------------------------------
    doc["encode_prompt"] = []
    encoded = {}
    for case in ENCODE_CASES:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=case["prompt"], device=torch.device("cpu"),
            num_images_per_prompt=case["num_images_per_prompt"],
            do_classifier_free_guidance=case["do_classifier_free_guidance"],
            negative_prompt=case["negative_prompt"],
        )
        encoded[case["name"]] = (pe, npe, ppe, nppe)
        c = case["name"]
        entry = dict(case)
        entry["tensors"] = {
            "prompt_embeds": refs.add(f"encode.{c}.prompt_embeds", pe),
            "negative_prompt_embeds": refs.add(f"encode.{c}.negative_prompt_embeds", npe),
            "pooled_prompt_embeds": refs.add(f"encode.{c}.pooled_prompt_embeds", ppe),
            "negative_pooled_prompt_embeds": refs.add(f"encode.{c}.negative_pooled_prompt_embeds", nppe),
        }
        entry["shapes"] = {k: refs.shape(v) for k, v in entry["tensors"].items()}
        doc["encode_prompt"].append(entry)
    assert float(encoded["b"][1].abs().max()) == 0.0 and float(encoded["b"][3].abs().max()) == 0.0
    assert float(encoded["c"][1].abs().max()) > 0.0  # "" is encoded, not zeroed

    # --- One UNet call --------------------------------------------------------------------------------------------
    pe, npe, ppe, nppe = encoded["a"]
    sample = randn((2, 4, 8, 12), UNET_SAMPLE_SEED)
    ehs = torch.cat([npe[:1], pe[:1]], dim=0)  # CFG order: [uncond, cond]
    text_embeds = torch.cat([nppe[:1], ppe[:1]], dim=0)
    h, w = UNET_HW
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=torch.float32)
    doc["unet"] = {
        "sample": refs.add("unet.sample", sample),
        "sample_seed": UNET_SAMPLE_SEED,
        "encoder_hidden_states": refs.add("unet.encoder_hidden_states", ehs),
        "encoder_hidden_states_from": "[encode.a.negative_prompt_embeds[0], encode.a.prompt_embeds[0]]",
        "text_embeds": refs.add("unet.text_embeds", text_embeds),
        "text_embeds_from": "[encode.a.negative_pooled_prompt_embeds[0], encode.a.pooled_prompt_embeds[0]]",
        "time_ids": refs.add("unet.time_ids", time_ids),
        "time_ids_order": "original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)",
        "outputs": [],
    }
    for suffix, t in UNET_TIMESTEPS.items():
        ts = torch.tensor(t, dtype=torch.float32)
        out = pipe.unet(sample, ts, encoder_hidden_states=ehs,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]
        n = refs.add(f"unet.out.{suffix}", out)
        doc["unet"]["outputs"].append({"timestep": t, "timestep_dtype": "float32 0-d tensor", "tensor": n})

    # --- One VAE decode -------------------------------------------------------------------------------------------
    z = randn((1, 4, 8, 12), VAE_LATENT_SEED)
    img = pipe.vae.decode(z, return_dict=False)[0]
    doc["vae"] = {
        "latents": refs.add("vae.latents", z),
        "latents_seed": VAE_LATENT_SEED,
        "image": refs.add("vae.image", img),
        "note": "vae.image = vae.decode(vae.latents).sample; the input is already divided by scaling_factor; raw "
                "output in ~[-1, 1], before (x*0.5+0.5).clamp(0,1)",
    }

    # --- End-to-end -----------------------------------------------------------------------------------------------
    doc["e2e"] = []
    for case in E2E_CASES:
        assert case.get("model", "tiny-sdxl") == pipe._fixture_model_name, "one pipeline per model variant"
        r = case["request"]
        default_scheduler = pipe.scheduler
        # A request's scheduler_options go on top of the model's config, like the model's own overrides.
        overrides = {**case.get("scheduler_config_overrides", {}), **r.get("scheduler_options", {})}
        # The engine seeds a scheduler's own noise sampler with the request's seed.
        overrides = {**({"noise_sampler_seed": r["seed"]} if r["scheduler"].startswith("DPM++ SDE") else {}), **overrides}
        pipe.scheduler = make_scheduler(pipe, r["scheduler"], overrides)
        final = {}

        def grab(p, i, t, kw):
            final["latents"] = kw["latents"].clone()
            final.setdefault("timesteps", []).append(float(t))
            return kw

        kwargs = dict(
            prompt=r["prompt"],
            negative_prompt=r["negative_prompt"] if r["negative_prompt"] else None,
            num_images_per_prompt=r["samples"],
            num_inference_steps=r["num_inference_steps"],
            guidance_scale=r["guidance_scale"],
            width=r["img_width"],
            height=r["img_height"],
            generator=torch.Generator("cpu").manual_seed(r["seed"]),
            output_type="np",
            callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if "eta" in r or r["scheduler"] in PIPELINE_ETA:
            kwargs["eta"] = r.get("eta", PIPELINE_ETA.get(r["scheduler"]))
        images = pipe(**kwargs).images  # float32 numpy (N, H, W, 3) in [0, 1]
        scheduler_info = {
            "class": type(pipe.scheduler).__name__,
            "timesteps": [float(x) for x in pipe.scheduler.timesteps],
            "init_noise_sigma": float(pipe.scheduler.init_noise_sigma),
        }
        if hasattr(pipe.scheduler, "sigmas"):
            scheduler_info["sigmas"] = [float(x) for x in pipe.scheduler.sigmas]
        pipe.scheduler = default_scheduler

        u8 = (images * 255).round().astype("uint8")  # VaeImageProcessor.numpy_to_pil's quantisation
        assert u8.shape == (r["samples"], r["img_height"], r["img_width"], 3)
        assert u8.std() > 5, (case["name"], float(u8.std()))
        name = case["name"]
        entry = {
            "name": name,
            "model": case.get("model", "tiny-sdxl"),
            "request": r,
            "diffusers_call": {k: v for k, v in kwargs.items()
                               if k not in ("generator", "callback_on_step_end", "callback_on_step_end_tensor_inputs")},
            "do_classifier_free_guidance": r["guidance_scale"] > 1.0,
            "scheduler": {"api_name": r["scheduler"], **SCHEDULERS[r["scheduler"]], **scheduler_info},
            "scheduler_config_overrides": case.get("scheduler_config_overrides", {}),
            "unet_timesteps_seen": final["timesteps"],
            "images": refs.add(f"e2e.{name}.images", torch.from_numpy(u8)),
            "latents": refs.add(f"e2e.{name}.latents", final["latents"]),
        }
        entry["diffusers_call"]["generator"] = f"torch.Generator('cpu').manual_seed({r['seed']})"
        entry["images_shape"] = refs.shape(entry["images"])
        entry["latents_shape"] = refs.shape(entry["latents"])
        doc["e2e"].append(entry)

        # The initial noise is the generator's first draw: randn((N, 4, H/8, W/8)) (before * init_noise_sigma).
        # Check it by passing it back as `latents=` and compare the run's final latents with the callback's ones
        # (and with what `output_type="latent"` returns).
        noise = randn((r["samples"], 4, r["img_height"] // 8, r["img_width"] // 8), r["seed"])
        entry["init_noise"] = refs.add(f"e2e.{name}.init_noise", noise)
        entry["init_noise_shape"] = refs.shape(entry["init_noise"])
        # The generator has drawn the initial noise before a stochastic scheduler draws its own: do the same.
        generator = torch.Generator("cpu").manual_seed(r["seed"])
        torch.randn(noise.shape, generator=generator)
        kw2 = dict(kwargs, output_type="latent", callback_on_step_end=None, latents=noise.clone(), generator=generator)
        kw2.pop("callback_on_step_end_tensor_inputs")
        pipe.scheduler = make_scheduler(pipe, r["scheduler"], overrides)
        lat = pipe(**kw2).images
        pipe.scheduler = default_scheduler
        assert torch.equal(lat, final["latents"]), (name, "init noise / final latents mismatch")
    return doc


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    ap.add_argument("--tokenizer-src", default=os.environ.get("CLIP_TOKENIZER_DIR"),
                    help="folder with the CLIP vocab.json and merges.txt (default: ../shared/clip-tokenizer, "
                         "/work/shared/clip-tokenizer, then the committed models/tiny-sdxl/tokenizer)")
    args = ap.parse_args()
    root = Path(args.root)
    tokenizer_bytes = find_tokenizer_files(root, args.tokenizer_src)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diffusers.utils.logging.disable_progress_bar()

    unet, vae, te1, te2 = build_models()

    refs = Refs()
    doc = {
        "description": "Reference tensors from diffusers' StableDiffusionXLPipeline for the tiny random SDXL model. "
                       "All float tensors are float32; ids are int64; images are uint8 (N, H, W, 3).",
        "generated_by": "scripts/make_tiny_model.py",
        "versions": {"torch": torch.__version__.split("+")[0], "diffusers": DIFFUSERS_VERSION,
                     "transformers": TRANSFORMERS_VERSION, "numpy": np.__version__,
                     "safetensors": safetensors.__version__, "scipy": scipy.__version__},
        "tensors_file": "tests/fixtures/reference.safetensors",
        "models": {},
        "schedulers": SCHEDULERS,
        "conventions": {
            "e2e.images": "pipe(..., output_type='np') gives float32 (N,H,W,3) = (vae.decode(latents / scaling_factor)"
                          " * 0.5 + 0.5).clamp(0, 1) in NHWC; uint8 = (x * 255).round() with numpy's "
                          "round-half-to-even",
            "e2e.latents": "latents after the last scheduler step (= output_type='latent'), before / scaling_factor",
            "e2e.init_noise": "randn((N, 4, H/8, W/8)) from the seeded CPU generator (the pipeline's first draw), "
                              "before * init_noise_sigma",
            "negative_prompt": "request negative_prompt '' -> diffusers negative_prompt=None -> zero negative "
                               "embeddings and zero negative pooled (force_zeros_for_empty_prompt) when CFG is on",
            "cfg": "guidance_scale > 1: UNet batch = cat([uncond x N, cond x N]); noise = uncond + g * (cond - uncond);"
                   " guidance_scale <= 1: no CFG, negative prompt ignored",
            "time_ids": "[height, width, 0, 0, height, width] in pixels (original_size + crop top-left + "
                        "target_size), same for the uncond half",
        },
    }

    assert len(MODEL_VARIANTS) >= 1
    for variant, spec in MODEL_VARIANTS.items():
        out = root / "models" / variant
        write_model_folder(out, unet, vae, te1, te2, tokenizer_bytes, spec["scheduler_overrides"])
        doc["models"][variant] = {"path": f"models/{variant}", **spec}

    # References are computed only for the primary variant unless cases name another one.
    variants_used = sorted({c.get("model", "tiny-sdxl") for c in E2E_CASES} | {"tiny-sdxl"})
    assert variants_used == ["tiny-sdxl"], "extend compute_references to run per variant"
    out = root / "models" / "tiny-sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out), torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe._fixture_model_name = "tiny-sdxl"
    check_model_folder(out, pipe, unet, vae, te1, te2)
    doc["model"] = "models/tiny-sdxl"
    doc["pipeline_load"] = ("StableDiffusionXLPipeline.from_pretrained('models/tiny-sdxl', torch_dtype=torch.float32, "
                            "add_watermarker=False)")

    doc.update(compute_references(pipe, refs))

    doc["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                      for k, v in sorted(refs.tensors.items())}
    fx = root / "tests" / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    save_file(refs.tensors, str(fx / "reference.safetensors"), metadata={"format": "pt"})
    write_json(fx / "reference.json", doc)
    print(f"wrote {len(refs.tensors)} reference tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
