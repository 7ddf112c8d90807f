"""Tree attention over a paged KV cache: plan once per step, run once per layer.

A request with a draft tree is scheduled as ``1 + len(tree)`` query tokens: the root
(its last committed token) then the tree's nodes in topological order. Their K/V are
already in the paged cache at logical positions ``prefix_len + j`` (``j`` = query index),
so every query token sees the ``prefix_len`` cached tokens plus the tree tokens that are
its ancestors or itself: the tree mask. (RoPE positions are ``prefix_len + depth``,
not ``prefix_len + j``: the caller sets them before the layers run.)

Two cache layouts:

- vLLM's CPU one (``CPU_ATTN``, x86 ``vec`` ISA): per block and KV head, ``block_size``
  keys stored transposed (``[head_dim, block_size]``), then ``block_size`` values
  (``[block_size, head_dim]``); :func:`split_cache` gives the two views. Keys being
  transposed is what makes the score product a plain matmul. Plan: :func:`plan`.
- a token-slot cache (SGLang's ``MHATokenToKVPool``): keys and values in two tensors
  ``[slots, kv_heads, head_dim]``, request ``r``'s position ``p`` in slot
  ``slot_table[r, p]``. Plan: :func:`plan_slots`; C path :func:`run_native_slots`
  (tiles of keys are gathered into the transposed layout inside the kernel). It is
  the vLLM layout with ``block_size`` 1 and the slot table as block table, which is how
  :func:`reference` checks it.

Like FlashInfer's wrappers, the work splits in two:

- :func:`plan` (once per step, on the host): ragged trees of the whole batch -> token
  offsets, parents and the blocks each request reads;
- :func:`run_native` (once per layer), the CPU fast path: ``csrc/tree_attention_cpu.c``
  (built on first use by :mod:`spec_plugins.kernels.native`) reads the paged cache in
  place, one (request, KV head) per OpenMP task, and writes the output rows directly.
  On this 2-core AVX2 machine it matches or beats vLLM's causal CPU kernel for the
  same number of query tokens (``integration/bench_tree_attention.py``);
- :func:`run`, the torch path, used when the kernel cannot be built or the dtype is not
  float32: gather the blocks, two batched matmuls and a softmax for the whole batch
  (the query heads of a KV group stacked, so K/V are not expanded), scatter back.

:func:`reference` is the definition, token by token, for tests. GPU paths behind the
same plan/run split: :mod:`spec_plugins.kernels.triton_tree` (a Triton kernel reading
vLLM's GPU paged cache or SGLang's token-slot cache) and
:mod:`spec_plugins.kernels.flashinfer_tree` (FlashInfer's prefill wrappers, with the
masks and indices built here). No engine uses them yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spec_plugins.kernels import native


@dataclass
class TreePlan:
    q_start: torch.Tensor        # [R + 1] int32: request r's tokens are q_start[r]:q_start[r+1]
    prefix_lens: torch.Tensor    # [R] int32: cached tokens before each root
    parents: torch.Tensor        # [T] int32: parent of each token within its request (root -1)
    blocks: torch.Tensor         # [R, nblk] int32: KV blocks read per request
    block_size: int
    ancestors: list[np.ndarray]  # per request [q, q] bool: token i sees token j
    slots: torch.Tensor | None = None  # [R, >= prefix + q] int64: a token-slot cache's
    _padded: "Padded | None" = None

    @property
    def num_tokens(self) -> int:
        return int(self.q_start[-1])


@dataclass
class Padded:
    """The torch path's view of a plan: requests padded to the longest."""
    rows: torch.Tensor           # [R * Qmax] packed row of each padded slot (T = padding)
    packed: torch.Tensor         # [T] padded slot of each packed query token
    bias: torch.Tensor           # [R, 1, 1, Qmax, nblk * block_size]: 0 = attend, -inf = not
    max_q: int


