#!/usr/bin/env python3
"""Writes tests/fixtures/rng_tokens.json: reference values for src/rng.rs and src/tokenizer.rs.

* rng: torch.randn(..., generator=torch.Generator("cpu").manual_seed(seed)) float32 values, as diffusers draws them.
  Small draws are stored whole; large ones as their first/last 16 values, their sum and the sum of their float32
  bit patterns (an exact fingerprint). `rng_default_capability` holds the same kind of summaries computed by torch
  with ATEN_CPU_CAPABILITY=default (its portable, non-AVX2 kernel) for the unit test of that kernel.
* tokens: the ids that transformers' CLIPTokenizer.from_pretrained(folder) gives (as diffusers' SDXL pipeline loads
  and calls it) for both SDXL tokenizers, for a set of prompts; and, in `tokenizer_variants`, for a few prompts with
  other tokenizer_config.json layouts (the config files are stored too, so the test can recreate the folders).

Usage (from the repository root, with torch + transformers installed and the tokenizer folders in place):
    python scripts/make_rng_token_refs.py [--models models/tiny-sdxl] [--out tests/fixtures/rng_tokens.json]
"""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

SEEDS = [0, 42, 1135424276, 2**33 + 17, 999999999999999]
FULL_LIMIT = 64  # draws of up to this many values are stored whole

# Each case is a list of consecutive draws from one fresh generator.
RNG_CASES = (
    [[[n]] for n in (1, 7, 16, 37, 40, 768)]
    + [[[2, 4, 8, 12]], [[1, 4, 128, 128]]]
    + [[[37], [40]], [[3], [3]], [[5], [16], [1]], [[768], [2, 4, 8, 12]]]
    + [[[n]] for n in range(2, 16) if n != 7]
)

DEFAULT_CAPABILITY_CASES = [(seed, n) for seed in (0, 42, 2**33 + 17) for n in (16, 37, 40, 768, 65536)]


def short(values):
    """float32 values as their shortest round-trip decimals (parse as float, round to float32)."""
    return [float(str(np.float32(v))) for v in values]


def summary(values):
    values = np.asarray(values, dtype=np.float32).ravel()
    out = {"len": int(values.size)}
    if values.size <= FULL_LIMIT:
        out["values"] = short(values)
    else:
        out["first"] = short(values[:16])
        out["last"] = short(values[-16:])
    out["sum"] = math.fsum(float(v) for v in values)
    out["bits_sum"] = int(values.view(np.uint32).astype(np.uint64).sum())
    return out


def rng_refs():
    refs = []
    for seed in SEEDS:
        for draws in RNG_CASES:
            g = torch.Generator("cpu").manual_seed(seed)
            outs = []
            for shape in draws:
                t = torch.randn(shape, generator=g, dtype=torch.float32)
                outs.append(dict(shape=list(shape), **summary(t.numpy())))
            refs.append({"seed": seed, "draws": outs})
    return refs


