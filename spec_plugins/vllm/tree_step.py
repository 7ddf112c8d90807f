"""Tree verification inside one vLLM engine step.

vLLM schedules a request's draft as a flat list of speculative tokens and verifies it as
a chain. For a draft *tree* the drafter hands vLLM the tree's nodes in topological order
(so the scheduler's caps and truncation keep a valid tree) and remembers their parents;
then, in the step that verifies them:

1. :func:`begin` (after the runner prepared its inputs): find the requests whose
   scheduled drafts are a branching tree, give their tokens depth-based RoPE positions
   (the KV slots stay the flat ones vLLM computed), and return a :class:`TreeStep`, which
   the drafter owns for the step and hands to whoever needs it.
2. ``spec_plugins.vllm.attention``'s builders get the step to attend with the tree mask.
3. :func:`verify` (inside vLLM's rejection sampler, after vLLM processed the target
   logits): pick each tree's accepted path with the core verifiers and write it in
   vLLM's output format (accepted tokens, bonus token, then placeholders), so the
   scheduler, stop checks and ``vllm:spec_decode_*`` metrics work unchanged.
4. :func:`compact_kv`: copy the K/V of the accepted nodes to the slots right after the
   root, where vLLM expects the accepted chain; the scheduler then rolls back the
   rejected tail as usual and the cache equals a non-speculative run's.

Chains (including truncated trees that became chains) go through vLLM's own path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spec_plugins.kernels.tree_attention import split_cache
from spec_plugins.tree import DraftTree
from spec_plugins.verify import verify_greedy_ids, verify_stochastic

PLACEHOLDER = -1          # vLLM's PLACEHOLDER_TOKEN_ID
SAMPLING_EPS = 1e-5       # vLLM's _SAMPLING_EPS: temperature below it is greedy


@dataclass
class TreeStep:
    num_reqs: int
    num_tokens: int
    rows: np.ndarray                  # batch rows with a branching tree
    prefix_lens: np.ndarray           # computed tokens before each root
    trees: list[DraftTree]
    tree_tokens: torch.Tensor         # query indices of all tree rows' tokens, packed
    other_rows: np.ndarray            # every other row
    other_q_lens: np.ndarray
    other_tokens: torch.Tensor
    slots: torch.Tensor | None = None  # KV slot of every packed tree token (set by attention)
    block_size: int = 0
    runner: Any = None                # the GPUModelRunner running the step
    verdicts: list | None = None      # per tree, the verifier's Verdict (set by verify)


def begin(runner, scheduler_output, pending: dict[str, DraftTree]) -> TreeStep | None:
    """``pending``: the trees the drafter proposed last step, by request id (popped).
    None when no scheduled draft is a branching tree."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    if not pending or not spec:
        pending.clear()
        return None
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    q_lens = np.array([scheduler_output.num_scheduled_tokens[r] for r in batch.req_ids[:num_reqs]],
                      dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(q_lens)[:-1]])
    rows, trees = [], []
    for req_id, drafted in spec.items():
        tree = pending.pop(req_id, None)
        if tree is None:
            continue
        n = len(drafted)
        i = batch.req_id_to_index[req_id]
        # The scheduler may cut the draft (budget, model length); a prefix of a
        # topological order is still a tree. Anything else is not ours to verify.
        if n == 0 or q_lens[i] != n + 1 or list(drafted) != tree.tokens[:n]:
            continue
        sub = tree.prefix(n)
        if not sub.is_chain:
            rows.append(i)
            trees.append(sub)
    pending.clear()
    if not rows:
        return None
    order = np.argsort(rows)
    rows = np.asarray(rows, dtype=np.int64)[order]
    trees = [trees[k] for k in order]
    prefix = batch.num_computed_tokens_cpu[rows].astype(np.int64)

    def token_indices(rs):
        return (np.concatenate([starts[r] + np.arange(q_lens[r]) for r in rs])
                if len(rs) else np.zeros(0, dtype=np.int64))

    tok = token_indices(rows)
    # Depth-based RoPE positions for the tree tokens (root depth 0).
    depth_list = []
    for t in trees:
        depth_list.append(0)
        depth_list.extend(t.depths())
    positions = np.repeat(prefix, [len(t) + 1 for t in trees]) + np.asarray(depth_list)
    tok_t = torch.from_numpy(tok)
    runner.positions[tok_t] = torch.from_numpy(positions).to(runner.positions.dtype)
    other = np.setdiff1d(np.arange(num_reqs), rows)
    other_tok = token_indices(other)
    return TreeStep(
        num_reqs=num_reqs, num_tokens=int(q_lens.sum()), rows=rows,
        prefix_lens=prefix, trees=trees, tree_tokens=tok_t, other_rows=other,
        other_q_lens=q_lens[other], other_tokens=torch.from_numpy(other_tok), runner=runner)


