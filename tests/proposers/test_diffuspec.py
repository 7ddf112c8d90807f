"""The diffuspec proposer on a tiny random DiffusionGemma (a real block-diffusion
architecture from transformers; no pretrained diffusion LM shares SmolLM2's tokenizer, so
acceptance on the default model cannot be measured): lossless greedy speculation with
trees and CPS chains, sampled drafts with their distributions, adaptive block length,
bind errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("this transformers has no DiffusionGemma", allow_module_level=True)

from spec_plugins.options import OptionError  # noqa: E402
from spec_plugins.proposers.base import DraftRequest, ModelInfo, StepContext  # noqa: E402
from spec_plugins.proposers.diffuspec import DiffuSpecProposer  # noqa: E402
from toy_target import verify_on_table  # noqa: E402

V, CANVAS = 256, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"], num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=32,
                num_global_key_value_heads=1, sliding_window=8, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, max_position_embeddings=512)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                  position_embedding_size=16, patch_size=4)
    cfg = transformers.DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                            canvas_length=CANVAS)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("diffusion_gemma")
    transformers.DiffusionGemmaForBlockDiffusion(cfg).save_pretrained(path)
    return str(path)


def info(vocab=V):
    return ModelInfo(model_path="toy", tokenizer_path="toy", architecture="Toy", num_layers=4,
                     hidden_size=32, vocab_size=vocab, max_model_len=512,
                     dtype=torch.float32, device=torch.device("cpu"))


def proposer(checkpoint, **opts):
    p = DiffuSpecProposer({"drafter": checkpoint, **opts})
    p.bind(info())
    return p


def test_bind_errors_name_the_field(checkpoint):
    with pytest.raises(OptionError, match="diffuspec.drafter is required"):
        DiffuSpecProposer({}).bind(info())
    with pytest.raises(OptionError, match="must share a tokenizer"):
        DiffuSpecProposer({"drafter": checkpoint}).bind(info(vocab=V + 10))
    with pytest.raises(OptionError, match="diffuspec.drafter='/nonexistent' cannot be loaded"):
        DiffuSpecProposer({"drafter": "/nonexistent"}).bind(info())
    assert proposer(checkpoint).max_block == CANVAS


@pytest.mark.parametrize("opts", [{"topk": 3}, {"tree": False}, {"tree": False, "cps_weight": 0}],
                         ids=["ddtree", "cps-chain", "argmax-chain"])
def test_greedy_speculation_equals_greedy_decoding(checkpoint, opts):
    table = np.random.default_rng(0).integers(0, V, size=V)
    plain = [3, 4, 5]
    while len(plain) < 40:
        plain.append(int(table[plain[-1]]))
    p = proposer(checkpoint, **opts)
    seq, accepted, sizes = [3, 4, 5], None, []   # sizes: draft depth per step
    while len(seq) < 40:
        req = DraftRequest("r", np.array(seq), 3, [seq[-1]], 8, num_accepted=accepted)
        (tree,) = p.propose([req], StepContext())
        tree.validate(V)
        assert opts.get("tree", True) or tree.is_chain
        v = verify_on_table(tree, seq[-1], table)
        seq += v.emitted
        accepted = v.num_accepted
        sizes.append(max(tree.depths(), default=0))
    assert seq[:40] == plain
    if opts.get("tree") is False:
        assert sizes[0] == CANVAS and min(sizes) < CANVAS   # ADL shortened rejected blocks


def test_cps_chain_follows_the_requests_own_bigrams(checkpoint):
    """With a heavy causal weight, a chain continues as the request's history did."""
    p = proposer(checkpoint, tree=False, cps_weight=50.0, topk=V, adaptive=False, max_block=3,
                 suffix=False)
    hist = [7, 8, 9, 7, 8, 9, 7, 8, 9, 7]
    (tree,) = p.propose([DraftRequest("r", np.array(hist), 2, [7], 8)], StepContext())
    assert tree.tokens == [8, 9, 7]
    argmax = proposer(checkpoint, tree=False, cps_weight=0.0, adaptive=False, max_block=3,
                      suffix=False)
    (plain,) = argmax.propose([DraftRequest("r", np.array(hist), 2, [7], 8)], StepContext())
    assert plain.tokens == p.drafter.lattice([("x", hist)], 3)[0].argmax(-1).tolist()


def test_sampled_drafts_carry_their_distributions(checkpoint):
    p = proposer(checkpoint, tree=False, adaptive=False, max_block=4)
    reqs = [DraftRequest(r, np.arange(10, 20), 3, [19], 8, temperature=0.8, seed=5)
            for r in ("a", "b")]
    ta, tb = p.propose(reqs, StepContext())
    assert ta.draft_dists.shape == (4, V) and ta.dist_rows == [0, 1, 2, 3]
    assert np.allclose(ta.draft_dists.sum(-1), 1.0, atol=1e-5)
    assert ta.tokens == tb.tokens
