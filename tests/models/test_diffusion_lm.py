"""DiffusionLMDrafter on tiny random checkpoints (DiffusionGemma, and a masked LM for the
generic path), saved to disk and loaded back through ``from_pretrained``."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("this transformers has no DiffusionGemma", allow_module_level=True)

from spec_plugins.models.diffusion_lm import DiffusionLMDrafter  # noqa: E402

VOCAB = 256
CANVAS = 16
WINDOW = 8  # sliding-window layers cache the last WINDOW - 1 context keys
ATOL = 1e-5


def _tiny_diffusion_gemma():
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        sliding_window=WINDOW,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        max_position_embeddings=512,
    )
    vision = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        position_embedding_size=16,
        patch_size=4,
    )
    cfg = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=CANVAS
    )
    torch.manual_seed(0)
    return transformers.DiffusionGemmaForBlockDiffusion(cfg)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def dg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusion_gemma")
    _tiny_diffusion_gemma().save_pretrained(path)
    return path


@pytest.fixture
def drafter(dg_path):
    return DiffusionLMDrafter.from_pretrained(dg_path, device="cpu")


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


A, B = _tokens(21, 1), _tokens(5, 2)


def test_loads_and_describes_the_model(drafter):
    assert drafter.kind == "diffusion_gemma"
    assert drafter.vocab_size == VOCAB and drafter.max_block == CANVAS
    assert drafter.mask_token_id is None  # uniform-noise canvas; no tokenizer saved here


def test_lattice_shape_and_finite(drafter):
    out = drafter.lattice([("a", A), ("b", B)], block_len=6)
    assert out.shape == (2, 6, VOCAB) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert drafter.cached_len("a") == len(A) and drafter.cached_len("b") == len(B)


def test_matches_the_models_own_first_denoising_step(drafter):
    """Batch 1, the same canvas: the lattice is DiffusionGemmaForBlockDiffusion.forward on
    (context, canvas), i.e. generate's first decoder pass (positions n..n+L-1, no
    self-conditioning)."""
    out = drafter.lattice([("a", A)], block_len=8)
    canvas = drafter._noise([len(A)], (1, 8), "cpu")[:, 0]
    with torch.no_grad():
        ref = drafter.model(input_ids=torch.tensor([A]), decoder_input_ids=canvas).logits
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_equals_one_at_a_time(dg_path, attn):
    d = DiffusionLMDrafter.from_pretrained(dg_path, device="cpu", attn_implementation=attn)
    c = _tokens(4, 3)  # shorter than the sliding window, A longer: different pads per layer type
    both = d.lattice([("a", A), ("b", B), ("c", c)], block_len=7)
    for i, (rid, toks) in enumerate([("a", A), ("b", B), ("c", c)]):
        d.finish(rid)
        one = d.lattice([(rid, toks)], block_len=7)
        torch.testing.assert_close(both[i], one[0], atol=ATOL, rtol=0)


def test_incremental_encoding_equals_encoding_at_once(dg_path):
    whole = DiffusionLMDrafter.from_pretrained(dg_path, device="cpu")
    inc = DiffusionLMDrafter.from_pretrained(dg_path, device="cpu")
    for cut in (2, 3, 9, 10, 16, 21):  # past the sliding window, in chunks and single tokens
        got = inc.lattice([("a", A[:cut]), ("b", B)], block_len=5)
        whole.finish("a")
        want = whole.lattice([("a", A[:cut])], block_len=5)
        torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
    assert inc.stats["encoded_tokens"] == len(A) + len(B)  # each token encoded once
    assert inc.stats["reencodes"] == 0


def test_same_context_again_encodes_nothing(drafter):
    first = drafter.lattice([("a", A)], block_len=4)
    n = drafter.stats["encoded_tokens"]
    torch.testing.assert_close(drafter.lattice([("a", A)], block_len=4), first, atol=0, rtol=0)
    assert drafter.stats["encoded_tokens"] == n


def test_finish_and_reset(drafter, dg_path):
    first = drafter.lattice([("a", A)], block_len=4)
    drafter.finish("a")
    assert drafter.cached_len("a") == 0
    drafter.finish("never-seen")  # no error
    n = drafter.stats["encoded_tokens"]
    torch.testing.assert_close(drafter.lattice([("a", A)], block_len=4), first, atol=ATOL, rtol=0)
    assert drafter.stats["encoded_tokens"] == n + len(A)
    drafter.reset("a")
    assert drafter.cached_len("a") == 0
    torch.testing.assert_close(drafter.lattice([("a", A)], block_len=4), first, atol=ATOL, rtol=0)


def test_diverged_history_is_detected_and_reencoded(drafter, dg_path):
    drafter.lattice([("a", A)], block_len=4)
    fresh = DiffusionLMDrafter.from_pretrained(dg_path, device="cpu")
    for history in (A[:12], A[:8] + _tokens(5, 9)):  # truncated, then rewritten
        got = drafter.lattice([("a", history)], block_len=4)
        fresh.finish("a")
        want = fresh.lattice([("a", history)], block_len=4)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert drafter.stats["reencodes"] == 2
    assert drafter.cached_len("a") == 13


def test_bad_arguments_raise_clear_errors(drafter):
    with pytest.raises(ValueError, match="max_block=16"):
        drafter.lattice([("a", A)], block_len=CANVAS + 1)
    with pytest.raises(ValueError, match="block_len"):
        drafter.lattice([("a", A)], block_len=0)
    with pytest.raises(ValueError, match="steps"):
        drafter.lattice([("a", A)], block_len=4, steps=0)
    with pytest.raises(ValueError, match="no committed tokens"):
        drafter.lattice([("a", [])], block_len=4)
    with pytest.raises(ValueError, match="twice"):
        drafter.lattice([("a", A), ("a", A)], block_len=4)
    assert drafter.lattice([], block_len=4).shape == (0, 4, VOCAB)
    assert drafter.lattice([("a", A)], block_len=CANVAS).shape == (1, CANVAS, VOCAB)


def test_steps_fix_the_confident_positions_first(drafter):
    one = drafter.lattice([("a", A), ("b", B)], block_len=8)
    passes = drafter.stats["decoder_passes"]
    two = drafter.lattice([("a", A), ("b", B)], block_len=8, steps=2)
    assert drafter.stats["decoder_passes"] == passes + 2
    assert two.shape == one.shape and torch.isfinite(two).all()
    # pass 1 is the one-step lattice; it fixes the 4 positions it is surest of
    top = one.softmax(-1).amax(-1).topk(4, dim=-1).indices
    for b in range(2):
        torch.testing.assert_close(two[b, top[b]], one[b, top[b]], atol=0, rtol=0)
    assert not torch.allclose(two, one)  # the rest come from the second, self-conditioned pass
    many = drafter.lattice([("a", A)], block_len=3, steps=10)  # capped at block_len passes
    assert drafter.stats["decoder_passes"] == passes + 2 + 3
    drafter.finish("a")
    batched = drafter.lattice([("a", A), ("b", B)], block_len=3, steps=10)
    torch.testing.assert_close(many[0], batched[0], atol=ATOL, rtol=0)


def test_full_canvas_runs_the_trained_block(dg_path):
    d = DiffusionLMDrafter.from_pretrained(dg_path, device="cpu", full_canvas=True)
    out = d.lattice([("a", A)], block_len=4)
    assert out.shape == (1, 4, VOCAB)
    canvas = d._noise([len(A)], (1, CANVAS), "cpu")[:, 0]
    with torch.no_grad():
        ref = d.model(input_ids=torch.tensor([A]), decoder_input_ids=canvas).logits[:, :4]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


# ---- generic path: a bidirectional masked LM (no LLaDA/Dream checkpoint exists offline) ----

MASK = 3


@pytest.fixture(scope="module")
def mlm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("masked_lm")
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(path)
    return path


def test_generic_masked_lm_needs_a_mask_token(mlm_path):
    with pytest.raises(ValueError, match="mask_token_id"):
        DiffusionLMDrafter.from_pretrained(mlm_path, device="cpu")


def test_generic_mask_token_from_the_tokenizer(mlm_path, tmp_path):
    import shutil

    path = shutil.copytree(mlm_path, tmp_path / "with_tokenizer")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]"] + [f"t{i}" for i in range(VOCAB - 5)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    assert DiffusionLMDrafter.from_pretrained(path, device="cpu").mask_token_id == MASK


@pytest.mark.parametrize("shift", [False, True])
def test_generic_masked_lm_reads_the_canvas(mlm_path, shift):
    d = DiffusionLMDrafter.from_pretrained(
        mlm_path, device="cpu", mask_token_id=MASK, max_block=8, shift_logits=shift
    )
    assert d.kind == "bert" and d.mask_token_id == MASK and d.max_block == 8
    c = _tokens(5, 4)  # same length as B: batched together without padding
    out = d.lattice([("a", A), ("b", B), ("c", c)], block_len=6)
    assert out.shape == (3, 6, VOCAB) and torch.isfinite(out).all()
    for i, toks in enumerate([A, B, c]):
        with torch.no_grad():
            ref = d.model(input_ids=torch.tensor([toks + [MASK] * 6])).logits
        n = len(toks) - int(shift)
        torch.testing.assert_close(out[i], ref[0, n : n + 6], atol=ATOL, rtol=0)
    two = d.lattice([("a", A)], block_len=6, steps=2)
    assert two.shape == (1, 6, VOCAB) and torch.isfinite(two).all()
    with pytest.raises(ValueError, match="max_block=8"):
        d.lattice([("a", A)], block_len=9)
