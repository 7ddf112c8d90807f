"""The target model as a drafter: vLLM's own decoder layers, run on a subset.

Self-speculative methods (``spec_plugins.proposers.swift``, ``.del_exit``) draft with
the target's weights: :class:`VllmTargetModel` is the ``StepContext.target_model``
handle the vLLM adapter gives them. It calls the loaded model's modules one decoder
layer at a time (embedding, the chosen layers, final norm, LM head), in eager mode,
with attention through vLLM's CPU kernel and forward context, so every architecture
whose layers have the ``layer(positions, hidden, residual)`` form of vLLM's
Llama/Qwen/Mistral implementations works and no weight is copied.

Which KV the draft reads and writes. A request's committed tokens, except the last
one, have exact target KV in its blocks. A draft token at position ``p`` reads that
context plus the draft's own KV at positions ``len-1 .. p`` and writes its KV at
``p``'s slot, in the layers it runs. Those slots lie beyond the request's computed
tokens, inside blocks the scheduler already allocated to it alone (a block is shared
or hashed for prefix caching only when its tokens are computed). The verify pass
writes every position it scores before any attention reads it, so the target never
sees draft KV: the cache it verifies against is a non-speculative run's. Positions in
blocks not yet allocated cannot be drafted: :meth:`room` says how far a request can go.
"""

from __future__ import annotations

from typing import Sequence

import torch

from spec_plugins.vllm.version import logger


def language_model(model):
    """The decoder stack of ``model`` (``layers``, ``embed_tokens``, ``norm``): a VLM's
    language model (vLLM's ``get_language_model``), else ``model.model``."""
    from vllm.model_executor.models.interfaces import supports_multimodal

    lm = model.get_language_model() if supports_multimodal(model) else model
    return lm if hasattr(lm, "layers") else getattr(lm, "model", None)


def _attention_name(layer) -> str:
    from vllm.model_executor.layers.attention.attention import Attention

    names = [m.layer_name for m in layer.modules() if isinstance(m, Attention)]
    if len(names) != 1:
        raise NotImplementedError(
            f"spec_plugins layer-skip drafting needs one attention module per decoder "
            f"layer; {type(layer).__name__} has {len(names)}")
    return names[0]


class VllmTargetModel:
    """``spec_plugins.proposers.base.TargetModel`` over a vLLM model runner."""

    def __init__(self, model, vllm_config):
        inner = language_model(model)   # a VLM's language model: image KV is the target's
        layers = getattr(inner, "layers", None)
        if (layers is None or not hasattr(inner, "embed_input_ids")
                or not hasattr(inner, "norm") or not hasattr(model, "compute_logits")):
            raise NotImplementedError(
                f"spec_plugins layer-skip drafting supports decoder-only models laid out "
                f"like vLLM's Llama/Qwen (model.layers, model.norm, compute_logits); "
                f"got {type(model).__name__}")
        if (getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(layers))) \
                != (0, len(layers)):
            raise NotImplementedError("spec_plugins layer-skip drafting does not support "
                                      "pipeline parallelism")
        self.model, self.inner, self.layers = model, inner, list(layers)
        self.names = [_attention_name(layer) for layer in self.layers]
        self.num_layers = len(self.layers)
        self.vllm_config = vllm_config
        self._builder = None
        self._rows: dict[str, int] = {}
        self._valid: dict[str, int] = {}

    def bind(self, runner, rows: dict[str, int]) -> None:
        """Start a drafting step over the runner's batch; ``rows`` maps the requests to
        draft for to their input-batch rows."""
        if self._builder is None:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

            groups = runner.attn_groups
            if len(groups) != 1 or len(groups[0]) != 1:
                raise NotImplementedError("spec_plugins layer-skip drafting needs a model "
                                          "with one KV-cache group")
            builder = groups[0][0].get_metadata_builder()
            if not isinstance(builder, CPUAttentionMetadataBuilder):
                raise NotImplementedError(
                    f"spec_plugins layer-skip drafting runs on vLLM's CPU attention "
                    f"backend; this engine uses {type(builder).__name__}")
            self._builder = builder
            logger.info("spec_plugins: layer-skip drafter bound to %s (%d layers)",
                        type(self.model).__name__, self.num_layers)
        table = runner.input_batch.block_table[0]
        self._table, self._nblocks = table.block_table.cpu, table.num_blocks_per_row
        self._rows = rows
        self._valid = {r: int(runner.input_batch.num_tokens_no_spec[i]) - 1
                       for r, i in rows.items()}

    def room(self, req_id: str) -> int:
        """Tokens :meth:`draft_forward` can run for the request in this step."""
        row = self._rows[req_id]
        return int(self._nblocks[row]) * self._builder.block_size - self._valid[req_id]

    @torch.inference_mode()
    def draft_forward(self, req_ids: Sequence[str], token_ids: Sequence[int],
                      positions: Sequence[int], layers: Sequence[int],
                      exits: Sequence[int] = ()) -> list[torch.Tensor]:
        from vllm.forward_context import set_forward_context

        from spec_plugins.vllm.attention import cpu_metadata

        bs = self._builder.block_size
        rows = torch.tensor([self._rows[r] for r in req_ids], dtype=torch.long)
        pos = torch.tensor(positions, dtype=torch.long)
        for r, p in zip(req_ids, positions):
            lo = self._valid[r]
            hi = lo + self.room(r)
            if not lo <= p < hi:
                raise ValueError(f"draft position {p} of request {r!r} is outside [{lo}, {hi})")
        table = self._table.index_select(0, rows)
        slots = table.gather(1, (pos // bs).unsqueeze(1)).squeeze(1).long() * bs + pos % bs
        n = len(req_ids)
        md = cpu_metadata(self._builder, torch.arange(n + 1, dtype=torch.int32), 1,
                          (pos + 1).to(torch.int32), table, slots)
        used = [self.names[i] for i in layers]
        out = []
        with set_forward_context({name: md for name in used}, self.vllm_config,
                                 num_tokens=n, slot_mapping={name: slots for name in used}):
            hidden = self.inner.embed_input_ids(torch.tensor(token_ids, dtype=torch.long))
            residual = None
            exits = set(exits)
            for count, i in enumerate(layers):
                if count in exits:
                    out.append(self._logits(hidden, residual))
                hidden, residual = self.layers[i](pos, hidden, residual)
        out.append(self._logits(hidden, residual))
        return out

    def _logits(self, hidden, residual) -> torch.Tensor:
        if residual is None:
            normed = self.inner.norm(hidden)
        else:
            normed, _ = self.inner.norm(hidden.clone(), residual.clone())
        return self.model.compute_logits(normed)