def ancestor_masks(parents: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per request, ``[1 + n, 1 + n]`` bool: query token ``i`` sees token ``j``. Token 0
    is the root, token ``i + 1`` is node ``i`` (parent ``-1`` = the root)."""
    out = []
    for par in parents:
        n = len(par)
        m = np.zeros((n + 1, n + 1), dtype=bool)
        m[0, 0] = True
        for i, p in enumerate(par):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: nodes must follow their parents")
            m[i + 1] = m[p + 1]
            m[i + 1, i + 1] = True
        out.append(m)
    return out


def parents_of_masks(masks: np.ndarray) -> list[list[int]] | None:
    """The inverse of :func:`ancestor_masks` for ``[R, q, q]`` ancestor-or-self masks
    (root first, nodes after their parents): each node's parent is its latest
    ancestor. None when some mask is not such a tree mask."""
    R, q = masks.shape[:2]
    lower = np.tril(masks, k=-1)
    latest = np.where(lower.any(-1), q - 1 - np.argmax(lower[:, :, ::-1], axis=-1), -1)
    parents = [[int(p) - 1 for p in latest[r, 1:]] for r in range(R)]
    if (latest[:, 1:] < 0).any():
        return None                       # a node that does not see the root
    if not np.array_equal(np.stack(ancestor_masks(parents)), masks):
        return None
    return parents


def _plan(prefix_lens, parents, ancestors=None, **kw) -> TreePlan:
    anc = ancestor_masks(parents) if ancestors is None else ancestors
    R = len(anc)
    q_lens = np.array([m.shape[0] for m in anc], dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    tok_parents = np.concatenate(
        [np.concatenate([[-1], np.asarray(par, dtype=np.int64) + 1]) for par in parents])
    q_start = np.zeros(R + 1, dtype=np.int32)
    q_start[1:] = np.cumsum(q_lens)
    return TreePlan(
        q_start=torch.from_numpy(q_start),
        prefix_lens=torch.from_numpy(prefix.astype(np.int32)),
        parents=torch.from_numpy(tok_parents.astype(np.int32)), ancestors=anc, **kw)


def plan(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
         block_table: torch.Tensor, block_size: int) -> TreePlan:
    """``block_table[r]``: the physical blocks of request ``r``'s logical positions."""
    R = len(parents)
    longest = max(int(p) + len(par) + 1 for p, par in zip(prefix_lens, parents))
    nblk = (longest + block_size - 1) // block_size
    return _plan(prefix_lens, parents,
                 blocks=block_table[:R, :nblk].to(torch.int32).contiguous(),
                 block_size=block_size)


def plan_slots(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
               slot_table: torch.Tensor, ancestors: list[np.ndarray] | None = None) -> TreePlan:
    """A token-slot cache: ``slot_table[r, p]`` is the KV slot of request ``r``'s
    position ``p`` (its prefix, then its root and tree tokens). ``ancestors``: the
    parents' :func:`ancestor_masks` where the caller has them."""
    R = len(parents)
    return _plan(prefix_lens, parents, ancestors, blocks=torch.zeros(R, 0, dtype=torch.int32),
                 block_size=1, slots=slot_table[:R].to(torch.int64).contiguous())


def _pad(p: TreePlan) -> Padded:
    if p._padded is not None:
        return p._padded
    anc, bs = p.ancestors, p.block_size
    R = len(anc)
    q_lens = np.array([m.shape[0] for m in anc], dtype=np.int64)
    prefix = p.prefix_lens.numpy().astype(np.int64)
    qmax = int(q_lens.max())
    S = p.blocks.shape[1] * bs
    mask = np.zeros((R, qmax, S), dtype=bool)
    mask[:, :, :] = np.arange(S)[None, None, :] < prefix[:, None, None]
    valid = np.arange(qmax)[None, :] < q_lens[:, None]
    rows = np.full((R, qmax), int(q_lens.sum()), dtype=np.int64)
    starts = p.q_start.numpy()[:-1]
    for r, m in enumerate(anc):
        q, p0 = m.shape[0], prefix[r]
        mask[r, :q, p0:p0 + q] = m
        rows[r, :q] = starts[r] + np.arange(q)
    # Padding slots attend to something, so softmax stays finite; they are dropped.
    mask[~valid, 0] = True
    bias = np.where(mask, np.float32(0), np.float32(-np.inf))
    p._padded = Padded(rows=torch.from_numpy(rows.reshape(-1)),
                       packed=torch.from_numpy(np.flatnonzero(valid.reshape(-1))),
                       bias=torch.from_numpy(bias)[:, None, None], max_q=qmax)
    return p._padded


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[num_blocks, kv_heads, block_size, 2 * D]`` -> keys ``[num_blocks, kv_heads, D,
    block_size]`` and values ``[num_blocks, kv_heads, block_size, D]`` (views)."""
    nb, h, bs, d2 = kv_cache.shape
    c = kv_cache.view(nb, h, 2, bs * (d2 // 2))
    return c[:, :, 0].view(nb, h, d2 // 2, bs), c[:, :, 1].view(nb, h, bs, d2 // 2)


def _gather_keys(key_t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """-> [R, kv_heads, D, nblk * block_size]"""
    R, nblk = blocks.shape
    g = key_t.index_select(0, blocks.reshape(-1))            # [R*nblk, H, D, bs]
    H, D, bs = g.shape[1:]
    return g.view(R, nblk, H, D, bs).permute(0, 2, 3, 1, 4).reshape(R, H, D, nblk * bs)


def _gather_values(value: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """-> [R, kv_heads, nblk * block_size, D]"""
    R, nblk = blocks.shape
    g = value.index_select(0, blocks.reshape(-1))            # [R*nblk, H, bs, D]
    H, bs, D = g.shape[1:]
    return g.view(R, nblk, H, bs, D).transpose(1, 2).reshape(R, H, nblk * bs, D)


def run(p: TreePlan, query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor,
        scale: float) -> torch.Tensor:
    """The torch path. ``query``: [T, heads, D] packed (request by request, root first);
    ``key_t`` and ``value`` from :func:`split_cache`. Returns [T, heads, D]."""
    T, H, D = query.shape
    pad = _pad(p)
    R, qmax = p.blocks.shape[0], pad.max_q
    blocks = p.blocks.long()
    kvh = key_t.shape[1]
    g = H // kvh
    padded = torch.cat([query, query.new_zeros(1, H, D)]).index_select(0, pad.rows)
    # Heads of one KV group side by side: [R, kvh, g * Q, D] against [R, kvh, D, S].
    q = padded.view(R, qmax, kvh, g, D).permute(0, 2, 3, 1, 4).reshape(R, kvh, g * qmax, D)
    s = torch.matmul(q, _gather_keys(key_t, blocks).to(query.dtype))
    S = s.shape[-1]
    s.view(R, kvh, g, qmax, S).mul_(scale).add_(pad.bias)
    a = torch.softmax(s, dim=-1)
    o = torch.matmul(a, _gather_values(value, blocks).to(query.dtype))
    o = o.view(R, kvh, g, qmax, D).permute(0, 3, 1, 2, 4).reshape(R * qmax, H, D)
    return o.index_select(0, pad.packed)


def run_native(p: TreePlan, query: torch.Tensor, output: torch.Tensor,
               tokens: torch.Tensor, kv_cache: torch.Tensor, scale: float) -> bool:
    """The C path (``csrc/tree_attention_cpu.c``), in place: ``output[tokens[t]]`` =
    attention of ``query[tokens[t]]`` for packed tree token ``t``. ``query``/``output``:
    [N, heads, D] with contiguous rows; ``kv_cache``: vLLM's CPU cache tensor
    ``[num_blocks, kv_heads, block_size, 2 * D]``. Returns False (and does nothing)
    when the kernel is not built or the tensors are not float32."""
    f = native.tree_attention()
    if (f is None or query.dtype != torch.float32 or kv_cache.dtype != torch.float32
            or output.dtype != torch.float32):
        return False
    N, H, D = query.shape
    if (query.stride(2) != 1 or query.stride(1) != D or output.stride(2) != 1
            or output.stride(1) != D or not kv_cache.is_contiguous()):
        return False
    kvh, bs = kv_cache.shape[1], kv_cache.shape[2]
    if bs % 16 or H % kvh:
        return False
    tokens = tokens.to(torch.int64).contiguous()
    rc = f(query.data_ptr(), query.stride(0), output.data_ptr(), output.stride(0),
           tokens.data_ptr(), kv_cache.data_ptr(), p.blocks.data_ptr(), p.blocks.stride(0),
           p.q_start.data_ptr(), p.prefix_lens.data_ptr(), p.parents.data_ptr(),
           len(p.prefix_lens), H, kvh, D, bs, scale)
    if rc != 0:
        raise MemoryError("tree attention: could not allocate its work buffers")
    return True


def run_native_slots(p: TreePlan, query: torch.Tensor, output: torch.Tensor,
                     tokens: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float) -> bool:
    """:func:`run_native` for a token-slot cache (a :func:`plan_slots` plan): ``key``
    and ``value`` ``[slots, kv_heads, D]``. Returns False (and does nothing) when the
    kernel is not built or the tensors are not float32 rows it can read in place."""
    f = native.tree_attention_slots()
    tensors = (query, output, key, value)
    if f is None or any(t.dtype != torch.float32 for t in tensors):
        return False
    N, H, D = query.shape
    if (query.stride(2) != 1 or query.stride(1) != D or output.stride(2) != 1
            or output.stride(1) != D or not key.is_contiguous() or not value.is_contiguous()):
        return False
    kvh = key.shape[1]
    if H % kvh or key.shape[2] != D:
        return False
    tokens = tokens.to(torch.int64).contiguous()
    rc = f(query.data_ptr(), query.stride(0), output.data_ptr(), output.stride(0),
           tokens.data_ptr(), key.data_ptr(), value.data_ptr(), p.slots.data_ptr(),
           p.slots.stride(0), p.q_start.data_ptr(), p.prefix_lens.data_ptr(),
           p.parents.data_ptr(), len(p.prefix_lens), H, kvh, D, scale)
    if rc != 0:
        raise MemoryError("tree attention: could not allocate its work buffers")
    return True


def reference(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
              block_table: torch.Tensor, block_size: int, query: torch.Tensor,
              key_t: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Token by token in float64: softmax(q . K_visible) V_visible."""
    anc = ancestor_masks(parents)
    T, H, D = query.shape
    kvh = key_t.shape[1]
    out = torch.empty(T, H, D, dtype=torch.float64)
    t = 0
    for r, m in enumerate(anc):
        p0 = int(prefix_lens[r])
        for i in range(m.shape[0]):
            cols = list(range(p0)) + [p0 + j for j in np.flatnonzero(m[i])]
            blk = block_table[r, torch.tensor(cols) // block_size].long()
            off = torch.tensor(cols) % block_size
            K = key_t[blk, :, :, off].double()       # [L, kvh, D]
            V = value[blk, :, off].double()
            for h in range(H):
                g = h // (H // kvh)
                s = (K[:, g] @ query[t, h].double()) * scale
                out[t, h] = torch.softmax(s, 0) @ V[:, g]
            t += 1
    return out
