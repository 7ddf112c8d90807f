"""Torch stand-ins for the Triton / sgl_kernel helpers SGLang's speculative paths call.

On the CPU platform there is no GPU to launch Triton kernels on and no ``sgl_kernel``
build to import, so every helper below would fail at its first call (or, for
``reconstruct_tree``, at import). Each stand-in keeps the original's signature and
in-place contract; they run once per verify step on tensors of a few dozen elements,
where plain torch (or a Python loop) costs microseconds.

Installed once per process by the platform (``install``), on the supported SGLang only.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import torch

from spec_plugins.sglang.version import logger, unsupported_reason

RECONSTRUCT_TREE_MODULE = "sglang.kernels.ops.speculative.reconstruct_tree"
_HOOK_SOURCE = ("spec_plugins_cpu_platform", "spec_plugins")


# --- tree metadata and greedy verification ------------------------------------------


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrieve_index,
                                       retrieve_next_token, retrieve_next_sibling,
                                       batch_size: int, draft_token_num: int) -> None:
    """NGRAM verify metadata from ``bs`` flattened ``[n, n]`` ancestor masks, in place:
    positions = prefix length + depth, first child, next sibling (replaces the
    ``sgl_kernel.speculative`` op that ``reconstruct_tree`` imports at module level)."""
    if batch_size == 0:
        return
    n = draft_token_num
    mask = tree_mask.reshape(-1)[: batch_size * n * n].view(batch_size, n, n).bool()
    node = torch.arange(n, device=mask.device)
    # ancestors[b, i, j]: j is a strict ancestor of i.
    ancestors = mask & (node[None, :] < node[:, None])
    depth = ancestors.sum(-1)
    positions.view(batch_size, n).copy_(depth + verified_seq_len.view(-1, 1).to(depth.dtype))
    retrieve_index.view(batch_size, n).copy_(
        node + n * torch.arange(batch_size, device=mask.device)[:, None])
    # parent = deepest (largest-index) ancestor, -1 for a root.
    parent = torch.where(ancestors, node, -1).amax(-1)
    # first child of t = smallest k with t among k's ancestors.
    first = torch.where(ancestors, node[None, :, None], n).amin(1)
    retrieve_next_token.view(batch_size, n).copy_(torch.where(first < n, first, -1))
    # next sibling of t = smallest k > t with the same parent (roots have none).
    same = (parent[:, :, None] == parent[:, None, :]) & (node[:, None] > node[None, :])
    sibling = torch.where(same, node[None, :, None], n).amin(1)
    retrieve_next_sibling.view(batch_size, n).copy_(
        torch.where((sibling < n) & (parent >= 0), sibling, -1))


def verify_tree_greedy(predicts, accept_index, accept_token_num, candidates, retrieve_index,
                       retrieve_next_token, retrieve_next_sibling, target_predict,
                       topk: int = -1):
    """Greedy tree walk (``spec_tree.verify_tree_greedy_func``; Triton/sgl_kernel only):
    from the root, follow the child whose draft token equals the target's argmax at its
    parent; write accepted node indices, their count and the target tokens in place."""
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    cand = candidates.tolist()
    index = retrieve_index.tolist()
    child = retrieve_next_token.tolist()
    sibling = retrieve_next_sibling.tolist()
    target = target_predict.reshape(-1).tolist()
    predicted = predicts.tolist()
    accepted = accept_index.tolist()
    counts = [0] * bs
    for b in range(bs):
        last = index[b][0]
        accepted[b][0] = last
        node = 0
        for _ in range(1, steps):
            node = child[b][node]
            want = target[last]
            while node != -1 and cand[b][node] != want:
                node = sibling[b][node]
            if node == -1:
                break
            predicted[last] = want
            counts[b] += 1
            last = index[b][node]
            accepted[b][counts[b]] = last
        predicted[last] = target[last]
    predicts.copy_(torch.tensor(predicted, dtype=predicts.dtype))
    accept_index.copy_(torch.tensor(accepted, dtype=accept_index.dtype))
    accept_token_num.copy_(torch.tensor(counts, dtype=accept_token_num.dtype))
    return predicts, accept_index, accept_token_num


def tree_speculative_sampling_target_only(
        predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
        retrive_next_sibling, uniform_samples, uniform_samples_for_final_sampling,
        target_probs, draft_probs, threshold_single: float = 1.0, threshold_acc: float = 1.0,
        deterministic: bool = True) -> None:
    """Tree verification of sampled requests (``verify_sampling``'s op of that name; a
    CUDA JIT kernel, None elsewhere, so a sampled request would crash the verify step).

    Per level, the children of the last accepted node are tried in sibling order: child
    k is accepted when its token has target mass and the coin of its parent falls below
    the cumulative target mass of the children tried so far (``/ threshold_acc``), or
    its own mass reaches ``threshold_single``. The bonus token is drawn from the last
    accepted node's target distribution without the tokens rejected there, which keeps
    the output distributed as the target's. ``draft_probs`` is not written (the CUDA
    kernel uses it as scratch for the rejected tokens).
    """
    bs = candidates.shape[0]
    steps = accept_index.shape[1]
    threshold_acc = max(float(threshold_acc), 1e-9)
    tokens = candidates.tolist()
    index = retrive_index.tolist()
    child = retrive_next_token.tolist()
    sibling = retrive_next_sibling.tolist()
    coins = uniform_samples.tolist()
    final_coins = uniform_samples_for_final_sampling.tolist()
    accepted_all = accept_index.tolist()
    counts = [0] * bs
    for b in range(bs):
        at, last, coin, mass = 0, index[b][0], coins[b][0], 0.0
        accepted_all[b][0] = last
        rejected = []
        node = 0
        for _ in range(1, steps):
            node = child[b][node]
            while node != -1:
                token = tokens[b][node]
                p = float(target_probs[b, at, token])
                mass += p
                if p > 0 and (coin < mass / threshold_acc or p >= threshold_single):
                    predicts[last] = token
                    counts[b] += 1
                    last = index[b][node]
                    accepted_all[b][counts[b]] = last
                    at, coin, mass, rejected = node, coins[b][node], 0.0, []
                    break
                rejected.append(token)
                node = sibling[b][node]
            if node == -1:
                break
        residual = target_probs[b, at].clone()
        if rejected:
            residual[rejected] = 0
        predicts[last] = _sample(residual, final_coins[b])
    accept_index.copy_(torch.tensor(accepted_all, dtype=accept_index.dtype))
    accept_token_num.copy_(torch.tensor(counts, dtype=accept_token_num.dtype))


def _sample(weights: torch.Tensor, coin: float) -> int:
    """Inverse-CDF draw from unnormalised ``weights`` with a uniform ``coin``."""
    cdf = torch.cumsum(weights, 0)
    pick = int(torch.searchsorted(cdf, coin * cdf[-1], right=True))
    if pick < weights.numel():
        return pick
    nonzero = torch.nonzero(weights > 0)
    return int(nonzero[-1]) if nonzero.numel() else weights.numel() - 1


def top_k_renorm_prob(probs: torch.Tensor, top_ks) -> torch.Tensor:
    """Keep each row's ``top_k`` largest probabilities, renormalised (``renorm``'s op;
    FlashInfer/Triton only, None here)."""
    k = torch.as_tensor(top_ks, device=probs.device).reshape(-1, 1).long()
    k = k.expand(probs.shape[0], 1).clamp(1, probs.shape[-1])
    kth = torch.sort(probs, dim=-1, descending=True).values.gather(-1, k - 1)
    kept = torch.where(probs >= kth, probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_ps) -> torch.Tensor:
    """Keep each row's smallest most-likely set with mass >= ``top_p``, renormalised
    (``renorm``'s op; FlashInfer/Triton only, None here)."""
    p = torch.as_tensor(top_ps, device=probs.device, dtype=probs.dtype).reshape(-1, 1)
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(ordered, -1) - ordered  # mass of the more likely tokens
    ordered = torch.where(before < p, ordered, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum(-1, keepdim=True)


# --- KV slot bookkeeping ------------------------------------------------------------


def _ranges(starts: torch.Tensor, ends: torch.Tensor):
    """Row ids and column ids of the concatenated ranges [starts[i], ends[i])."""
    lens = (ends - starts).long()
    rows = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    offsets = torch.cumsum(lens, 0) - lens
    cols = torch.arange(int(lens.sum()), device=lens.device) - offsets[rows] + starts.long()[rows]
    return rows, cols


def assign_extend_cache_locs(req_pool_indices, req_to_token, start_offset, end_offset,
                             batch_size: int, draft_token_num: int, device):
    """KV slots ``req_to_token[r, start:end]`` of each request, concatenated (the
    platform hook for ``cache_locs.assign_extend_cache_locs_func``; Triton only)."""
    rows, cols = _ranges(start_offset, end_offset)
    return req_to_token[req_pool_indices.long()[rows], cols].to(torch.int64)


def assign_req_to_token_pool(req_pool_indices, req_to_token, start_offset, end_offset,
                             out_cache_loc, batch_size: int) -> None:
    """Write ``out_cache_loc`` into ``req_to_token[r, start:end]`` per request
    (``allocation.assign_req_to_token_pool_func``; Triton only)."""
    rows, cols = _ranges(start_offset, end_offset)
    req_to_token[req_pool_indices.long()[rows], cols] = out_cache_loc[: cols.numel()].to(
        req_to_token.dtype)


def fill_front_out_cache_loc(num_front, out_cache_loc, front_out_cache_loc) -> None:
    """Pack the first ``num_front[i]`` slots of each request's verify window
    (``cache_locs.fill_front_out_cache_loc_func``; Triton only)."""
    window = out_cache_loc.view(num_front.numel(), -1)
    keep = torch.arange(window.shape[1], device=window.device)[None, :] < num_front[:, None]
    front = window[keep]
    front_out_cache_loc[: front.numel()] = front


def fill_accept_out_cache_loc(accept_index, out_cache_loc, accept_out_cache_loc,
                              size: int) -> None:
    """Pack the KV slots of the accepted nodes, skipping -1 entries
    (``eagle.fill_accept_out_cache_loc_func``; Triton only)."""
    index = accept_index.reshape(-1)[:size]
    slots = out_cache_loc[index[index != -1].long()]
    accept_out_cache_loc[: slots.numel()] = slots


def fill_bonus_tokens(accept_tokens, accept_lens, bonus_tokens, accept_stride: int,
                      batch_size: int) -> None:
    """Each request's last accepted token (``eagle.fill_bonus_tokens_func``; Triton only)."""
    rows = torch.arange(batch_size, device=accept_lens.device)
    bonus_tokens[:batch_size] = accept_tokens.reshape(-1)[
        rows * accept_stride + accept_lens[:batch_size].long() - 1]


def get_last_loc(req_to_token, req_pool_indices_tensor, prefix_lens_tensor):
    """KV slot of each request's last prefix token, -1 for none (``allocation.get_last_loc``
    picks its Triton kernel for every backend not named torch_native; paged KV only)."""
    last = req_to_token[req_pool_indices_tensor, (prefix_lens_tensor - 1).clamp(min=0)]
    return torch.where(prefix_lens_tensor > 0, last, torch.full_like(last, -1))


# Dotted SGLang function -> stand-in, applied with HookRegistry REPLACE.
REPLACEMENTS = {
    "sglang.kernels.ops.speculative.spec_tree.verify_tree_greedy_func": verify_tree_greedy,
    "sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func":
        fill_front_out_cache_loc,
    "sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func":
        fill_accept_out_cache_loc,
    "sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func": fill_bonus_tokens,
    "sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func": assign_req_to_token_pool,
    "sglang.srt.mem_cache.allocation.get_last_loc": get_last_loc,
}


# Kernels SGLang resolves to None off CUDA (module -> name -> stand-in): without them a
# sampled (temperature > 0) request crashes speculative verification.
MISSING_KERNELS = {
    "sglang.kernels.ops.speculative.verify_sampling": {
        "tree_speculative_sampling_target_only": tree_speculative_sampling_target_only},
    "sglang.kernels.ops.sampling.renorm": {"top_k_renorm_prob": top_k_renorm_prob,
                                           "top_p_renorm_prob": top_p_renorm_prob},
}
# Modules that import those kernels by name (``from ... import name``).
KERNEL_CONSUMERS = ("sglang.srt.speculative.eagle_utils",)


# --- installation -------------------------------------------------------------------


def install_import_shims() -> None:
    """Let ``ngram_worker`` import: its ``reconstruct_tree`` dependency imports
    ``sgl_kernel.speculative`` at module level, which has no CPU build here. Where that
    import fails, the module is replaced by one whose function is the torch stand-in."""
    if RECONSTRUCT_TREE_MODULE in sys.modules:
        return
    try:
        importlib.import_module(RECONSTRUCT_TREE_MODULE)
        return
    except ImportError:
        pass
    shim = types.ModuleType(RECONSTRUCT_TREE_MODULE, "spec_plugins: torch stand-in for "
                            "SGLang's reconstruct_tree (no sgl_kernel on this machine)")
    shim.reconstruct_indices_from_tree_mask_func = reconstruct_indices_from_tree_mask
    shim.reconstruct_indices_from_tree_mask = reconstruct_indices_from_tree_mask
    sys.modules[RECONSTRUCT_TREE_MODULE] = shim
    parent, _, name = RECONSTRUCT_TREE_MODULE.rpartition(".")
    setattr(importlib.import_module(parent), name, shim)
    logger.info("spec_plugins: %s replaced by a torch stand-in", RECONSTRUCT_TREE_MODULE)


@functools.cache
def install() -> bool:
    """Apply every stand-in once per process; False (and nothing changed) on an SGLang
    this module was not checked against."""
    reason = unsupported_reason()
    if reason is not None:
        logger.warning(reason)
        return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

    install_import_shims()
    source = HookSource(*_HOOK_SOURCE)
    for target, replacement in REPLACEMENTS.items():
        HookRegistry.register(target, replacement, HookType.REPLACE, source=source)
    HookRegistry.apply_hooks()
    for module, functions in MISSING_KERNELS.items():
        _bind_missing(module, functions)
    return True


def _bind_missing(module_name: str, functions: dict) -> None:
    """Bind stand-ins for kernels SGLang resolved to None on this platform, in their
    module and in the modules that imported them by name. (HookRegistry cannot patch
    these: it would replace every module attribute that is None.)"""
    module = importlib.import_module(module_name)
    for name, function in functions.items():
        if getattr(module, name, None) is not None:
            continue  # a real kernel exists here
        setattr(module, name, function)
        for consumer in KERNEL_CONSUMERS:
            loaded = importlib.import_module(consumer)
            if name in vars(loaded) and getattr(loaded, name) is None:
                setattr(loaded, name, function)


@functools.cache
def mha_kv_pool_cls() -> type:
    """SGLang's MHA KV pool without its Triton KV-copy kernel: speculation builds the
    pool with ``enable_kv_cache_copy`` (a Triton warm-up at construction and Triton
    moves of accepted KV); torch's indexed copy moves it here instead."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    class CpuMHATokenToKVPool(MHATokenToKVPool):
        def __init__(self, *args, **kwargs):
            kwargs["enable_kv_cache_copy"] = False
            super().__init__(*args, **kwargs)
            self.use_native_move_kv_cache = True

    return CpuMHATokenToKVPool
