"""What an engine adapter keeps between steps, engine-neutral: one :class:`AdapterSession`
per engine process that serves a spec_plugins method.

Both adapters (``spec_plugins.vllm.drafter``, ``spec_plugins.sglang.worker``) translate
their engine's batch into calls on the session and its results back into the engine's
format, nothing more. The session owns:

- one :class:`RequestRecord` per running request (what was read once from its sampling
  parameters, its last draft and how much of it was accepted, the target's top-k at its
  last verified positions);
- the method's proposer behind the fault guard (:class:`GuardedProposer`);
- the step timer that calibrates the verify-cost model on the engine's own steps;
- the payoff gate: per batch-size class, whole decoding cycles with the method and without
  it are timed, and the method runs only where it pays (a method that loses at 32
  concurrent is off there within a few dozen steps, back when the batch thins; while off
  it costs no drafting work, probes included);
- the queue of committed hidden states (methods that read them);
- the "log this reason once" set.

It builds the :class:`DraftRequest` and :class:`StepContext` each ``propose`` gets and
finishes requests that left the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from spec_plugins.adapter.guard import GuardedProposer
from spec_plugins.cost import StepTimer
from spec_plugins.payoff import PayoffGate
from spec_plugins.proposers import proposer_class
from spec_plugins.proposers.base import (CommittedStatesQueue, DraftRequest, ModelInfo,
                                         StepContext, TargetModel)
from spec_plugins.tree import DraftTree

# Prior slope of the step-time curve, as a fraction of a one-token step per extra query
# token (float32 on a CPU: ~0.1); online calibration replaces it within a few steps.
PRIOR_PER_TOKEN = 0.1
# The session's payoff gate: cycles per measurement window (more than a method's own gate:
# at high concurrency prefills and arrivals make single cycles noisy), and the propose
# calls between log lines of what it measured.
GATE_WINDOW = 16
GATE_LOG_EVERY = 2048


@dataclass
class RequestRecord:
    """What the session remembers about a running request between steps."""
    skip_reason: str | None = None   # why it is never drafted for (options drafts cannot honour)
    tree_ok: bool = True             # a branching tree can be verified for it
    temperature: float = 0.0         # 0: greedy
    seed: int | None = None          # seeded sampling: drafts from its own tokens only
    max_draft: int | None = None     # the client's cap, 0: no speculation
    # (temperature, top_k, top_p, min_p) for the core sampler, where the adapter verifies.
    probs_args: tuple = ()
    num_tokens: int = 0              # tokens the proposer has seen (prompt + output)
    drafted: int = 0                 # draft nodes of its last draft
    accepted: int | None = None      # of which the verifier accepted
    topk: tuple[np.ndarray, np.ndarray] | None = None   # (tokens [m], topk ids [m, k])

    @property
    def never_drafted(self) -> bool:
        return self.skip_reason is not None or self.max_draft == 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def model_info(model, decoder=None, **fields) -> ModelInfo:
    """:class:`ModelInfo` for a loaded torch target: the engine-specific ``fields`` (sizes,
    paths, dtype, placeholder ids) plus the target's embedding, LM head and device, read
    the same way for every engine. ``decoder``: the module holding ``embed_tokens``
    (default ``model.model``; a VLM's language model)."""
    inner = decoder if decoder is not None else getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    param = next(model.parameters(), None)
    return ModelInfo(device=None if param is None else param.device,
                     embed_tokens=getattr(inner, "embed_tokens", None),
                     lm_head_weight=getattr(head, "weight", None), **fields)


# Words in a multimodal config's token fields and in a tokenizer's special tokens that
# mark the tokens a processor puts where an image (video, audio) goes.
_MEDIA_WORDS = ("image", "img", "video", "vision", "audio")


def placeholder_token_ids(hf_config, tokenizer_path: str,
                          trust_remote_code: bool = False) -> frozenset[int]:
    """A multimodal model's placeholder ids (``ModelInfo.placeholder_token_ids``): the
    config's ``*image*_token_id`` / ``*_token_index`` style fields and the tokenizer's
    added tokens named for a medium (Idefics3's ``<image>``, ``<fake_token_around_image>``,
    ``<global-img>``; Qwen-VL's ``<|vision_start|>``...)."""
    from transformers import AutoTokenizer

    ids: set[int] = set()
    for name, value in vars(hf_config).items():
        if (name.endswith(("_token_id", "_token_ids", "_token_index"))
                and any(w in name for w in _MEDIA_WORDS)):
            ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value])
                       if isinstance(v, int) and v >= 0)
    added = AutoTokenizer.from_pretrained(tokenizer_path,
                                          trust_remote_code=trust_remote_code).get_added_vocab()
    ids.update(i for text, i in added.items() if any(w in text.lower() for w in _MEDIA_WORDS))
    return frozenset(ids)


