#!/usr/bin/env python3
"""Writes tests/fixtures/brownian.json: reference values for src/schedulers/brownian.rs (tests/brownian.rs).

* seed_sequences: numpy.random.SeedSequence(entropy, spawn_key=..., pool_size=...).generate_state(n) for small, large
  (> 2**32, > 2**64) entropies, with and without spawn keys (incl. one wider than 32 bits), as torchsde seeds its
  Brownian tree nodes.
* rounding: Python's round(x, 6) (torchsde's tol=1e-6 quantisation) for exact binary ties and ordinary values.
* randint: torch.randint(0, 2**63 - 1, [], generator=torch.Generator("cpu").manual_seed(seed)), how the scheduler
  draws a noise_sampler_seed from the run's generator when the config has none (diffusers draws it the same way from
  torch's global generator).
* queries: the (sigma, sigma_next) pairs, in order, that diffusers' DPMSolverSDEScheduler (use_karras_sigmas, the
  model's config) asks of its BrownianTreeNoiseSampler in a sampling loop at 1, 2, 7 and 20 steps, with the
  sampler's sigma_min / sigma_max; plus hand-written sets: out of order, reversed (sigma < sigma_next), clamped to
  the interval, and times closer than the tolerance; `failing` holds two such queries that torchsde cannot answer
  (RecursionError).
* samplers: for seeds (0, 1234, one > 2**32, 2**64 - 1; not every combination), sample shapes (1x4x4x6;
  2x3x4x5, not a multiple of 16; 1x3x2x2, under 16 values: torch's scalar normal path) and query sets, the outputs
  of a fresh BrownianTreeNoiseSampler(torch.zeros(shape), sigma_min, sigma_max, seed) called on the queries in
  order: the signed tree increment `w`, the divisor sqrt|sigma_next - sigma| as torch computes it, and the noise
  `w / divisor`, the tensors summarised by their first 4 values, sum and the sum of their float32 bit patterns (an
  exact fingerprint). torch's float32 sqrt (like exp and log) runs Intel MKL's VML on the CPU, which is not always
  correctly rounded: the divisor is stored so that the test can check the increment and the division separately.
* correctly_rounded_runs: the DPM++ SDE scheduler loops of make_scheduler_refs.py (final samples) for a few
  variations and step counts, run with correctly rounded float32 exp/log/expm1/sqrt instead of torch's CPU kernels
  (Intel MKL's VML, Sleef), which are not always correctly rounded: the Brownian tree rounds its query times to
  1e-6, so a 1-ulp difference in a query time (from exp/log) can change a step's noise by ~1e-3. Without MKL in the
  way, the test holds the scheduler to float32 rounding.

Run from the repository root: venv/bin/python scripts/make_brownian_refs.py (see scripts/requirements.txt). It is
deterministic: rerunning it rewrites an identical file.
"""

import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

import diffusers
import numpy as np
import torch
import torchsde
from diffusers.schedulers import scheduling_dpmsolver_sde as sde

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "brownian.json"

sys.path.insert(0, str(ROOT / "scripts"))
import make_scheduler_refs  # noqa: E402
from make_scheduler_refs import BASE, DEIS_ONLY_KEYS, initial_sample, stand_in_model  # noqa: E402

SEEDS = [0, 1234, 2**40 + 12345, 2**64 - 1]
SHAPES = [(1, 4, 4, 6), (2, 3, 4, 5), (1, 3, 2, 2)]
KARRAS_STEPS = [1, 2, 7, 20]


def f32(x):
    """A number as the Python float of its float32 rounding (what `.item()` of a float32 tensor gives)."""
    return float(np.float32(x))


def seed_sequences():
    cases = []
    for entropy in [0, 1, 1234, 2**32, 2**40 + 12345, 2**64 - 1, 2**100 + 7]:
        for spawn_key in [(), (0, 0), (5, 3), (2**33 + 1, 40)]:
            for pool_size in [4, 24]:
                state = np.random.SeedSequence(entropy, spawn_key=spawn_key, pool_size=pool_size).generate_state(9)
                cases.append(
                    {
                        "entropy": str(entropy),
                        "spawn_key": [str(k) for k in spawn_key],
                        "pool_size": pool_size,
                        "state": [int(v) for v in state],
                    }
                )
    return cases


