"""Tree attention: both paths (the C kernel and torch) against the reference and against
plain attention over each node's root-to-node chain, on random trees in ragged batches."""

import os
import shutil

import numpy as np
import pytest
import torch

from spec_plugins.kernels import native, tree_attention as ta

H, KVH, D, BS = 6, 2, 32, 32

# CI's machine has a C compiler, so the C kernel is tested there; it skips only where
# none exists (where the engine also falls back to the torch path).
HAS_CC = shutil.which(os.environ.get("CC") or "cc") is not None
PATHS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not HAS_CC,
                                                                  reason="no C compiler"))]


def attend(path, plan, q, kv, scale):
    if path == "torch":
        return ta.run(plan, q, *ta.split_cache(kv), scale)
    out = torch.full_like(q, float("nan"))
    assert ta.run_native(plan, q, out, torch.arange(len(q)), kv, scale), \
        native.unavailable_reason()
    return out


def random_parents(rng, n):
    return [-1 if i == 0 else int(rng.integers(-1, i)) for i in range(n)]


def make_batch(seed, sizes, prefixes, num_blocks=64):
    """Random cache, block tables and queries; K/V of the tree tokens live at
    ``prefix + j`` like in the engine."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, KVH, BS, 2 * D, generator=g)
    need = [(p + n + 1 + BS - 1) // BS for p, n in zip(prefixes, sizes)]
    perm = rng.permutation(num_blocks)
    table = torch.zeros(len(sizes), max(need), dtype=torch.int32)
    used = 0
    for r, k in enumerate(need):
        table[r, :k] = torch.from_numpy(perm[used:used + k].astype(np.int32))
        used += k
    parents = [random_parents(rng, n) for n in sizes]
    q = torch.randn(sum(n + 1 for n in sizes), H, D, generator=g)
    return kv, table, parents, q


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_ragged_batches(seed, path):
    rng = np.random.default_rng(100 + seed)
    R = int(rng.integers(1, 6))
    sizes = [int(rng.integers(0, 12)) for _ in range(R)]
    prefixes = [int(rng.integers(0, 150)) for _ in range(R)]
    kv, table, parents, q = make_batch(seed, sizes, prefixes)
    key_t, value = ta.split_cache(kv)
    plan = ta.plan(prefixes, parents, table, BS)
    out = attend(path, plan, q, kv, 0.17)
    ref = ta.reference(prefixes, parents, table, BS, q, key_t, value, 0.17)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_each_node_equals_attention_over_its_chain(path):
    """Exact check: node i's output is ordinary causal attention of its query over the
    prefix followed by the root-to-i path, computed from contiguous tensors."""
    sizes, prefixes = [9, 5, 0], [40, 3, 70]
    kv, table, parents, q = make_batch(7, sizes, prefixes)
    key_t, value = ta.split_cache(kv)
    out = attend(path, ta.plan(prefixes, parents, table, BS), q, kv, 0.2)
    t = 0
    for r, (n, p0) in enumerate(zip(sizes, prefixes)):
        pos = torch.arange(p0 + n + 1)
        blk, off = table[r, pos // BS].long(), pos % BS
        K = key_t[blk, :, :, off]             # [L, KVH, D] in logical order
        V = value[blk, :, off]
        for i in range(n + 1):
            path, node = [], i - 1
            while node >= 0:
                path.append(node + 1)
                node = parents[r][node]
            cols = list(range(p0)) + [p0] + [p0 + j for j in reversed(path)]
            for h in range(H):
                k, v = K[cols, h // (H // KVH)], V[cols, h // (H // KVH)]
                want = torch.softmax(k @ q[t, h] * 0.2, 0) @ v
                torch.testing.assert_close(out[t, h], want, atol=1e-5, rtol=1e-4)
            t += 1


@pytest.mark.parametrize("path", PATHS)
def test_padding_and_empty_trees_stay_finite(path):
    sizes, prefixes = [0, 15], [0, 5]
    kv, table, parents, q = make_batch(3, sizes, prefixes)
    out = attend(path, ta.plan(prefixes, parents, table, BS), q, kv, 0.3)
    assert torch.isfinite(out).all()
    # A root with no prefix and no tree sees only itself: the output is its value.
    _, value = ta.split_cache(kv)
    torch.testing.assert_close(out[0], value[table[0, 0], :, 0].repeat_interleave(H // KVH, 0))


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="nodes must follow their parents"):
        ta.ancestor_masks([[-1, 2, 0]])


@pytest.mark.parametrize("path", PATHS)
def test_chain_equals_vllm_cpu_kernel(path):
    """On a chain, tree attention is causal attention: compare with vLLM's own CPU
    kernel reading the same cache (this pins the cache layout too)."""
    ops = pytest.importorskip("vllm._custom_ops")
    sizes, prefixes = [8, 3], [45, 100]
    kv, table, _, q = make_batch(11, sizes, prefixes)
    chains = [list(range(-1, n - 1)) for n in sizes]
    key_cache, value_cache = kv.view(kv.shape[0], KVH, 2 * BS, D).chunk(2, dim=2)
    qsl = torch.tensor([0, 9, 13], dtype=torch.int32)
    seq = torch.tensor([54, 104], dtype=torch.int32)
    md = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=2, num_heads=H, num_kv_heads=KVH, head_dim=D, seq_lens=seq,
        dtype=torch.float32, query_start_loc=qsl, causal=True, sliding_window_size=-1,
        isa="vec", enable_kv_split=False)
    want = torch.empty_like(q)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=want,
        query_start_loc=qsl, seq_lens=seq, scale=0.125, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=table, softcap=0, scheduler_metadata=md, s_aux=None)
    got = attend(path, ta.plan(prefixes, chains, table, BS), q, kv, 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_native_reads_and_writes_rows_in_place():
    """As in the engine: queries are a strided view (q of a fused qkv projection), the
    tree tokens are some rows of the batch, and only those output rows are written. The
    cache past each request's tokens holds NaN, which must never be read."""
    sizes, prefixes = [6, 2], [130, 7]
    kv, table, parents, q = make_batch(5, sizes, prefixes)
    key_t, value = ta.split_cache(kv)
    for r, (n, p0) in enumerate(zip(sizes, prefixes)):
        end = p0 + n + 1
        for pos in range(end, (end + BS - 1) // BS * BS):   # the rest of its last block
            key_t[table[r, pos // BS], :, :, pos % BS] = float("nan")
            value[table[r, pos // BS], :, pos % BS] = float("nan")
    N = len(q) + 5
    tokens = torch.randperm(N)[:len(q)]
    qkv = torch.randn(N, (H + 2 * KVH) * D)
    query = qkv[:, :H * D].view(N, H, D)
    query[tokens] = q
    out = torch.full((N, H, D), 7.0)
    plan = ta.plan(prefixes, parents, table, BS)
    assert ta.run_native(plan, query, out, tokens, kv, 0.2)
    want = ta.reference(prefixes, parents, table, BS, q, *ta.split_cache(kv), 0.2)
    torch.testing.assert_close(out[tokens].double(), want, atol=2e-5, rtol=1e-4)
    rest = torch.ones(N, dtype=torch.bool)
    rest[tokens] = False
    assert (out[rest] == 7.0).all()


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
def test_native_head_dim_not_a_multiple_of_16():
    g = torch.Generator().manual_seed(2)
    d, kvh, h = 40, 1, 3
    kv = torch.randn(8, kvh, BS, 2 * d, generator=g)
    table = torch.tensor([[3, 1, 6]], dtype=torch.int32)
    parents = [[-1, -1, 0, 2]]
    q = torch.randn(5, h, d, generator=g)
    plan = ta.plan([70], parents, table, BS)
    out = torch.empty_like(q)
    assert ta.run_native(plan, q, out, torch.arange(5), kv, 0.15)
    want = ta.reference([70], parents, table, BS, q, *ta.split_cache(kv), 0.15)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


def test_native_declines_what_it_does_not_handle(monkeypatch):
    """Non-float32 data or a block size that is not a multiple of 16 go to the torch
    path (run_native returns False and writes nothing); so does a disabled kernel."""
    kv, table, parents, q = make_batch(1, [3], [10])
    plan = ta.plan([10], parents, table, BS)
    out = torch.zeros_like(q)
    rows = torch.arange(len(q))
    assert not ta.run_native(plan, q.double(), out.double(), rows, kv.double(), 0.1)
    kv8 = kv.view(kv.shape[0], KVH, BS // 4, 8 * D)[:, :, :, :2 * D].contiguous()
    assert not ta.run_native(ta.plan([10], parents, table, 8), q, out, rows, kv8, 0.1)
    assert (out == 0).all()
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("SPEC_PLUGINS_NATIVE", "0")
    assert not ta.run_native(plan, q, out, rows, kv, 0.1)
    assert "SPEC_PLUGINS_NATIVE=0" in native.unavailable_reason()


def slot_batch(seed, sizes, prefixes, d=D, num_slots=700):
    """A token-slot cache (SGLang's layout): K and V [slots, KVH, d], each request's
    positions in random slots; positions past a request's tokens hold NaN slots."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(num_slots, KVH, d, generator=g)
    value = torch.randn(num_slots, KVH, d, generator=g)
    lens = [p + n + 1 for p, n in zip(prefixes, sizes)]
    perm = rng.permutation(num_slots - 1) + 1
    table = torch.zeros(len(sizes), max(lens) + 3, dtype=torch.int64)
    used = 0
    for r, n in enumerate(lens):
        table[r, :n] = torch.from_numpy(perm[used:used + n])
        used += n
    key[0] = value[0] = float("nan")          # slot 0: what the table's padding points at
    parents = [random_parents(rng, n) for n in sizes]
    q = torch.randn(sum(n + 1 for n in sizes), H, d, generator=g)
    return key, value, table, parents, q


@pytest.mark.skipif(not HAS_CC, reason="no C compiler")
@pytest.mark.parametrize("seed,d", [(0, D), (1, D), (2, 64), (3, 40)])
def test_slot_cache_kernel_matches_reference(seed, d):
    """The slot-cache entry point against the definition: a slot cache is the vLLM layout
    with block size 1 and the slot table as block table. Padding slots (NaN) are never
    read."""
    rng = np.random.default_rng(200 + seed)
    R = int(rng.integers(1, 6))
    sizes = [int(rng.integers(0, 12)) for _ in range(R)]
    prefixes = [int(rng.integers(0, 150)) for _ in range(R)]
    key, value, table, parents, q = slot_batch(seed, sizes, prefixes, d)
    plan = ta.plan_slots(prefixes, parents, table)
    out = torch.full_like(q, float("nan"))
    assert ta.run_native_slots(plan, q, out, torch.arange(len(q)), key, value, 0.17), \
        native.unavailable_reason()
    want = ta.reference(prefixes, parents, table, 1, q, key.unsqueeze(-1),
                        value.unsqueeze(2), 0.17)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


def test_slot_kernel_declines_what_it_does_not_handle():
    key, value, table, parents, q = slot_batch(4, [2], [9])
    plan = ta.plan_slots([9], parents, table)
    out = torch.zeros_like(q)
    rows = torch.arange(len(q))
    assert not ta.run_native_slots(plan, q.double(), out.double(), rows, key.double(),
                                   value.double(), 0.1)
    assert not ta.run_native_slots(plan, q, out, rows, key[:, :, :D // 2], value, 0.1)
    assert (out == 0).all()


def test_parents_of_masks_inverts_ancestor_masks():
    rng = np.random.default_rng(9)
    parents = [random_parents(rng, 11) for _ in range(4)]
    masks = np.stack(ta.ancestor_masks(parents))
    assert ta.parents_of_masks(masks) == parents
    chain = np.tril(np.ones((1, 5, 5), dtype=bool))
    assert ta.parents_of_masks(chain) == [[-1, 0, 1, 2]]
    not_a_tree = masks.copy()
    not_a_tree[0, 5, 0] = False                  # a node that does not see the root
    assert ta.parents_of_masks(not_a_tree) is None
    skips = chain.copy()
    skips[0, 4, 2] = False                       # sees its grandparent's parent, not it
    assert ta.parents_of_masks(skips) is None
