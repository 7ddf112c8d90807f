"""The Triton tree-attention kernel against ``tree_attention.reference``.

Triton's interpreter must be switched on before Triton is imported, and switching it on
in this process would make every later Triton import (vLLM's) interpreted too. So here,
without a GPU, the case tests skip and ``test_cases_through_interpreter`` runs this file
again in a subprocess with ``TRITON_INTERPRET=1``, where the cases run on CPU tensors.
With a GPU the cases run compiled on CUDA (the GPU-only tests).

Tolerances (against the float64 reference over the same rounded inputs): float32 2e-5
(IEEE dots, float32 softmax); float16 2e-3 and bfloat16 2e-2: the softmax weights are
rounded to the input dtype before the weighted sum of values, as FlashAttention does
(relative error 2^-11 resp. 2^-8 on each weight, values ~N(0, 1)).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from spec_plugins.kernels import tree_attention as ta  # noqa: E402
from spec_plugins.kernels import triton_tree as tt  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU and not INTERPRETED else "cpu"
needs_backend = pytest.mark.skipif(
    not (INTERPRETED or GPU),
    reason="compiled Triton needs a GPU; test_cases_through_interpreter runs these cases "
           "on the CPU")
gpu_only = pytest.mark.skipif(not GPU or INTERPRETED, reason="needs a CUDA GPU")

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def random_parents(rng, n):
    return [-1 if i == 0 else int(rng.integers(-1, i)) for i in range(n)]


def vllm_cache(g, num_blocks, bs, kvh, d, layout, dtype):
    """One layer's cache as vLLM's GPU backends hand it over: logical ``[blocks,
    kv_heads, block_size, 2 * d]`` stored in the identity order (``LBHNC``) or
    token-major (``LBNHC``), or the older ``[blocks, 2, block_size, kv_heads, d]``."""
    if layout == "legacy":
        return torch.randn(num_blocks, 2, bs, kvh, d, generator=g).to(dtype)
    if layout == "LBNHC":
        return torch.randn(num_blocks, bs, kvh, 2 * d, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(num_blocks, kvh, bs, 2 * d, generator=g).to(dtype)


def paged_case(seed, sizes, prefixes, h, kvh, d, bs, layout="LBHNC", dtype=torch.float32,
               nan_tail=True):
    """Random pages in random order; K/V of the tree tokens at ``prefix + j``. With
    ``nan_tail`` the rest of each request's last page holds NaN, which must never be read."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    need = [(p + n + 1 + bs - 1) // bs for p, n in zip(prefixes, sizes)]
    num_blocks = sum(need) + 3
    kv = vllm_cache(g, num_blocks, bs, kvh, d, layout, dtype)
    key, value = tt.vllm_kv(kv, d)
    perm = rng.permutation(num_blocks)
    table = torch.zeros(len(sizes), max(need) + 2, dtype=torch.int32)
    used = 0
    for r, k in enumerate(need):
        table[r, :k] = torch.from_numpy(perm[used:used + k].astype(np.int32))
        used += k
        end = prefixes[r] + sizes[r] + 1
        for pos in range(end, k * bs if nan_tail else 0):
            key[table[r, pos // bs], pos % bs] = float("nan")
            value[table[r, pos // bs], pos % bs] = float("nan")
    parents = [random_parents(rng, n) for n in sizes]
    q = torch.randn(sum(n + 1 for n in sizes), h, d, generator=g).to(dtype)
    return key, value, table, parents, q


def reference_paged(prefixes, parents, table, bs, q, key, value, scale):
    # The reference reads vLLM's CPU layout: keys [blocks, kvh, d, bs], values
    # [blocks, kvh, bs, d]; the GPU views are [blocks, bs, kvh, d].
    return ta.reference(prefixes, parents, table, bs, q.float(),
                        key.float().permute(0, 2, 3, 1), value.float().permute(0, 2, 1, 3),
                        scale)


def to_dev(*ts):
    return [t.to(DEVICE) for t in ts]


# (sizes, prefixes, heads, kv_heads, head_dim, block_size, layout, splits, block_m, block_n)
PAGED = {
    # several ragged trees, one of them only a root; GQA with a group of 3
    "ragged_gqa3": ([6, 0, 11, 3], [21, 5, 40, 16], 6, 2, 32, 16, "LBHNC", 1, 16, 16),
    # the same through three KV splits and a token-major physical layout
    "ragged_splits": ([6, 0, 11, 3], [21, 5, 40, 16], 6, 2, 32, 16, "LBNHC", 3, 16, 16),
    # query tiles of 2 tokens (group 8): many tiles per request
    "gqa8_small_tiles": ([9, 4], [7, 30], 8, 1, 16, 8, "legacy", 2, 16, 16),
    # no GQA, head_dim not a power of two, trees straddling pages and KV tiles
    "mha_d40_straddle": ([12, 7], [14, 31], 2, 2, 40, 8, "LBHNC", 1, 32, 16),
    # prefixes that end exactly on a KV tile, and no prefix at all
    "tile_aligned": ([5, 8], [32, 0], 4, 2, 16, 16, "LBHNC", 2, 16, 16),
    # default tiles and splits, as a caller would plan
    "defaults": ([10, 2, 17], [50, 3, 9], 4, 1, 32, 16, "LBNHC", None, None, None),
}


@needs_backend
@pytest.mark.parametrize("name", list(PAGED))
def test_paged_matches_reference(name):
    sizes, prefixes, h, kvh, d, bs, layout, splits, bm, bn = PAGED[name]
    key, value, table, parents, q = paged_case(list(PAGED).index(name), sizes, prefixes, h,
                                               kvh, d, bs, layout)
    want = reference_paged(prefixes, parents, table, bs, q, key, value, 0.18)
    dkey, dvalue, dtable, dq = to_dev(key, value, table, q)
    plan = tt.plan(prefixes, parents, dtable, bs, h, kvh, d, num_splits=splits, block_m=bm,
                   block_n=bn)
    out = tt.run(plan, dq, dkey, dvalue, 0.18)
    assert out.shape == q.shape
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[torch.float32], rtol=0)


@needs_backend
@pytest.mark.parametrize("splits", [1, 2])
def test_chains(splits):
    """A chain is causal attention over prefix + chain: compare with SDPA, causal, over
    each request's contiguous K/V."""
    sizes, prefixes, h, kvh, d, bs = [7, 3], [19, 40], 4, 2, 16, 8
    key, value, table, _, q = paged_case(5, sizes, prefixes, h, kvh, d, bs)
    chains = [list(range(-1, n - 1)) for n in sizes]
    dkey, dvalue, dtable, dq = to_dev(key, value, table, q)
    plan = tt.plan(prefixes, chains, dtable, bs, h, kvh, d, num_splits=splits, block_m=16,
                   block_n=16)
    out = tt.run(plan, dq, dkey, dvalue, 0.25).cpu()
    t = 0
    for r, (n, p0) in enumerate(zip(sizes, prefixes)):
        pos = torch.arange(p0 + n + 1)
        blk, off = table[r, pos // bs].long(), pos % bs
        k = key[blk, off].repeat_interleave(h // kvh, 1).transpose(0, 1)   # [h, L, d]
        v = value[blk, off].repeat_interleave(h // kvh, 1).transpose(0, 1)
        qr = q[t:t + n + 1].transpose(0, 1)                                # [h, n+1, d]
        # causal over the last n+1 positions, the prefix visible to all
        mask = torch.ones(n + 1, p0 + n + 1, dtype=torch.bool).tril(diagonal=p0)
        want = torch.nn.functional.scaled_dot_product_attention(qr, k, v, attn_mask=mask,
                                                                scale=0.25)
        torch.testing.assert_close(out[t:t + n + 1], want.transpose(0, 1), atol=2e-5, rtol=0)
        t += n + 1


@needs_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 2])
def test_half_precision(dtype, splits):
    sizes, prefixes, h, kvh, d, bs = [8, 2, 5], [27, 9, 0], 4, 2, 32, 16
    key, value, table, parents, q = paged_case(11, sizes, prefixes, h, kvh, d, bs, "LBNHC",
                                               dtype)
    want = reference_paged(prefixes, parents, table, bs, q, key, value, 0.2)
    dkey, dvalue, dtable, dq = to_dev(key, value, table, q)
    plan = tt.plan(prefixes, parents, dtable, bs, h, kvh, d, num_splits=splits, block_m=16,
                   block_n=16)
    out = tt.run(plan, dq, dkey, dvalue, 0.2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype], rtol=0)


@needs_backend
def test_rows_in_place():
    """As in an engine: the query is a strided view (q of a fused qkv projection), the
    tree tokens are some rows of the batch, and only those output rows are written."""
    sizes, prefixes, h, kvh, d, bs = [5, 3], [12, 20], 4, 2, 16, 8
    key, value, table, parents, q = paged_case(3, sizes, prefixes, h, kvh, d, bs)
    N = len(q) + 4
    tokens = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:len(q)]
    qkv = torch.randn(N, (h + 2 * kvh) * d)
    query = qkv[:, :h * d].view(N, h, d)
    query[tokens] = q
    out = torch.full((N, h, d), 7.0)
    dkey, dvalue, dtable, dquery, dout, dtokens = to_dev(key, value, table, query, out, tokens)
    plan = tt.plan(prefixes, parents, dtable, bs, h, kvh, d, num_splits=2, block_m=16,
                   block_n=16)
    assert tt.run(plan, dquery, dkey, dvalue, 0.3, out=dout, tokens=dtokens) is dout
    out = dout.cpu()
    want = reference_paged(prefixes, parents, table, bs, q, key, value, 0.3)
    torch.testing.assert_close(out[tokens].double(), want, atol=2e-5, rtol=0)
    rest = torch.ones(N, dtype=torch.bool)
    rest[tokens] = False
    assert (out[rest] == 7.0).all()


def slot_case(seed, sizes, prefixes, h, kvh, d, dtype=torch.float32, num_slots=300):
    """SGLang's pool: K and V ``[slots, kvh, d]``, ``req_to_token`` rows for a pool larger
    than the batch, requests at scattered rows; slot 0 (the padding) holds NaN."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(num_slots, kvh, d, generator=g).to(dtype)
    value = torch.randn(num_slots, kvh, d, generator=g).to(dtype)
    key[0] = value[0] = float("nan")
    lens = [p + n + 1 for p, n in zip(prefixes, sizes)]
    req_to_token = torch.zeros(len(sizes) + 3, max(lens) + 5, dtype=torch.int32)
    pool_rows = torch.from_numpy(rng.permutation(len(sizes) + 3)[:len(sizes)])
    perm = rng.permutation(num_slots - 1) + 1
    used = 0
    for r, n in enumerate(lens):
        req_to_token[pool_rows[r], :n] = torch.from_numpy(perm[used:used + n].astype(np.int32))
        used += n
    parents = [random_parents(rng, n) for n in sizes]
    q = torch.randn(sum(n + 1 for n in sizes), h, d, generator=g).to(dtype)
    return key, value, req_to_token, pool_rows, parents, q


@needs_backend
@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float32, 3),
                                          (torch.bfloat16, 2)])
def test_slots_match_reference(dtype, splits):
    """A token-slot cache is the paged one with pages of one token and req_to_token's
    rows as block table, which is how the reference reads it."""
    sizes, prefixes, h, kvh, d = [4, 9, 0], [17, 33, 6], 6, 2, 32
    key, value, r2t, rows, parents, q = slot_case(21, sizes, prefixes, h, kvh, d, dtype)
    table = r2t[rows]
    want = ta.reference(prefixes, parents, table, 1, q.float(), key.float().unsqueeze(-1),
                        value.float().unsqueeze(2), 0.2)
    dkey, dvalue, dr2t, drows, dq = to_dev(key, value, r2t, rows, q)
    plan = tt.plan_slots(prefixes, parents, dr2t, drows, h, kvh, d, num_splits=splits,
                         block_m=16, block_n=16)
    out = tt.run(plan, dq, dkey, dvalue, 0.2)
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype], rtol=0)


def test_plan_rejects_heads_that_do_not_group():
    with pytest.raises(ValueError, match="do not group"):
        tt.plan([3], [[-1]], torch.zeros(1, 1, dtype=torch.int32), 16, 6, 4, 32)


def test_packed_tree_masks_are_the_ancestor_masks():
    """Bit j of row i's words (little-endian int32) = token i sees token j, for trees
    wider than one word."""
    rng = np.random.default_rng(4)
    parents = [random_parents(rng, n) for n in (40, 0, 70)]
    anc = ta.ancestor_masks(parents)
    words, starts, widths = tt.pack_tree_masks(anc)
    for m, s, w in zip(anc, starts, widths):
        q = m.shape[0]
        rows = words[s:s + q * w].reshape(q, w).astype(np.int64) & 0xFFFFFFFF
        bits = (rows[:, :, None] >> np.arange(32)) & 1
        assert np.array_equal(bits.reshape(q, 32 * w)[:, :q].astype(bool), m)
        assert not bits.reshape(q, 32 * w)[:, q:].any()


def test_cases_through_interpreter():
    """Every case above on the CPU through Triton's interpreter, in a fresh process."""
    if INTERPRETED:
        pytest.skip("this is the interpreter's run")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(Path(__file__).resolve()), "-k", "not through_interpreter and not gpu"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, report
    summary = res.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, report


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_shapes(dtype):
    """Compiled on CUDA with default tiles and splits at a model's shapes (32 heads over
    8 KV heads, head_dim 128, 16-token pages, a long prefix) against the torch path."""
    sizes, prefixes, h, kvh, d, bs = [63, 20, 0, 40], [1500, 900, 37, 2048], 32, 8, 128, 16
    # (no NaN tail: the torch path reads whole pages)
    key, value, table, parents, q = paged_case(8, sizes, prefixes, h, kvh, d, bs, "LBNHC",
                                               dtype, nan_tail=False)
    key, value, table, q = key.cuda(), value.cuda(), table.cuda(), q.cuda()
    plan = tt.plan(prefixes, parents, table, bs, h, kvh, d)
    assert plan.num_splits > 1                         # a small batch: KV split
    out = tt.run(plan, q, key, value, d ** -0.5)
    host = ta.plan(prefixes, parents, table.cpu(), bs)
    want = ta.run(host, q.cpu().float(), key.cpu().float().permute(0, 2, 3, 1),
                  value.cpu().float().permute(0, 2, 1, 3), d ** -0.5)
    torch.testing.assert_close(out.cpu().float(), want, atol=TOL[dtype], rtol=0)
