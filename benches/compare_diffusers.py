#!/usr/bin/env python3
"""Runs diffusers and our engine (and optionally stable-diffusion.cpp) on the same full-size SDXL files, one process
per case, and prints the ratios.

Cases (``--cases``, comma-separated; default all but the two below marked "opt-in"):
  unet256, unet512   one classifier-free-guidance UNet call (batch 2) at 256² / 512², f32: seconds (median)
  unet512bf16        the same at 512², ours in bf16 mixed precision (AVX512-BF16 matrix products) against
                     diffusers in f32 (the target is ≤ 0.6× of diffusers' f32 time); reuses unet512's diffusers
                     number when both run. Any size and ``int8`` work the same way (opt-in: ``unet1024``,
                     ``unet1024bf16``, ``unet1024int8``)
  text               both text encoders on a prompt + negative prompt: seconds (median)
  vae512             VAE decode of one 512² image: seconds (median)
  gen1024            a whole 1024² generation (2 steps, CFG), process peak resident memory (GB); diffusers holds
                     every component at once (its default), ours loads and frees them in turn (our default)
  startup            ours only: process start → first denoising step (warm page cache), seconds
  sched              ours only: scheduler update per step on 1024² latents, milliseconds
  whole512           (opt-in) the WHOLE process of one 512² generation (``--whole-size``): 3 Euler steps,
                     classifier-free guidance 7 with a negative prompt, VAE decode, PNG written, seed 0. Each run is
                     one process, timed from start to exit (imports, loading, everything) with its peak RSS
                     (``/usr/bin/time``). Configs (``--configs`` picks a subset):
                       diffusers-f32   a Python child: StableDiffusionXLPipeline.from_pretrained(model, float32)
                                       with EulerDiscreteScheduler from the model's scheduler config
                       ours-f32, ours-bf16, ours-int8
                                       ``dreamshaper generate --scheduler Euler --dtype f32|bf16|int8``
                       sdcpp-f32, sdcpp-f16, sdcpp-q8_0
                                       only with ``--sdcpp PATH`` (stable-diffusion.cpp's ``sd``/``sd-cli``):
                                       ``-m SINGLE_FILE --type f32|f16|q8_0 -t <cores> --sampling-method euler``
                                       on the single-file checkpoint (``--sdcpp-model``, default MODEL.safetensors
                                       next to the model folder, see ``benches/make_full_single_file.py``)
                     ``--runs N`` runs per config (default 3): min and median seconds, max peak RSS, and each
                     config's median over diffusers-f32's median. A config that fails is reported (its stderr
                     tail) and the others go on.
  mem1024            (opt-in) ours only: a whole 1024² generation (1 step, CFG) per selected ours-* config: wall
                     time and process peak resident memory
  threads            (opt-in) thread scaling of one CFG UNet call at 256² (``--threads-size``): ours (the bench
                     binary's ``unet-cfg``, f32) under RAYON_NUM_THREADS=n and diffusers under
                     ``torch.set_num_threads(n)``, for n = 1, 2, 4, … ≤ the CPU count (and the CPU count itself);
                     ``--runs`` timed calls after one warm-up. Per-thread efficiency = t1 / (n · tn); the ratio is
                     ours over diffusers at the same n.

Page cache (``--cache warm|cold|both``, default warm; whole512 only): warm reads the config's model files once
(``cat > /dev/null``) before its runs; cold runs ``sync; echo 3 > /proc/sys/vm/drop_caches`` before every run,
which needs root outside a container; where it cannot, the table says so instead of reporting warm numbers.

The model folder is made by ``benches/make_full_model.py`` if missing (``--model`` takes any diffusers SDXL folder,
e.g. ``models/tiny-sdxl`` for a plumbing check with ``--whole-size 64 --threads-size 64 --runs 1``). Our binary is
``--binary`` (default ``$CARGO_TARGET_DIR`` or ``target``, then ``release/dreamshaper``, built with cargo unless
given); the bench binary comes from ``cargo bench --no-run`` (which follows CARGO_TARGET_DIR). Peak memory is the
child process's maximum resident set (``/usr/bin/time -f %M``). torch runs with its default threads (all cores),
as does our engine, except in ``threads``. The Markdown tables go to standard output and the raw results to
``target/bench/compare.json``.

Usage: ``python benches/compare_diffusers.py [--model DIR] [--cases …] [--iters N] [--quick]
[--configs …] [--runs N] [--cache warm|cold|both] [--sdcpp PATH] [--binary PATH] [--whole-size N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

DIFFUSERS_CASE = r'''
import json, sys, time, torch
case, model, size, iters = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 0  # 0: torch's default
if threads > 0:
    torch.set_num_threads(threads)
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
        c = unet.config  # SDXL: 2048-wide context, 1280-wide pooled text embedding (2816 - 6 * 256)
        x, ctx = torch.randn(2, c.in_channels, l, l), torch.randn(2, 77, c.cross_attention_dim)
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
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
    elif case == "whole":
        # The whole process is what is measured (from outside); the in-process time is only reported.
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        prompt, negative, out_png = sys.argv[6], sys.argv[7], sys.argv[8]
        pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32, add_watermarker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        image = pipe(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.0, width=size,
                     height=size, generator=torch.Generator("cpu").manual_seed(0)).images[0]
        image.save(out_png)
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


def run_whole(cmd: list[str], env=None) -> dict:
    """Runs `cmd` once under /usr/bin/time without raising: exit status, wall seconds (process start to exit), peak
    resident memory in GB and the tail of its standard error."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    wall = time.perf_counter() - started
    rss = [line for line in done.stderr.splitlines() if line.startswith("MAXRSS_KB")]
    stderr = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("MAXRSS_KB"))
    return {"rc": done.returncode, "seconds": wall, "peak_rss_gb": int(rss[-1].split()[1]) / 1e6 if rss else None,
            "stdout_tail": done.stdout[-2000:], "stderr_tail": stderr[-2000:]}


