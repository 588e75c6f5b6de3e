#!/usr/bin/env bash
# Builds, on a machine with no GPU and no system CUDA, the release binary with `--features cuda` that runs on the GPU
# machine (H200, driver 580 = CUDA 13.0, torch 2.11's CUDA 13 wheels, no Rust, no network).
#
#   scripts/build-cuda-release.sh [--cudnn]      # binary: $CARGO_TARGET_DIR/release/dreamshaper (default target/)
#
# How (see ../shared/notes/cuda-build.md and .ci/cuda-check):
# - nvcc, headers and the libraries candle links (cudarc's `dynamic-linking`: libcuda, libcublas, libcublasLt,
#   libcurand, libnvrtc; libcudnn with --cudnn) come from PyPI wheels of CUDA 13.0, into target/cuda-release-venv.
#   13.0, not CI's 13.2: candle-kernels' PTX is JIT-compiled by the driver, and driver 580 (CUDA 13.0) refuses PTX
#   from a newer nvcc (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
# - libcuda.so.1 is the driver's and exists only on the GPU machine: the link uses a stub, the toolkit's
#   lib/stubs/libcuda.so where a wheel ships one, else one made here: an empty C function for each driver entry point
#   cudarc declares, soname libcuda.so.1 (at load time the real driver library resolves them).
# - CUDA_COMPUTE_CAP=90 (H200, Hopper): kernels are built for sm_90.
# - No RPATH is set: on the GPU machine the libraries are torch's wheels', found with
#     export LD_LIBRARY_PATH=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
#   (the sonames are the same: libcublas.so.13, libcublasLt.so.13, libnvrtc.so.13, libcurand.so.10, libcudnn.so.9);
#   scripts/gpu-check.sh's recipe in BENCHMARKS.md does this. `ldd` here, printed at the end, shows what must be found.
set -euo pipefail
cd "$(dirname "$0")/.."
cudnn=0
[ "${1:-}" = "--cudnn" ] && cudnn=1
venv=target/cuda-release-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
packages=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.88 nvidia-cuda-nvrtc==13.0.88 "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*")
[ "$cudnn" = 1 ] && packages+=("nvidia-cudnn-cu13==9.*")
echo "build-cuda-release: installing ${packages[*]}"
"$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
cu=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cu/bin/nvcc" ] || { echo "build-cuda-release: no nvcc under $cu" >&2; exit 1; }

# Unversioned names for the linker (wheels ship only libX.so.N).
links=target/cuda-release-link
mkdir -p "$links"
for lib in "$cu"/lib/lib*.so.* "$cu"/lib/stubs/lib*.so; do
    [ -e "$lib" ] || continue
    base=$(basename "$lib")
    ln -sf "$lib" "$links/${base%%.so*}.so"
done
if [ ! -e "$links/libcuda.so" ]; then
    # One empty function per driver entry point cudarc declares (its src/driver/sys/mod.rs): enough for the linker.
    cudarc=$(cargo metadata --format-version 1 --features cuda \
        --filter-platform "$(rustc -vV | sed -n "s/host: //p")" | python3 -c 'import json, sys, os
print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
    grep -o "pub unsafe fn cu[A-Za-z0-9_]*" "$cudarc/src/driver/sys/mod.rs" | sort -u \
        | sed 's/pub unsafe fn \(.*\)/void \1(void) {}/' >"$links/libcuda-stub.c"
    echo "build-cuda-release: no libcuda stub in the wheels; made one of $(wc -l <"$links/libcuda-stub.c") driver" \
        "functions (soname libcuda.so.1)"
    cc -shared -fPIC "$links/libcuda-stub.c" -o "$links/libcuda.so" -Wl,-soname,libcuda.so.1
fi

export PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_TOOLKIT_ROOT_DIR="$cu"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$(pwd)/$links${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$(pwd)/$links"
features=cuda
[ "$cudnn" = 1 ] && features=cudnn
echo "build-cuda-release: $(nvcc --version | tail -1); compute capability $CUDA_COMPUTE_CAP; --features $features"
cargo build --release --features "$features" --bin dreamshaper
binary="${CARGO_TARGET_DIR:-target}/release/dreamshaper"
echo "build-cuda-release: $binary: $(stat -c %s "$binary") bytes"
# Over the 64 MiB that may travel even stripped (candle's PTX is most of it, as text): it travels gzipped.
strip -o "$binary.stripped" "$binary"
gzip -9 -c "$binary.stripped" >"$binary.gz"
echo "build-cuda-release: stripped $(stat -c %s "$binary.stripped") bytes; to carry: $binary.gz," \
    "$(stat -c %s "$binary.gz") bytes (there: gunzip -c dreamshaper.gz >dreamshaper && chmod +x dreamshaper)"
echo "build-cuda-release: needs glibc $(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)" \
    "and $(objdump -T "$binary" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)"
echo "build-cuda-release: ldd (libcuda.so.1 is the driver's, not found here; the rest are torch's wheels there):"
LD_LIBRARY_PATH="$cu/lib" ldd "$binary" || true
# The binary loads and runs on the CPU with the stub standing in for the driver (no CUDA call is made).
ln -sf libcuda.so "$links/libcuda.so.1"
LD_LIBRARY_PATH="$links:$cu/lib" "$binary" generate --model models/tiny-sdxl --prompt "a red fox" --device cpu \
    --num-inference-steps 2 --img-width 64 --img-height 64 -q -o "${CARGO_TARGET_DIR:-target}/cuda-binary-cpu-smoke.png"
echo "build-cuda-release: ok (a CPU generation with the CUDA binary and the libcuda stub)"