class AdapterSession:
    """One engine process's drafting state for the method it serves.

    ``supplies``: what the engine adapter can hand the proposer (``Proposer.needs``);
    a method that needs more stops start-up, naming ``engine``."""

    def __init__(self, method: str, options, logger: logging.Logger, engine: str,
                 supplies: frozenset[str], prior_per_token: float = PRIOR_PER_TOKEN):
        self.method, self.logger = method, logger
        self.proposer = proposer_class(method)(options)
        self.proposer.logger = logger
        needs = set(self.proposer.needs)
        if needs - supplies:
            raise NotImplementedError(
                f"spec_plugins method {method!r} needs {sorted(needs - supplies)}, which the "
                f"{engine} adapter does not supply")
        # Every call into the method goes through the guard: its faults never reach the engine.
        self.guard = GuardedProposer(self.proposer, method, logger)
        self.wants_topk = "target_topk" in needs
        self.wants_model = "target_model" in needs
        self.wants_states = "hidden_states" in needs
        self.makes_trees = bool(self.proposer.makes_trees)
        self.timer = StepTimer(prior_per_token)
        # Hidden states of committed tokens, queued per request until its next draft.
        self.states = CommittedStatesQueue()
        self.requests: dict[str, RequestRecord] = {}
        self._logged: set[str] = set()
        self.gate = (PayoffGate(self.proposer.parts, window=GATE_WINDOW,
                                on_decision=self._log_decision)
                     if getattr(self.proposer.options, "payoff_gate", True) else None)
        self._drafter_version = self.proposer.drafter_version
        self._proposals = 0

    def bind(self, info: ModelInfo) -> None:
        """The target is loaded: the proposer learns about it once; model-dependent
        mistakes raise here, at start-up."""
        self.guard.bind(info)
        if info.placeholder_token_ids:
            self.logger.info("spec_plugins: multimodal target: no draft carries its "
                             "placeholder token ids %s", sorted(info.placeholder_token_ids))

    def hidden_layers(self) -> tuple[int, ...]:
        """The target layers whose outputs the method reads (after ``bind``)."""
        layers = tuple(getattr(self.proposer, "hidden_layers", ()) or ())
        if not layers:
            raise RuntimeError(f"spec_plugins method {self.method!r} needs hidden states but "
                               "lists no hidden_layers after bind()")
        return layers

    # ---- requests -------------------------------------------------------------
    def admit(self, req_id: str, record: RequestRecord, why_skipped: str = "") -> RequestRecord:
        """Keep ``record`` for a request seen for the first time; a skip reason is logged
        once per reason (``why_skipped`` says why the engine cannot draft for it)."""
        self.requests[req_id] = record
        if record.skip_reason:
            self.log_once(record.skip_reason, "spec_plugins: requests with %s are served "
                          "without drafts (%s)", record.skip_reason, why_skipped)
        return record

    def log_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self.logger.info(msg, *args)

    def retain(self, live: Iterable[str]) -> None:
        """Finish every request not in ``live`` (finished, aborted or preempted: a
        resumed request starts over)."""
        live = set(live)
        for req_id in [r for r in self.requests if r not in live]:
            self.finish(req_id)

    def finish(self, req_id: str) -> None:
        self.states.drop(req_id)
        if self.requests.pop(req_id, None) is not None:
            self.guard.finish(req_id)

    def queue_states(self, req_id: str, first_position: int, states) -> None:
        """Hidden states ``[n, F]`` of positions ``first_position`` on, committed by a
        request that is drafted for (kept until its next draft)."""
        rec = self.requests.get(req_id)
        if rec is not None and not rec.never_drafted:
            self.states.put(req_id, first_position, states)

    # ---- a drafting step ------------------------------------------------------
    def draft_request(self, req_id: str, token_ids: np.ndarray, num_prompt_tokens: int,
                      new_tokens: Sequence[int], room: int) -> DraftRequest | None:
        """The request's :class:`DraftRequest` for this step (``room``: the most draft
        tokens the engine takes), or None when it is not drafted for."""
        rec = self.requests[req_id]
        if rec.never_drafted:
            return None
        if rec.max_draft is not None:
            room = min(room, rec.max_draft)
        if room <= 0:
            return None
        return DraftRequest(
            req_id=req_id, token_ids=token_ids, num_prompt_tokens=num_prompt_tokens,
            new_tokens=new_tokens, max_draft_tokens=room,
            num_accepted=rec.accepted if rec.drafted else None,
            isolated=rec.seed is not None, tree_ok=rec.tree_ok,
            temperature=rec.temperature, seed=rec.seed)

    def propose(self, requests: Sequence[DraftRequest], batch_tokens: int,
                target_model: TargetModel | None = None) -> list[DraftTree]:
        """One draft per request (empty: none), through the guard. ``batch_tokens``: the
        tokens the next step computes anyway (one per running request)."""
        if not requests:
            return []
        part = self._choose_part(requests)
        # Seeded requests are drafted whatever the (timed) gate says, in full: their drafts
        # must not depend on timing, or their sampled outputs would.
        run = requests if part is not None else [r for r in requests if r.isolated]
        trees = {}
        if run:
            ctx = StepContext(cost=self.timer.cost, batch_tokens=batch_tokens,
                              target_model=target_model, part=part or 0)
            if self.wants_topk:
                ctx.target_topk = [self.requests[r.req_id].topk for r in run]
            if self.wants_states:
                ctx.hidden_states = [self.states.take(r.req_id) for r in run]
            trees = {r.req_id: t for r, t in zip(run, self.guard.propose(run, ctx))}
        return [trees[r.req_id] if r.req_id in trees else DraftTree.empty() for r in requests]

    def _choose_part(self, requests: Sequence[DraftRequest]) -> int | None:
        """The part of the method the payoff gate runs this cycle (None: none); the gate
        times the cycle that ends at the next call."""
        gate = self.gate
        if gate is None:
            return 0
        if self.proposer.drafter_version != self._drafter_version:
            self._drafter_version = self.proposer.drafter_version
            gate.forget_drafting()
        arm = gate.begin(requests)
        self._log_gate()
        if self.proposer.exploring:
            gate.end(None)          # a search's cycles say nothing of the method's payoff
            return 0
        gate.end(arm)
        return None if arm == gate.off else arm

    def _log_decision(self, line: str) -> None:
        self.logger.info("spec_plugins: %s payoff gate: %s", self.method, line)

    def _log_gate(self) -> None:
        self._proposals += 1
        if self._proposals % GATE_LOG_EVERY == 0:
            self.logger.info("spec_plugins: %s payoff gate (cycles with the method and "
                             "without it) %s", self.method, self.gate.describe())

    def drafted(self, req_id: str, num_nodes: int) -> None:
        """The request's draft this step had ``num_nodes`` nodes (0: none)."""
        rec = self.requests.get(req_id)
        if rec is not None:
            rec.drafted = num_nodes
            rec.topk = None   # read by this step's propose; the next verify sets it anew
