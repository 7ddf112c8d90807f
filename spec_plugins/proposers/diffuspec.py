"""DiffuSpec: a pretrained diffusion LM drafts blocks for the target (method ``diffuspec``).

Training-free: any masked- or block-diffusion LM that shares the target's tokenizer
(``spec_plugins.models.diffusion_lm``: DiffusionGemma through transformers, LLaDA/Dream-
style models through their own code) is shown the committed tokens and a canvas of
``L`` noised positions, and returns a distribution per position: a lattice. The lattice
becomes drafts as for ``dflash`` (``blockdraft.py``: DDTrees for greedy requests, drawn
drafts with their distributions for sampled ones, the block length from recent
acceptance: ADL). Chains (``tree: false``, or requests that need one) come from
causal-consistency path search (CPS, ``lattice.causal_consistency_path``): a diffusion
LM's per-position marginals need not be consistent with each other left to right, so the
chain is the beam-search path that best agrees with a causal bigram model of the
request's own tokens (``cps_weight``; 0 gives the per-position argmax).

The diffusion LM re-reads nothing of the target: it encodes the committed tokens itself
(incrementally, per request, where its architecture allows a cache).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spec_plugins.lattice import causal_consistency_path
from spec_plugins.options import OptionError, opt
from spec_plugins.proposers.base import DraftRequest, ModelInfo
from spec_plugins.proposers.blockdraft import BlockOptions, BlockProposer, BlockState
from spec_plugins.tree import DraftTree


@dataclass(frozen=True)
class DiffuSpecOptions(BlockOptions):
    drafter: str = opt("", help="diffusion LM checkpoint directory (shares the target's "
                                "tokenizer); required")
    steps: int = opt(1, lo=1, hi=64, help="denoising passes per block")
    cps_weight: float = opt(1.0, lo=0.0, hi=100.0,
                            help="weight of the causal bigram score in chain search (0: argmax)")
    cps_beam: int = opt(4, lo=1, hi=64, help="beam width of the chain search")
    trust_remote_code: bool = opt(False, help="allow checkpoints that ship their own model code")


class _State(BlockState):
    def __init__(self, adl):
        super().__init__(adl)
        self.seen = 0                 # tokens counted into the bigram model
        self.bigrams: Counter = Counter()
        self.unigrams: Counter = Counter()


class DiffuSpecProposer(BlockProposer):
    name = "diffuspec"
    Options = DiffuSpecOptions

    def bind(self, model: ModelInfo) -> None:
        from spec_plugins.models.diffusion_lm import DiffusionLMDrafter

        super().bind(model)
        o = self.options
        if not o.drafter:
            raise OptionError("diffuspec.drafter is required: the directory of a diffusion LM "
                              "that shares the served model's tokenizer")
        try:
            drafter = DiffusionLMDrafter.from_pretrained(
                o.drafter, device=model.device, dtype=model.dtype,
                trust_remote_code=o.trust_remote_code)
        except (OSError, ValueError) as e:
            raise OptionError(f"diffuspec.drafter={o.drafter!r} cannot be loaded: {e}") from e
        if drafter.vocab_size < model.vocab_size:
            raise OptionError(f"diffuspec.drafter={o.drafter!r} has a {drafter.vocab_size}-token "
                              f"vocabulary, the served model {model.vocab_size}: they must share "
                              "a tokenizer")
        self.vocab = model.vocab_size
        self.drafter = drafter
        self._set_max_block(drafter.max_block)
        self.logger.info("spec_plugins: diffuspec drafter %s (%s), blocks of %d-%d positions, "
                         "%d denoising pass(es)", o.drafter, drafter.kind, o.min_block,
                         self.max_block, o.steps)

    def finish(self, req_id: str) -> None:
        super().finish(req_id)
        self.drafter.finish(req_id)

    def _new_state(self, req: DraftRequest) -> _State:
        return _State(self._adl())

    def _update(self, st: _State, req: DraftRequest, extra) -> _State:
        toks = req.token_ids
        if len(toks) < st.seen:
            st = self._new_state(req)
        new = [int(t) for t in toks[max(st.seen - 1, 0):]]
        st.bigrams.update(zip(new, new[1:]))
        st.unigrams.update(new[:-1])
        st.seen = len(toks)
        return st

    def _lattice(self, reqs: Sequence[DraftRequest], states, length: int) -> torch.Tensor:
        logits = self.drafter.lattice([(r.req_id, r.token_ids.tolist()) for r in reqs], length,
                                      steps=self.options.steps)
        return logits[..., :self.vocab]            # the target's vocabulary

    def _chain(self, req: DraftRequest, ids: np.ndarray, probs: np.ndarray) -> DraftTree | None:
        o = self.options
        if o.cps_weight == 0:
            return None
        st: _State = self._requests[req.req_id]
        last = int(req.token_ids[-1])

        def causal(prefix, x):
            prev = prefix[-1] if prefix else last
            return math.log((st.bigrams[(prev, x)] + 0.1) / (st.unigrams[prev] + 0.1 * self.vocab))

        path = causal_consistency_path(ids, probs, causal, beam=o.cps_beam, weight=o.cps_weight)
        pos = {(d, int(t)): float(p) for d in range(len(ids)) for t, p in zip(ids[d], probs[d])}
        return DraftTree.chain(path, [pos[(d, t)] for d, t in enumerate(path)])
