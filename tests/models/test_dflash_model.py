"""The DFlash drafter (spec_plugins.models.dflash): format, semantics, incremental context."""

import json
import math

import pytest
import torch

from spec_plugins.models.dflash import (DFlashConfig, DFlashContext, DFlashDrafter,
                                        MASK_EMBEDDING_FILE)
from spec_plugins.models.vision import VisionConfig, complete_spans, spans

V, H, HT, NL_T = 97, 32, 24, 6  # target vocab, draft hidden, target hidden, target layers


def tiny_config(**kw):
    base = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=48, vocab_size=V, target_layer_ids=[1, 3, 4],
                mask_token_id=V - 1, target_hidden_size=HT, num_target_layers=NL_T,
                rope_theta=10000.0, rms_norm_eps=1e-6, block_size=5)
    base.update(kw)
    return DFlashConfig(**base)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tiny_drafter(seed=0, trimmed=False, trained_mask=False, **kw):
    g = torch.Generator().manual_seed(100 + seed)
    embed = torch.randn(V, H, generator=g)
    head = torch.randn(V, H, generator=g)
    if trimmed:
        cfg = tiny_config(draft_vocab_size=40, **kw)
        m = DFlashDrafter(cfg, embed_tokens=embed, own_lm_head=True, trained_mask=trained_mask)
        ids = torch.randperm(V, generator=g)[:40].sort().values
        m.d2t.copy_(ids - torch.arange(40))
    else:
        m = DFlashDrafter(tiny_config(**kw), embed_tokens=embed, lm_head_weight=head,
                          trained_mask=trained_mask)
    return randomize(m, seed).eval(), embed, head


# ---------------------------------------------------------------- a plain reference

def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean() + eps) * w


