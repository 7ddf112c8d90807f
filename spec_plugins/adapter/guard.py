"""Fault containment between a proposer and an engine.

A drafting method is an optimisation: whatever goes wrong inside it must never take the
engine down or change an output. :class:`GuardedProposer` is what every adapter calls
instead of the proposer itself:

- an exception in ``propose`` (the method's code or its drafter model) gives that step
  no drafts for the batch; a bad draft for one request (a token outside the vocabulary,
  NaN/inf or unnormalised draft distributions, more nodes than allowed, a tree where
  the engine needs a chain, a malformed tree) gives that request no draft;
- each kind of fault is logged once, with the method's name and the first message;
- after ``max_consecutive`` faulty steps in a row, or ``max_total`` in all, the method
  is switched off for the process with one line; the engine keeps serving without
  speculation;
- nodes carrying a placeholder token (``ModelInfo.placeholder_token_ids``: a VLM's image
  tokens) are cut out of every draft, with their subtrees.

Engine-agnostic; an exception from ``finish`` is contained the same way.
"""

from __future__ import annotations

import logging
from typing import Sequence

from spec_plugins.proposers.base import DraftRequest, Proposer, StepContext
from spec_plugins.tree import DraftTree


class GuardedProposer:
    def __init__(self, proposer: Proposer, method: str, logger: logging.Logger,
                 max_consecutive: int = 8, max_total: int = 64):
        self.proposer, self.method, self.logger = proposer, method, logger
        self.max_consecutive, self.max_total = max_consecutive, max_total
        self.vocab_size: int | None = None
        self.placeholders: frozenset[int] = frozenset()
        self.disabled = False
        self.faults_total = 0
        self._consecutive = 0
        self._logged: set[str] = set()

    def bind(self, model) -> None:
        """Model-dependent mistakes must stop start-up: ``bind`` is not guarded."""
        self.proposer.bind(model)
        self.vocab_size = model.vocab_size
        self.placeholders = frozenset(model.placeholder_token_ids)

    def propose(self, requests: Sequence[DraftRequest], ctx: StepContext) -> list[DraftTree]:
        empty = [DraftTree.empty() for _ in requests]
        if self.disabled or not requests:
            return empty
        try:
            trees = list(self.proposer.propose(requests, ctx))
            if len(trees) != len(requests):
                raise RuntimeError(f"returned {len(trees)} drafts for {len(requests)} "
                                   "requests")
        except Exception as e:  # noqa: BLE001 - any failure of the method is contained
            self._fault("exception", f"{type(e).__name__}: {e}", exc=e)
            return empty
        faulty = False
        for i, (req, tree) in enumerate(zip(requests, trees)):
            problem = self._problem(req, tree)
            if problem is not None:
                kind, msg = problem
                self._fault(kind, msg, step=not faulty)
                faulty = True
                trees[i] = DraftTree.empty()
            elif self.placeholders:
                # Not a fault: an LM head may rank a placeholder id, but a draft token
                # there would be embedded as text where the target never saw text.
                trees[i] = tree.without_tokens(self.placeholders)
        if not faulty:
            self._consecutive = 0
        return trees

    def finish(self, req_id: str) -> None:
        try:
            self.proposer.finish(req_id)
        except Exception as e:  # noqa: BLE001
            self._fault("exception in finish", f"{type(e).__name__}: {e}", exc=e)

    def _problem(self, req: DraftRequest, tree) -> tuple[str, str] | None:
        if not isinstance(tree, DraftTree):
            return "bad draft", f"returned {type(tree).__name__}, not a DraftTree"
        if len(tree) > req.max_draft_tokens:
            return ("too many nodes", f"drafted {len(tree)} tokens for a request allowed "
                                      f"{req.max_draft_tokens}")
        if not tree.is_chain and not req.tree_ok:
            return ("tree for a chain request", "returned a tree for a request that needs a "
                                                "chain (DraftRequest.tree_ok is False)")
        try:
            tree.validate(self.vocab_size)
        except ValueError as e:
            msg = str(e)
            kind = ("bad draft distributions" if "draft_dists" in msg else
                    "token outside the vocabulary" if "vocabulary" in msg else
                    "malformed tree")
            return kind, msg
        return None

    def _fault(self, kind: str, msg: str, exc: BaseException | None = None,
               step: bool = True) -> None:
        if step:
            self._consecutive += 1
            self.faults_total += 1
        if kind not in self._logged:
            self._logged.add(kind)
            self.logger.error("spec_plugins: method %s: %s (%s); serving the affected requests "
                              "without drafts this step (logged once per kind)", self.method,
                              kind, msg, exc_info=exc)
        if not self.disabled and (self._consecutive >= self.max_consecutive
                                  or self.faults_total >= self.max_total):
            self.disabled = True
            self.logger.error("spec_plugins: method %s switched off for this process after "
                              "%d faulty steps (%d in a row); serving without speculation",
                              self.method, self.faults_total, self._consecutive)
