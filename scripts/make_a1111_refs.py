#!/usr/bin/env python3
"""Writes the A1111 prompt-syntax references for dreamshaper's `src/prompt/` tests.

Outputs (relative to the repository root):

* ``tests/fixtures/a1111.json``: prompt schedules, emphasis fragments and 77-token chunks (ids and weights, both
  tokenizers) for A1111's documented examples, the hosted API's example prompts, and a few hundred random
  bracket-heavy strings; plus the description of every embedding case.
* ``tests/fixtures/a1111.safetensors``: the embeddings of those cases through the tiny model's text encoders
  (transformers, float32): ``a1111.{case}.context`` (distinct texts, 77·chunks, 64) and ``a1111.{case}.pooled``
  (distinct texts, 32).

The reading of prompts is ``a1111_prompts.py`` (our model of A1111's algorithm, checked against A1111's own parser
during development). The encoding below follows A1111's ``sd_hijack_clip`` literally: every schedule entry of a
prompt (duplicates included) is encoded as one batch per chunk index, tokens after the first EOS become the
tokenizer's pad id, the penultimate hidden states get the emphasis with ``z.mean()`` over that batch, chunks are
concatenated along the sequence, the pooled embedding is the second encoder's on the first chunk.

Deterministic (fixed seeds, one CPU thread). Usage: ``/work/venv/bin/python scripts/make_a1111_refs.py [--root DIR]``
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import a1111_prompts as a1111  # noqa: E402

HOSTED_SHORT = (
    "a photo of (the Grumpy Cat:1.25), (grumpy:1.2), (cyberpunk:1.4), ( best quality:1.9), (action-packed:1.8), "
    "[deformed | disfigured], [bad : wrong], (mutated hands and fingers)"
)
HOSTED_PROMPT = (
    HOSTED_SHORT + ", sitting on a neon-lit rooftop in a rainy megacity at night, holographic billboards, flying "
    "cars, volumetric fog, reflections on wet asphalt, cinematic lighting, dramatic rim light, ultra detailed fur, "
    "sharp focus, 8k uhd, masterpiece, trending on artstation, octane render, unreal engine 5, by Greg Rutkowski "
    "and Alphonse Mucha"
)
HOSTED_NEGATIVE = (
    "(worst quality:1.4), (low quality:1.4), (deformed, distorted, disfigured:1.3), poorly drawn, bad anatomy, "
    "wrong anatomy, extra limb, missing limb, floating limbs, (mutated hands and fingers:1.4), disconnected limbs, "
    "mutation, mutated, ugly, disgusting, blurry, amputation"
)
# 151 tokens: two full chunks' worth and a bit, commas throughout (the comma backtrack at work).
LONG_150 = ", ".join(
    [
        f"{adj} {noun}"
        for adj, noun in zip(
        ["a tiny", "a huge", "an old", "a shiny", "a wooden", "a glass", "a stone", "a paper", "a golden",
         "a rusty", "a frozen", "a burning", "a floating", "a hidden", "a broken", "a painted", "a woven",
         "a silver", "a crystal", "a velvet", "a marble", "a copper", "a bamboo", "a leather", "a porcelain",
         "an ivory", "a neon", "a misty", "a sunny", "a quiet", "a noisy", "a crowded", "an empty", "a narrow",
         "a wide", "a steep", "a gentle", "a wild", "a calm", "a stormy", "a bright", "a dark", "a pale",
         "a vivid", "a soft", "a rough", "a smooth", "a sharp", "a blunt", "a curved"],
        ["castle", "bridge", "tower", "garden", "lantern", "window", "river", "forest", "mountain", "harbor",
         "market", "temple", "library", "station", "village", "meadow", "canyon", "island", "desert", "valley",
         "lighthouse", "cathedral", "workshop", "balcony", "courtyard", "fountain", "staircase", "corridor",
         "orchard", "vineyard", "glacier", "volcano", "lagoon", "waterfall", "cliff", "cave", "dune", "pier",
         "windmill", "greenhouse", "observatory", "monastery", "aqueduct", "arena", "bazaar", "citadel",
         "palace", "plaza", "quarry", "reef"],
        )
    ][:38]
)

# Embedding cases: prompt, steps (model evaluations), emphasis.
EMBED_CASES = [
    {"name": "weighted", "prompt": HOSTED_SHORT, "steps": 4, "emphasis": "original"},
    {"name": "hosted", "prompt": HOSTED_PROMPT, "steps": 3, "emphasis": "original"},
    {"name": "negative", "prompt": HOSTED_NEGATIVE, "steps": 3, "emphasis": "original"},
    {"name": "long150", "prompt": LONG_150, "steps": 1, "emphasis": "original"},
    {"name": "long150_weighted", "prompt": "(" + LONG_150 + ":0.8), [masterpiece], ((best quality))",
     "steps": 1, "emphasis": "original"},
    {"name": "no_norm", "prompt": HOSTED_SHORT, "steps": 2, "emphasis": "no-norm"},
    {"name": "edited", "prompt": "a [cat:dog:0.5] in [a forest|the city], (detailed:1.3) [[blurry]]", "steps": 6,
     "emphasis": "original"},
    {"name": "break", "prompt": "a cat BREAK (a dog:1.3), [grass]", "steps": 1, "emphasis": "original"},
    {"name": "plain", "prompt": "a photo of a Grumpy cat, 8k!", "steps": 1, "emphasis": "original"},
]

# Prompts whose chunks (both tokenizers) are checked id for id.
CHUNK_PROMPTS = [HOSTED_SHORT, HOSTED_PROMPT, HOSTED_NEGATIVE, LONG_150,
                 "x, " * 30 + "a very long tail of words without any comma at all in it to be moved along nicely",
                 "BREAK starts empty BREAK and BREAK", "wow!!! so (loud!:1.2)", ""]

DOCUMENTED = [
    "test", "a [b:3]", "a [b: 3]", "a [[[b]]:2]", "[(a:2):3]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e", "a [unbalanced",
    "a [b:.5] c", "a [{b|d{:.5] c", "((a][:b:c [d:3]", "[a|(b:1.1)]", "[fe|]male", "[fe|||]male",
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
    "[ in background:0.25] [shoddy:masterful:0.5]",
    HOSTED_SHORT, HOSTED_PROMPT, HOSTED_NEGATIVE, "[bad : wrong]", "a BREAK b", "(BREAK)", "(a: 1.5 )", "(a:1.2.3)",
]
FUZZ_ALPHABET = list("()[]:|\\ ab1.5,") + [
    "BREAK", " BREAK ", "0.5", "2", "-1", "1e1", "\n", "\t", "e", "+", "[a:b:3]", "[x|y]", "(c:1.2)", ":0.3)",
    "\u3000", "\x1c", "\uff13", "cat", " dog",
]


def fuzz_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 16))) for _ in range(count)]


class Encoders:
    def __init__(self, model_dir: Path):
        self.tokenizers = [CLIPTokenizer.from_pretrained(str(model_dir / d)) for d in ("tokenizer", "tokenizer_2")]
        self.models = [
            CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), torch_dtype=torch.float32).eval(),
            CLIPTextModelWithProjection.from_pretrained(str(model_dir / "text_encoder_2"),
                                                        torch_dtype=torch.float32).eval(),
        ]

    def special(self, e: int):
        tok = self.tokenizers[e]
        vocab = tok.get_vocab()
        return tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, vocab.get(",</w>")

    def tokenize(self, e: int, text: str) -> list[int]:
        return self.tokenizers[e](text, add_special_tokens=False)["input_ids"]

    def chunks(self, e: int, fragments):
        bos, eos, _, comma = self.special(e)
        return a1111.chunks(fragments, lambda t: self.tokenize(e, t), bos, eos, comma)


def reading(encoders: Encoders, prompt: str, steps: int):
    entries = a1111.schedule(prompt, steps)
    texts = [text for _, text in entries]
    fragments = {t: a1111.attention(t) for t in texts}
    chunks = {t: [encoders.chunks(e, fragments[t]) for e in range(2)] for t in texts}
    count = max(len(c) for t in texts for c in chunks[t])
    return entries, texts, fragments, chunks, count


@torch.no_grad()
def encode_case(encoders: Encoders, prompt: str, steps: int, emphasis: str):
    """A1111's encoding of one prompt: the batch of all its schedule texts (duplicates included)."""
    entries, texts, _, chunks, count = reading(encoders, prompt, steps)
    zs = []
    pooled = None
    for e in range(2):
        bos, eos, pad, _ = encoders.special(e)
        per_chunk = []
        for c in range(count):
            batch = [chunks[t][e][c] if c < len(chunks[t][e]) else a1111.empty_chunk(bos, eos) for t in texts]
            ids = torch.tensor([a1111.with_padding(ids, eos, pad) for ids, _ in batch])
            mults = torch.asarray([m for _, m in batch])  # float32, like A1111's torch.asarray of Python floats
            out = encoders.models[e](input_ids=ids, output_hidden_states=True)
            z = out.hidden_states[-2]
            if e == 1 and c == 0:
                pooled = out.text_embeds
            if emphasis == "original":
                original_mean = z.mean()
                z = z * mults.reshape(mults.shape + (1,)).expand(z.shape)
                new_mean = z.mean()
                z = z * (original_mean / new_mean)
            else:
                z = z * mults.reshape(mults.shape + (1,)).expand(z.shape)
            per_chunk.append(z)
        zs.append(torch.cat(per_chunk, dim=1))
    context = torch.cat(zs, dim=2)
    distinct = list(dict.fromkeys(texts))
    rows = [texts.index(t) for t in distinct]
    return entries, distinct, context[rows].contiguous(), pooled[rows].contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="repository root")
    root = Path(ap.parse_args().root)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    encoders = Encoders(root / "models" / "tiny-sdxl")

    texts = DOCUMENTED + fuzz_strings(400, seed=4)
    schedules = []
    for i, text in enumerate(texts):
        steps = [10, 1, 2, 5, 30][i % 5] if i >= len(DOCUMENTED) else 10
        entries = a1111.schedule(text, steps)
        literal = a1111.is_literal(text)
        schedules.append({"prompt": text, "steps": steps, "literal": literal, "entries": entries})
    # Weights as repr strings: exact for any JSON reader (serde_json's default float parsing may be 1 ulp off).
    attention = [{"text": t, "fragments": [[f, repr(w)] for f, w in a1111.attention(t)]} for t in texts]

    chunk_cases = []
    for prompt in CHUNK_PROMPTS:
        fragments = a1111.attention(prompt)
        chunk_cases.append({
            "prompt": prompt,
            "encoders": [[{"ids": ids, "weights": [repr(x) for x in w]} for ids, w in encoders.chunks(e, fragments)]
                         for e in range(2)],
        })

    tensors = {}
    embed_cases = []
    for case in EMBED_CASES:
        entries, distinct, context, pooled = encode_case(encoders, case["prompt"], case["steps"], case["emphasis"])
        name = case["name"]
        tensors[f"a1111.{name}.context"] = context
        tensors[f"a1111.{name}.pooled"] = pooled
        embed_cases.append({**case, "entries": entries, "texts": distinct,
                            "context": f"a1111.{name}.context", "pooled": f"a1111.{name}.pooled",
                            "shape": list(context.shape)})

    doc = {
        "description": "A1111 prompt syntax references for the tiny SDXL model: schedules (get_learned_conditioning_"
                       "prompt_schedules), emphasis fragments (parse_prompt_attention), chunks (tokenize_line, both "
                       "tokenizers) and embeddings (sd_hijack_clip + Original/No norm emphasis), float32.",
        "generated_by": "scripts/make_a1111_refs.py",
        "versions": {"torch": torch.__version__.split("+")[0],
                     "transformers": transformers.__version__},
        "hosted": {"prompt": HOSTED_PROMPT, "short": HOSTED_SHORT, "negative": HOSTED_NEGATIVE},
        "schedules": schedules,
        "attention": attention,
        "chunks": chunk_cases,
        "embeddings": embed_cases,
    }
    fx = root / "tests" / "fixtures"
    save_file(tensors, str(fx / "a1111.safetensors"), metadata={"format": "pt"})
    (fx / "a1111.safetensors").chmod(0o644)
    with open(fx / "a1111.json", "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(schedules)} schedules, {len(chunk_cases)} chunk cases, {len(embed_cases)} embedding cases",
          file=sys.stderr)


if __name__ == "__main__":
    main()