def rounding():
    values = [0.0078125, 0.0234375, 1.5e-7, 2.5e-6, 14.614640235900879, 0.029167532920837402, 7.3251953125]
    values += [float(v) for v in np.random.default_rng(0).uniform(0.0, 20.0, 20)]
    return [{"x": x, "round6": round(x, 6)} for x in values]


def randint():
    out = []
    for seed in [0, 1, 1234, 2**40 + 12345]:
        g = torch.Generator("cpu").manual_seed(seed)
        out.append({"seed": seed, "values": [int(torch.randint(0, 2**63 - 1, [], generator=g).item()) for _ in range(3)]})
    return out


class Recorder(sde.BrownianTreeNoiseSampler):
    """Records what the scheduler asks of its noise sampler."""

    log = None

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x):
        super().__init__(x, sigma_min, sigma_max, seed, transform)
        Recorder.log = {"sigma_min": f32(sigma_min), "sigma_max": f32(sigma_max), "queries": []}

    def __call__(self, sigma, sigma_next):
        Recorder.log["queries"].append([float(sigma), float(sigma_next)])
        return super().__call__(sigma, sigma_next)


def karras_queries(steps):
    config = {k: v for k, v in BASE.items() if k not in DEIS_ONLY_KEYS}
    s = diffusers.DPMSolverSDEScheduler.from_config(config, use_karras_sigmas=True, noise_sampler_seed=1234)
    s.set_timesteps(steps)
    original = sde.BrownianTreeNoiseSampler
    sde.BrownianTreeNoiseSampler = Recorder
    try:
        x = initial_sample() * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(stand_in_model(s.scale_model_input(x, t), t), t, x).prev_sample
    finally:
        sde.BrownianTreeNoiseSampler = original
    return {"name": f"karras_{steps}_steps", **Recorder.log}


def query_sets():
    sets = [karras_queries(steps) for steps in KARRAS_STEPS]
    lo, hi = f32(0.0291675), f32(14.614642)
    arbitrary = [(5.0, 4.9), (hi, lo), (1.0, 2.0), (0.3, 0.2), (2.0, 1.0), (12.0, 0.05), (0.2, 0.3), (4.9, 5.0)]
    sets.append({"name": "out_of_order", "sigma_min": lo, "sigma_max": hi, "queries": arbitrary})
    # Outside [sigma_min, sigma_max] (torchsde clamps and warns), and times closer than its 1e-6 tolerance that it
    # answers (with zeros, or a rounding residue).
    odd = [(20.0, 10.0), (0.01, 0.5), (0.01, 0.02), (0.5, 0.5000002), (7.1, 7.1000004), (hi, hi - 1e-3)]
    sets.append({"name": "clamped_and_close", "sigma_min": lo, "sigma_max": hi, "queries": odd})
    for s in sets:
        s["queries"] = [[f32(a), f32(b)] for a, b in s["queries"]]
    return sets


def failing():
    """Queries closer than the tolerance that torchsde cannot answer (it splits a node into itself until Python's
    recursion limit), each on a fresh sampler."""
    lo, hi = f32(0.0291675), f32(14.614642)
    out = []
    for a, b in [(3.0, 3.0000004), (3.0000004, 3.0)]:
        a, b = f32(a), f32(b)
        sampler = sde.BrownianTreeNoiseSampler(torch.zeros(4), lo, hi, 0)
        try:
            sampler(torch.as_tensor(a), torch.as_tensor(b))
            error = None
        except RecursionError as e:
            error = type(e).__name__
        assert error, "expected torchsde to fail"
        out.append({"sigma_min": lo, "sigma_max": hi, "query": [a, b], "error": error})
    return out


def noise(sampler, sigma, sigma_next):
    """`sampler(sigma, sigma_next)` (identity transform), split in its two parts: the signed tree increment `w` and
    the float32 divisor torch computes for it, `(sigma_next - sigma).abs().sqrt()`, which goes through MKL's vmsSqrt
    and is not always the correctly rounded square root."""
    t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    w = sampler.tree(t0, t1)
    divisor = (t1 - t0).abs().sqrt()
    out = w / divisor
    return {"w": summary(w), "divisor": float(divisor), "noise": summary(out, first=0)}, out


def summary(t, first=4):
    values = t.detach().to(torch.float32).contiguous().numpy().ravel()
    out = {"first": [float(v) for v in values[:first]]} if first else {}
    out["sum"] = math.fsum(float(v) for v in values)
    out["bits_sum"] = int(values.view(np.uint32).astype(np.uint64).sum())
    return out


