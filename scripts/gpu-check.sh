#!/usr/bin/env bash
# The GPU machine's one command: CUDA parity on the tiny model for every scheduler, then full-size timings against
# diffusers (see scripts/gpu_check.py for the stages and BENCHMARKS.md "On a GPU" for the recipe around it).
#
#   scripts/gpu-check.sh [--binary target/release/dreamshaper] [--out DIR] [--dry-run] [--full-model DIR]
#
# Needs only python3's standard library for its own work (PNG decoding, JSON); the diffusers stages need torch and
# diffusers (a pure-Python wheel travels with the tree, see --diffusers-wheel). No network. Every stage runs under its
# own time limit; the whole run is bounded too (9 minutes, or 110 s in a dry run) so a hang cannot eat the GPU budget.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=540
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && limit=110
done
exec timeout --kill-after=10 "$limit" python3 scripts/gpu_check.py "$@"
