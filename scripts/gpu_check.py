#!/usr/bin/env python3
"""The GPU check behind ``scripts/gpu-check.sh``: one command on the GPU machine that gives every number.

Stages (each bounded by its own time limit; results land in ``OUT/gpu-check.json`` after every stage, so a run cut
short still leaves what it measured; the log in ``OUT/gpu-check.log``):

a. parity  — the tiny model (``models/tiny-sdxl``), every scheduler name the binary knows, once each: CUDA f32 and
             CUDA f16 images against the CPU f32 image (mean absolute difference in /255: ≤ 0.5 f32, ≤ 2 f16).
b. full    — the full-size random model (``benches/make_full_model.py --dtype f16`` unless ``--full-model`` names a
             made one), then ours f16 at 1024² × 30 steps UniPC with CFG: seconds per step (from a 30-step and a
             2-step run: the difference over 28 steps, so loading cancels), whole process time, peak GPU memory.
c. diffusers — diffusers fp16 (torch SDPA) on the same GPU, same request, same files: seconds per step (its step
             callback), load and call times, peak GPU memory; and ours / diffusers.
d. 512²    — b and c at 512², with ``samples`` 1 and 4.
e. vae2048 — ours at 2048² (2 steps) with the banded VAE decode (``--vae-tiling``): whole time and peak GPU memory.

``--dry-run`` runs everything but the GPU calls on the CPU: (a) with CPU f32 for the "f32" leg and CPU bf16 for the
"f16" leg, (b), (d) and (e) shrunk to the tiny model at 64² and a few steps, (c) skipped (it needs torch and
diffusers). It needs only this Python's standard library and the binary.

Peak GPU memory is the device's ``nvidia-smi`` memory.used sampled every 50 ms, less its value before the stage.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
SEED = 42
GUIDANCE = 7.5
F32_LIMIT = 0.5
F16_LIMIT = 2.0

LOG = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


# --- PNG: 8-bit RGB / RGBA, non-interlaced, as the binary writes them ---------------------------------------------


def read_png(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixels row by row)."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        raise ValueError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs (depth {depth}, color type {color})")
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    out, prev = bytearray(), bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bpp, bytes(out)


def mean_abs_diff(a: Path, b: Path) -> float:
    """Mean absolute difference of the RGB channels, in /255."""
    wa, ha, ca, pa = read_png(a)
    wb, hb, cb, pb = read_png(b)
    if (wa, ha) != (wb, hb):
        raise ValueError(f"{a} is {wa}x{ha}, {b} is {wb}x{hb}")
    total = sum(abs(pa[i * ca + k] - pb[i * cb + k]) for i in range(wa * ha) for k in range(3))
    return total / (wa * ha * 3)


# --- running things --------------------------------------------------------------------------------------------------


class GpuMemory:
    """Peak of nvidia-smi's memory.used (MiB) over a block, less its value at the start; None without nvidia-smi."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak = self.base = None

    @staticmethod
    def used() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.strip().splitlines()[0])
        except Exception:
            return None

    def __enter__(self):
        if self.enabled:
            self.base = self.used()
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.05):
            used = self.used()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()

    def peak_gib(self) -> float | None:
        if self.peak is None or self.base is None:
            return None
        return round((self.peak - self.base) / 1024, 3)


def run(cmd: list[str], timeout: float, env=None) -> tuple[float, str]:
    """Runs cmd, returns (wall seconds, stdout+stderr); raises on failure or timeout, with the output's tail."""
    log("$ " + " ".join(f"'{c}'" if " " in c else c for c in cmd))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {cmd[0]}")
    wall = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if LOG:
        LOG.write(output[-4000:])
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {output.strip()[-800:]}")
    return wall, output


def scheduler_names(binary: str) -> list[str]:
    """Every scheduler name, from the binary's own error for an unknown one."""
    proc = subprocess.run([binary, "generate", "--model", str(ROOT / "models/tiny-sdxl"), "--prompt", "x",
                           "--scheduler", "help"], capture_output=True, text=True, timeout=30)
    match = re.search(r"valid names: (.*)", proc.stdout + proc.stderr)
    if not match:
        raise RuntimeError(f"no scheduler list in: {(proc.stdout + proc.stderr).strip()[-400:]}")
    return [name.strip() for name in match.group(1).split(",") if name.strip()]


def generate(binary: str, model: str, device: str, dtype: str, out: Path, *, size: int, steps: int,
             scheduler: str = "UniPC", samples: int = 1, extra: tuple[str, ...] = (), timeout: float) -> float:
    cmd = [binary, "generate", "--model", model, "--device", device, "--dtype", dtype, "--prompt", PROMPT,
           "--negative-prompt", NEGATIVE, "--scheduler", scheduler, "--num-inference-steps", str(steps),
           "--guidance-scale", str(GUIDANCE), "--seed", str(SEED), "--img-width", str(size), "--img-height",
           str(size), "--samples", str(samples), "-q", "-o", str(out), *extra]
    wall, _ = run(cmd, timeout)
    return wall


