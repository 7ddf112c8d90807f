#!/usr/bin/env bash
# Run the whole test suite (unit tests, then end-to-end tests against real vLLM and
# SGLang servers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-sglang.sh
# Two workers, one per core, a module at a time (integration/conftest.py pins each
# worker's servers to its core and builds the shared fixtures once); `-n 0` runs serially.
exec .venv/bin/python -m pytest -ra --durations=30 -n "$(( $(nproc) < 2 ? 1 : 2 ))" \
  --dist loadfile --no-loadscope-reorder "$@"
