#!/usr/bin/env python3
"""Runs diffusers and our engine on the same full-size SDXL files, one process per case, and prints the ratios.

Cases (``--cases``, comma-separated; default all):
  unet256, unet512   one classifier-free-guidance UNet call (batch 2) at 256² / 512², f32: seconds (median)
  unet512bf16        the same at 512², ours in bf16 mixed precision (AVX512-BF16 matrix products) against
                     diffusers in f32 (the target is ≤ 0.6× of diffusers' f32 time); reuses unet512's diffusers
                     number when both run
  text               both text encoders on a prompt + negative prompt: seconds (median)
  vae512             VAE decode of one 512² image: seconds (median)
  gen1024            a whole 1024² generation (2 steps, CFG), process peak resident memory (GB); diffusers holds
                     every component at once (its default), ours loads and frees them in turn (our default)
  startup            ours only: process start → first denoising step (warm page cache), seconds
  sched              ours only: scheduler update per step on 1024² latents, milliseconds

The model folder is made by ``benches/make_full_model.py`` if missing. Peak memory is the child process's maximum
resident set (``/usr/bin/time -f %M``). torch runs with its default threads (all cores), as does our engine.
The Markdown table goes to standard output and the raw results to ``target/bench/compare.json``.

Usage: ``python benches/compare_diffusers.py [--model DIR] [--cases …] [--iters N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

DIFFUSERS_CASE = r'''
import json, sys, time, torch
case, model, size, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def timed(fn):
    fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return sorted(out)
with torch.inference_mode():
    if case == "unet":
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32).eval()
        l = size // 8
        x, ctx = torch.randn(2, 4, l, l), torch.randn(2, 77, 2048)
        added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
        s = timed(lambda: unet(x, 500.0, encoder_hidden_states=ctx, added_cond_kwargs=added))
    elif case == "text":
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False,
                                                         unet=None, vae=None)
        s = timed(lambda: pipe.encode_prompt("a photo of an astronaut riding a horse on mars, highly detailed, 8k",
                                             negative_prompt="blurry, low quality", device="cpu",
                                             do_classifier_free_guidance=True))
    elif case == "vae":
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval()
        z = torch.randn(1, 4, size // 8, size // 8)
        s = timed(lambda: vae.decode(z / vae.config.scaling_factor))
    elif case == "gen":
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=2, width=size, height=size,
             generator=torch.Generator().manual_seed(0))
        s = [time.perf_counter() - t]
print(json.dumps({"seconds": s, "torch_threads": torch.get_num_threads()}))
'''


def run_measured(cmd: list[str], env=None) -> tuple[str, float]:
    """Runs `cmd` under /usr/bin/time; returns its stdout and peak resident memory in GB."""
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss = [line for line in done.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    return done.stdout, int(rss[-1].split()[1]) / 1e6


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def diffusers(case: str, model: Path, size: int, iters: int) -> dict:
    out, rss = run_measured([PYTHON, "-c", DIFFUSERS_CASE, case, str(model), str(size), str(iters)])
    result = json.loads(out.strip().splitlines()[-1])
    return {"seconds": median(result["seconds"]), "peak_rss_gb": rss, "torch_threads": result["torch_threads"]}


def bench_binary() -> Path:
    done = subprocess.run(["cargo", "bench", "--bench", "sdxl", "--no-run", "--message-format=json"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("target", {}).get("name") == "sdxl" \
                and message.get("executable"):
            return Path(message["executable"])
    raise RuntimeError("could not find the sdxl bench executable")


def ours(binary: Path, case: str, model: Path, size: int, iters: int, dtype: str = "f32") -> list[dict]:
    out, rss = run_measured([str(binary), "--case", case, "--model", str(model), "--size", str(size),
                             "--iters", str(iters), "--warmup", "1", "--dtype", dtype])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        row["process_peak_rss_gb"] = rss
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--cases", default="unet256,unet512,unet512bf16,text,vae512,gen1024,startup,sched")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256² UNet, text encoders, startup only, 2 iterations")
    args = ap.parse_args()
    cases = ["unet256", "text", "startup"] if args.quick else args.cases.split(",")
    iters = 2 if args.quick else args.iters
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "benches"))
        import make_full_model
        model = make_full_model.default_dir("f32")
        if not (model / make_full_model.COMPLETE).exists():
            subprocess.run([PYTHON, str(ROOT / "benches" / "make_full_model.py")], check=True)
    subprocess.run(["cargo", "build", "--release", "--bin", "dreamshaper"], cwd=ROOT, check=True)
    binary = bench_binary()
    (ROOT / "target" / "bench").mkdir(parents=True, exist_ok=True)
    rows, raw = [], {"model": str(model), "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {}}

    def add(name, metric, theirs, mine, target):
        ratio = mine / theirs if theirs else float("nan")
        rows.append((name, metric, theirs, mine, ratio, target))
        print(f"  {name}: diffusers {theirs:.3f}, ours {mine:.3f} ({ratio:.2f}×)", file=sys.stderr, flush=True)

    for case in cases:
        print(f"case {case} …", file=sys.stderr, flush=True)
        if case.startswith("unet"):
            dtype = "bf16" if case.endswith("bf16") else "f32"
            size = int(case[4:].removesuffix("bf16"))
            f32_case = raw["cases"].get(f"unet{size}")
            theirs = f32_case["diffusers"] if f32_case else diffusers("unet", model, size, iters)
            mine = ours(binary, "unet-cfg", model, size, iters, dtype)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            target = "≤ 0.6×" if dtype == "bf16" else "≤ 1.0×"
            add(f"UNet CFG call {size}², ours {dtype} vs diffusers f32", "s", theirs["seconds"], mine["median_s"],
                target)
            add(f"UNet process peak RSS {size}², ours {dtype}", "GB", theirs["peak_rss_gb"],
                mine["process_peak_rss_gb"], "")
        elif case == "text":
            theirs = diffusers("text", model, 0, iters)
            mine = ours(binary, "text-encoders", model, 512, iters)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add("text encoders (prompt + negative)", "s", theirs["seconds"], mine["median_s"], "")
        elif case.startswith("vae"):
            size = int(case[3:])
            theirs = diffusers("vae", model, size, iters)
            mine = ours(binary, "vae-decode", model, size, iters)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add(f"VAE decode {size}²", "s", theirs["seconds"], mine["median_s"], "")
        elif case.startswith("gen"):
            size = int(case[3:])
            theirs = diffusers("gen", model, size, 1)
            started = time.perf_counter()
            _, rss = run_measured([str(ROOT / "target" / "release" / "dreamshaper"), "generate", "--model", str(model),
                                   "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
                                   "--num-inference-steps", "2", "--img-width", str(size), "--img-height", str(size),
                                   "--seed", "0", "--quiet", "-o", str(ROOT / "target" / "bench" / "gen.png")])
            mine = {"seconds": time.perf_counter() - started, "peak_rss_gb": rss}
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add(f"{size}² generation (2 steps) peak RSS", "GB", theirs["peak_rss_gb"], mine["peak_rss_gb"], "≤ 12 GB")
            add(f"{size}² generation (2 steps) wall time", "s", theirs["seconds"], mine["seconds"], "")
        elif case == "startup":
            mine = ours(binary, "startup", model, 1024, 1)[0]
            raw["cases"][case] = {"ours": mine}
            rows.append(("start-up → first denoising step (ours)", "s", None, mine["median_s"], None, "≤ 2 s"))
        elif case == "sched":
            for row in ours(binary, "scheduler-step", model, 1024, iters):
                name = row["extra"]["scheduler"]
                raw["cases"].setdefault(case, {})[name] = row
                rows.append((f"scheduler step {name}, 1024² latents (ours)", "ms", None, row["median_s"] * 1e3,
                             None, ""))
        else:
            raise SystemExit(f"unknown case {case}")

    print(f"\nmodel: {model}; {raw['cpus']} CPUs; torch threads: default\n")
    print("| case | unit | diffusers | ours | ours / diffusers | target |")
    print("|---|---|---|---|---|---|")
    for name, unit, theirs, mine, ratio, target in rows:
        t = "–" if theirs is None else f"{theirs:.2f}"
        r = "–" if ratio is None else f"{ratio:.2f}×"
        print(f"| {name} | {unit} | {t} | {mine:.2f} | {r} | {target or ''} |")
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    raw["table"] = rows
    (out / "compare.json").write_text(json.dumps(raw, indent=2, default=str))


if __name__ == "__main__":
    main()
