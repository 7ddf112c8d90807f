"""spec_plugins: speculative-decoding methods for stock vLLM and SGLang.

This package's top level is the engine-agnostic core (draft trees, verifiers, method
options); ``spec_plugins.proposers`` holds the drafting methods, ``spec_plugins.kernels``
tree attention, and ``spec_plugins.vllm`` / ``spec_plugins.sglang`` the engine adapters.
Nothing here imports an engine.
"""

__version__ = "0.1.0"
