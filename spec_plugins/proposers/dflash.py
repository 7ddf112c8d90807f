"""DFlash block drafting with DDTree draft trees (method ``dflash``).

A small non-causal drafter (``spec_plugins.models.dflash``, vLLM's ``dflash`` checkpoint
format, so drafters published for vLLM load unchanged) reads the target's hidden states at
the committed tokens and drafts a block of ``L`` positions in ONE forward pass: the last
committed token, then mask slots, each slot's output a distribution over the token at its
position. What is done with that lattice (DDTrees for greedy requests, drawn drafts with
their distributions for sampled ones, adaptive block length) is ``blockdraft.py``'s.

The drafter's context K/V is its own per-request state: it grows by the hidden states the
adapter hands over for every committed token (prefill chunks, then per step the accepted
tokens); a request that leaves the engine (finished, aborted, preempted) drops it, and a
resumed request rebuilds it from its recomputed prefill. Tokens an engine serves from
its prefix cache have no hidden states (the target did not run on them): the drafter
keeps the context K/V of recent prompts (:class:`PromptContextCache`) and gives such a
request the cached rows of the same prefix; without a match the context lacks them
(drafts get worse, outputs do not change).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spec_plugins.models.vision import complete_spans
from spec_plugins.options import OptionError, opt
from spec_plugins.paths import drafter_dir
from spec_plugins.proposers.base import DraftRequest, ModelInfo
from spec_plugins.proposers.blockdraft import BlockOptions, BlockProposer, BlockState


@dataclass(frozen=True)
class DFlashOptions(BlockOptions):
    drafter: str = opt("", help="DFlash drafter checkpoint directory (vLLM's dflash format); "
                                "empty: the one spec-plugins-train-drafter built for the "
                                "served model")
    dtype: str = opt("auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="drafter weights' dtype (auto: the target's, bfloat16 for a "
                          "float32 target on a CPU with native bf16)")


class _State(BlockState):
    def __init__(self, adl, context):
        super().__init__(adl)
        self.context = context      # DFlashContext: the drafter's K/V of the committed tokens
        self.end = 0                # position after the last token whose state came
        self.gap = False            # the context lacks rows (prefix-cache miss)
        self.cached = False         # its prompt's context is in the PromptContextCache
        # Vision adaptor: states of an image span a prefill chunk cut (whole spans only
        # enter the context), and the mean global feature of the spans in the context.
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.image_global: torch.Tensor | None = None
        self.num_images = 0


class PromptContextCache:
    """Context K/V ``[L, n, nkv, hd]`` of recent prompts, least recently used first out,
    at most ``max_tokens`` rows in all: what a request whose prompt prefix the engine
    served from its prefix cache (positions ``0..p0-1`` without hidden states) needs."""

    def __init__(self, max_tokens: int = 16384):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, tuple[np.ndarray, torch.Tensor, torch.Tensor]] = (
            OrderedDict())
        self.tokens = 0

    def store(self, tokens: np.ndarray, k: torch.Tensor, v: torch.Tensor) -> None:
        n = len(tokens)
        if n == 0 or n > self.max_tokens:
            return
        key = hash(tokens.tobytes())
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        self.entries[key] = (tokens.copy(), k.clone(), v.clone())
        self.tokens += n
        while self.tokens > self.max_tokens:
            _, (old, _, _) = self.entries.popitem(last=False)
            self.tokens -= len(old)

    def lookup(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K/V of ``tokens`` (a prefix of some stored prompt), or None."""
        n = len(tokens)
        for key, (stored, k, v) in reversed(self.entries.items()):
            if len(stored) >= n and np.array_equal(stored[:n], tokens):
                self.entries.move_to_end(key)
                return k[:, :n], v[:, :n]
        return None