def sampler_cases(sets):
    cases = []
    for seed in SEEDS:
        for shape in SHAPES:
            for s in sets:
                # Every query set for two of the seeds and the 1x4x4x6 sample; fewer combinations otherwise.
                full = seed in SEEDS[::2] and shape == SHAPES[0]
                if not full and s["name"] not in ("karras_7_steps", "out_of_order"):
                    continue
                if shape != SHAPES[0] and (seed not in SEEDS[:2] or s["name"] != "karras_7_steps"):
                    continue
                sampler = sde.BrownianTreeNoiseSampler(torch.zeros(shape), s["sigma_min"], s["sigma_max"], seed)
                # The same sampler called as diffusers calls it, to check that the split gives its outputs.
                whole = sde.BrownianTreeNoiseSampler(torch.zeros(shape), s["sigma_min"], s["sigma_max"], seed)
                outputs = []
                for a, b in s["queries"]:
                    out, tensor = noise(sampler, a, b)
                    assert torch.equal(tensor, whole(torch.as_tensor(a), torch.as_tensor(b)))
                    outputs.append(out)
                cases.append({"seed": str(seed), "shape": list(shape), "queries": s["name"], "outputs": outputs})
    return cases


# (variation, steps) of the correctly rounded runs, for both DPM++ SDE names.
CR_RUNS = [(v, n) for v in ("dreamshaper", "trailing", "linspace", "v_prediction", "bare") for n in (7, 20)]
CR_RUNS += [("dreamshaper", n) for n in (1, 2, 35, 100)]


@contextlib.contextmanager
def correctly_rounded_math():
    """torch's float32 exp, log, expm1 and sqrt (also `** 0.5`) computed in float64 and rounded once: correctly
    rounded, unlike the CPU kernels (Intel MKL's VML for exp/log/sqrt, Sleef for expm1)."""
    names = ("exp", "log", "expm1", "sqrt", "__pow__")
    saved = {k: getattr(torch.Tensor, k) for k in names}

    def widened(f):
        return lambda self: f(self.double()).to(torch.float32) if self.dtype == torch.float32 else f(self)

    def power(self, e):
        if self.dtype == torch.float32 and isinstance(e, float) and e == 0.5:
            return saved["sqrt"](self.double()).to(torch.float32)
        return saved["__pow__"](self, e)

    try:
        for k in names[:4]:
            setattr(torch.Tensor, k, widened(saved[k]))
        torch.Tensor.__pow__ = power
        yield
    finally:
        for k, f in saved.items():
            setattr(torch.Tensor, k, f)


def correctly_rounded_runs():
    """make_scheduler_refs' stand-in loop for the DPM++ SDE names (their options there: noise_sampler_seed) with
    correctly rounded float32 exp/log/expm1/sqrt. diffusers' DPMSolverSDEScheduler computes its Brownian-tree query
    times with torch's exp and log, which on the CPU are MKL's and not always correctly rounded; torchsde rounds the
    times to 6 decimals, so a 1-ulp difference can move a query across that grid and change the noise by about
    sqrt(1e-6). These runs take MKL out, so the test can hold everything else to float32 rounding."""
    out = []
    with correctly_rounded_math():
        for name in ("DPM++ SDE Karras", "DPM++ SDE"):
            for variation, steps in CR_RUNS:
                case = make_scheduler_refs.run(name, variation, steps)
                out.append({k: case[k] for k in ("name", "variation", "steps")})
                out[-1]["final_sample"] = [float(str(np.float32(v))) for v in case["final_sample"]]
    return out


def main():
    warnings.simplefilter("ignore")  # torchsde warns about the clamped queries
    torch.set_num_threads(1)
    sets = query_sets()
    doc = {
        "description": "diffusers' BrownianTreeNoiseSampler (torchsde BrownianInterval) and numpy SeedSequence "
        "references (see scripts/make_brownian_refs.py)",
        "versions": {
            "diffusers": diffusers.__version__,
            "torch": torch.__version__,
            "torchsde": torchsde.__version__,
            "numpy": np.__version__,
        },
        "seed_sequences": seed_sequences(),
        "rounding": rounding(),
        "randint": randint(),
        "query_sets": sets,
        "samplers": sampler_cases(sets),
        "failing": failing(),
        "correctly_rounded_runs": correctly_rounded_runs(),
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"{len(doc['samplers'])} sampler cases -> {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
