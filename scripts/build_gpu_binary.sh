#!/usr/bin/env bash
# Builds the CUDA test binary (actors/tests/cuda.rs, with gpu_bench) for scripts/gpu_check.sh, on a machine
# with cargo but no GPU (docs: ../shared/docs/gpu.md "Recipes" 2): nvcc 13.0 from PyPI wheels, link-time
# stand-ins for the CUDA libraries, a release build, stripped and xz-compressed into .gpu/ (git-ignored).
# ~10 min on 2 cores; the binary cannot start here (it needs libcuda at load time).
set -euo pipefail
cd "$(dirname "$0")/.."
P=${CUDA_WHEELS:-$PWD/.gpu/cuda13}
C=$P/nvidia/cu13
if [ ! -x "$C/bin/nvcc" ]; then
    mkdir -p "$P/dl"
    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
        -d "$P/dl" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    for w in "$P"/dl/*.whl; do unzip -qo "$w" -d "$P"; done
    chmod +x "$C"/bin/* "$C"/nvvm/bin/* 2>/dev/null || true
    ln -sf libcudart.so.13 "$C/lib/libcudart.so"
fi
CUDARC=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.10 | head -1)
[ -d "$C/lib/stubs" ] || ../shared/tools/cuda/gen_cuda_stubs.sh "$CUDARC" "$C/lib/stubs"
export PATH=$C/bin:$PATH CUDA_HOME=$C CUDA_ROOT=$C CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS=2 \
    CUDARC_CUDA_VERSION=13000 RUSTFLAGS="-L $C/lib/stubs -L $C/lib" CARGO_TARGET_DIR=target/cuda-build
OUTPUT=$(cargo test --release --features cuda -p r1v2-actors --test cuda --no-run --message-format=json \
    | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
mkdir -p .gpu
cp "$OUTPUT" .gpu/cuda-tests && strip .gpu/cuda-tests && xz -9 -f .gpu/cuda-tests
echo "$PWD" > .gpu/build_root
ls -l .gpu/cuda-tests.xz