def verify(step: TreeStep, out: torch.Tensor, num_draft_tokens, target_logits: torch.Tensor,
           bonus_token_ids: torch.Tensor, sampling_metadata, rng: np.random.Generator) -> list:
    """Overwrite the tree rows of vLLM's rejection-sampler output ``out``
    ``[num_reqs, max_spec_len + 1]``. ``target_logits`` holds, per request, the
    processed logits at the root and every node but the last (vLLM's layout); the
    last node is a leaf, so its bonus token is vLLM's bonus sample."""
    offsets = np.concatenate([[0], np.cumsum(num_draft_tokens)])
    temps = sampling_metadata.temperature
    greedy = [sampling_metadata.all_greedy or (temps is not None and float(temps[r]) < SAMPLING_EPS)
              for r in step.rows]
    g_rows = [k for k, g in enumerate(greedy) if g]
    argmax = {}
    if g_rows:
        idx = torch.cat([torch.arange(offsets[step.rows[k]], offsets[step.rows[k] + 1]) for k in g_rows])
        am = target_logits[idx].argmax(dim=-1).tolist()
        pos = 0
        for k in g_rows:
            n = len(step.trees[k])
            argmax[k] = am[pos:pos + n]
            pos += n
    verdicts = []
    for k, (r, tree) in enumerate(zip(step.rows, step.trees)):
        bonus = int(bonus_token_ids[r, 0])
        rows_r = slice(int(offsets[r]), int(offsets[r + 1]))
        if greedy[k]:
            v = verify_greedy_ids(tree, argmax[k] + [bonus])
        else:
            probs = torch.softmax(target_logits[rows_r].float(), dim=-1).double().numpy()
            last = np.zeros((1, probs.shape[1]))
            last[0, bonus] = 1.0
            gen = sampling_metadata.generators.get(int(r))
            v = verify_stochastic(tree, np.concatenate([probs, last]),
                                  rng if gen is None else _rng_from(gen))
        emitted = v.emitted
        out[r, :len(emitted)] = torch.tensor(emitted, dtype=out.dtype)
        out[r, len(emitted):] = PLACEHOLDER
        verdicts.append(v)
    return verdicts


def _rng_from(gen: torch.Generator) -> np.random.Generator:
    """A numpy stream drawn from the request's seeded torch generator (reproducible)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))


def compact_kv(step: TreeStep, verdicts, kv_caches) -> int:
    """Move each accepted node's K/V from its flat slot to ``root slot + depth``.
    Returns the number of token slots moved (per layer)."""
    if step.slots is None:
        raise RuntimeError("tree attention did not record the step's KV slots")
    src, dst = [], []
    base = 0
    for tree, v in zip(step.trees, verdicts):
        for depth, node in enumerate(v.accepted, start=1):
            if node + 1 != depth:
                src.append(base + node + 1)
                dst.append(base + depth)
        base += len(tree) + 1
    if not src:
        return 0
    s = step.slots[torch.tensor(src)].long()
    d = step.slots[torch.tensor(dst)].long()
    bs = step.block_size
    sb, so, db, do = s // bs, s % bs, d // bs, d % bs
    for cache in kv_caches:
        key_t, value = split_cache(cache)
        key_t[db, :, :, do] = key_t[sb, :, :, so]
        value[db, :, do] = value[sb, :, so]
    return len(src)
