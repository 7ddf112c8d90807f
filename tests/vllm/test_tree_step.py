"""The vLLM side of tree verification: the accepted path in vLLM's output format, and
KV compaction on a cache written by vLLM's own CPU kernel."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spec_plugins.kernels.tree_attention import split_cache
from spec_plugins.tree import DraftTree
from spec_plugins.verify import Verdict
from spec_plugins.vllm import tree_step

ops = pytest.importorskip("vllm._custom_ops")

KVH, D, BS, V = 2, 32, 32, 50


def step_for(trees, rows, prefix_lens, slots=None):
    return tree_step.TreeStep(
        num_reqs=max(rows) + 1, num_tokens=int(sum(len(t) + 1 for t in trees)),
        rows=np.asarray(rows), prefix_lens=np.asarray(prefix_lens),
        trees=trees, tree_tokens=torch.arange(sum(len(t) + 1 for t in trees)),
        other_rows=np.zeros(0, dtype=np.int64), other_q_lens=np.zeros(0, dtype=np.int64),
        other_tokens=torch.zeros(0, dtype=torch.long), slots=slots, block_size=BS)


def logits_for(argmax_ids):
    x = torch.zeros(len(argmax_ids), V)
    x[torch.arange(len(argmax_ids)), torch.tensor(argmax_ids)] = 5.0
    return x


def test_greedy_tree_rows_take_the_target_path():
    #        root -> 7 (0) -> 9 (2) -> 4 (4)
    #             -> 8 (1) -> 3 (3)
    tree = DraftTree(tokens=[7, 8, 9, 3, 4], parents=[-1, -1, 0, 1, 2], scores=[1.0] * 5)
    step = step_for([tree], rows=[1], prefix_lens=[10])
    # Request 0 is a chain vLLM verified itself (2 drafts); request 1 the tree. vLLM's
    # layout: per request, target rows at the root and every node but the last.
    target = torch.cat([logits_for([1, 2]), logits_for([7, 9, 11, 4, 12])])
    bonus = torch.tensor([[5], [6]])
    out = torch.tensor([[1, 2, 5, -1, -1, -1], [7, 0, 0, 0, 0, 0]])
    meta = SimpleNamespace(all_greedy=True, temperature=None, generators={})
    (v,) = tree_step.verify(step, out, [2, 5], target, bonus, meta, np.random.default_rng(0))
    assert v.accepted == [0, 2, 4]               # 7, 9, then 4 (the last node: a leaf)
    assert out[1].tolist() == [7, 9, 4, 6, -1, -1]  # ... and vLLM's bonus token after it
    assert out[0].tolist() == [1, 2, 5, -1, -1, -1]  # other rows untouched


def test_sampled_tree_rows_are_reproducible_with_a_seed():
    tree = DraftTree(tokens=[1, 2, 3], parents=[-1, -1, 0], scores=[1.0] * 3)
    target = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    results = []
    for _ in range(2):
        out = torch.zeros(1, 4, dtype=torch.long)
        meta = SimpleNamespace(all_greedy=False, temperature=torch.tensor([0.8]),
                               generators={0: torch.Generator().manual_seed(42)})
        tree_step.verify(step_for([tree], [0], [4]), out, [3], target, torch.tensor([[9]]),
                         meta, np.random.default_rng())
        results.append(out.tolist())
    assert results[0] == results[1]


def test_compaction_moves_accepted_kv_where_vllm_expects_the_chain():
    num_blocks = 4
    kv = torch.zeros(num_blocks, KVH, BS, 2 * D)
    key_cache, value_cache = kv.view(num_blocks, KVH, 2 * BS, D).chunk(2, dim=2)
    tree = DraftTree(tokens=[7, 8, 9, 3, 4], parents=[-1, -1, 0, 1, 2], scores=[1.0] * 5)
    # Root at logical position 30 of a request whose blocks are [2, 1]: the tree
    # straddles a block boundary.
    table = [2, 1]
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(30, 36)])
    k = torch.randn(6, KVH, D)
    v = torch.randn(6, KVH, D)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")
    step = step_for([tree], [0], [30], slots=slots)
    verdict = Verdict(accepted=[0, 2, 4], accepted_tokens=[7, 9, 4], bonus_token=6)
    moved = tree_step.compact_kv(step, [verdict], [kv])
    assert moved == 2                         # node 0 is already at depth 1
    key_t, value = split_cache(kv)
    for depth, token in enumerate([0, 1, 3, 5]):  # root, then nodes 0, 2, 4
        s = int(slots[depth])
        torch.testing.assert_close(key_t[s // BS, :, :, s % BS], k[token])
        torch.testing.assert_close(value[s // BS, :, s % BS], v[token])
