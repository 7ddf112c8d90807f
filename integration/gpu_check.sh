#!/usr/bin/env bash
# One prepared run on a lent GPU machine (issue 23): installs the carried wheels, runs the
# kernel tests compiled on CUDA (Triton tree attention; FlashInfer's shapes when flashinfer
# imports), then the per-layer microbenchmark (integration/bench_gpu_tree_attention.py).
# Everything it writes is under $OUT: nvidia-smi.txt, env.txt, tests.txt, bench.txt,
# tree_attention_gpu.json (+ .png when matplotlib is carried). Aims to finish in ~6 min
# on an H100/H200, FlashInfer's first-use JIT build included (the tests build the one FA2
# prefill module, bf16 / head_dim 128, that the benchmark reuses).
#
# The GPU machine has torch, Triton and nvcc but no network, flashinfer, vLLM or SGLang.
# Before the session that has a GPU, fetch the wheels on the CPU machine into .whl/
# (ignored by git; pass it in `carry`). FlashInfer (~62 MB, pure Python + JIT sources):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl flashinfer-python==0.7.2.post1
#
# Its dependencies (flashinfer's requirements.txt): torch and numpy are on the machine;
# `import flashinfer` and the prefill JIT need at least apache-tvm-ffi (<0.2, the FFI of
# the JIT modules), ninja (the build tool; its wheel puts the binary in /tmp/site/bin),
# einops, nvidia-ml-py, packaging, requests, tabulate, tqdm, click; cuda-python,
# nvidia-cudnn-frontend, nvidia-cutlass-dsl, cuda-tile and nccl4py are for other kernels
# (check whether 0.7.2.post1 imports them at top level: unpack the wheel and grep its
# flashinfer/__init__.py imports before spending device time). Same command with each
# name instead of flashinfer-python (and --no-deps: torch must not be pulled in). pytest
# (+ pluggy, iniconfig) if the machine lacks it; matplotlib (+ contourpy, cycler,
# fonttools, kiwisolver, pillow, pyparsing, python-dateutil, six) for the plot, else
# redraw it here with `bench_gpu_tree_attention.py --plot tree_attention_gpu.json`.
#
# Run it (device tool): command "bash integration/gpu_check.sh", carry [".whl"],
# timeout_s ~540. Without .whl/ it still runs the Triton tests and benchmark paths.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        2>&1 | tail -5
fi
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
export MAX_JOBS=${MAX_JOBS:-16}
# FlashInfer's JIT builds for this GPU's architecture only (e.g. 9.0a on Hopper).
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-$(python3 -c \
    'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}" + ("a" if M >= 9 else ""))')}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{
    python3 --version
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    which nvcc ninja
    nvcc --version | tail -2
    python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -3
    python3 -c 'import pytest; print("pytest", pytest.__version__)' 2>&1 | tail -1
    echo "FLASHINFER_CUDA_ARCH_LIST=$FLASHINFER_CUDA_ARCH_LIST"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The interpreter case (test_cases_through_interpreter) is CI's; here the cases run
# compiled on CUDA. FlashInfer tests skip with a reason when it does not import.
echo "== tests ($(elapsed) s)"
timeout 270 python3 -m pytest -q -rs -p no:cacheprovider \
    tests/kernels/test_triton_tree.py tests/kernels/test_flashinfer_plan.py \
    -k "not through_interpreter" 2>&1 | tee "$OUT/tests.txt" | tail -30
echo "tests rc=${PIPESTATUS[0]}"

echo "== benchmark ($(elapsed) s)"
left=$(( 480 - $(elapsed) ))
budget=$(( left > 120 ? left - 60 : 60 ))
timeout $(( budget + 60 )) python3 integration/bench_gpu_tree_attention.py --out "$OUT" \
    --budget-s "$budget" 2>&1 | tee "$OUT/bench.txt" | tail -40
echo "benchmark rc=${PIPESTATUS[0]} total $(elapsed) s"
