"""The proposer interface every drafting method implements, whatever the engine.

An engine adapter (``spec_plugins.vllm``, ``spec_plugins.sglang``) owns the batch; once
per decoding step it hands the proposer one :class:`DraftRequest` per running request
and gets back one :class:`~spec_plugins.tree.DraftTree` per request (empty = do not
speculate for it this step). The proposer never sees engine objects, so the same class
serves vLLM's model runner and SGLang's speculative worker.

What a method may need, declared in :attr:`Proposer.needs`, and what the adapter then
supplies through :class:`StepContext`:

- nothing (model-free drafters: suffix trees, n-grams, token recycling): token ids only;
- ``"target_topk"``: for every position the target verified in the last step (the
  root and every draft node, accepted or not; a prefill's last prompt token), the token
  there and the target's top-k next tokens after it: ``StepContext.target_topk[i] =
  (tokens [m], topk_ids [m, k])`` for request ``i``, best first (token recycling keeps a
  successor table from them); ``k`` is the proposer's ``topk`` attribute;
- ``"target_logits"``: the target's logits at the positions sampled in the last step
  (``StepContext.target_logits[i]`` for request ``i``);
- ``"hidden_states"``: the target's hidden states after the layers the proposer lists in
  :attr:`Proposer.hidden_layers`, at every token committed since the proposer last saw
  the request (prefill chunks included): ``StepContext.hidden_states[i]`` is a
  :class:`CommittedStates` (EAGLE-style heads, diffusion drafters conditioned on the
  target). They come out of the target's own forward pass; a method that does not ask
  pays nothing;
- ``"target_model"``: a :class:`TargetModel` handle that runs the target's own layers
  over draft tokens with a KV cache the adapter keeps separate from the target's
  (layer-skip self-speculation: SWIFT, DEL).

Life cycle: :meth:`Proposer.bind` is called once when the target model is loaded, with a
:class:`ModelInfo` (layers, sizes, vocabulary, dtype, device, tokenizer, and the target's
embedding and LM head to share): model-dependent option checks belong there, so a bad
value stops the server at start-up. ``propose`` is called every step for the running requests; a request seen
for the first time is new; :meth:`Proposer.finish` is called once when a request leaves
the engine (finished, aborted, or preempted: it may come back later with the same id
and must then be treated as new). ``DraftRequest.num_accepted`` tells the proposer how
many tokens of its previous draft the verifier accepted, which is all an adaptive
controller needs. ``DraftRequest.isolated`` asks for drafts that depend on the request's
own tokens alone (no cross-request caches).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Sequence

import numpy as np

from spec_plugins.cost import CostModel
from spec_plugins.tree import DraftTree


@dataclass
class DraftRequest:
    req_id: str
    # Prompt followed by every token generated so far, including ``new_tokens``.
    token_ids: np.ndarray
    num_prompt_tokens: int
    # Tokens committed in the last step (accepted draft tokens + the bonus token);
    # for a new request, its first sampled token.
    new_tokens: Sequence[int]
    # Most draft nodes the engine accepts for this request in this step.
    max_draft_tokens: int
    # Draft tokens of the previous step that were accepted (None: no previous draft).
    num_accepted: int | None = None
    # Draft from this request's own tokens only, sized without the timing-based cost
    # model. Set for seeded sampling: the verifier draws its random numbers per draft, so
    # drafts that depend on other requests or on step times would make a seeded
    # request's output depend on what else the server has served, and when.
    isolated: bool = False
    # The engine can verify a branching tree for this request. False: return a chain
    # (e.g. repetition penalties or logprobs, which vLLM computes by draft position).
    tree_ok: bool = True
    # Sampling temperature of the request (0: greedy). A drafter that samples its drafts
    # for a sampled request must return the distributions it drew from
    # (``DraftTree.draft_dists``): the verifier needs them to stay lossless.
    temperature: float = 0.0
    # The request's seed (seeded sampling), so a sampling drafter can draw reproducibly.
    seed: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a proposer learns about the target once, at load (:meth:`Proposer.bind`)."""
    model_path: str
    tokenizer_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: Any = None          # torch.dtype of the served weights
    device: Any = None         # torch.device the target runs on
    # The target's own modules, shared rather than copied (None where the engine cannot
    # expose them): token ids [n] -> embeddings [n, hidden]; LM head weight [vocab, hidden].
    embed_tokens: Any = None
    lm_head_weight: Any = None
    # Token ids that stand for non-text input (a VLM's image placeholders and the tokens
    # framing them): the embeddings there are not the token's, so no draft may carry one
    # (the guard cuts them out) and model-free drafters must not match across them.
    placeholder_token_ids: frozenset[int] = frozenset()


@dataclass
class CommittedStates:
    """Target hidden states at tokens the request committed since the proposer last saw
    it, in position order (prefill chunks, then per step the accepted draft tokens and the
    token before them; the newest sampled token has none yet: its forward pass is the next
    step's)."""
    positions: Any             # [n] int64 tensor
    states: Any                # [n, len(hidden_layers) * hidden_size] tensor, target dtype


