"""What both engine adapters share: the per-process :class:`~spec_plugins.adapter.session.
AdapterSession` (per-request records, the guarded proposer, the step timer, committed
hidden states) and the fault guard. Engine-neutral: it imports no engine; the vLLM and
SGLang adapters translate their batches into calls on it."""
