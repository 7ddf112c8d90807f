"""The dflash proposer: DDTrees from the drafter's lattice, sampled drafts with their
distributions, adaptive block length, per-request context, option errors at bind."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from spec_plugins.models.dflash import DFlashConfig, DFlashDrafter
from spec_plugins.models.vision import VisionConfig
from spec_plugins import paths
from spec_plugins.options import OptionError
from spec_plugins.proposers.base import CommittedStates, DraftRequest, ModelInfo, StepContext
from spec_plugins.proposers.dflash import DFlashProposer
from spec_plugins.verify import verify_stochastic
from toy_target import verify_on_table

V, H, HT, NL = 97, 32, 24, 6          # vocab, draft hidden, target hidden, target layers
LAYERS = [1, 3, 4]


def make_checkpoint(d, vision=None):
    cfg = DFlashConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=V,
                       target_layer_ids=LAYERS, mask_token_id=V - 1, target_hidden_size=HT,
                       num_target_layers=NL, rope_theta=10000.0, rms_norm_eps=1e-6, block_size=7,
                       vision=vision)
    g = torch.Generator().manual_seed(0)
    m = DFlashDrafter(cfg, embed_tokens=torch.randn(V, H, generator=g),
                      lm_head_weight=torch.randn(V, H, generator=g))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("norm.weight")
                    else 0.2 * torch.randn(p.shape, generator=g))
    m.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dflash"))


def info(num_layers=NL, hidden=HT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return ModelInfo(model_path="toy", tokenizer_path="toy", architecture="Toy",
                     num_layers=num_layers, hidden_size=hidden, vocab_size=V, max_model_len=512,
                     dtype=torch.float32, device=torch.device("cpu"),
                     embed_tokens=torch.randn(V, H, generator=g),
                     lm_head_weight=torch.randn(V, H, generator=g))


def proposer(checkpoint, **opts):
    p = DFlashProposer({"drafter": checkpoint, **opts})
    p.bind(info())
    return p


def states(positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.as_tensor(positions, dtype=torch.long)
    return CommittedStates(pos, torch.randn(len(pos), len(LAYERS) * HT, generator=g))


def request(rid="r", n=6, max_draft=8, **kw):
    toks = np.arange(3, 3 + n) % V
    return DraftRequest(rid, toks, 3, [int(toks[-1])], max_draft, **kw)


def test_bind_reads_the_drafter_and_its_layers(checkpoint):
    p = proposer(checkpoint)
    assert p.hidden_layers == tuple(LAYERS)
    assert p.max_block == 6          # block_size 7 = the last token + 6 drafts


@pytest.mark.parametrize("opts,model,msg", [
    ({"drafter": "/nonexistent"}, info(), "dflash.drafter='/nonexistent' is not a DFlash"),
    ({}, info(num_layers=4), r"reads target layers \[4\]"),
    ({}, info(hidden=16), "expects 72 target features"),
    ({"min_block": 9}, info(), "dflash.min_block=9 exceeds"),
])
def test_model_dependent_mistakes_fail_at_bind(checkpoint, opts, model, msg):
    p = DFlashProposer({"drafter": checkpoint, **opts})
    with pytest.raises(OptionError, match=msg):
        p.bind(model)


def test_without_a_drafter_option_bind_reads_the_one_trained_for_the_model(
        checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    model = tmp_path / "served-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    served = dataclasses.replace(info(), model_path=str(model))
    with pytest.raises(OptionError, match="build one for this model with: "
                                          "spec-plugins-train-drafter --model"):
        DFlashProposer({}).bind(served)
    default = paths.drafter_dir(model)
    assert default.is_relative_to(tmp_path / "cache")
    shutil.copytree(checkpoint, default)
    p = DFlashProposer({})
    p.bind(served)
    assert p.hidden_layers == tuple(LAYERS)


IMAGE_IDS = frozenset({90, 91})


@pytest.mark.parametrize("style", ["vispec", "msd"])
def test_vision_drafter_reads_image_spans_whatever_the_prefill_chunks(tmp_path, style):
    """A prompt with an image span, its states delivered at once or in chunks that cut
    the span: the same drafts (vispec holds a cut span back until it is whole); msd reads
    the input embeddings too (layer -1, first); the image changes the drafts."""
    ckpt = make_checkpoint(tmp_path, VisionConfig(style, num_queries=2))
    model = dataclasses.replace(info(), placeholder_token_ids=IMAGE_IDS)

    def bound():
        p = DFlashProposer({"drafter": ckpt, "tree": False, "adaptive": False, "suffix": False})
        p.bind(model)
        return p

    whole, parts = bound(), bound()
    assert whole.hidden_layers == ((-1,) if style == "msd" else ()) + tuple(LAYERS)
    toks = np.array([5, 6] + [90] * 5 + [91] + [7, 8, 9, 10, 11, 12, 13])
    req = DraftRequest("r", toks, 12, [13], 6)
    g = torch.Generator().manual_seed(3)
    st = CommittedStates(torch.arange(14), torch.randn(14, len(whole.hidden_layers) * HT,
                                                       generator=g))
    (a,) = whole.propose([req], StepContext(hidden_states=[st]))
    for cut in (4, 8):     # inside the span; right after its last token
        parts = bound()
        parts.propose([req], StepContext(hidden_states=[
            CommittedStates(st.positions[:cut], st.states[:cut])]))
        (b,) = parts.propose([req], StepContext(hidden_states=[
            CommittedStates(st.positions[cut:], st.states[cut:])]))
        assert b.tokens == a.tokens, cut
    other = st.states.clone()
    other[2:8] = torch.randn(6, other.shape[1], generator=g)
    drafts = {tuple(bound().propose([req], StepContext(hidden_states=[
        CommittedStates(st.positions, s)]))[0].tokens) for s in (st.states, other)}
    assert len(drafts) == 2


@pytest.mark.parametrize("tree", [False, True], ids=["chains", "trees"])
def test_vision_drafter_sampled_drafts_keep_the_target_distribution(tmp_path, tree):
    """The distribution test of the vision-aware drafter: its drafts drawn on an image
    prompt (global image feature in every draft input), verified by the core's stochastic
    verifier against a toy target: the first two tokens follow the target's distribution
    (chi-square goodness of fit). Some drafts were accepted (the random drafter and the
    random target agree rarely: ~5% of 1200 requests), so both the accepting and the
    residual branches ran."""
    from scipy import stats

    ckpt = make_checkpoint(tmp_path, VisionConfig("vispec", num_queries=2))
    p = DFlashProposer({"drafter": ckpt, "tree": tree, "adaptive": False, "suffix": False,
                        "calibrate": False, "max_block": 3})
    p.bind(dataclasses.replace(info(), placeholder_token_ids=IMAGE_IDS))
    rng = np.random.default_rng(0)
    # A peaked toy target (a few likely tokens after each), the drafter's vocabulary.
    logits = rng.normal(size=(V, V)) * 2.5
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    prompt = [5, 6, 90, 90, 90, 91, 7, 8]
    feats = torch.randn(len(prompt) + 8, len(p.hidden_layers) * HT,
                        generator=torch.Generator().manual_seed(4))
    counts, accepted, n = {}, 0, 1200
    for i in range(n):
        seq, done = list(prompt), 0
        while len(seq) < len(prompt) + 2:
            new = torch.arange(done, len(seq) - 1)
            req = DraftRequest(f"r{i}", np.array(seq), len(prompt), [seq[-1]], 3,
                               temperature=1.0)
            (t,) = p.propose([req], StepContext(hidden_states=[CommittedStates(new, feats[new])]))
            done = len(seq) - 1
            target = np.stack([P[seq[-1]]] + [P[tok] for tok in t.tokens])
            v = verify_stochastic(t, target, rng)
            accepted += v.num_accepted
            seq += v.emitted
        p.finish(f"r{i}")
        key = tuple(seq[len(prompt):len(prompt) + 2])
        counts[key] = counts.get(key, 0) + 1
    expected = {(a, b): n * P[prompt[-1], a] * P[a, b] for a in range(V) for b in range(V)}
    big = [k for k, e in expected.items() if e >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [expected[k] for k in big] + [n - sum(expected[k] for k in big)]
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert accepted > 0.02 * n


def test_option_errors_name_the_field():
    with pytest.raises(OptionError, match="dflash.min_block=5 must not exceed dflash.max_block=3"):
        DFlashProposer({"min_block": 5, "max_block": 3})
    with pytest.raises(OptionError, match="allowed values: 'auto', 'float32'"):
        DFlashProposer({"dtype": "int8"})


def test_chain_is_the_argmax_of_the_block(checkpoint):
    p = proposer(checkpoint, tree=False, adaptive=False, calibrate=False)
    req = request()
    (tree,) = p.propose([req], StepContext(hidden_states=[states(range(5))]))
    assert tree.is_chain and len(tree) == 6
    ctx = p.model.new_context()
    ctx.append(states(range(5)).states, torch.arange(5))
    logits = p.model.draft_block([ctx], torch.tensor([int(req.token_ids[-1])]),
                                 torch.tensor([5]), 6, target_vocab=True)
    assert tree.tokens == logits[0].argmax(-1).tolist()


def test_ddtree_branches_in_decreasing_path_probability(checkpoint):
    p = proposer(checkpoint, topk=3, adaptive=False, calibrate=False)
    (tree,) = p.propose([request(max_draft=10)], StepContext(hidden_states=[states(range(5))]))
    tree.validate(V)
    assert len(tree) == 10 and not tree.is_chain
    pp = tree.path_probs()
    assert pp == sorted(pp, reverse=True)
    # A request that needs a chain (penalties, logprobs) gets one.
    p2 = proposer(checkpoint, topk=3, adaptive=False)
    (chain,) = p2.propose([request(max_draft=10, tree_ok=False)],
                          StepContext(hidden_states=[states(range(5))]))
    assert chain.is_chain


def test_context_delivered_in_pieces_drafts_like_at_once(checkpoint):
    whole = proposer(checkpoint, tree=False, adaptive=False)
    parts = proposer(checkpoint, tree=False, adaptive=False)
    s = states(range(9))
    (a,) = whole.propose([request(n=10)], StepContext(hidden_states=[s]))
    first = CommittedStates(s.positions[:4], s.states[:4])
    rest = CommittedStates(s.positions[4:], s.states[4:])
    parts.propose([request(n=5)], StepContext(hidden_states=[first]))
    (b,) = parts.propose([request(n=10)], StepContext(hidden_states=[rest]))
    assert a.tokens == b.tokens
    # Recomputed from position 0 (preempted, resumed): the context starts over.
    (c,) = parts.propose([request(n=10)], StepContext(hidden_states=[s]))
    assert c.tokens == a.tokens


def test_sampled_requests_get_drawn_drafts_with_their_distributions(checkpoint):
    p = proposer(checkpoint, tree=False, adaptive=False)
    reqs = [request("a", temperature=0.7, seed=11), request("b", temperature=0.7, seed=11)]
    ta, tb = p.propose(reqs, StepContext(hidden_states=[states(range(5)), states(range(5))]))
    assert ta.draft_dists is not None and ta.draft_dists.shape == (6, V)
    assert np.allclose(ta.draft_dists.sum(-1), 1.0, atol=1e-5)
    assert ta.dist_rows == list(range(6))
    assert ta.tokens == tb.tokens          # same seed, same inputs: same draws
    other = proposer(checkpoint, tree=False, adaptive=False)
    (tc,) = other.propose([request("c", temperature=0.7, seed=12)],
                          StepContext(hidden_states=[states(range(5))]))
    (td,) = other.propose([request("d", temperature=0.7, seed=13)],
                          StepContext(hidden_states=[states(range(5))]))
    assert [tc.tokens, td.tokens] != [ta.tokens, ta.tokens]


def test_block_length_adapts_to_acceptance(checkpoint):
    p = proposer(checkpoint, tree=False, min_block=1)
    req = request(n=6)
    (t,) = p.propose([req], StepContext(hidden_states=[states(range(5))]))
    assert len(t) == 6
    pos = 5
    for _ in range(8):  # nothing accepted, step after step
        nxt = DraftRequest("r", np.arange(pos + 2) % V, 3, [1], 8, num_accepted=0)
        (t,) = p.propose([nxt], StepContext(hidden_states=[states([pos], seed=pos)]))
        pos += 1
    assert len(t) <= 2


def decode_on_table(p, table, length, prompt=(3, 4, 5), max_draft=8):
    """Greedy speculative decoding against a toy target (a fixed next-token table) with
    target features drawn per token id: the sequence and the accepted count per step."""
    feats = torch.randn(V, len(LAYERS) * HT, generator=torch.Generator().manual_seed(5))
    seq, states_from, accepted = list(prompt), 0, []
    while len(seq) < length:
        new = torch.arange(states_from, len(seq) - 1)
        s = CommittedStates(new, feats[torch.tensor(seq[:-1], dtype=torch.long)[new]])
        req = DraftRequest("r", np.array(seq), len(prompt), [seq[-1]], max_draft,
                           num_accepted=accepted[-1] if accepted else None)
        (tree,) = p.propose([req], StepContext(hidden_states=[s]))
        assert len(tree) <= max_draft
        states_from = len(seq) - 1
        v = verify_on_table(tree, seq[-1], table)
        seq += v.emitted
        accepted.append(v.num_accepted)
    return seq[:length], accepted


def test_greedy_speculation_with_dflash_equals_greedy_decoding(checkpoint):
    """A toy target (fixed random next-token table) verified greedily: the proposer's
    trees only change how many tokens a step commits, never which."""
    table = np.random.default_rng(0).integers(0, V, size=V)
    plain = [3, 4, 5]
    while len(plain) < 40:
        plain.append(int(table[plain[-1]]))
    seq, _ = decode_on_table(proposer(checkpoint, topk=2), table, 40)
    assert seq == plain


@pytest.mark.parametrize("tree", [True, False])
def test_suffix_drafts_join_the_block_drafts(checkpoint, tree):
    """``suffix`` (the default): a target that repeats itself (a table walk enters a cycle) is drafted
    from the suffix tries too: far more tokens per step than the untrained block drafter
    alone, the same output, chains where trees are off."""
    table = np.random.default_rng(3).integers(0, V, size=V)
    plain = [3, 4, 5]
    while len(plain) < 120:
        plain.append(int(table[plain[-1]]))
    alone = proposer(checkpoint, topk=2, tree=tree, budget=False, suffix=False)
    both = proposer(checkpoint, topk=2, tree=tree, budget=False)
    seq_alone, acc_alone = decode_on_table(alone, table, 120)
    seq_both, acc_both = decode_on_table(both, table, 120)
    assert seq_alone == plain and seq_both == plain
    assert len(acc_both) < 0.6 * len(acc_alone)
    if not tree:
        last = both._requests["r"].last
        assert last is None or last.is_chain


def test_the_suffix_side_alone_skips_the_block_pass_and_keeps_the_context(checkpoint):
    """While the session's payoff gate runs the suffix side alone (``ctx.part`` 1: the
    block pass does not pay), no block is drafted, yet the context keeps every committed
    token, so a draft after the gate reopens equals a fresh proposer's that saw the
    context at once."""
    p = proposer(checkpoint, tree=False, adaptive=False)
    assert p.parts == ("the block pass", "the suffix side alone")
    pos, drafted = 5, []
    s = states(range(5))
    for step in range(40):
        req = DraftRequest("r", np.arange(pos + 1) % V, 3, [1], 8,
                           num_accepted=0 if step else None)
        (t,) = p.propose([req], StepContext(hidden_states=[s], part=int(step >= 4)))
        drafted.append(len(t) > 0)
        s = states([pos], seed=pos)
        pos += 1
    assert all(drafted[:4]) and not any(drafted[4:])   # no token repeats: no suffix draft
    # The context still holds every committed position.
    assert p._requests["r"].end == pos - 1
    fresh = proposer(checkpoint, tree=False, adaptive=False, budget=False)
    whole = CommittedStates(torch.arange(pos - 1), torch.cat(
        [states(range(5)).states] + [states([q], seed=q).states for q in range(5, pos - 1)]))
    req = DraftRequest("r", np.arange(pos) % V, 3, [1], 8)
    (want,) = fresh.propose([req], StepContext(hidden_states=[whole]))
    p.options = p.Options.parse({"drafter": checkpoint, "tree": False, "adaptive": False,
                                 "budget": False})
    (got,) = p.propose([req], StepContext(hidden_states=[None]))
    assert got.tokens == want.tokens


def test_auto_dtype_is_bf16_only_for_fp32_targets_on_cpus_with_native_bf16(monkeypatch):
    import spec_plugins.models as models
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(models, "_cpu_has_native_bf16", lambda: native)
        want = torch.bfloat16 if native else torch.float32
        assert models.drafter_dtype("auto", torch.float32, cpu) == want
        assert models.drafter_dtype("auto", torch.float16, cpu) == torch.float16
        assert models.drafter_dtype("float32", torch.float32, cpu) == torch.float32
        assert models.drafter_dtype("auto", torch.float32, torch.device("meta")) == torch.float32


def test_prompt_served_from_the_engines_prefix_cache_gets_the_cached_context(checkpoint):
    """Request b shares a's first 6 prompt tokens, which the engine served from its
    prefix cache (b's hidden states start at position 6): b drafts as if it had them."""
    s = states(range(9))
    toks = np.arange(3, 13) % V                        # 10 tokens, the 10th is sampled
    a = DraftRequest("a", toks, 9, [int(toks[-1])], 8)
    b = DraftRequest("b", toks, 9, [int(toks[-1])], 8)
    whole = proposer(checkpoint, tree=False, adaptive=False, budget=False)
    (want,) = whole.propose([b], StepContext(hidden_states=[s]))
    p = proposer(checkpoint, tree=False, adaptive=False, budget=False)
    p.propose([a], StepContext(hidden_states=[s]))
    rest = CommittedStates(s.positions[6:], s.states[6:])
    (got,) = p.propose([b], StepContext(hidden_states=[rest]))
    assert got.tokens == want.tokens
    # Without a stored prompt of that prefix the context just lacks those positions.
    cold = proposer(checkpoint, tree=False, adaptive=False, budget=False)
    (lacking,) = cold.propose([b], StepContext(hidden_states=[rest]))
    assert len(cold._requests["b"].context) == 3
    assert len(p._requests["b"].context) == 9


def seeded_run(p, steps=6, companions=None, part=0, temperature=0.8):
    """Drive seeded request ``s`` for ``steps`` steps beside ``companions`` (req_id ->
    (tokens, max_draft, temperature, accepted)), each step committing one token per
    request (tokens never repeat: no suffix drafts): ``s``'s drafts and their
    distributions. ``part``: the part of the method the payoff gate runs."""
    companions = companions or {}
    seq = np.random.default_rng(1).permutation(V - 1)       # no token twice
    n = 9
    hs = {"s": states(range(n - 1))}
    for r, (m, *_) in companions.items():
        hs[r] = states(range(m - 1), seed=len(r))
    out = []
    for step in range(steps):
        reqs = [DraftRequest("s", seq[:n + step], 4, seq[n + step - 1:n + step], 8,
                             num_accepted=0 if step else None, isolated=True,
                             temperature=temperature, seed=7)]
        for r, (m, md, temp, acc) in companions.items():
            toks = np.roll(seq, 7 * len(r))[:m + step]
            reqs.append(DraftRequest(r, toks, 3, toks[-1:], md,
                                     num_accepted=acc if step else None, temperature=temp))
        trees = p.propose(reqs, StepContext(hidden_states=[hs[r.req_id] for r in reqs],
                                            batch_tokens=len(reqs), part=part))
        t = trees[0]
        out.append((list(t.tokens), None if t.draft_dists is None else t.draft_dists.copy()))
        for r in reqs:
            pos = len(r.token_ids) - 1
            hs[r.req_id] = states([pos], seed=1000 * len(r.req_id) + pos)
    return out


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_seeded_request_drafts_the_same_whatever_else_the_proposer_serves(
        checkpoint, temperature):
    """A seeded (isolated) request's drafts and their distributions are a function of its
    own tokens and seed: the same on a fresh proposer, beside other requests with longer
    blocks, in steps where the payoff gate runs the suffix side alone, and after traffic
    that fed the calibrators."""
    alone = seeded_run(proposer(checkpoint, topk=2), temperature=temperature)
    assert all(len(tokens) for tokens, _ in alone)
    # Beside requests whose blocks are longer (all accepted) or shorter (max_draft 2).
    beside = seeded_run(proposer(checkpoint, topk=2), temperature=temperature,
                        companions={"xx": (30, 8, 0.0, 8), "yyy": (9, 2, 0.7, 2)})
    # After traffic whose drafts were never accepted (the calibrators have learnt), in
    # steps that run the suffix side alone.
    busy = proposer(checkpoint, topk=2)
    seeded_run(busy, steps=40, temperature=0.5,
               companions={"g": (12, 8, 0.0, 0), "h": (20, 3, 0.9, 0)})
    for name in list(busy._requests):
        busy.finish(name)
    after = seeded_run(busy, temperature=temperature, part=1,
                       companions={"xx": (30, 8, 0.0, 8)})
    for run in (beside, after):
        for (ta, da), (tb, db) in zip(alone, run):
            assert ta == tb
            assert (da is None) == (db is None)
            if da is not None:
                assert np.array_equal(da, db)
