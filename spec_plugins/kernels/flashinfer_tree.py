"""Tree attention with FlashInfer (GPU): the inputs FlashInfer needs for a batch of draft
trees, and a plan/run pair that calls it.

Same contract as :mod:`spec_plugins.kernels.tree_attention`: request ``r`` has
``q_r = 1 + len(tree)`` query tokens (root, then nodes in topological order) whose K/V
sit at positions ``prefix_r + j`` of its pages; each sees the prefix plus its ancestors
and itself. Two shapes:

- ``"custom_mask"``: one ``BatchPrefillWithPagedKVCacheWrapper`` call with a custom mask,
  per request the row-major ``q_r x (prefix_r + q_r)`` mask, prefix columns included
  (:func:`custom_mask_inputs`). FlashInfer's FA2 kernel then applies the mask on every
  KV tile, the whole prefix included: the baseline.
- ``"split"``: the prefix with no mask (a paged prefill over the prefix pages, read
  once), the tree part alone (a ragged prefill over the tree tokens' K/V with a
  ``q_r x q_r`` mask), both with their log-sum-exp, merged by
  ``flashinfer.cascade.merge_state`` (:func:`split_inputs`).

Masks are packed little-endian, one segment per request starting on a byte, with
``mask_indptr`` in bytes. FlashInfer's ``plan(packed_custom_mask=...)`` keeps the
``mask_indptr`` it derives in bits while its kernels read it as byte offsets (correct
only for one request; flashinfer PR #2201, open), so :func:`plan` passes the packed mask
and then sets the wrapper's byte offsets itself.

The builders are numpy/torch only (unit-tested on a CPU); flashinfer is imported by
:func:`plan` and :func:`run` alone, which need it and a CUDA GPU (its kernels compile on
first use with nvcc). A token-slot cache (SGLang) is a paged one with ``page_size`` 1
and ``req_to_token`` rows as block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spec_plugins.kernels.tree_attention import ancestor_masks

MODES = ("split", "custom_mask")


@dataclass
class PagedInputs:
    """A paged prefill's indexing (FlashInfer's names), int32 on the table's device."""
    qo_indptr: torch.Tensor          # [R + 1]
    paged_kv_indptr: torch.Tensor    # [R + 1]: request r's pages are indices[indptr[r]:indptr[r+1]]
    paged_kv_indices: torch.Tensor
    paged_kv_last_page_len: torch.Tensor   # [R]: tokens in each request's last page


@dataclass
class PackedMasks:
    bits: torch.Tensor               # uint8, one little-endian segment per request
    indptr: torch.Tensor             # [R + 1] int32: segment starts in BYTES


@dataclass
class CustomMaskInputs:
    paged: PagedInputs               # KV: prefix and tree, prefix_r + q_r tokens
    mask: PackedMasks                # q_r x (prefix_r + q_r) per request


@dataclass
class SplitInputs:
    prefix: PagedInputs              # KV: the prefix_r tokens only, no mask
    tree_indptr: torch.Tensor        # [R + 1] int32: tree tokens (queries and keys alike)
    mask: PackedMasks                # q_r x q_r per request
    tree_pages: torch.Tensor         # [T] int64: page of each tree token's K/V
    tree_offsets: torch.Tensor       # [T] int64: its slot in that page


def pack_masks(masks: Sequence[np.ndarray], device) -> PackedMasks:
    """Row-major bool masks -> FlashInfer's packed form (as ``segment_packbits(...,
    bitorder="little")`` makes it): each request's bits from a new byte, offsets in
    bytes."""
    segs = [np.packbits(np.ascontiguousarray(m, dtype=bool).reshape(-1), bitorder="little")
            for m in masks]
    indptr = np.zeros(len(segs) + 1, dtype=np.int32)
    indptr[1:] = np.cumsum([len(s) for s in segs])
    bits = np.concatenate(segs) if segs else np.zeros(0, dtype=np.uint8)
    return PackedMasks(torch.from_numpy(bits).to(device), torch.from_numpy(indptr).to(device))