class DFlashProposer(BlockProposer):
    name = "dflash"
    needs = frozenset({"hidden_states"})
    Options = DFlashOptions

    def bind(self, model: ModelInfo) -> None:
        from spec_plugins.models import drafter_dtype
        from spec_plugins.models.dflash import DFlashDrafter

        super().bind(model)
        o = self.options
        path = Path(o.drafter) if o.drafter else drafter_dir(model.model_path)
        if not (path / "config.json").is_file():
            how = ("" if o.drafter else
                   f"; build one for this model with: spec-plugins-train-drafter --model "
                   f"{model.model_path}")
            raise OptionError(f"dflash.drafter={str(path)!r} is not a DFlash checkpoint "
                              f"directory (no config.json){how}")
        dtype = drafter_dtype(o.dtype, model.dtype, model.device)
        try:
            drafter = DFlashDrafter.from_pretrained(
                path, device=model.device, dtype=dtype, embed_tokens=model.embed_tokens,
                lm_head_weight=model.lm_head_weight)
        except ValueError as e:
            raise OptionError(f"dflash.drafter={str(path)!r}: {e}") from e
        c = drafter.config
        layers = tuple(sorted(c.target_layer_ids))
        bad = [i for i in layers if not 0 <= i < model.num_layers]
        if bad:
            raise OptionError(f"dflash.drafter={str(path)!r} reads target layers {bad}, but the "
                              f"served model has layers 0..{model.num_layers - 1}")
        if c.fc_in_features != len(layers) * model.hidden_size:
            raise OptionError(
                f"dflash.drafter={str(path)!r} expects {c.fc_in_features} target features "
                f"({len(layers)} layers), the served model gives "
                f"{len(layers) * model.hidden_size} (hidden size {model.hidden_size})")
        if c.embedding_width not in (0, model.hidden_size):
            raise OptionError(
                f"dflash.drafter={str(path)!r}: its msd vision adaptor reads {c.embedding_width}-"
                f"wide input embeddings, the served model's are {model.hidden_size} wide")
        if c.vocab_size != model.vocab_size:
            raise OptionError(f"dflash.drafter={str(path)!r} has a {c.vocab_size}-token "
                              f"vocabulary, the served model {model.vocab_size}")
        self._set_max_block(max(int(c.block_size) - 1, 1))
        self.model = drafter.eval()
        self.prompt_cache = PromptContextCache()
        # The msd vision adaptor also reads the target's input embeddings (layer -1).
        self.hidden_layers = ((-1,) if c.vision and c.vision.reads_embeddings else ()) + layers
        self._placeholder_ids = torch.tensor(sorted(model.placeholder_token_ids), dtype=torch.long)
        if c.vision is not None and not model.placeholder_token_ids:
            self.logger.warning("spec_plugins: dflash drafter %s has a vision adaptor, but the "
                                "served model %s has no image placeholder tokens: it drafts "
                                "as a text drafter", path, model.model_path)
        self.logger.info("spec_plugins: dflash drafter %s: %s; blocks of %d-%d positions, "
                         "target layers %s", path, drafter.describe(), o.min_block,
                         self.max_block, list(self.hidden_layers))

    def _new_state(self, req: DraftRequest) -> _State:
        return _State(self._adl(), self.model.new_context())

    def _update(self, st: _State, req: DraftRequest, states) -> _State:
        if states is None or not len(states.positions):
            return st
        p0 = int(states.positions[0])
        if p0 < st.end:
            st = self._new_state(req)   # recomputed from an earlier position: start over
        if st.end == 0 and p0 > 0:
            # The engine served positions 0..p0-1 from its prefix cache.
            hit = self.prompt_cache.lookup(np.asarray(req.token_ids[:p0]))
            if hit is not None:
                st.context.append_kv(*hit)
            else:
                st.gap = True
        self._append(st, req, states.states, states.positions.to(st.context.k.device))
        st.end = int(states.positions[-1]) + 1
        if not st.cached and not st.gap and st.end >= req.num_prompt_tokens:
            # A whole prompt from position 0: keep it for requests that share a prefix.
            st.cached = True
            # Up to the first image placeholder: the ids there are the same for every
            # image, and a later prompt with the same ids may carry another image.
            n = self._shareable_prefix(req.token_ids[:req.num_prompt_tokens])
            ctx = st.context
            self.prompt_cache.store(np.asarray(req.token_ids[:n]),
                                    ctx.k[:, :, :n].transpose(1, 2), ctx.v[:, :, :n].transpose(1, 2))
        return st

    def _append(self, st: _State, req: DraftRequest, states: torch.Tensor,
                positions: torch.Tensor) -> None:
        """Add the states ``[n, F]`` at ``positions [n]`` (consecutive) to the context;
        with a vision adaptor, image spans go through it, whole (models/vision.py)."""
        if self.model.vision is None or not len(self._placeholder_ids):
            st.context.append(states, positions)
            return
        if st.pending is not None:
            states = torch.cat((st.pending[0], states))
            positions = torch.cat((st.pending[1], positions))
            st.pending = None
        p0, n = int(positions[0]), len(positions)
        ids = torch.as_tensor(np.asarray(req.token_ids[p0:p0 + n + 1], dtype=np.int64))
        is_image = torch.isin(ids, self._placeholder_ids)
        image = is_image[:n].to(positions.device)
        keep = n
        if self.model.config.vision.style == "vispec":
            keep = complete_spans(image, next_is_text=len(ids) > n and not bool(is_image[n]))
        if keep < n:
            st.pending = (states[keep:], positions[keep:])
        if keep:
            with torch.no_grad():
                h, pos, _, glob = self.model.encode_context(states[:keep], positions[:keep],
                                                            image[:keep])
            st.context.append_rows(h, pos)
            if glob is not None:
                total = glob[0].sum(0) + (st.image_global * st.num_images
                                          if st.num_images else 0)
                st.num_images += len(glob[0])
                st.image_global = total / st.num_images

    def _can_draft(self, st: _State) -> bool:
        return len(st.context) > 0

    def _lattice(self, reqs: Sequence[DraftRequest], states: Sequence[_State],
                 length: int) -> torch.Tensor:
        dev = states[0].context.k.device
        first = torch.tensor([int(r.token_ids[-1]) for r in reqs], device=dev)
        pos = torch.tensor([len(r.token_ids) - 1 for r in reqs], device=dev)
        glob = None
        if any(s.num_images for s in states):
            H = self.model.config.hidden_size
            glob = torch.stack([s.image_global if s.num_images else torch.zeros(H, device=dev)
                                for s in states])
        return self.model.draft_block([s.context for s in states], first, pos, length,
                                      image_global=glob)

    def _to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.draft_to_target(ids)

    def _to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.to_target_logits(logits)
