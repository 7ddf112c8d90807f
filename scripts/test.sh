#!/usr/bin/env bash
# Run the whole test suite (unit tests, then end-to-end tests against real vLLM and
# SGLang servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-sglang.sh
exec .venv/bin/python -m pytest -ra --durations=30 "$@"