# --- stages ----------------------------------------------------------------------------------------------------------


def stage_parity(args, out: Path) -> dict:
    tiny = str(ROOT / "models/tiny-sdxl")
    device, half = ("cpu", "bf16") if args.dry_run else ("cuda", "f16")
    folder = out / "parity"
    folder.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    for i, name in enumerate(scheduler_names(args.binary)):
        common = dict(size=64, steps=8, scheduler=name, timeout=120)
        ref = folder / f"{i:02}-reference-cpu-f32.png"
        f32, f16 = folder / f"{i:02}-{device}-f32.png", folder / f"{i:02}-{device}-{half}.png"
        row = {"scheduler": name}
        try:
            generate(args.binary, tiny, "cpu", "f32", ref, **common)
            generate(args.binary, tiny, device, "f32", f32, **common)
            generate(args.binary, tiny, device, half, f16, **common)
            row["f32_mad_255"] = round(mean_abs_diff(ref, f32), 4)
            row[f"{half}_mad_255"] = round(mean_abs_diff(ref, f16), 4)
            row["ok"] = row["f32_mad_255"] <= F32_LIMIT and row[f"{half}_mad_255"] <= F16_LIMIT
        except Exception as e:  # one scheduler's failure must not hide the others'
            row["error"], row["ok"] = str(e), False
        ok &= row["ok"]
        log(f"parity {name}: {row}")
        rows.append(row)
    return {"ok": ok, "device": device, "half_dtype": half, "limits_255": {"f32": F32_LIMIT, half: F16_LIMIT},
            "size": 64, "steps": 8, "schedulers": rows}


