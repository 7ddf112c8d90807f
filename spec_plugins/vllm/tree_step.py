"""Tree verification inside one vLLM engine step, as phases that pass values.

vLLM schedules a request's draft as a flat list of speculative tokens and verifies it as
a chain. For a draft *tree* the drafter hands vLLM the tree's nodes in topological order
(so the scheduler's caps and truncation keep a valid tree) and remembers their parents;
then, in the step that verifies them:

1. :func:`begin` (after the runner prepared its inputs) -> :class:`TreePlan`: the
   requests whose scheduled drafts are a branching tree, their tokens' depth-based RoPE
   positions and their (flat) KV slots. ``hooks`` writes the positions into the runner
   and hands the plan to ``spec_plugins.vllm.attention``'s builders, which attend with
   the tree mask.
2. :func:`verify` (inside vLLM's rejection sampler, after vLLM processed the target
   logits) -> one :class:`~spec_plugins.verify.Verdict` per tree: the accepted path by
   the core verifiers. :func:`emitted_rows` is what ``hooks`` writes into vLLM's output
   (accepted tokens, bonus token, then placeholders), so the scheduler, stop checks and
   ``vllm:spec_decode_*`` metrics work unchanged.
3. :func:`kv_moves`: which slots ``hooks`` copies so that the accepted nodes' K/V sit
   right after the root, where vLLM expects the accepted chain; the scheduler then rolls
   back the rejected tail as usual and the cache equals a non-speculative run's.

Nothing here writes into a vLLM object. Chains (including truncated trees that became
chains) go through vLLM's own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from spec_plugins.tree import DraftTree
from spec_plugins.verify import Verdict, verify_greedy_ids, verify_stochastic

PLACEHOLDER = -1          # vLLM's PLACEHOLDER_TOKEN_ID
SAMPLING_EPS = 1e-5       # vLLM's _SAMPLING_EPS: temperature below it is greedy


@dataclass(frozen=True)
class TreePlan:
    """One step's branching trees, in the runner's batch (``num_reqs`` rows,
    ``num_tokens`` scheduled tokens)."""
    num_reqs: int
    num_tokens: int
    rows: np.ndarray                  # [T] batch rows with a branching tree, ascending
    prefix_lens: np.ndarray           # [T] computed tokens before each root
    trees: list[DraftTree]
    tree_tokens: torch.Tensor         # [n] query indices of the tree rows' tokens, packed
    tree_positions: torch.Tensor      # [n] their RoPE positions (root depth 0)
    slots: torch.Tensor               # [n] their KV slots (vLLM's flat ones)
    block_size: int
    other_rows: np.ndarray            # every other row
    other_q_lens: np.ndarray
    other_tokens: torch.Tensor        # query indices of the other rows' tokens


def begin(pending: Mapping[str, DraftTree], spec: Mapping[str, Sequence[int]],
          req_ids: Sequence[str], q_lens: np.ndarray, num_computed: np.ndarray,
          slot_mapping: torch.Tensor, block_size: int) -> TreePlan | None:
    """The step's plan, or None when no scheduled draft is a branching tree.

    ``pending``: the trees the drafter proposed last step, by request id; ``spec``: the
    draft tokens the scheduler scheduled, by request id; per batch row ``req_ids``,
    ``q_lens`` (scheduled tokens) and ``num_computed`` (tokens before them);
    ``slot_mapping`` [num_tokens]: the KV slot of every scheduled token."""
    if not pending or not spec:
        return None
    num_reqs = len(req_ids)
    index = {r: i for i, r in enumerate(req_ids)}
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    rows, trees = [], []
    for req_id, drafted in spec.items():
        tree = pending.get(req_id)
        if tree is None:
            continue
        n = len(drafted)
        i = index[req_id]
        # The scheduler may cut the draft (budget, model length); a prefix of a
        # topological order is still a tree. Anything else is not ours to verify.
        if n == 0 or q_lens[i] != n + 1 or list(drafted) != tree.tokens[:n]:
            continue
        sub = tree.prefix(n)
        if not sub.is_chain:
            rows.append(i)
            trees.append(sub)
    if not rows:
        return None
    order = np.argsort(rows)
    rows = np.asarray(rows, dtype=np.int64)[order]
    trees = [trees[k] for k in order]
    prefix = np.asarray(num_computed, dtype=np.int64)[rows]

    def token_indices(rs):
        return (np.concatenate([starts[r] + np.arange(q_lens[r]) for r in rs])
                if len(rs) else np.zeros(0, dtype=np.int64))

    tok = torch.from_numpy(token_indices(rows))
    depths = []
    for t in trees:
        depths.append(0)
        depths.extend(t.depths())
    positions = np.repeat(prefix, [len(t) + 1 for t in trees]) + np.asarray(depths)
    other = np.setdiff1d(np.arange(num_reqs), rows)
    return TreePlan(
        num_reqs=num_reqs, num_tokens=int(np.sum(q_lens)), rows=rows, prefix_lens=prefix,
        trees=trees, tree_tokens=tok, tree_positions=torch.from_numpy(positions),
        slots=slot_mapping.index_select(0, tok.to(slot_mapping.device)).cpu(),
        block_size=block_size, other_rows=other, other_q_lens=np.asarray(q_lens)[other],
        other_tokens=torch.from_numpy(token_indices(other)))


def verify(plan: TreePlan, num_draft_tokens, target_logits: torch.Tensor,
           bonus_token_ids: torch.Tensor, sampling_metadata,
           rng: np.random.Generator) -> list[Verdict]:
    """The accepted path of every tree. ``target_logits`` holds, per request, the
    processed logits at the root and every node but the last (vLLM's layout); the last
    node is a leaf, so its bonus token is vLLM's bonus sample."""
    offsets = np.concatenate([[0], np.cumsum(num_draft_tokens)])
    temps = sampling_metadata.temperature
    greedy = [sampling_metadata.all_greedy or (temps is not None and float(temps[r]) < SAMPLING_EPS)
              for r in plan.rows]
    g_rows = [k for k, g in enumerate(greedy) if g]
    argmax = {}
    if g_rows:
        idx = torch.cat([torch.arange(offsets[plan.rows[k]], offsets[plan.rows[k] + 1])
                         for k in g_rows])
        am = target_logits[idx].argmax(dim=-1).tolist()
        pos = 0
        for k in g_rows:
            n = len(plan.trees[k])
            argmax[k] = am[pos:pos + n]
            pos += n
    verdicts = []
    for k, (r, tree) in enumerate(zip(plan.rows, plan.trees)):
        bonus = int(bonus_token_ids[r, 0])
        if greedy[k]:
            verdicts.append(verify_greedy_ids(tree, argmax[k] + [bonus]))
            continue
        rows_r = slice(int(offsets[r]), int(offsets[r + 1]))
        probs = torch.softmax(target_logits[rows_r].float(), dim=-1).double().numpy()
        last = np.zeros((1, probs.shape[1]))
        last[0, bonus] = 1.0
        gen = sampling_metadata.generators.get(int(r))
        verdicts.append(verify_stochastic(tree, np.concatenate([probs, last]),
                                          rng if gen is None else _rng_from(gen)))
    return verdicts


def emitted_rows(plan: TreePlan, verdicts: Sequence[Verdict], width: int) -> torch.Tensor:
    """[T, width] rows of vLLM's rejection-sampler output for the tree rows: each tree's
    emitted tokens, then placeholders."""
    out = torch.full((len(verdicts), width), PLACEHOLDER, dtype=torch.long)
    for k, v in enumerate(verdicts):
        emitted = v.emitted
        out[k, :len(emitted)] = torch.tensor(emitted, dtype=torch.long)
    return out


def _rng_from(gen: torch.Generator) -> np.random.Generator:
    """A numpy stream drawn from the request's seeded torch generator (reproducible)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))


def kv_moves(plan: TreePlan, verdicts: Sequence[Verdict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, destination) KV slots [m]: each accepted node's K/V from its flat slot to
    ``root slot + depth`` (empty when every accepted node is already there)."""
    src, dst = [], []
    base = 0
    for tree, v in zip(plan.trees, verdicts):
        for depth, node in enumerate(v.accepted, start=1):
            if node + 1 != depth:
                src.append(base + node + 1)
                dst.append(base + depth)
        base += len(tree) + 1
    if not src:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    return (plan.slots[torch.tensor(src)].long(), plan.slots[torch.tensor(dst)].long())
