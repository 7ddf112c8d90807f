"""Tree attention: the fast path against the reference and against plain attention over
each node's root-to-node chain, on random trees in ragged batches."""

import numpy as np
import pytest
import torch

from spec_plugins.kernels import tree_attention as ta

H, KVH, D, BS = 6, 2, 32, 32


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


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_ragged_batches(seed):
    rng = np.random.default_rng(100 + seed)
    R = int(rng.integers(1, 6))
    sizes = [int(rng.integers(0, 12)) for _ in range(R)]
    prefixes = [int(rng.integers(0, 150)) for _ in range(R)]
    kv, table, parents, q = make_batch(seed, sizes, prefixes)
    key_t, value = ta.split_cache(kv)
    plan = ta.plan(prefixes, parents, table, BS)
    out = ta.run(plan, q, key_t, value, 0.17)
    ref = ta.reference(prefixes, parents, table, BS, q, key_t, value, 0.17)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


def test_each_node_equals_attention_over_its_chain():
    """Exact check: node i's output is ordinary causal attention of its query over the
    prefix followed by the root-to-i path, computed from contiguous tensors."""
    sizes, prefixes = [9, 5, 0], [40, 3, 70]
    kv, table, parents, q = make_batch(7, sizes, prefixes)
    key_t, value = ta.split_cache(kv)
    out = ta.run(ta.plan(prefixes, parents, table, BS), q, key_t, value, 0.2)
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


def test_padding_and_empty_trees_stay_finite():
    sizes, prefixes = [0, 15], [0, 5]
    kv, table, parents, q = make_batch(3, sizes, prefixes)
    out = ta.run(ta.plan(prefixes, parents, table, BS), q, *ta.split_cache(kv), 0.3)
    assert torch.isfinite(out).all()
    # A root with no prefix and no tree sees only itself: the output is its value.
    _, value = ta.split_cache(kv)
    torch.testing.assert_close(out[0], value[table[0, 0], :, 0].repeat_interleave(H // KVH, 0))


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="nodes must follow their parents"):
        ta.ancestor_masks([[-1, 2, 0]])


def test_chain_equals_vllm_cpu_kernel():
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
    got = ta.run(ta.plan(prefixes, chains, table, BS), q, *ta.split_cache(kv), 0.125)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
