"""Tree attention in Triton, for GPUs: plan once per step, run once per layer.

The same contract as :mod:`spec_plugins.kernels.tree_attention` (whose :func:`reference
<spec_plugins.kernels.tree_attention.reference>` defines the result): request ``r`` is
scheduled as ``1 + len(tree)`` query tokens (its root, then the tree's nodes in
topological order) whose K/V sit at logical positions ``prefix_len + j``; each token sees
the whole prefix plus its tree ancestors and itself.

Two caches, one kernel (a token-slot cache is a paged cache with pages of one token):

- vLLM's GPU paged cache: key and value views ``[num_blocks, block_size, kv_heads,
  head_dim]`` with any strides (last dim contiguous), read through a block table
  (:func:`vllm_kv` makes them from a layer's cache tensor); plan with :func:`plan`;
- SGLang's token-slot cache (``MHATokenToKVPool``): per layer, K and V buffers
  ``[num_slots, kv_heads, head_dim]``, request ``r``'s position ``p`` in slot
  ``req_to_token[req_pool_indices[r], p]`` (the draft tokens' slots included, as SGLang's
  verify assigns them); plan with :func:`plan_slots`.

How the kernel works: one program per (request, tile of query rows, KV head, KV split).
The query heads of a KV group are stacked in the tile's rows (GQA: K/V are read once per
group). KV is read in tiles of ``block_n`` logical positions: tiles wholly inside the
prefix take no mask at all; only the few tiles that reach the tree use the ancestry
bit-mask (``[q, ceil(q / 32)]`` int32 words per request, built by the plan), and tree
tiles past a query tile's last token are skipped (nodes follow their parents, so the
tree mask is lower-triangular). Online softmax in float32 (base 2), float32
accumulation, inputs float32 / bfloat16 / float16 (float32 dot products in IEEE
precision, not TF32). With few programs for the GPU (a small batch, a long prefix) the
KV range is split and a second kernel merges the splits' partial outputs by their
log-sum-exp, as flash-decoding does.

Nothing here assumes a CPU: the plan is built with numpy and copied to the block table's
device in one transfer; :func:`run` launches on whatever device the tensors are on. On a
CPU, Triton's interpreter (``TRITON_INTERPRET=1`` before Triton is imported) runs the
same kernels, which is how CI tests them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from spec_plugins.kernels.tree_attention import ancestor_masks

# The interpreter multiplies bfloat16 tiles as their raw uint16 bits (Triton 3.9's
# interpreter `create_dot`); there the kernels upcast bfloat16 dot operands to float32,
# which is exact for bfloat16 values. Compiled kernels use bfloat16 tensor-core dots.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


@dataclass
class TritonTreePlan:
    """One step's trees, on the device. Built by :func:`plan` / :func:`plan_slots`."""
    num_tokens: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int              # tokens per page (1: a token-slot cache)
    table: torch.Tensor          # [rows, width] int: pages (slots) of each request's positions
    table_rows: torch.Tensor     # [R] int32: request r reads table[table_rows[r]]
    q_start: torch.Tensor        # [R + 1] int32
    prefix_lens: torch.Tensor    # [R] int32
    mask_start: torch.Tensor     # [R] int32: first mask word of request r
    mask_words: torch.Tensor     # [R] int32: mask words per query row of request r
    mask_bits: torch.Tensor      # int32 words: bit j of row i = token i sees tree token j
    work_req: torch.Tensor       # [W] int32: request of each query tile
    work_q0: torch.Tensor        # [W] int32: first query token of each tile
    block_m: int                 # query rows (tokens x group heads) per tile
    block_n: int                 # KV positions per tile
    num_splits: int
    _scratch: dict = field(default_factory=dict)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pack_tree_masks(anc: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ancestor masks -> (int32 words, per-request first word, per-request words per
    row): row ``i`` of request ``r`` is ``ceil(q_r / 32)`` little-endian words, bit ``j``
    set when token ``i`` sees tree token ``j``."""
    words, starts, widths, at = [], [], [], 0
    for m in anc:
        q = m.shape[0]
        w = (q + 31) // 32
        padded = np.zeros((q, 32 * w), dtype=bool)
        padded[:, :q] = m
        words.append(np.packbits(padded, axis=1, bitorder="little").view("<i4").reshape(-1))
        starts.append(at)
        widths.append(w)
        at += q * w
    return np.concatenate(words), np.array(starts), np.array(widths)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(device: torch.device, programs: int, max_tiles: int) -> int:
    """KV splits so that the GPU has about two programs per SM, each split reading at
    least 4 KV tiles; 1 off CUDA (a CPU run is the interpreter's: no occupancy)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device)
    want = math.ceil(2 * sms / max(programs, 1))
    return int(max(1, min(want, max_tiles // 4, 64)))


def plan(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
         block_table: torch.Tensor, block_size: int, num_heads: int, num_kv_heads: int,
         head_dim: int, *, rows: torch.Tensor | Sequence[int] | None = None,
         ancestors: list[np.ndarray] | None = None, num_splits: int | None = None,
         block_m: int | None = None, block_n: int | None = None) -> TritonTreePlan:
    """A paged cache: request ``r``'s position ``p`` is in page ``block_table[rows[r], p //
    block_size]`` (``rows`` defaults to ``0..R-1``). ``block_table`` stays where it is
    (the kernels read it on its device); the plan's own small arrays are built on the
    host and copied there once. ``ancestors``: the parents' :func:`ancestor_masks
    <spec_plugins.kernels.tree_attention.ancestor_masks>` where the caller has them.
    ``num_splits``, ``block_m``, ``block_n``: tuning overrides (tests use small tiles)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    anc = ancestor_masks(parents) if ancestors is None else list(ancestors)
    R = len(anc)
    device = block_table.device
    q_lens = np.array([m.shape[0] for m in anc], dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)[:R]
    group = num_heads // num_kv_heads
    if block_m is None:
        # One tile for a small tree (re-reading the prefix per tile costs more than idle
        # rows), 128-row tiles beyond.
        block_m = min(128, max(16, _next_pow2(int(q_lens.max()) * group)))
    block_m = max(block_m, _next_pow2(group))
    block_n = 64 if block_n is None else block_n
    block_q = block_m // group
    tiles = [(r, q0) for r in range(R) for q0 in range(0, int(q_lens[r]), block_q)]
    work = np.array(tiles, dtype=np.int64).reshape(-1, 2)
    if num_splits is None:
        max_tiles = int(((prefix + q_lens).max() + block_n - 1) // block_n)
        num_splits = _num_splits(device, len(tiles) * num_kv_heads, max_tiles)
    bits, mask_start, mask_words = pack_tree_masks(anc)
    q_start = np.zeros(R + 1, dtype=np.int64)
    q_start[1:] = np.cumsum(q_lens)
    parts = [q_start, prefix, mask_start, mask_words, work[:, 0], work[:, 1], bits]
    flat = torch.from_numpy(np.concatenate([np.asarray(a).astype(np.int32) for a in parts]))
    dev = flat.to(device)              # one host-to-device copy per step
    views, at = [], 0
    for a in parts:
        views.append(dev[at:at + len(a)])
        at += len(a)
    if rows is None:
        table_rows = torch.arange(R, dtype=torch.int32, device=device)
    else:
        table_rows = torch.as_tensor(rows).to(device=device, dtype=torch.int32)[:R]
    return TritonTreePlan(
        num_tokens=int(q_start[-1]), num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, table=block_table, table_rows=table_rows,
        q_start=views[0], prefix_lens=views[1], mask_start=views[2], mask_words=views[3],
        work_req=views[4], work_q0=views[5], mask_bits=views[6], block_m=block_m,
        block_n=block_n, num_splits=int(num_splits))


def plan_slots(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor | Sequence[int],
               num_heads: int, num_kv_heads: int, head_dim: int, **kw) -> TritonTreePlan:
    """SGLang's token-slot cache: request ``r``'s position ``p`` (its prefix, then its
    root and tree tokens) is in slot ``req_to_token[req_pool_indices[r], p]``. ``kw``: as
    for :func:`plan`."""
    return plan(prefix_lens, parents, req_to_token, 1, num_heads, num_kv_heads, head_dim,
                rows=req_pool_indices, **kw)


def vllm_kv(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, block_size, kv_heads, head_dim]`` of one layer's
    vLLM GPU cache: the logical ``[num_blocks, kv_heads, block_size, 2 * head_dim]``
    tensor of vLLM's FlashAttention/Triton backends (whatever its physical stride order),
    or the older ``[num_blocks, 2, block_size, kv_heads, head_dim]`` one."""
    if kv_cache.dim() == 5:
        return kv_cache[:, 0], kv_cache[:, 1]
    kv = kv_cache.transpose(1, 2)
    return kv[..., :head_dim], kv[..., head_dim:]


def run(p: TritonTreePlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        scale: float, out: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Tree attention of one layer. ``query``: ``[N, heads, head_dim]`` (rows contiguous
    in the last dim); packed tree token ``t`` is row ``tokens[t]`` (default ``t``) of
    ``query`` and of ``out`` (allocated like ``query`` when not given; other rows are not
    written). ``key``/``value``: ``[num_blocks, block_size, kv_heads, head_dim]`` views,
    or ``[num_slots, kv_heads, head_dim]`` buffers for a :func:`plan_slots` plan.
    Returns ``out``."""
    if key.dim() == 3:
        key, value = key.unsqueeze(1), value.unsqueeze(1)
    H, D = p.num_heads, p.head_dim
    kvh = p.num_kv_heads
    if query.shape[1:] != (H, D) or key.shape[1:] != (p.block_size, kvh, D):
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} do not "
                         f"match the plan ({H} heads, {kvh} KV heads, head_dim {D}, "
                         f"block size {p.block_size})")
    if query.stride(2) != 1 or key.stride(3) != 1 or value.stride(3) != 1:
        raise ValueError("tree attention reads rows with a contiguous last dim")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query {query.dtype} and KV cache {key.dtype} differ")
    if out is None:
        out = torch.empty_like(query)
    if p.num_tokens == 0:
        return out
    d_pad = max(16, _next_pow2(D))
    has_tokens = tokens is not None
    if has_tokens:
        tokens = tokens.to(device=query.device, dtype=torch.int32)
    tok = tokens if has_tokens else p.q_start           # a placeholder pointer
    fp32 = query.dtype == torch.float32
    meta = dict(G=p.group, D=D, D_PAD=d_pad, BLOCK_M=p.block_m, BLOCK_N=p.block_n,
                PAGE=p.block_size, HAS_TOKENS=has_tokens,
                DOT_F32=_INTERPRETED and query.dtype == torch.bfloat16,
                PRECISION="ieee" if fp32 else "tf32",
                num_warps=4 if p.block_m <= 64 else 8, num_stages=2)
    S = p.num_splits
    if S > 1:
        key_ = (query.device, S)
        if key_ not in p._scratch:
            p._scratch[key_] = (
                torch.empty(S, p.num_tokens, H, d_pad, dtype=torch.float32, device=query.device),
                torch.empty(S, p.num_tokens, H, dtype=torch.float32, device=query.device))
        part_out, part_lse = p._scratch[key_]
        dst = part_out
    else:
        part_out = part_lse = dst = out
    grid = (len(p.work_req), kvh, S)
    _tree_attention[grid](
        query, key, value, dst, part_lse, tok,
        p.work_req, p.work_q0, p.q_start, p.prefix_lens, p.table, p.table_rows,
        p.table.stride(0), p.mask_bits, p.mask_start, p.mask_words,
        scale * 1.4426950408889634, S,                     # log2(e): softmax in base 2
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        dst.stride(0) if S == 1 else part_out.stride(1),
        dst.stride(1) if S == 1 else part_out.stride(2),
        part_out.stride(0) if S > 1 else 0,
        part_lse.stride(0) if S > 1 else 0, part_lse.stride(1) if S > 1 else 0,
        SPLIT=S > 1, **meta)
    if S > 1:
        block_h = min(16, _next_pow2(H))
        _merge_splits[(p.num_tokens, triton.cdiv(H, block_h))](
            part_out, part_lse, out, tok, H,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0), out.stride(1), S,
            D=D, D_PAD=d_pad, BLOCK_H=block_h, HAS_TOKENS=has_tokens)
    return out


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores ``s`` (``-inf`` = not visible) and its values ``v``
    into the running (acc, max, sum). A row with nothing visible yet keeps max ``-inf``
    and sum 0 without producing NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if DOT_F32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention(
        Q, K, V, Out, PartLse, Tokens,
        work_req, work_q0, q_start, prefix_lens, table, table_rows, table_stride,
        mask_bits, mask_start, mask_words, scale_log2, num_splits,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
        stride_vh, stride_ot, stride_oh, stride_os, stride_ls, stride_lt,
        G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr,
        HAS_TOKENS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Program (tile, KV head, split). Without ``SPLIT`` ``Out`` is the output; with it,
    ``Out`` is ``[splits, T, H, D_PAD]`` float32 partial outputs (normalised) and
    ``PartLse`` ``[splits, T, H]`` their base-2 log-sum-exp."""
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.load(work_req + w)
    q0 = tl.load(work_q0 + w)
    t0 = tl.load(q_start + r)
    q_len = tl.load(q_start + r + 1) - t0
    prefix = tl.load(prefix_lens + r)
    page_row = table + tl.load(table_rows + r).to(tl.int64) * table_stride

    # Rows: query token q0 + m // G, head kvh * G + m % G.
    m = tl.arange(0, BLOCK_M)
    qi = q0 + m // G
    head = kvh * G + m % G
    row_ok = (m < (BLOCK_M // G) * G) & (qi < q_len)
    if HAS_TOKENS:
        row = tl.load(Tokens + t0 + qi, mask=row_ok, other=0).to(tl.int64)
    else:
        row = (t0 + qi).to(tl.int64)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    q = tl.load(Q + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    # This tile's tokens see positions < prefix + (last token + 1).
    kv_end = prefix + tl.minimum(q0 + BLOCK_M // G, q_len)
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    n_free = prefix // BLOCK_N                  # tiles of prefix only: no mask
    per_split = tl.cdiv(n_tiles, num_splits)
    k_lo = split * per_split
    k_hi = tl.minimum(k_lo + per_split, n_tiles)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    for k in range(k_lo, tl.minimum(k_hi, n_free)):
        pos = k * BLOCK_N + n
        page = tl.load(page_row + pos // PAGE).to(tl.int64)
        off = pos % PAGE
        kt = tl.load(K + page[None, :] * stride_kb + off[None, :] * stride_ks
                     + kvh * stride_kh + d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(V + page[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=d_ok[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_F32, PRECISION)
    for k in range(tl.maximum(k_lo, n_free), k_hi):
        pos = k * BLOCK_N + n
        in_kv = pos < kv_end
        page = tl.load(page_row + pos // PAGE, mask=in_kv, other=0).to(tl.int64)
        off = pos % PAGE
        kt = tl.load(K + page[None, :] * stride_kb + off[None, :] * stride_ks
                     + kvh * stride_kh + d[:, None],
                     mask=d_ok[:, None] & in_kv[None, :], other=0.0)
        v = tl.load(V + page[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :],
                    mask=in_kv[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        j = tl.maximum(pos - prefix, 0)          # tree token index of a tree position
        tree = (pos >= prefix) & in_kv
        words = tl.load(mask_bits + tl.load(mask_start + r) + qi[:, None] * tl.load(mask_words + r)
                        + (j // 32)[None, :], mask=row_ok[:, None] & tree[None, :], other=0)
        seen = ((words >> (j % 32)[None, :]) & 1) != 0
        visible = (pos < prefix)[None, :] | (tree[None, :] & seen)
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, DOT_F32, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if not SPLIT:
        tl.store(Out + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        t = (t0 + qi).to(tl.int64)
        tl.store(Out + split * stride_os + t[:, None] * stride_ot + head[:, None] * stride_oh
                 + d[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(PartLse + split * stride_ls + t * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _merge_splits(PartOut, PartLse, Out, Tokens, H,
                  stride_ps, stride_pt, stride_ph, stride_ls, stride_lt, stride_ot, stride_oh,
                  num_splits, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_H: tl.constexpr, HAS_TOKENS: tl.constexpr):
    """Program (packed token, block of heads): the splits' partial outputs weighted by
    their log-sum-exp."""
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < H
    d = tl.arange(0, D_PAD)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(PartLse + s * stride_ls + t * stride_lt + h, mask=h_ok,
                      other=float("-inf"))
        o = tl.load(PartOut + s * stride_ps + t * stride_pt + h[:, None] * stride_ph
                    + d[None, :], mask=h_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        wgt = tl.math.exp2(lse - m_use)
        l_i = l_i * alpha + wgt
        acc = acc * alpha[:, None] + wgt[:, None] * o
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if HAS_TOKENS:
        row = tl.load(Tokens + t).to(tl.int64)
    else:
        row = t.to(tl.int64)
    tl.store(Out + row * stride_ot + h[:, None] * stride_oh + d[None, :],
             o.to(Out.dtype.element_ty), mask=h_ok[:, None] & (d < D)[None, :])