def _rope(x, pos, theta=10000.0):
    """Rotate one head vector (neox halves), angle pos / theta^(2i/d), written out."""
    d = x.shape[0]
    out = x.clone()
    for i in range(d // 2):
        ang = pos / theta ** (2 * i / d)
        a, b = x[i], x[i + d // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + d // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def reference_block(m, states, first_token, p, k, causal=False):
    """Token-by-token float64 computation of one request's block logits [k, Vd]."""
    c = m.config
    sd = {n: t.double() for n, t in m.state_dict().items() if t.is_floating_point()}
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    grp = nh // nkv
    emb = lambda t: (m._shared_embed if m.embed_tokens is None else m.embed_tokens.weight)[t].double()
    mask_vec = sd["mask_embedding"] if m.mask_embedding is not None else emb(c.mask_token_id)
    xs = [emb(first_token)] + [mask_vec.clone() for _ in range(k)]
    ctx = [_rms(sd["fc.weight"] @ s.double(), sd["hidden_norm.weight"]) for s in states]
    n = len(ctx)
    for li in range(c.num_hidden_layers):
        P = lambda name: sd[f"layers.{li}.{name}"]
        keys, vals = [], []  # per position: [nkv][hd]
        for j, cj in enumerate(ctx):
            kk = (P("self_attn.k_proj.weight") @ cj).view(nkv, hd)
            vv = (P("self_attn.v_proj.weight") @ cj).view(nkv, hd)
            keys.append([_rope(_rms(kk[h], P("self_attn.k_norm.weight")), j) for h in range(nkv)])
            vals.append([vv[h] for h in range(nkv)])
        hs = [_rms(x, P("input_layernorm.weight")) for x in xs]
        qs = []
        for t, h in enumerate(hs):
            qq = (P("self_attn.q_proj.weight") @ h).view(nh, hd)
            kk = (P("self_attn.k_proj.weight") @ h).view(nkv, hd)
            vv = (P("self_attn.v_proj.weight") @ h).view(nkv, hd)
            qs.append([_rope(_rms(qq[a], P("self_attn.q_norm.weight")), p + t) for a in range(nh)])
            keys.append([_rope(_rms(kk[a], P("self_attn.k_norm.weight")), p + t) for a in range(nkv)])
            vals.append([vv[a] for a in range(nkv)])
        new = []
        for t in range(k + 1):
            heads = []
            for a in range(nh):
                visible = range(n + t + 1) if causal else range(n + k + 1)
                sc = torch.stack([qs[t][a] @ keys[j][a // grp] / math.sqrt(hd) for j in visible])
                w = torch.softmax(sc, 0)
                heads.append(sum(w[i] * vals[j][a // grp] for i, j in enumerate(visible)))
            x = xs[t] + P("self_attn.o_proj.weight") @ torch.cat(heads)
            h2 = _rms(x, P("post_attention_layernorm.weight"))
            mlp = P("mlp.down_proj.weight") @ (torch.nn.functional.silu(P("mlp.gate_proj.weight") @ h2)
                                               * (P("mlp.up_proj.weight") @ h2))
            new.append(x + mlp)
        xs = new
    W = sd["lm_head.weight"] if m.lm_head is not None else m._shared_head.double()
    return torch.stack([W @ _rms(x, sd["norm.weight"]) for x in xs[1:]])


# ---------------------------------------------------------------- tests

def test_config_round_trip_keeps_vllm_fields():
    d = tiny_config(draft_vocab_size=40).to_dict()
    assert d["architectures"] == ["DFlashDraftModel"] and d["model_type"] == "qwen3"
    assert d["dflash_config"]["mask_token_id"] == V - 1
    assert d["dflash_config"]["target_layer_ids"] == [1, 3, 4]
    assert d["block_size"] == 5 and d["draft_vocab_size"] == 40 and d["target_hidden_size"] == HT
    assert DFlashConfig.from_dict(d).to_dict() == d
    assert DFlashConfig.from_dict(d).aux_layer_ids == [2, 4, 5]
    # A published-style config (top-level block_size, legacy rope_theta, extra keys) keeps its keys.
    pub = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 96, "vocab_size": 50, "rope_theta": 1000000,
           "rope_scaling": None, "block_size": 16, "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
           "layer_types": ["full_attention"],
           "dflash_config": {"mask_token_id": 7, "target_layer_ids": [1, 2]}}
    cfg = DFlashConfig.from_dict(pub)
    assert cfg.block_size == 16 and cfg.rope_theta == 1e6 and cfg.mask_token_id == 7
    out = cfg.to_dict()
    assert out["auto_map"] == pub["auto_map"] and out["layer_types"] == ["full_attention"]
    assert DFlashConfig.from_dict(out) == cfg


@pytest.mark.parametrize("trimmed,trained_mask", [(False, False), (True, True)])
def test_save_load_round_trip(tmp_path, trimmed, trained_mask):
    m, embed, head = tiny_drafter(trimmed=trimmed, trained_mask=trained_mask)
    m.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    assert (MASK_EMBEDDING_FILE in names) == trained_mask
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "fc.weight" in keys and "layers.1.self_attn.q_norm.weight" in keys
    assert "embed_tokens.weight" not in keys and ("lm_head.weight" in keys) == trimmed
    assert ("d2t" in keys) == trimmed and not any("mask" in k for k in keys)
    m2 = DFlashDrafter.from_pretrained(tmp_path, embed_tokens=embed,
                                       lm_head_weight=None if trimmed else head)
    assert m2.config == m.config or m2.config.to_dict() == json.loads((tmp_path / "config.json").read_text())
    for (a, x), (b, y) in zip(sorted(m.state_dict().items()), sorted(m2.state_dict().items())):
        assert a == b and torch.equal(x, y)
    states, first = torch.randn(7, 3 * HT), torch.tensor([5])
    ctx = m.context_kv(states, torch.arange(7))
    ctx2 = m2.context_kv(states, torch.arange(7))
    torch.testing.assert_close(m.draft_block([ctx], first, torch.tensor([7]), 4),
                               m2.draft_block([ctx2], first, torch.tensor([7]), 4))


@pytest.mark.parametrize("trimmed,trained_mask,causal", [(False, False, None), (True, True, None),
                                                         (False, False, True)])
def test_block_matches_token_by_token_reference(trimmed, trained_mask, causal):
    m, *_ = tiny_drafter(trimmed=trimmed, trained_mask=trained_mask, causal=causal)
    if trained_mask:
        with torch.no_grad():
            m.mask_embedding.normal_()
    torch.manual_seed(1)
    n, k = 6, 4
    states = torch.randn(n, 3 * HT)
    got = m.draft_block([m.context_kv(states, torch.arange(n))], torch.tensor([11]), torch.tensor([n]), k)
    ref = reference_block(m, states, 11, n, k, causal=bool(causal))
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=1e-4)
    # The drafter attends non-causally: changing a LATER mask slot's embedding changes earlier slots.
    if not causal:
        full = m.draft_block([m.context_kv(states, torch.arange(n))], torch.tensor([11]),
                             torch.tensor([n]), k + 1)
        assert not torch.allclose(full[0, :k], got[0], atol=1e-5)


def test_batch_of_ragged_contexts_equals_one_by_one():
    m, *_ = tiny_drafter(trimmed=True)
    torch.manual_seed(2)
    lens = [3, 9, 1]
    ctxs = [m.new_context(capacity=2) for _ in lens]
    for c, n in zip(ctxs, lens):
        c.append(torch.randn(n, 3 * HT), torch.arange(n))
    first = torch.tensor([4, 8, 15])
    pos = torch.tensor(lens)
    batch = m.draft_block(ctxs, first, pos, 3)
    for i, c in enumerate(ctxs):
        one = m.draft_block([c.kv()], first[i:i + 1], pos[i:i + 1], 3)
        torch.testing.assert_close(batch[i:i + 1], one, rtol=1e-5, atol=1e-5)
    assert [len(c) for c in ctxs] == lens  # drafting does not grow the context


def test_context_grows_incrementally_like_at_once():
    m, *_ = tiny_drafter()
    torch.manual_seed(3)
    states = torch.randn(20, 3 * HT)
    whole = m.context_kv(states, torch.arange(20))
    ctx = DFlashContext(m, capacity=1)
    for a, b in ((0, 5), (5, 6), (6, 13), (13, 20)):
        ctx.append(states[a:b], torch.arange(a, b))
        m.draft_block([ctx], torch.tensor([1]), torch.tensor([b]), 4)  # scratch writes past length
    assert len(ctx) == 20 and ctx.capacity >= 20 and ctx.nbytes > 0
    for got, want in zip(ctx.kv(), whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    out = m.draft_block([ctx], torch.tensor([1]), torch.tensor([20]), 4)
    torch.testing.assert_close(out, m.draft_block([whole], torch.tensor([1]), torch.tensor([20]), 4))
    ctx.truncate(13)  # rollback, then regrow with other states
    ctx.append(states[13:20], torch.arange(13, 20))
    torch.testing.assert_close(ctx.kv()[0], whole[0], rtol=1e-5, atol=1e-6)
    ctx.reset()
    assert len(ctx) == 0


def test_d2t_maps_draft_ids_to_target_ids():
    m, *_ = tiny_drafter(trimmed=True)
    states = torch.randn(5, 3 * HT)
    ctx = m.context_kv(states, torch.arange(5))
    small = m.draft_block([ctx], torch.tensor([3]), torch.tensor([5]), 3)
    full = m.draft_block([ctx], torch.tensor([3]), torch.tensor([5]), 3, target_vocab=True)
    assert small.shape == (1, 3, 40) and full.shape == (1, 3, V)
    tid = torch.arange(40) + m.d2t
    torch.testing.assert_close(full[..., tid], small)
    outside = torch.ones(V, dtype=torch.bool)
    outside[tid] = False
    assert torch.isinf(full[..., outside]).all()
    assert torch.equal(m.draft_to_target(small.argmax(-1)), full.argmax(-1))


def test_missing_embedding_or_head_is_a_clear_error(tmp_path):
    m, embed, head = tiny_drafter()
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embed_tokens"):
        DFlashDrafter.from_pretrained(tmp_path, lm_head_weight=head)
    with pytest.raises(ValueError, match="lm_head"):
        DFlashDrafter.from_pretrained(tmp_path, embed_tokens=embed)
    # A callable embedding works as well as a weight.
    m2 = DFlashDrafter.from_pretrained(tmp_path, embed_tokens=torch.nn.Embedding.from_pretrained(embed),
                                       lm_head_weight=head)
    assert m2.parameter_count() == m.parameter_count() and m2.memory_bytes() > 0
    assert "embedding shared" in m2.describe()


def test_training_pass_matches_inference_blocks():
    """forward_train (many blocks per sequence, one mask) == draft_block per anchor."""
    m, *_ = tiny_drafter(trimmed=True, trained_mask=True)
    torch.manual_seed(4)
    S, k = 12, 3
    states = torch.randn(2, S, 3 * HT)
    ids = torch.randint(0, V, (2, S))
    anchors = torch.tensor([[2, 7, 5], [1, 8, 4]])
    first = ids.gather(1, anchors)
    out = m.forward_train(states, first, anchors, k)
    assert out.shape == (2, 3, k, 40)
    for b in range(2):
        for a in range(3):
            p = int(anchors[b, a])
            one = m.draft_block([m.context_kv(states[b, :p], torch.arange(p))], first[b, a:a + 1],
                                anchors[b, a:a + 1], k)
            torch.testing.assert_close(out[b, a], one[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- vision adaptor

VISPEC, MSD = VisionConfig("vispec", num_queries=3), VisionConfig("msd")
# Image positions: a 6-token span, a 2-token span (shorter than vispec's 3 queries).
IMAGE = torch.zeros(16, dtype=torch.bool)
IMAGE[2:8] = IMAGE[10:12] = True


def test_vision_config_round_trip_and_errors():
    for v in (VISPEC, MSD):
        cfg = tiny_config(vision=v)
        d = cfg.to_dict()
        assert d["dflash_config"]["vision"]["style"] == v.style
        assert DFlashConfig.from_dict(d).vision == v
    assert tiny_config(vision=MSD).state_width == HT + 3 * HT
    d = tiny_config().to_dict()
    d["dflash_config"]["vision"] = {"style": "llava"}
    with pytest.raises(ValueError, match="dflash_config.vision.style='llava'; allowed values: "
                                         "vispec, msd"):
        DFlashConfig.from_dict(d)
    d["dflash_config"]["vision"] = {"style": "vispec", "queries": 2}
    with pytest.raises(ValueError, match=r"unknown fields \['queries'\]"):
        DFlashConfig.from_dict(d)


def test_spans_and_complete_spans():
    assert spans(IMAGE) == [(2, 8), (10, 12)]
    # A segment ending inside a span holds it back unless the next token is known text.
    assert complete_spans(IMAGE[:5], next_is_text=False) == 2
    assert complete_spans(IMAGE[:8], next_is_text=True) == 8
    assert complete_spans(IMAGE[:9], next_is_text=False) == 9
    assert complete_spans(IMAGE[2:6], next_is_text=False) == 0


def serving_context(m, states, p):
    """What the serving side holds at anchor p: rows of positions < p; a vispec image span
    only once the token after it is known (token p is)."""
    img = IMAGE[:p]
    keep = (complete_spans(img, next_is_text=not bool(IMAGE[p]))
            if m.config.vision.style == "vispec" else p)
    h, pos, _, glob = m.encode_context(states[:keep], torch.arange(keep), img[:keep])
    g = None if glob is None else glob[0].mean(0, keepdim=True)
    return m.rows_kv(h, pos), g


@pytest.mark.parametrize("vision", [VISPEC, MSD], ids=["vispec", "msd"])
def test_training_pass_with_images_matches_serving_blocks(vision):
    """forward_train over sequences with image spans == draft_block per anchor on the
    context the serving side builds (spans whole, global feature of the spans seen)."""
    m, *_ = tiny_drafter(vision=vision)
    torch.manual_seed(5)
    S, k = 16, 3
    states = torch.randn(2, S, m.config.state_width)
    ids = torch.randint(0, V, (2, S))
    # Before the images, inside the first span, right after it, after both.
    anchors = torch.tensor([[1, 5, 8, 14], [9, 10, 12, 15]])
    first = ids.gather(1, anchors)
    out = m.forward_train(states, first, anchors, k, image=IMAGE.expand(2, S))
    for b in range(2):
        for a in range(4):
            p = int(anchors[b, a])
            kv, g = serving_context(m, states[b], p)
            one = m.draft_block([kv], first[b, a:a + 1], anchors[b, a:a + 1], k, image_global=g)
            torch.testing.assert_close(out[b, a], one[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vision", [VISPEC, MSD], ids=["vispec", "msd"])
def test_the_adaptor_reads_image_positions_and_round_trips(vision, tmp_path):
    m, embed, head = tiny_drafter(vision=vision)
    torch.manual_seed(6)
    states = torch.randn(14, m.config.state_width)
    p, first = 13, torch.tensor([7])

    def block(model, st):
        kv, g = serving_context(model, st, p)
        return model.draft_block([kv], first, torch.tensor([p]), 3, image_global=g)

    base = block(m, states)
    E = m.config.embedding_width
    # What the adaptor reads at image positions moves the draft: the target layers'
    # states (vispec) or the input embeddings (msd) ...
    at_image = states.clone()
    cols = slice(0, E) if E else slice(None)
    at_image[3, cols] += 1.0
    assert not torch.allclose(block(m, at_image), base)
    if E:  # ... and msd reads no embedding at text positions.
        at_text = states.clone()
        at_text[0, :E] += 1.0
        torch.testing.assert_close(block(m, at_text), base)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dflash_config"]["vision"]["style"] \
        == vision.style
    m2 = DFlashDrafter.from_pretrained(tmp_path, embed_tokens=embed, lm_head_weight=head)
    assert "vision adaptor " + vision.style in m2.describe()
    torch.testing.assert_close(block(m2, states), base)


@pytest.mark.parametrize("vision", [VISPEC, MSD], ids=["vispec", "msd"])
def test_an_adaptor_added_to_a_text_drafter_keeps_its_text_drafts(vision):
    m, *_ = tiny_drafter(trimmed=True, trained_mask=True)
    v = m.with_vision(vision)
    assert v.config.vision == vision and m.config.vision is None
    torch.manual_seed(7)
    states = torch.randn(9, 3 * HT)
    wide = torch.cat((torch.randn(9, v.config.embedding_width), states), dim=1)
    first, p = torch.tensor([4]), torch.tensor([9])
    text = m.draft_block([m.context_kv(states, torch.arange(9))], first, p, 3)
    h, pos, _, _ = v.encode_context(wide, torch.arange(9), torch.zeros(9, dtype=torch.bool))
    torch.testing.assert_close(v.draft_block([v.rows_kv(h, pos)], first, p, 3,
                                             image_global=torch.zeros(1, H)), text)
