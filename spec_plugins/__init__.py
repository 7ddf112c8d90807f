"""spec_plugins: speculative-decoding methods for stock vLLM and SGLang.

This package's top level is the engine-agnostic core (draft trees, verifiers, method
options); ``spec_plugins.proposers`` holds the drafting methods, ``spec_plugins.kernels``
tree attention, ``spec_plugins.vllm`` / ``spec_plugins.sglang`` the engine adapters and
``spec_plugins.tools`` the commands (default model, drafter trainer). Nothing here imports
an engine (tests/test_layering.py checks the layers).
"""

__version__ = "0.1.0"