def default_capability_refs():
    """Runs this script again with torch's portable kernel forced."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run(
        [sys.executable, __file__, "--default-capability-only"], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def default_capability_only():
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
    refs = []
    for seed, n in DEFAULT_CAPABILITY_CASES:
        t = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        refs.append({"seed": seed, "n": n, "first": short(t[:16]),
                     "bits_sum": int(t.view(np.uint32).astype(np.uint64).sum())})
    json.dump(refs, sys.stdout)


LONG_PROMPT = (
    "masterpiece, best quality, ultra detailed photograph of an old lighthouse keeper standing on a rocky shore at "
    "dusk, dramatic clouds, crashing waves, warm lantern light, cinematic lighting, volumetric fog, 35mm film grain, "
    "shallow depth of field, bokeh, highly detailed face, wrinkles, weathered skin, wool sweater, rain drops, "
    "reflections on wet rocks, seagulls in the distance, moody atmosphere, award winning, trending on artstation"
)

PROMPTS = [
    "a photo of a Grumpy cat, 8k!",  # the checked example in /work/shared/clip-tokenizer/README.md
    "a beautiful landscape painting of mountains at sunset",
    "(the Grumpy Cat:1.25)",
    "[deformed | disfigured]",
    "masterpiece, best quality, (ultra-detailed:1.2), [blurry], ((sharp focus)), {cat|dog}",
    "8k uhd, 1024x1024, 3.5mm f/1.8, 35mm, 16:9, v1.0, 2024-01-31",
    "the cat's toy isn't here; they're sure we've seen it, I'm told you'll find what he'd hidden",
    "DON'T Stop, it'S fine",
    "Ünïcödé café naïve résumé Ångström Straße ﬁne",
    "cafe\u0301 vs caf\u00e9",  # decomposed vs precomposed (NFC)
    "emoji 🐱🔥✨ party 🎉👍🏽 family 👨‍👩‍👧",
    "CJK: 猫が好きです 中文字符 한국어 テスト",
    "мир ΑΘΗΝΑ ΣΊΣΥΦΟΣ İstanbul",
    "مرحبا שלום नमस्ते",
    "numbers 1234567890 and ½ ² ⅓ Ⅻ ٣",
    "  multiple   spaces\n\nnewlines\tand\ttabs  \r\n",
    "\u3000ideographic\u2003em space\u00a0nbsp zero\u200bwidth",
    "ctrl\x00chars\x07here\x1b",
    "ALL UPPERCASE PROMPT WITH MIXED Case",
    "!!!???...,,,;;; hello!world !",
    "'quoted' \"double\" `back` a_b-c+d=e/f\\g|h~i^j <tag> #hash @at $5 %",
    "<|startoftext|>hello<|endoftext|> <|ENDOFTEXT|> <|EndOfText|>",
    "",
    "   ",
    LONG_PROMPT,
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality",
]
# Generated prompts: (text, repeat count); stored as such to keep the fixture small.
REPEATED = [("cat, ", 2000), ("🐱", 100)]


def token_refs(models):
    from transformers import CLIPTokenizer

    tokenizers = {name: CLIPTokenizer.from_pretrained(os.path.join(models, name)) for name in ("tokenizer", "tokenizer_2")}
    cases = []
    for prompt, repeat in [(p, 1) for p in PROMPTS] + REPEATED:
        text = prompt * repeat
        case = {"prompt": prompt, "repeat": repeat}
        for name, tok in tokenizers.items():
            # What diffusers' StableDiffusionXLPipeline.encode_prompt calls.
            padded = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
            untruncated = tok(text, padding="longest").input_ids
            tokens = tok(text, add_special_tokens=False).input_ids
            assert untruncated[1:-1] == tokens
            case[name] = {
                "tokens": tokens if len(tokens) <= 200 else None,
                "padded": padded,
                "truncated": max(0, len(untruncated) - tok.model_max_length),
            }
        cases.append(case)
    meta = {
        name: {
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "pad": tok.pad_token_id,
            "max_length": tok.model_max_length,
        }
        for name, tok in tokenizers.items()
    }
    return meta, cases


# Other layouts of a tokenizer folder (same vocab.json/merges.txt as tokenizer_2), to check how the special tokens
# are resolved: the `added_tokens_decoder` layout that newer transformers versions save, and no config at all.
NEWER_TOKENIZER_2_CONFIG = {
    "add_prefix_space": False,
    "added_tokens_decoder": {
        "0": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
              "special": True},
        "49406": {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": True},
        "49407": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True},
    },
    "additional_special_tokens": [],
    "bos_token": "<|startoftext|>",
    "clean_up_tokenization_spaces": True,
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "!",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}
VARIANTS = {
    "tokenizer_2_added_tokens_decoder": {
        "tokenizer_config.json": NEWER_TOKENIZER_2_CONFIG,
        "special_tokens_map.json": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                                    "unk_token": "<|endoftext|>"},
    },
    "no_config": {},
}
VARIANT_PROMPTS = [
    "a photo of a Grumpy cat, 8k!",
    "!!!???...,,,;;; hello!world !",
    "<|startoftext|>hello<|endoftext|> <|ENDOFTEXT|> <|EndOfText|>",
    "Ünïcödé café naïve résumé Ångström Straße ﬁne",
    "",
]


def variant_refs(models):
    import shutil
    import tempfile

    from transformers import CLIPTokenizer

    out = {}
    for name, files in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(models, "tokenizer_2", f), d)
            for f, content in files.items():
                with open(os.path.join(d, f), "w") as fh:
                    json.dump(content, fh)
            tok = CLIPTokenizer.from_pretrained(d)
            out[name] = {
                "files": files,
                "bos": tok.bos_token_id,
                "eos": tok.eos_token_id,
                "pad": tok.pad_token_id,
                "max_length": tok.model_max_length if tok.model_max_length < 10**6 else None,
                "cases": [{"prompt": p, "tokens": tok(p, add_special_tokens=False).input_ids} for p in VARIANT_PROMPTS],
            }
    return out


def main():
    if "--default-capability-only" in sys.argv:
        default_capability_only()
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=os.path.join(root, "models", "tiny-sdxl"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "rng_tokens.json"))
    args = ap.parse_args()

    import transformers

    meta, cases = token_refs(args.models)
    data = {
        "generated_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "rng": rng_refs(),
        "rng_default_capability": default_capability_refs(),
        "tokenizers": meta,
        "prompts": cases,
        "tokenizer_variants": variant_refs(args.models),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        # One case per line keeps the file diffable without making it huge.
        f.write("{\n")
        items = list(data.items())
        for i, (key, value) in enumerate(items):
            f.write(f"{json.dumps(key)}: ")
            if isinstance(value, list):
                f.write("[\n" + ",\n".join(json.dumps(v, ensure_ascii=False) for v in value) + "\n]")
            else:
                f.write(json.dumps(value, ensure_ascii=False))
            f.write(",\n" if i + 1 < len(items) else "\n")
        f.write("}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