def diffusers_env(args) -> dict:
    """The environment with the travelled pure-Python wheels (diffusers, and Pillow where the machine lacks it)."""
    env = dict(os.environ)
    wheels = [str(Path(w).resolve()) for w in args.wheel]
    # Pure-Python wheels import as zip files; packages with native code (Pillow) travel unpacked, in wheels/site.
    for pattern in ["shared/wheels/*.whl", "target/wheels/*.whl", "shared/wheels/site", "target/wheels/site"]:
        wheels += [str(Path(w).resolve()) for w in sorted(glob.glob(str(ROOT / pattern)))]
    if wheels:
        env["PYTHONPATH"] = os.pathsep.join(wheels + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def full_model(args, results: dict) -> str:
    if args.dry_run:
        return str(ROOT / "models/tiny-sdxl")
    if args.full_model and (Path(args.full_model) / "unet").is_dir():
        return args.full_model
    target = args.full_model or str(Path.home() / ".cache/dreamshaper/bench/sdxl-random-f16")
    wall, _ = run([args.python, str(ROOT / "benches/make_full_model.py"), "--dtype", "f16", "--out", target],
                  timeout=240, env=diffusers_env(args))
    results["make_full_model_s"] = round(wall, 1)
    return target


def ours_timing(args, model: str, out: Path, *, size: int, steps: int, samples: int = 1, short: int | None = 2,
                extra: tuple[str, ...] = ()) -> dict:
    """One run at `steps` (whole time, peak GPU memory) and, with `short`, one at `short` steps for the step time."""
    device, dtype = ("cpu", "f32") if args.dry_run else ("cuda", "f16")
    with GpuMemory(not args.dry_run) as mem:
        whole = generate(args.binary, model, device, dtype, out / f"ours-{size}-x{samples}.png", size=size, steps=steps,
                         samples=samples, extra=extra, timeout=240)
    result = {"device": device, "dtype": dtype, "size": size, "steps": steps, "samples": samples, "extra": list(extra),
              "process_s": round(whole, 3), "peak_gpu_gib": mem.peak_gib()}
    if short:
        few = generate(args.binary, model, device, dtype, out / f"ours-{size}-x{samples}-short.png", size=size,
                       steps=short, samples=samples, extra=extra, timeout=240)
        result |= {f"process_s_{short}_steps": round(few, 3), "s_per_step": round((whole - few) / (steps - short), 4)}
    return result


DIFFUSERS_RUN = r"""
import json, sys, time, torch
from diffusers import StableDiffusionXLPipeline, UniPCMultistepScheduler
model, size, steps, samples, prompt, negative, seed, guidance = sys.argv[1:9]
size, steps, samples, seed, guidance = int(size), int(steps), int(samples), int(seed), float(guidance)
t0 = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float16).to("cuda")
pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
torch.cuda.synchronize(); load = time.perf_counter() - t0
def call(n, stamps):
    def cb(p, i, t, kw):
        torch.cuda.synchronize(); stamps.append(time.perf_counter()); return kw
    g = torch.Generator("cuda").manual_seed(seed)
    t = time.perf_counter()
    pipe(prompt, negative_prompt=negative, height=size, width=size, num_inference_steps=n, guidance_scale=guidance,
         num_images_per_prompt=samples, generator=g, callback_on_step_end=cb)
    torch.cuda.synchronize(); return time.perf_counter() - t
call(2, [])  # warm-up: cuDNN/cuBLAS autotuning and kernel loading
torch.cuda.reset_peak_memory_stats()
stamps = []
whole = call(steps, stamps)
gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
print(json.dumps({"load_s": round(load, 3), "call_s": round(whole, 3), "s_per_step": round(gaps[len(gaps) // 2], 4),
                  "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                  "torch": torch.__version__, "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention")}))
"""


def diffusers_timing(args, model: str, *, size: int, steps: int, samples: int = 1) -> dict:
    with GpuMemory(True) as mem:
        wall, output = run([args.python, "-c", DIFFUSERS_RUN, model, str(size), str(steps), str(samples), PROMPT,
                            NEGATIVE, str(SEED), str(GUIDANCE)], timeout=240, env=diffusers_env(args))
    result = json.loads(output.strip().splitlines()[-1])
    result.update({"size": size, "steps": steps, "samples": samples, "process_s": round(wall, 3),
                   "peak_gpu_gib": mem.peak_gib()})
    return result


def main() -> int:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/dreamshaper")
    ap.add_argument("--out", default=os.environ.get("OUT") or "target/gpu-check")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: CPU stand-ins, shrunk sizes, diffusers skipped")
    ap.add_argument("--full-model", help="a made full-size f16 model (default: make one with make_full_model.py)")
    ap.add_argument("--python", default=sys.executable, help="the Python with torch (diffusers, the model maker)")
    ap.add_argument("--wheel", action="append", default=[],
                    help="a pure-Python wheel to import from (diffusers); shared/wheels/*.whl, target/wheels/*.whl and "
                         "{shared,target}/wheels/site (unpacked, for Pillow) too")
    ap.add_argument("--stages", default="parity,full,diffusers,512,vae2048")
    args = ap.parse_args()
    args.binary = str(Path(args.binary).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = open(out / "gpu-check.log", "w")
    stages = args.stages.split(",")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = {"dry_run": args.dry_run, "binary": args.binary, "started": started,
               "request": {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "guidance_scale": GUIDANCE,
                           "scheduler": "UniPC"}, "stages": {}}
    if not args.dry_run and shutil.which("nvidia-smi"):
        results["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    full_size, full_steps, small_size = (64, 4, 64) if args.dry_run else (1024, 30, 512)
    model_holder = {}

    def model() -> str:
        if "path" not in model_holder:
            model_holder["path"] = full_model(args, results)
        return model_holder["path"]

    def save():
        (out / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")

    plan = [
        ("parity", "a: tiny-model parity, every scheduler", lambda: stage_parity(args, out)),
        ("full", f"b: ours at {full_size}² × {full_steps} steps",
         lambda: ours_timing(args, model(), out, size=full_size, steps=full_steps)),
        ("diffusers", f"c: diffusers fp16 SDPA at {full_size}² × {full_steps} steps",
         None if args.dry_run else lambda: diffusers_timing(args, model(), size=full_size, steps=full_steps)),
        ("512", f"d: {small_size}², samples 1 and 4", lambda: {
            "ours_x1": ours_timing(args, model(), out, size=small_size, steps=full_steps),
            "ours_x4": ours_timing(args, model(), out, size=small_size, steps=full_steps, samples=4),
            **({} if args.dry_run else {
                "diffusers_x1": diffusers_timing(args, model(), size=small_size, steps=full_steps),
                "diffusers_x4": diffusers_timing(args, model(), size=small_size, steps=full_steps, samples=4)})}),
        ("vae2048", f"e: banded VAE decode at {128 if args.dry_run else 2048}² (2 steps)", lambda: ours_timing(
            args, model(), out, size=128 if args.dry_run else 2048, steps=2, short=None, extra=("--vae-tiling",))),
    ]
    ok = True
    for key, title, fn in plan:
        if key not in stages:
            continue
        log(f"==> {title}")
        started = time.perf_counter()
        if fn is None:
            results["stages"][key] = {"skipped": "dry run (needs the GPU, torch and diffusers)"}
            log(f"==> {key}: skipped (dry run)")
            continue
        try:
            results["stages"][key] = fn()
            status = "ok" if results["stages"][key].get("ok", True) else "FAILED"
        except Exception as e:
            results["stages"][key] = {"error": str(e)}
            status = "FAILED"
        ok &= status == "ok"
        results["stages"][key]["stage_s"] = round(time.perf_counter() - started, 1)
        log(f"==> {key}: {status} ({results['stages'][key]['stage_s']} s)")
        save()
    stages_done = results["stages"]
    if "s_per_step" in stages_done.get("diffusers", {}) and "s_per_step" in stages_done.get("full", {}):
        results["ours_over_diffusers_s_per_step_1024"] = round(
            stages_done["full"]["s_per_step"] / stages_done["diffusers"]["s_per_step"], 3)
    results["ok"] = ok
    save()
    log(f"gpu-check: {'ok' if ok else 'FAILED'}; results in {out / 'gpu-check.json'}, log in {out / 'gpu-check.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
