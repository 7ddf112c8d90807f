"""Micro-benchmark: spec_plugins tree attention vs vLLM's CPU kernel on the same cache.

vLLM's kernel can only do causal attention (a chain); ours does a tree of the same
number of query tokens, with the C kernel (the default) and with the torch path. Side by
side in one run, per layer, SmolLM2-135M's attention
shape (9 query heads, 3 KV heads, head dim 64), block size 128, float32:

    LD_PRELOAD=.venv/lib/libiomp5.so .venv/bin/python integration/bench_tree_attention.py

``--slots``: SGLang's token-slot cache instead (no vLLM needed): the C kernel's slot
entry point against what the SGLang CPU backend does without it, one SDPA call with a
boolean tree mask over the gathered K/V:

    .venv-sglang/bin/python integration/bench_tree_attention.py --slots
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from spec_plugins.kernels import native, tree_attention as ta

H, KVH, D, BS = 9, 3, 64, 128


def bench(f, n=200) -> float:
    for _ in range(10):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def slots() -> None:
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = torch.Generator().manual_seed(0)
    num_slots, ctx = 6000, 300
    key = torch.randn(num_slots, KVH, D, generator=g)
    value = torch.randn(num_slots, KVH, D, generator=g)
    print(f"torch threads {torch.get_num_threads()}, context {ctx}")
    print("| requests | query tokens | SDPA, tree mask (ms) | tree, C (ms) | ratio |")
    print("|---|---|---|---|---|")
    for R, Q in [(1, 9), (1, 17), (3, 9), (8, 9), (8, 17)]:
        table = torch.stack([torch.randperm(num_slots, generator=g)[:ctx + Q]
                             for _ in range(R)])
        chains = [list(range(-1, Q - 2))] * R
        plan = ta.plan_slots([ctx] * R, chains, table)
        q = torch.randn(R * Q, H, D, generator=g)
        out, rows = torch.empty_like(q), torch.arange(R * Q)
        assert ta.run_native_slots(plan, q, out, rows, key, value, 0.125), \
            native.unavailable_reason()
        mask = torch.ones(R, 1, Q, ctx + Q, dtype=torch.bool)
        mask[..., ctx:] = torch.ones(Q, Q, dtype=torch.bool).tril()

        def masked_sdpa():
            sdpa(q.view(R, Q, H, D).transpose(1, 2), key[table].transpose(1, 2),
                 value[table].transpose(1, 2), attn_mask=mask, scale=0.125, enable_gqa=True)

        t_sdpa = bench(masked_sdpa)
        t_c = bench(lambda: ta.run_native_slots(plan, q, out, rows, key, value, 0.125))
        print(f"| {R} | {Q} | {t_sdpa:.3f} | {t_c:.3f} | {t_c / t_sdpa:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", action="store_true", help="SGLang's token-slot cache")
    if ap.parse_args().slots:
        return slots()
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    nb = 256
    kv = torch.randn(nb, KVH, BS, 2 * D, generator=g)
    key_cache, value_cache = kv.view(nb, KVH, 2 * BS, D).chunk(2, dim=2)
    key_t, value = ta.split_cache(kv)
    rng = np.random.default_rng(0)
    print("| requests | context | query tokens | vLLM causal (ms) | tree, C (ms) | ratio "
          "| tree, torch (ms) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for R, ctx, Q in [(1, 500, 5), (1, 500, 9), (1, 500, 17), (8, 500, 5), (8, 500, 9),
                      (1, 2000, 9)]:
        table = torch.from_numpy(rng.permutation(nb)[:R * 20].reshape(R, 20).astype(np.int32))
        q = torch.randn(R * Q, H, D, generator=g)
        out = torch.empty_like(q)
        qsl = torch.arange(R + 1, dtype=torch.int32) * Q
        seq = torch.full((R,), ctx + Q, dtype=torch.int32)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=R, num_heads=H, num_kv_heads=KVH, head_dim=D, seq_lens=seq,
            dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa="vec", enable_kv_split=False)

        def stock():
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=qsl, seq_lens=seq, scale=0.125, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0,
                scheduler_metadata=md, s_aux=None)

        parents = [[-1 if i == 0 else int(rng.integers(-1, i)) for i in range(Q - 1)]
                   for _ in range(R)]
        plan = ta.plan([ctx] * R, parents, table, BS)
        t_stock = bench(stock)
        rows = torch.arange(R * Q)
        assert ta.run_native(plan, q, out, rows, kv, 0.125), native.unavailable_reason()
        t_c = bench(lambda: ta.run_native(plan, q, out, rows, kv, 0.125))
        t_torch = bench(lambda: ta.run(plan, q, key_t, value, 0.125))
        print(f"| {R} | {ctx} | {Q} | {t_stock:.3f} | {t_c:.3f} | {t_c / t_stock:.2f}x "
              f"| {t_torch:.3f} | {t_torch / t_stock:.2f}x |")


if __name__ == "__main__":
    main()