def drop_caches() -> str | None:
    """Empties the page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``); returns why it could not, or None."""
    if os.geteuid() != 0:
        return "not root"
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"drop_caches: {e.strerror or e}"
    return None


def read_files(paths: list[Path]) -> float:
    """Reads the files once (``cat > /dev/null``) so that they are in the page cache; returns the GB read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total / 1e9


def model_files(model: Path) -> list[Path]:
    return sorted(p for p in model.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".bin"))


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def diffusers(case: str, model: Path, size: int, iters: int, threads: int = 0) -> dict:
    out, rss = run_measured([PYTHON, "-c", DIFFUSERS_CASE, case, str(model), str(size), str(iters), str(threads)])
    result = json.loads(out.strip().splitlines()[-1])
    return {"seconds": median(result["seconds"]), "min_s": min(result["seconds"]), "all_s": result["seconds"],
            "peak_rss_gb": rss, "torch_threads": result["torch_threads"]}


def bench_binary() -> Path:
    done = subprocess.run(["cargo", "bench", "--bench", "sdxl", "--no-run", "--message-format=json"],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    for line in done.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("target", {}).get("name") == "sdxl" \
                and message.get("executable"):
            return Path(message["executable"])
    raise RuntimeError("could not find the sdxl bench executable")


def ours(binary: Path, case: str, model: Path, size: int, iters: int, dtype: str = "f32", env=None) -> list[dict]:
    out, rss = run_measured([str(binary), "--case", case, "--model", str(model), "--size", str(size),
                             "--iters", str(iters), "--warmup", "1", "--dtype", dtype], env=env)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for row in rows:
        row["process_peak_rss_gb"] = rss
    return rows


PROMPT = "a photo of an astronaut riding a horse on mars, highly detailed, 8k"
NEGATIVE = "blurry, low quality, watermark, text"
WHOLE_CONFIGS = ["diffusers-f32", "ours-f32", "ours-bf16", "ours-int8", "sdcpp-f32", "sdcpp-f16", "sdcpp-q8_0"]
THREAD_CONFIGS = ["diffusers-f32", "ours-f32", "ours-int8"]


def whole_command(config: str, model: Path, binary: Path, sdcpp: Path | None, sdcpp_model: Path, size: int,
                  out_png: Path) -> list[str]:
    """The command line of one whole-process 3-step Euler CFG generation of `config`."""
    kind, dtype = config.split("-", 1)
    if kind == "diffusers":
        return [PYTHON, "-c", DIFFUSERS_CASE, "whole", str(model), str(size), "1", "0", PROMPT, NEGATIVE, str(out_png)]
    if kind == "ours":
        return [str(binary), "generate", "--model", str(model), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                "--num-inference-steps", "3", "--guidance-scale", "7", "--scheduler", "Euler", "--img-width",
                str(size), "--img-height", str(size), "--seed", "0", "--dtype", dtype, "--quiet", "-o", str(out_png)]
    if kind == "sdcpp":
        return [str(sdcpp), "-m", str(sdcpp_model), "--type", dtype, "-t", str(os.cpu_count()), "--sampling-method",
                "euler", "--steps", "3", "--cfg-scale", "7", "-W", str(size), "-H", str(size), "-s", "0", "-p", PROMPT,
                "-n", NEGATIVE, "-o", str(out_png)]
    raise ValueError(config)


def whole_case(configs: list[str], caches: list[str], runs: int, model: Path, binary: Path, sdcpp: Path | None,
               sdcpp_model: Path, size: int) -> dict:
    """``whole<size>``: per page-cache mode and config, `runs` whole processes; see the module docstring."""
    out_dir = ROOT / "target" / "bench"
    results: dict[str, dict[str, dict]] = {}
    for cache in caches:
        results[cache] = {}
        cold_problem = drop_caches() if cache == "cold" else None
        for config in configs:
            r: dict = {"runs": 0, "seconds": [], "peak_rss_gb": None, "error": None}
            results[cache][config] = r
            if config.startswith("sdcpp") and sdcpp is None:
                r["error"] = "needs --sdcpp PATH"
            elif cache == "cold" and cold_problem:
                r["error"] = f"cold cache could not be measured ({cold_problem})"
            if r["error"]:
                print(f"  whole{size} {cache} {config}: {r['error']}", file=sys.stderr, flush=True)
                continue
            files = [sdcpp_model] if config.startswith("sdcpp") else model_files(model)
            if cache == "warm":
                gb = read_files(files)
                print(f"  whole{size} warm {config}: read {gb:.1f} GB of model files into the page cache",
                      file=sys.stderr, flush=True)
            rss = []
            for i in range(runs):
                if cache == "cold" and (problem := drop_caches()):
                    r["error"] = f"cold cache could not be measured ({problem})"
                    break
                out_png = out_dir / f"whole{size}-{config}-{cache}-{i}.png"
                out_png.unlink(missing_ok=True)
                cmd = whole_command(config, model, binary, sdcpp, sdcpp_model, size, out_png)
                r["command"] = cmd
                done = run_whole(cmd)
                if done["rc"] != 0 or not out_png.exists():
                    why = f"exit status {done['rc']}" if done["rc"] != 0 else f"no PNG at {out_png}"
                    r["error"] = f"{why}: {done['stderr_tail'][-1500:]}"
                    print(f"  whole{size} {cache} {config}: FAILED ({why}): {error_line(done['stderr_tail'])}\n"
                          f"    stderr tail:\n{done['stderr_tail'][-800:]}", file=sys.stderr, flush=True)
                    break
                r["seconds"].append(done["seconds"])
                rss.append(done["peak_rss_gb"] or 0.0)
                print(f"  whole{size} {cache} {config} run {i + 1}/{runs}: {done['seconds']:.2f} s, "
                      f"{rss[-1]:.2f} GB", file=sys.stderr, flush=True)
            r["runs"] = len(r["seconds"])
            if r["seconds"]:
                r["min_s"], r["median_s"], r["peak_rss_gb"] = min(r["seconds"]), median(r["seconds"]), max(rss)
        base = results[cache].get("diffusers-f32", {}).get("median_s")
        for r in results[cache].values():
            r["ratio"] = r["median_s"] / base if base and r.get("median_s") else None
    return results


def threads_case(configs: list[str], runs: int, model: Path, bench, size: int) -> dict:
    """``threads``: one CFG UNet call under n threads, n = 1, 2, 4, … ≤ the CPU count (and the count itself)."""
    cpus = os.cpu_count() or 1
    counts = sorted({2 ** k for k in range(cpus.bit_length()) if 2 ** k <= cpus} | {cpus})
    results: dict[str, dict[int, dict]] = {c: {} for c in configs}
    for n in counts:
        for config in configs:
            try:
                if config == "diffusers-f32":
                    d = diffusers("unet", model, size, runs, threads=n)
                    r = {"min_s": d["min_s"], "median_s": d["seconds"], "peak_rss_gb": d["peak_rss_gb"],
                         "runs": len(d["all_s"]), "threads_reported": d["torch_threads"]}
                else:
                    env = dict(os.environ, RAYON_NUM_THREADS=str(n))
                    o = ours(bench(), "unet-cfg", model, size, runs, config.split("-", 1)[1], env=env)[0]
                    r = {"min_s": o["min_s"], "median_s": o["median_s"], "peak_rss_gb": o["process_peak_rss_gb"],
                         "runs": o["iters"], "threads_reported": o.get("threads")}
                r["error"] = None
            except (RuntimeError, ValueError, KeyError, IndexError) as e:
                r = {"runs": 0, "error": str(e)[-3000:]}  # the whole tail goes to compare.json
                print(f"  threads {config} n={n}: FAILED: {error_line(r['error'])}", file=sys.stderr, flush=True)
            else:
                print(f"  threads {config} n={n}: median {r['median_s']:.3f} s (threads seen: "
                      f"{r['threads_reported']})", file=sys.stderr, flush=True)
            results[config][n] = r
    for config, by_n in results.items():
        t1 = by_n.get(1, {}).get("median_s")
        for n, r in by_n.items():
            r["efficiency"] = t1 / (n * r["median_s"]) if t1 and r.get("median_s") else None
            base = results.get("diffusers-f32", {}).get(n, {}).get("median_s")
            r["ratio"] = r["median_s"] / base if base and r.get("median_s") else None
    return results


def num(value, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.2f}{suffix}"


def error_line(text: str) -> str:
    """The telling line of a failed child's standard error: a Rust panic's message, a Python exception, the first
    ``[ERROR]`` / ``error:`` line (sd.cpp, clap), else the last line; /usr/bin/time's own lines left out."""
    skip = ("MAXRSS_KB", "Command exited with", "note: ", "stack backtrace", "For more information", "[possible")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip) and not re.match(r"(\d+: |at )", line)]
    for i, line in enumerate(lines):
        if "panicked at" in line and i + 1 < len(lines):
            return lines[i + 1]
    exceptions = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
    if exceptions:
        return exceptions[-1]
    for line in lines:
        if line.startswith(("[ERROR]", "error", "Error")):
            return line
    return lines[-1] if lines else ""


