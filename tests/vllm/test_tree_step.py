"""The vLLM side of tree verification: the accepted path in vLLM's output format, and
KV compaction on a cache written by vLLM's own CPU kernel."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spec_plugins.kernels.tree_attention import split_cache
from spec_plugins.tree import DraftTree
from spec_plugins.verify import Verdict
from spec_plugins.vllm import hooks, tree_step

ops = pytest.importorskip("vllm._custom_ops")

KVH, D, BS, V = 2, 32, 32, 50


def plan_for(trees, rows, prefix_lens, slots=None):
    n = sum(len(t) + 1 for t in trees)
    return tree_step.TreePlan(
        num_reqs=max(rows) + 1, num_tokens=n, rows=np.asarray(rows),
        prefix_lens=np.asarray(prefix_lens), trees=trees, tree_tokens=torch.arange(n),
        tree_positions=torch.zeros(n, dtype=torch.long),
        slots=torch.arange(n) if slots is None else slots, block_size=BS,
        other_rows=np.zeros(0, dtype=np.int64), other_q_lens=np.zeros(0, dtype=np.int64),
        other_tokens=torch.zeros(0, dtype=torch.long))


def logits_for(argmax_ids):
    x = torch.zeros(len(argmax_ids), V)
    x[torch.arange(len(argmax_ids)), torch.tensor(argmax_ids)] = 5.0
    return x


def test_greedy_tree_rows_take_the_target_path():
    #        root -> 7 (0) -> 9 (2) -> 4 (4)
    #             -> 8 (1) -> 3 (3)
    tree = DraftTree(tokens=[7, 8, 9, 3, 4], parents=[-1, -1, 0, 1, 2], scores=[1.0] * 5)
    plan = plan_for([tree], rows=[1], prefix_lens=[10])
    # Request 0 is a chain vLLM verified itself (2 drafts); request 1 the tree. vLLM's
    # layout: per request, target rows at the root and every node but the last.
    target = torch.cat([logits_for([1, 2]), logits_for([7, 9, 11, 4, 12])])
    bonus = torch.tensor([[5], [6]])
    out = torch.tensor([[1, 2, 5, -1, -1, -1], [7, 0, 0, 0, 0, 0]])
    meta = SimpleNamespace(all_greedy=True, temperature=None, generators={})
    (v,) = tree_step.verify(plan, [2, 5], target, bonus, meta, np.random.default_rng(0))
    assert v.accepted == [0, 2, 4]               # 7, 9, then 4 (the last node: a leaf)
    hooks.write_verdicts(out, plan, [v])
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
        plan = plan_for([tree], [0], [4])
        verdicts = tree_step.verify(plan, [3], target, torch.tensor([[9]]), meta,
                                    np.random.default_rng())
        hooks.write_verdicts(out, plan, verdicts)
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
    plan = plan_for([tree], [0], [30], slots=slots)
    verdict = Verdict(accepted=[0, 2, 4], accepted_tokens=[7, 9, 4], bonus_token=6)
    src, dst = tree_step.kv_moves(plan, [verdict])
    assert len(src) == 2                      # node 0 is already at depth 1
    hooks.move_kv([kv], src, dst, BS)
    key_t, value = split_cache(kv)
    for depth, token in enumerate([0, 1, 3, 5]):  # root, then nodes 0, 2, 4
        s = int(slots[depth])
        torch.testing.assert_close(key_t[s // BS, :, :, s % BS], k[token])
        torch.testing.assert_close(value[s // BS, :, s % BS], v[token])


def test_begin_plans_only_scheduled_branching_trees():
    """Row 1 has a branching tree scheduled whole; row 0 a chain; row 2 a tree the
    scheduler cut to a chain: only row 1 is a tree row, at depth positions, with its flat
    KV slots."""
    tree = DraftTree(tokens=[7, 8, 9], parents=[-1, -1, 0], scores=[1.0] * 3)
    cut = DraftTree(tokens=[4, 5, 6], parents=[-1, 0, -1], scores=[1.0] * 3)
    spec = {"a": [1, 2], "b": [7, 8, 9], "c": [4, 5]}
    q_lens = np.array([3, 4, 3])
    slots = torch.arange(100, 110)
    plan = tree_step.begin({"b": tree, "c": cut}, spec, ["a", "b", "c"], q_lens,
                           np.array([20, 30, 40]), slots, BS)
    assert plan.rows.tolist() == [1] and plan.prefix_lens.tolist() == [30]
    assert plan.tree_tokens.tolist() == [3, 4, 5, 6]
    assert plan.tree_positions.tolist() == [30, 31, 31, 32]   # root, 7, 8, 9 (child of 7)
    assert plan.slots.tolist() == [103, 104, 105, 106]
    assert plan.other_rows.tolist() == [0, 2] and plan.other_q_lens.tolist() == [3, 3]
    assert plan.other_tokens.tolist() == [0, 1, 2, 7, 8, 9]
    assert tree_step.begin({}, spec, ["a", "b", "c"], q_lens, np.array([20, 30, 40]),
                           slots, BS) is None
    # A draft the scheduler did not schedule as proposed is not verified as a tree.
    assert tree_step.begin({"b": tree}, {"b": [7, 9, 8]}, ["b"], np.array([4]),
                           np.array([30]), slots, BS) is None
