#!/usr/bin/env bash
# One call on a GPU machine without cargo (README "GPUs"): the CUDA tests, r1v2's GPU benchmark and PyTorch +
# transformers beside it, everything written under $OUT (default .gpu/out).
#
#   scripts/gpu_check.sh            # on the GPU machine, in the repo root
#
# Needs .gpu/cuda-tests.xz and .gpu/build_root, made here by scripts/build_gpu_binary.sh and carried (.gpu is
# git-ignored: name it in the device tool's `carry`). The test binary finds the fixtures under the path it was
# built at, so that path is linked to this checkout first.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/.gpu/out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1

echo "== machine"
nvidia-smi || echo "nvidia-smi failed"
PY=${PYTHON:-python3}
SITE=$($PY -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
for dir in "$SITE"/nvidia/*/lib /usr/local/cuda/lib64; do
    [ -d "$dir" ] && LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldconfig -p | grep -E 'libcuda\.so|cublas|nccl|curand' || true
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())' \
    || echo "no torch"
nvcc --version 2>/dev/null | tail -2

BIN=.gpu/cuda-tests
if [ ! -f .gpu/cuda-tests.xz ]; then
    echo "missing .gpu/cuda-tests.xz: run scripts/build_gpu_binary.sh where cargo is, and carry .gpu"
    exit 2
fi
xz -dkf .gpu/cuda-tests.xz && chmod +x "$BIN"
ROOT=$(cat .gpu/build_root)
if [ "$ROOT" != "$REPO" ]; then
    # The fixtures' compiled-in paths: <build root>/actors/../tests/fixtures/...
    mkdir -p "$ROOT"
    ln -sfn "$REPO/actors" "$ROOT/actors"
    ln -sfn "$REPO/tests" "$ROOT/tests"
fi

echo "== CUDA tests (ops, one GRPO update, NCCL) against the CPU"
"$BIN" --test-threads=1 --nocapture
TESTS=$?
echo "== r1v2 GPU benchmark"
"$BIN" --ignored gpu_bench --nocapture --test-threads=1
BENCH=$?
echo "== PyTorch + transformers, same shapes"
$PY benches/gpu/torch_bench.py
TORCH=$?
echo "== summary"
grep '^BENCH' "$LOG" | sort -k2 || true
echo "tests rc=$TESTS bench rc=$BENCH torch rc=$TORCH"
exit $((TESTS | BENCH))