def row_note(runs: int, error: str | None) -> str:
    """A table cell for a config's error: "FAILED: <its telling stderr line>" when it ran and failed."""
    if not error:
        return ""
    last = error_line(error).replace("|", "/")[:200]
    if "could not be measured" in error or "needs --sdcpp" in error:
        return last
    return f"FAILED after {runs} good run(s): {last}" if runs else f"FAILED: {last}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--cases", default="unet256,unet512,unet512bf16,text,vae512,gen1024,startup,sched")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256² UNet, text encoders, startup only, 2 iterations")
    ap.add_argument("--configs", help="whole512 / threads: a comma-separated subset of "
                    f"{','.join(WHOLE_CONFIGS)} (default: all; sdcpp-* only with --sdcpp)")
    ap.add_argument("--runs", type=int, default=3, help="whole512: processes per config; threads: timed calls")
    ap.add_argument("--cache", choices=["warm", "cold", "both"], default="warm", help="whole512's page cache")
    ap.add_argument("--sdcpp", type=Path, help="stable-diffusion.cpp's sd / sd-cli binary (adds the sdcpp-* configs)")
    ap.add_argument("--sdcpp-model", type=Path, help="the single-file checkpoint for sd.cpp (default MODEL.safetensors)")
    ap.add_argument("--binary", type=Path, help="our dreamshaper binary (default: $CARGO_TARGET_DIR or target, "
                    "/release/dreamshaper, built with cargo first)")
    ap.add_argument("--whole-size", type=int, default=512, help="whole512's image side (64 for a plumbing check)")
    ap.add_argument("--threads-size", type=int, default=256, help="threads' image side")
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
    model = model.resolve()
    target_dir = ROOT / os.environ.get("CARGO_TARGET_DIR", "target")  # an absolute CARGO_TARGET_DIR replaces ROOT
    gen_binary = args.binary.resolve() if args.binary else target_dir / "release" / "dreamshaper"
    if args.binary is None:
        subprocess.run(["cargo", "build", "--release", "--bin", "dreamshaper"], cwd=ROOT, check=True)
    elif not gen_binary.exists():
        raise SystemExit(f"--binary {gen_binary}: no such file")
    bench_path: list[Path] = []

    def bench() -> Path:  # built on first use: the whole512 case does not need it
        if not bench_path:
            bench_path.append(bench_binary())
        return bench_path[0]

    sdcpp = args.sdcpp.resolve() if args.sdcpp else None
    sdcpp_model = (args.sdcpp_model or model.with_name(model.name + ".safetensors")).resolve()
    if sdcpp and not sdcpp_model.exists():
        raise SystemExit(f"{sdcpp_model}: no single-file checkpoint (benches/make_full_single_file.py writes it)")
    configs = args.configs.split(",") if args.configs else \
        [c for c in WHOLE_CONFIGS if sdcpp or not c.startswith("sdcpp")]
    unknown = [c for c in configs if c not in WHOLE_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {WHOLE_CONFIGS}")
    caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
    (ROOT / "target" / "bench").mkdir(parents=True, exist_ok=True)
    rows, raw = [], {"model": str(model), "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cases": {},
                     "binary": str(gen_binary), "sdcpp": str(sdcpp) if sdcpp else None,
                     "sdcpp_model": str(sdcpp_model) if sdcpp else None}
    # The whole512 / threads rows: (case, cache, config, runs, min s, median s, peak GB, ratio, efficiency, note).
    runs_rows: list[tuple] = []

    def add(name, metric, theirs, mine, target):
        ratio = mine / theirs if theirs else float("nan")
        rows.append((name, metric, theirs, mine, ratio, target))
        print(f"  {name}: diffusers {theirs:.3f}, ours {mine:.3f} ({ratio:.2f}×)", file=sys.stderr, flush=True)

    for case in cases:
        print(f"case {case} …", file=sys.stderr, flush=True)
        if case.startswith("unet"):
            dtype = next((d for d in ("bf16", "int8") if case.endswith(d)), "f32")
            size = int(case[4:].removesuffix(dtype))
            f32_case = raw["cases"].get(f"unet{size}")
            theirs = f32_case["diffusers"] if f32_case else diffusers("unet", model, size, iters)
            mine = ours(bench(), "unet-cfg", model, size, iters, dtype)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            target = {"bf16": "≤ 0.6×", "int8": ""}.get(dtype, "≤ 1.0×")
            add(f"UNet CFG call {size}², ours {dtype} vs diffusers f32", "s", theirs["seconds"], mine["median_s"],
                target)
            add(f"UNet process peak RSS {size}², ours {dtype}", "GB", theirs["peak_rss_gb"],
                mine["process_peak_rss_gb"], "")
        elif case == "text":
            theirs = diffusers("text", model, 0, iters)
            mine = ours(bench(), "text-encoders", model, 512, iters)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add("text encoders (prompt + negative)", "s", theirs["seconds"], mine["median_s"], "")
        elif case.startswith("vae"):
            size = int(case[3:])
            theirs = diffusers("vae", model, size, iters)
            mine = ours(bench(), "vae-decode", model, size, iters)[0]
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add(f"VAE decode {size}²", "s", theirs["seconds"], mine["median_s"], "")
        elif case.startswith("gen"):
            size = int(case[3:])
            theirs = diffusers("gen", model, size, 1)
            started = time.perf_counter()
            _, rss = run_measured([str(gen_binary), "generate", "--model", str(model),
                                   "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
                                   "--num-inference-steps", "2", "--img-width", str(size), "--img-height", str(size),
                                   "--seed", "0", "--quiet", "-o", str(ROOT / "target" / "bench" / "gen.png")])
            mine = {"seconds": time.perf_counter() - started, "peak_rss_gb": rss}
            raw["cases"][case] = {"diffusers": theirs, "ours": mine}
            add(f"{size}² generation (2 steps) peak RSS", "GB", theirs["peak_rss_gb"], mine["peak_rss_gb"], "≤ 12 GB")
            add(f"{size}² generation (2 steps) wall time", "s", theirs["seconds"], mine["seconds"], "")
        elif case == "startup":
            mine = ours(bench(), "startup", model, 1024, 1)[0]
            raw["cases"][case] = {"ours": mine}
            rows.append(("start-up → first denoising step (ours)", "s", None, mine["median_s"], None, "≤ 2 s"))
        elif case == "sched":
            for row in ours(bench(), "scheduler-step", model, 1024, iters):
                name = row["extra"]["scheduler"]
                raw["cases"].setdefault(case, {})[name] = row
                rows.append((f"scheduler step {name}, 1024² latents (ours)", "ms", None, row["median_s"] * 1e3,
                             None, ""))
        elif case.startswith("whole"):
            size = args.whole_size
            res = whole_case(configs, caches, args.runs, model, gen_binary, sdcpp, sdcpp_model, size)
            raw["cases"][case] = {"size": size, "steps": 3, "guidance": 7.0, "prompt": PROMPT, "negative": NEGATIVE,
                                  "results": res}
            for cache, by_config in res.items():
                for config, r in by_config.items():
                    runs_rows.append((f"whole{size}", cache, config, r["runs"], r.get("min_s"), r.get("median_s"),
                                      r.get("peak_rss_gb"), r.get("ratio"), None, r["error"]))
        elif case == "mem1024":
            # Ours only: peak memory of a whole 1024² generation (1 step, CFG) per selected ours-* dtype.
            for config in [c for c in configs if c.startswith("ours-")]:
                out_png = ROOT / "target" / "bench" / f"mem1024-{config}.png"
                cmd = [str(gen_binary), "generate", "--model", str(model), "--prompt", PROMPT, "--negative-prompt",
                       NEGATIVE, "--num-inference-steps", "1", "--img-width", "1024", "--img-height", "1024",
                       "--seed", "0", "--dtype", config.split("-", 1)[1], "--quiet", "-o", str(out_png)]
                done = run_whole(cmd)
                error = None if done["rc"] == 0 else error_line(done["stderr_tail"])
                raw["cases"].setdefault(case, {})[config] = {**done, "command": cmd, "error": error}
                print(f"  mem1024 {config}: {done['seconds']:.1f} s, {done['peak_rss_gb']} GB {error or ''}",
                      file=sys.stderr, flush=True)
                runs_rows.append(("mem1024 (1 step)", "warm", config, 1 if not error else 0, done["seconds"],
                                  done["seconds"], done["peak_rss_gb"], None, None, error))
        elif case == "threads":
            size = args.threads_size
            res = threads_case([c for c in THREAD_CONFIGS if c in configs], args.runs, model, bench, size)
            raw["cases"][case] = {"size": size, "results": res}
            for config, by_n in res.items():
                for n, r in by_n.items():
                    runs_rows.append((f"threads unet-cfg {size}²", "–", f"{config} n={n}", r["runs"], r.get("min_s"),
                                      r.get("median_s"), r.get("peak_rss_gb"), r.get("ratio"), r.get("efficiency"),
                                      r["error"]))
        else:
            raise SystemExit(f"unknown case {case}")

    print(f"\nmodel: {model}; {raw['cpus']} CPUs; torch threads: default\n")
    if rows:
        print("| case | unit | diffusers | ours | ours / diffusers | target |")
        print("|---|---|---|---|---|---|")
    for name, unit, theirs, mine, ratio, target in rows:
        t = "–" if theirs is None else f"{theirs:.2f}"
        r = "–" if ratio is None else f"{ratio:.2f}×"
        print(f"| {name} | {unit} | {t} | {mine:.2f} | {r} | {target or ''} |")
    if runs_rows:
        print("\nwhole: one process per run (start → exit, wall time); ratio: median / diffusers-f32's median "
              "(threads: ours / diffusers at the same n); efficiency: t1 / (n · tn)\n")
        print("| case | cache | config | runs | min s | median s | peak GB | ratio | efficiency | note |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for case, cache, config, n, lo, mid, peak, ratio, eff, note in runs_rows:
            print(f"| {case} | {cache} | {config} | {n} | {num(lo)} | {num(mid)} | {num(peak)} | "
                  f"{num(ratio, '×')} | {num(eff)} | {row_note(n, note)} |")
    raw["runs_table"] = runs_rows
    out = ROOT / "target" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    raw["table"] = rows
    (out / "compare.json").write_text(json.dumps(raw, indent=2, default=str))


if __name__ == "__main__":
    main()