def _paged(q_lens, kv_lens, table, page_size, rows) -> PagedInputs:
    """Pages of the first ``kv_lens[r]`` positions of each request."""
    device = table.device
    pages = (kv_lens + page_size - 1) // page_size
    last = kv_lens - (pages - 1) * page_size
    req = np.repeat(np.arange(len(pages)), pages)
    col = np.arange(int(pages.sum())) - np.repeat(np.cumsum(pages) - pages, pages)
    row_ids = torch.as_tensor(np.asarray(rows)[req], device=device, dtype=torch.long)
    indices = table[row_ids, torch.as_tensor(col, device=device, dtype=torch.long)]

    def indptr(x):
        out = np.zeros(len(x) + 1, dtype=np.int32)
        out[1:] = np.cumsum(x)
        return torch.from_numpy(out).to(device)

    return PagedInputs(indptr(q_lens), indptr(pages), indices.to(torch.int32),
                       torch.from_numpy(last.astype(np.int32)).to(device))


def _requests(prefix_lens, parents, ancestors, rows):
    anc = ancestor_masks(parents) if ancestors is None else list(ancestors)
    q = np.array([m.shape[0] for m in anc], dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)[:len(anc)]
    rows = np.arange(len(anc)) if rows is None else np.asarray(
        rows.cpu() if torch.is_tensor(rows) else rows)[:len(anc)]
    return anc, q, prefix, rows


def custom_mask_inputs(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
                       block_table: torch.Tensor, page_size: int, *, rows=None,
                       ancestors: list[np.ndarray] | None = None) -> CustomMaskInputs:
    """FlashInfer's plain custom-mask prefill: request ``r``'s pages are
    ``block_table[rows[r]]`` (``rows`` defaults to ``0..R-1``)."""
    anc, q, prefix, rows = _requests(prefix_lens, parents, ancestors, rows)
    masks = []
    for m, p0 in zip(anc, prefix):
        full = np.ones((m.shape[0], p0 + m.shape[0]), dtype=bool)
        full[:, p0:] = m
        masks.append(full)
    return CustomMaskInputs(_paged(q, prefix + q, block_table, page_size, rows),
                            pack_masks(masks, block_table.device))


def split_inputs(prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
                 block_table: torch.Tensor, page_size: int, *, rows=None,
                 ancestors: list[np.ndarray] | None = None) -> SplitInputs:
    """The split shape's inputs. Every request needs a prefix (>= 1 token): a verify
    step always has one, and FlashInfer's merge expects both states."""
    anc, q, prefix, rows = _requests(prefix_lens, parents, ancestors, rows)
    if (prefix < 1).any():
        raise ValueError("the split shape needs a prefix of at least one token per request")
    device = block_table.device
    tree_indptr = np.zeros(len(q) + 1, dtype=np.int32)
    tree_indptr[1:] = np.cumsum(q)
    req = np.repeat(np.arange(len(q)), q)
    pos = prefix[req] + (np.arange(int(q.sum())) - tree_indptr[:-1][req])
    row_ids = torch.as_tensor(rows[req], device=device, dtype=torch.long)
    pages = block_table[row_ids, torch.as_tensor(pos // page_size, device=device)]
    return SplitInputs(
        prefix=_paged(q, prefix, block_table, page_size, rows),
        tree_indptr=torch.from_numpy(tree_indptr).to(device), mask=pack_masks(anc, device),
        tree_pages=pages.long(),
        tree_offsets=torch.as_tensor(pos % page_size, device=device, dtype=torch.long))


def unavailable_reason() -> str | None:
    """Why :func:`plan` cannot run here, or None."""
    if not torch.cuda.is_available():
        return "FlashInfer needs a CUDA GPU"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:      # not installed, or a broken install
        return f"flashinfer is not importable: {e}"
    return None


class Wrappers:
    """FlashInfer's wrappers for one shape, made once per device and re-planned every
    step (each owns a workspace; making them allocates). ``prefix_backend``: the split
    shape's unmasked prefix prefill; FA2 by default, the module the masked calls need
    anyway (every other backend is one more JIT build on first use)."""

    def __init__(self, device, mode: str = "split", workspace_mb: int = 128,
                 prefix_backend: str = "fa2"):
        import flashinfer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode

        def ws():
            return torch.empty(workspace_mb << 20, dtype=torch.uint8, device=device)

        if mode == "custom_mask":
            # Arbitrary masks: FA2 only.
            self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws(), "NHD",
                                                                       backend="fa2")
        else:
            self.paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                ws(), "NHD", backend=prefix_backend)
            self.tree = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws(), "NHD",
                                                                       backend="fa2")


