#!/usr/bin/env bash
# Fresh machine to a working server: install, build the default model, start
# `vllm serve` with the spec_plugins suffix method, send one chat request, and print
# the answer and vLLM's speculative-decoding acceptance figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m integration.demo "$@"
