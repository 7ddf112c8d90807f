"""SGLang attention backend for the CPU platform: torch_native plus tree verification.

SGLang's ``torch_native`` backend treats ``ForwardMode.TARGET_VERIFY`` as a plain
extend and ignores the speculative tree mask, so sibling draft tokens would see each
other. This backend verifies a batch of draft trees with spec_plugins' tree-attention C
kernel reading SGLang's token-slot KV cache in place (``kernels.tree_attention``'s slot
layout; float32, tree masks): each request's ``n`` tree queries attend to its cached
prefix plus the tree tokens its mask allows. Where the kernel does not apply (no C
compiler, another dtype, a mask with prefix columns) one SDPA call per layer does the
same. Decode is batched with SDPA (one call per layer instead of one per request);
prefill and anything unusual (cross attention, sliding windows, encoders) stay with
torch_native.

Verify contract (what a speculative worker must hand this backend):
- ``forward_batch.seq_lens[r]``: committed tokens of request r, whose KV slots are
  ``req_to_token[req_pool_indices[r], :seq_lens[r]]`` (the drafts excluded).
- ``forward_batch.out_cache_loc``: ``bs * n`` KV slots, request-major, tree-node order;
  the drafts' K/V are written there and read back from there.
- ``spec_info.draft_token_num`` = ``n`` (the same for every request) and
  ``spec_info.custom_mask``: bool, either ``bs`` flattened ``[n, n]`` tree masks or
  ``bs`` flattened ``[n, seq_lens[r] + n]`` full masks (prefix columns first), row i
  marking what tree node i may attend to (itself included); None means chains (each
  draft sees the drafts before it).
- ``positions``: ``seq_lens[r] + depth`` of each node (the rotary position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from spec_plugins.kernels import native, tree_attention
from spec_plugins.sglang import ATTENTION_BACKEND
from spec_plugins.sglang.version import logger


@dataclass
class _BatchedKV:
    """Per-forward gather plan shared by every layer. SDPA reads ``sdpa()``: which KV
    slots each request's queries read (padded to the longest request) and which of them
    each query sees, built on first use (a verify that the C kernel runs never needs it)."""

    forward_batch: object
    bs: int
    q_per_req: int
    # () -> ([bs, kv_len] int64 KV-pool slots (padding reads slot 0),
    #        [bs, 1, q_per_req, kv_len] bool visibility, or None: all visible)
    build_sdpa: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    tree: tree_attention.TreePlan | None = None  # the C kernel's plan (verify only)
    _sdpa: tuple | None = None

    def sdpa(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._sdpa is None:
            self._sdpa = self.build_sdpa()
        return self._sdpa


class CpuAttnBackend(TorchNativeAttnBackend):
    """torch_native with batched decode and a tree-masked TARGET_VERIFY path."""

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        mode = forward_batch.forward_mode
        if mode.is_target_verify():
            self.forward_metadata = _verify_plan(forward_batch, self.req_to_token_pool)
        elif mode.is_decode():
            self.forward_metadata = _decode_plan(forward_batch, self.req_to_token_pool)
        else:
            self.forward_metadata = None

    def _plan(self, forward_batch) -> _BatchedKV | None:
        plan = self.forward_metadata
        if isinstance(plan, _BatchedKV) and plan.forward_batch is forward_batch:
            return plan
        # A caller that skipped init_forward_metadata (e.g. a worker's own forward).
        self.init_forward_metadata(forward_batch)
        return self.forward_metadata

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if not forward_batch.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if _needs_torch_native(layer, forward_batch):
            raise NotImplementedError(
                f"{ATTENTION_BACKEND}: target verify supports plain causal self-attention "
                "only (no cross attention, sliding window or encoder)")
        return self._batched(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if _needs_torch_native(layer, forward_batch):
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self._batched(q, k, v, layer, forward_batch, save_kv_cache)

    def _batched(self, q, k, v, layer, forward_batch, save_kv_cache):
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        plan = self._plan(forward_batch)
        bs, n = plan.bs, plan.q_per_req
        heads, kv_heads = layer.tp_q_head_num, layer.tp_k_head_num
        if plan.tree is not None:
            query = q.reshape(bs * n, heads, layer.qk_head_dim)
            out = torch.empty_like(query)
            done = tree_attention.run_native_slots(
                plan.tree, query, out, torch.arange(bs * n),
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id), layer.scaling)
            self._log_verify_path(done, query.dtype)
            if done:
                return out.view(bs * n, heads * layer.v_head_dim)
        # [bs * n, heads, d] -> [bs, heads, n, d]
        query = q.reshape(bs, n, heads, layer.qk_head_dim).transpose(1, 2)
        slots, mask = plan.sdpa()
        keys = self.token_to_kv_pool.get_key_buffer(layer.layer_id)[slots]
        values = self.token_to_kv_pool.get_value_buffer(layer.layer_id)[slots]
        # [bs, kv_len, kv_heads, d] -> [bs, kv_heads, kv_len, d]
        keys = keys.to(query.dtype).transpose(1, 2)
        values = values.to(query.dtype).transpose(1, 2)
        out = scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=layer.scaling,
            enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).reshape(bs * n, heads * layer.v_head_dim)

    def _log_verify_path(self, kernel: bool, dtype) -> None:
        if getattr(self, "_verify_path_logged", False):
            return
        self._verify_path_logged = True
        if kernel:
            logger.info("spec_plugins: tree verification uses the C tree-attention kernel "
                        "on SGLang's KV cache (%s)", dtype)
        else:
            logger.info("spec_plugins: tree verification uses SDPA (the C kernel: %s)",
                        native.unavailable_reason() or f"not for {dtype}")


def _needs_torch_native(layer, forward_batch) -> bool:
    window = getattr(layer, "sliding_window_size", None)
    return (layer.is_cross_attention or forward_batch.encoder_lens is not None
            or (window is not None and window > -1)
            or layer.qk_head_dim != layer.v_head_dim)


def _prefix_slots(req_to_token_pool, req_pool_indices, seq_lens, width):
    """[bs, width] KV slots of each request's first ``width`` tokens (slot 0 past its
    length) and the [bs, width] validity mask."""
    cols = torch.arange(width, device=seq_lens.device)
    valid = cols[None, :] < seq_lens[:, None]
    rows = req_to_token_pool.req_to_token[:, :width][req_pool_indices.long()]
    return torch.where(valid, rows, 0).long(), valid


def _decode_plan(forward_batch, req_to_token_pool) -> _BatchedKV:
    seq_lens = forward_batch.seq_lens.long()
    width = int(seq_lens.max())
    slots, valid = _prefix_slots(req_to_token_pool, forward_batch.req_pool_indices,
                                 seq_lens, width)
    mask = None if bool(valid.all()) else valid[:, None, None, :]
    return _BatchedKV(forward_batch, len(seq_lens), 1, lambda: (slots, mask))


def _verify_plan(forward_batch, req_to_token_pool) -> _BatchedKV:
    spec = forward_batch.spec_info
    seq_lens = forward_batch.seq_lens.long()
    bs = seq_lens.shape[0]
    n = int(spec.draft_token_num)
    width = int(seq_lens.max())
    slots, prefix_valid = _prefix_slots(req_to_token_pool, forward_batch.req_pool_indices,
                                        seq_lens, width)
    prefix_mask, tree_mask = verify_masks(spec.custom_mask, seq_lens, n, prefix_valid)
    tree_slots = forward_batch.out_cache_loc.long().view(bs, n)

    def sdpa():
        mask = torch.cat([prefix_mask, tree_mask], dim=2)[:, None]
        return torch.cat([slots, tree_slots], dim=1), mask

    return _BatchedKV(forward_batch, bs, n, sdpa,
                      _kernel_plan(seq_lens, slots, prefix_valid, prefix_mask, tree_slots,
                                   tree_mask))


def _kernel_plan(seq_lens, prefix_slots, prefix_valid, prefix_mask, tree_slots, tree_mask):
    """The tree-attention kernel's plan, or None where it does not apply: no kernel, a
    node that does not see all of its prefix, or a tree mask that is not a tree's
    ancestor-or-self mask."""
    bs, n = tree_slots.shape
    if native.tree_attention_slots() is None:
        return None                # no kernel here: SDPA verifies, nothing to plan
    if not bool((prefix_mask == prefix_valid[:, None, :]).all()):
        return None
    masks = tree_mask.cpu().numpy()
    parents = tree_attention.parents_of_masks(masks)
    if parents is None:
        return None
    width = prefix_slots.shape[1]
    table = torch.zeros(bs, width + n, dtype=torch.int64)
    table[:, :width] = prefix_slots
    # Position seq_len + j of request r is its tree token j.
    table.scatter_(1, seq_lens.cpu()[:, None] + torch.arange(n), tree_slots.cpu())
    # The masks were just checked to be these parents' ancestor masks: reuse them.
    return tree_attention.plan_slots(seq_lens.tolist(), parents, table, ancestors=list(masks))


def verify_masks(custom_mask: torch.Tensor, seq_lens: torch.Tensor, n: int,
                 prefix_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A verify mask in either layout as ``([bs, n, width], [bs, n, n])``: what each
    tree node sees of the (padded) prefix and of the tree.

    Layouts: ``bs`` flattened ``[n, n]`` tree blocks (every node sees the whole
    prefix), ``bs`` flattened ``[n, seq_lens[r] + n]`` rows, prefix columns first, or
    None for chains (causal).
    """
    bs, width = prefix_valid.shape
    if custom_mask is None:  # a chain: each draft sees the ones before it
        chain = torch.ones(n, n, dtype=torch.bool, device=prefix_valid.device).tril()
        return prefix_valid[:, None, :].expand(bs, n, width), chain.expand(bs, n, n)
    flat = custom_mask.reshape(-1).bool()
    if flat.numel() == bs * n * n:
        return prefix_valid[:, None, :].expand(bs, n, width), flat.view(bs, n, n)
    row_lens = seq_lens + n
    if flat.numel() != int((row_lens * n).sum()):
        raise ValueError(
            f"{ATTENTION_BACKEND}: custom_mask has {flat.numel()} entries; expected "
            f"{bs * n * n} ([n, n] per request) or {int((row_lens * n).sum())} "
            f"([n, prefix + n] per request) for n={n}, prefix lengths {seq_lens.tolist()}")
    prefix = torch.zeros(bs, n, width, dtype=torch.bool, device=flat.device)
    tree = torch.empty(bs, n, n, dtype=torch.bool, device=flat.device)
    for r, block in enumerate(torch.split(flat, (row_lens * n).tolist())):
        rows = block.view(n, -1)
        prefix[r, :, :rows.shape[1] - n] = rows[:, :-n]
        tree[r] = rows[:, -n:]
    return prefix, tree


def register() -> None:
    """Make ``--attention-backend spec_plugins_cpu`` buildable in this process."""
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS, register_attention_backend)

    if ATTENTION_BACKEND not in ATTENTION_BACKENDS:
        register_attention_backend(ATTENTION_BACKEND)(CpuAttnBackend)
        logger.debug("spec_plugins: attention backend %s registered", ATTENTION_BACKEND)