@dataclass
class FlashInferTreePlan:
    wrappers: Wrappers
    inputs: CustomMaskInputs | SplitInputs


def _set_mask_indptr(wrapper, indptr: torch.Tensor) -> None:
    # See the module docstring: the wrapper derived bit offsets; its kernels read bytes.
    if wrapper._mask_indptr_buf is None:
        raise RuntimeError("flashinfer did not keep a custom mask for this plan")
    wrapper._mask_indptr_buf = indptr.to(wrapper._mask_indptr_buf.device)


def plan(wrappers: Wrappers, prefix_lens: Sequence[int], parents: Sequence[Sequence[int]],
         block_table: torch.Tensor, page_size: int, num_heads: int, num_kv_heads: int,
         head_dim: int, dtype: torch.dtype, scale: float, *, rows=None,
         ancestors: list[np.ndarray] | None = None) -> FlashInferTreePlan:
    """Plan ``wrappers`` (their shape) for one step's trees: once per step, then
    :func:`run` per layer."""
    kw = dict(num_qo_heads=num_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim,
              sm_scale=scale, q_data_type=dtype, kv_data_type=dtype)
    if wrappers.mode == "custom_mask":
        inp = custom_mask_inputs(prefix_lens, parents, block_table, page_size, rows=rows,
                                 ancestors=ancestors)
        pg = inp.paged
        wrappers.paged.plan(pg.qo_indptr, pg.paged_kv_indptr, pg.paged_kv_indices,
                            pg.paged_kv_last_page_len, page_size=page_size,
                            packed_custom_mask=inp.mask.bits, **kw)
        _set_mask_indptr(wrappers.paged, inp.mask.indptr)
        return FlashInferTreePlan(wrappers, inp)
    inp = split_inputs(prefix_lens, parents, block_table, page_size, rows=rows,
                       ancestors=ancestors)
    pg = inp.prefix
    wrappers.paged.plan(pg.qo_indptr, pg.paged_kv_indptr, pg.paged_kv_indices,
                        pg.paged_kv_last_page_len, page_size=page_size, causal=False, **kw)
    wrappers.tree.plan(inp.tree_indptr, inp.tree_indptr, packed_custom_mask=inp.mask.bits,
                       **kw)
    _set_mask_indptr(wrappers.tree, inp.mask.indptr)
    return FlashInferTreePlan(wrappers, inp)


def run(p: FlashInferTreePlan, query: torch.Tensor, key_cache: torch.Tensor,
        value_cache: torch.Tensor, tree_key: torch.Tensor | None = None,
        tree_value: torch.Tensor | None = None) -> torch.Tensor:
    """One layer. ``query`` ``[T, heads, head_dim]`` packed (request by request, root
    first); caches ``[num_pages, page_size, kv_heads, head_dim]`` (FlashInfer's NHD).
    ``tree_key``/``tree_value``: the tree tokens' K/V ``[T, kv_heads, head_dim]`` where
    the caller has them (an engine's layer input); else read from the cache."""
    from flashinfer.cascade import merge_state

    w, inp = p.wrappers, p.inputs
    if w.mode == "custom_mask":
        return w.paged.run(query, (key_cache, value_cache))
    o_prefix, lse_prefix = w.paged.run(query, (key_cache, value_cache), return_lse=True)
    if tree_key is None:
        tree_key = key_cache[inp.tree_pages, inp.tree_offsets]
        tree_value = value_cache[inp.tree_pages, inp.tree_offsets]
    o_tree, lse_tree = w.tree.run(query, tree_key, tree_value, return_lse=True)
    out, _ = merge_state(o_prefix, lse_prefix, o_tree, lse_tree)
    return out
