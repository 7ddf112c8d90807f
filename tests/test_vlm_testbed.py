"""The VLM testbed (``spec-plugins-vlm``): synthetic images, the assembled Idefics3
checkpoint (SmolLM2's weights and text tokenization unchanged, image tokens renamed
from unused ones), and the placeholder ids drafters must avoid."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from spec_plugins.tools.vlm.images import HELD_OUT_SEEDS, KINDS, TRAIN_SEEDS, draw  # noqa: E402


def test_a_seed_fixes_the_image_and_its_caption():
    for kind in KINDS:
        a, b = draw(17, kind=kind), draw(17, kind=kind)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.caption == b.caption and a.kind == kind
        assert a.facts["background"] in a.caption
    assert not np.array_equal(np.asarray(draw(1).image), np.asarray(draw(2).image))
    assert not set(TRAIN_SEEDS) & set(HELD_OUT_SEEDS[:1000])
    with pytest.raises(ValueError, match="kind must be one of"):
        draw(0, kind="photo")


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    from spec_plugins.tools.default_model import build as build_default
    from spec_plugins.tools.vlm.cli import build

    out = build(steps=2, caption_steps=2, out=tmp_path_factory.mktemp("vlm") / "testbed",
                log=lambda *a: None)
    return build_default(), out


def test_text_tokenizes_as_the_language_model_does(testbed):
    from transformers import AutoTokenizer

    lm_dir, out = testbed
    lm, vlm = AutoTokenizer.from_pretrained(lm_dir), AutoTokenizer.from_pretrained(out)
    text = "Describe the picture: a red <b>circle</b>, 3 bars.\n```python\nx = 1\n```"
    assert vlm(text).input_ids == lm(text).input_ids
    assert vlm.convert_tokens_to_ids("<image>") == 14


def test_the_processor_puts_one_span_of_image_tokens_per_image(testbed):
    from transformers import AutoProcessor

    _, out = testbed
    processor = AutoProcessor.from_pretrained(out)
    ids = processor(text="<image>What is it?", images=[draw(3).image]).input_ids[0]
    assert ids.count(14) == 49
    assert ids.count(11) == 2 and ids.count(12) == 1   # framing and global-image tokens


def test_the_checkpoint_keeps_the_language_models_weights(testbed):
    import torch
    from transformers import AutoModelForCausalLM, Idefics3ForConditionalGeneration

    lm_dir, out = testbed
    assert (out / "spec_plugins_vlm.json").exists()
    about = json.loads((out / "spec_plugins_vlm.json").read_text())
    assert about["align_steps"] == 2 and about["caption_steps"] == 2
    assert 0 < about["caption_loss"] < 20
    vlm = Idefics3ForConditionalGeneration.from_pretrained(out).eval()
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([[1, 504, 2443, 282, 253, 4166, 351]])
    with torch.no_grad():
        assert torch.allclose(vlm(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5)


def test_placeholder_ids_are_the_image_tokens_and_their_frame(testbed):
    from transformers import AutoConfig

    from spec_plugins.adapter.session import placeholder_token_ids

    lm_dir, out = testbed
    assert placeholder_token_ids(AutoConfig.from_pretrained(out), str(out)) == {11, 12, 14}
    # A text model's config and tokenizer name no medium.
    assert placeholder_token_ids(AutoConfig.from_pretrained(lm_dir), str(lm_dir)) == frozenset()


def test_the_chat_template_is_smollm2s_for_text_and_places_images(testbed):
    from transformers import AutoTokenizer

    lm_dir, out = testbed
    lm, vlm = AutoTokenizer.from_pretrained(lm_dir), AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Why?"}]
    assert (vlm.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == lm.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    parts = [{"role": "user", "content": [{"type": "text", "text": "A:"}, {"type": "image"},
                                          {"type": "text", "text": "B:"}, {"type": "image"}]}]
    text = vlm.apply_chat_template(parts, tokenize=False)
    assert "user\nA:<image>B:<image><|im_end|>" in text


def test_answers_are_scored_against_what_was_drawn():
    from spec_plugins.tools.vlm.evaluate import score

    for kind in KINDS:
        d = draw(5, kind=kind)
        assert all(score(d, d.caption).values()), (kind, d.caption)
    chart = draw(5, kind="chart")
    wrong = [c for c in ("red", "blue") if c not in (chart.facts["colour"],
                                                     chart.facts["background"])][0]
    got = score(chart, f"A {wrong} square on a {wrong} background.")
    assert got == {"kind": False, "background": False, "foreground": False}