class CommittedStatesQueue:
    """What an adapter captured of each request's hidden states and has not yet handed to
    the proposer: rows are queued as the target's forward passes produce them and taken,
    concatenated in position order, at the request's next ``propose``. ``end(req_id)``
    is the position after the last row ever queued (a lower start means the engine
    recomputes the request: preempted and resumed)."""

    def __init__(self):
        self._parts: dict[str, list[CommittedStates]] = {}
        self._end: dict[str, int] = {}

    def put(self, req_id: str, first_position: int, states) -> None:
        """``states`` [n, F]: the rows of positions ``first_position`` on."""
        import torch

        n = len(states)
        if n == 0:
            return
        positions = torch.arange(first_position, first_position + n, dtype=torch.long)
        self._parts.setdefault(req_id, []).append(CommittedStates(positions, states))
        self._end[req_id] = first_position + n

    def end(self, req_id: str) -> int | None:
        return self._end.get(req_id)

    def take(self, req_id: str) -> CommittedStates | None:
        parts = self._parts.pop(req_id, None)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        import torch

        return CommittedStates(torch.cat([p.positions for p in parts]),
                               torch.cat([p.states for p in parts]))

    def drop(self, req_id: str) -> None:
        self._parts.pop(req_id, None)
        self._end.pop(req_id, None)


class TargetModel(Protocol):
    """Handle on the target model for self-speculative methods (layer skip), valid for
    one ``propose`` call. For each request the context KV is the target's own; the
    handle keeps draft KV for positions from ``len(token_ids) - 1`` on, separate from
    anything the target's verification reads."""

    num_layers: int

    def room(self, req_id: str) -> int:
        """How many draft forwards the request can take this step (positions from
        ``len(token_ids) - 1`` on)."""

    def draft_forward(self, req_ids: Sequence[str], token_ids: Sequence[int],
                      positions: Sequence[int], layers: Sequence[int],
                      exits: Sequence[int] = ()) -> list:
        """Run ``layers`` of the target (in that order; the others are skipped) over one
        token per request, at consecutive positions per request starting at
        ``len(token_ids) - 1``, writing only draft KV. Returns ``[len(req_ids), vocab]``
        logits (final norm and LM head) after each count in ``exits`` of leading layers,
        then after all of ``layers``."""


@dataclass
class StepContext:
    # Verify cost of the engine's step vs query tokens (calibrated by the adapter) and
    # the tokens the next step computes anyway (one per running request): with them a
    # method sizes its drafts for the batch (``spec_plugins.budget.allocate``).
    cost: CostModel | None = None
    batch_tokens: int = 1
    target_topk: Sequence[tuple[np.ndarray, np.ndarray] | None] | None = None
    target_logits: Any | None = None   # per request, [vocab] (engine tensor or ndarray)
    hidden_states: Sequence[CommittedStates | None] | None = None   # per request
    target_model: TargetModel | None = None
    # Which of the method's ``Proposer.parts`` runs this step (0: the fullest), chosen by
    # the adapter session's payoff gate; requests marked ``isolated`` run the fullest.
    part: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class Proposer(ABC):
    #: Method name users select (``spec_plugins.vllm.<Class>`` maps to it).
    name: ClassVar[str]
    #: Subset of {"target_topk", "target_logits", "hidden_states", "target_model"}.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``propose`` may return trees with branches (else chains only).
    makes_trees: ClassVar[bool] = False
    #: With ``"target_topk"`` in ``needs``: how many successors per position.
    topk: int = 0
    #: With ``"hidden_states"`` in ``needs``: the target layers (0-based) whose outputs
    #: the proposer reads, concatenated in this order (set by ``bind`` at the latest).
    hidden_layers: tuple[int, ...] = ()
    #: The ways the method can run, fullest first (``StepContext.part`` indexes them):
    #: the adapter session's payoff gate times each, and running without the method, per
    #: batch-size class and runs the fastest.
    parts: tuple[str, ...] = ("drafts",)
    #: Bumped when the drafts' quality changes (a new layer set): the gate re-measures.
    drafter_version: int = 0

    #: The method's options dataclass (see ``spec_plugins.options``), if it has options.
    Options: ClassVar[type | None] = None
    #: Where the method reports its choices (adapters set the engine's logger).
    logger: logging.Logger = logging.getLogger("spec_plugins")

    def __init__(self, options: Any = None):
        """``options``: a parsed ``Options`` instance or a mapping to validate."""
        if self.Options is None or isinstance(options, self.Options):
            self.options = options
        else:
            self.options = self.Options.parse(options or {}, where=self.name)

    def bind(self, model: ModelInfo) -> None:
        """Called once when the target is loaded, before the first ``propose``. Check
        model-dependent options here (raise ``OptionError`` naming the field) and load
        any weights of the method's own."""

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        """One tree per request, in the order given, each of at most
        ``max_draft_tokens`` nodes."""

    @property
    def exploring(self) -> bool:
        """The method is searching for how to draft (e.g. a layer set): it runs whatever
        the gate says, and those cycles are not timed. It must keep the search cheap."""
        return False

    def finish(self, req_id: str) -> None:
        """The request left the engine; drop per-request state (or keep it for reuse)."""

