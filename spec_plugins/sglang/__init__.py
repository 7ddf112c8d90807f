"""SGLang adapter (planned): a ``sglang.srt.plugins`` entry point registering each method
with ``SpeculativeAlgorithm.register`` and a speculative worker that drives the same
``spec_plugins.proposers`` interface the vLLM adapter drives."""
