"""spec-plugins-train-drafter end to end on a tiny random Llama target (well under a minute)."""

import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from spec_plugins.tools.train_drafter import cli, corpus, features, generation  # noqa: E402
from spec_plugins.tools.train_drafter.pipeline import run  # noqa: E402
from spec_plugins.tools.train_drafter.settings import Settings  # noqa: E402
from spec_plugins.tools.train_drafter.training import default_target_layers  # noqa: E402
from spec_plugins.models.dflash import DFlashDrafter  # noqa: E402

TEXT = """The river runs past the old mill and under the stone bridge. In spring the water is
high and the children watch the boats go by.

A list is a sequence of values. You can add items to a list, remove them, sort the list or
reverse it. Lists are written with square brackets.

The baker opens the shop at six. Fresh bread, rolls and small cakes are on the shelves
before the first customers arrive, and the smell fills the whole street.

To read a file in Python, open it with a with statement and iterate over its lines. Each
line keeps its newline character unless you strip it.

Clouds gather in the west when the wind turns. Farmers look at the sky and decide whether
to bring the hay in before the rain.
"""


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny-target")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<unused0>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<unused0>"])
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=4, vocab_size=len(tok),
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT)
    return d, corpus


def _run(model, corpus, out, **kw):
    s = Settings.tiny(model=str(model), corpus=str(corpus), out=str(out), threads=1, **kw)
    return run(s)


def test_tiny_training_end_to_end(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_PLUGINS_CACHE", str(tmp_path / "cache"))
    model, corpus = tiny_target
    out = tmp_path / "drafter"
    r1 = _run(model, corpus, out, steps=12)
    c1 = r1["cost"]
    assert c1["tokens_generated"] > 0 and c1["generate_s"] > 0 and c1["positions_trained"] > 0
    hist = json.loads((out / "train_report.json").read_text())["loss_first"]
    assert len(hist) == 5
    state = torch.load(out / "train_state.pt", weights_only=False)
    losses = state["history"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    ev = r1["eval"]
    assert len(ev["per_position_accuracy"]) == 3 and all(0 <= a <= 1 for a in ev["per_position_accuracy"])

    # The checkpoint is a DFlash checkpoint that loads with the target's embedding.
    from transformers import AutoModelForCausalLM
    target = AutoModelForCausalLM.from_pretrained(model)
    emb = target.get_input_embeddings().weight.detach()
    d = DFlashDrafter.from_pretrained(out, embed_tokens=emb)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["draft_vocab_size"] == 64
    assert cfg["dflash_config"]["target_layer_ids"] == default_target_layers(4)
    assert cfg["dflash_config"]["mask_token_id"] == r1["mask_token_id"]
    assert (out / "mask_embedding.pt").exists() and d.mask_embedding is not None
    states = torch.randn(5, d.config.fc_in_features)
    logits = d.draft_block([d.context_kv(states, torch.arange(5))], torch.tensor([3]),
                           torch.tensor([5]), 3)
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()

    # Re-running with more steps resumes (and reuses the cached generation and features).
    snap = tmp_path / "at12"
    shutil.copytree(out, snap)
    r2 = _run(model, corpus, out, steps=16)
    assert r2["cost"]["resumed_from"] == 12
    assert r2["cost"]["generate_s"] == 0.0 and r2["cost"]["features_s"] == 0.0
    assert len(torch.load(out / "train_state.pt", weights_only=False)["history"]) == 16

    # --eval-only evaluates the checkpoint without training or rewriting it.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    r5 = _run(model, corpus, out, steps=16, eval_only=True)
    assert r5["cost"]["positions_trained"] == 0 and r5["step"] == 16
    assert r5["eval"] == r2["eval"] and (out / "eval_report_step16.json").exists()
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # The same seed gives identical weights (fresh output directory, cached data).
    r3 = _run(model, corpus, tmp_path / "again", steps=12)
    assert r3["cost"]["generate_s"] == 0.0
    from safetensors.torch import load_file
    a = load_file(str(snap / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # ... and another seed does not.
    _run(model, corpus, tmp_path / "other", steps=12, seed=1)
    c = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert not all(torch.equal(a[n], c[n]) for n in a if n in c)


def test_target_layers_and_cli_parsing():
    assert default_target_layers(30) == [1, 8, 14, 20, 27]
    assert default_target_layers(36) == [1, 9, 17, 25, 33]
    assert max(default_target_layers(4)) <= 2
    s = cli.parse_args(["--tiny", "--steps", "3", "--target-layers", "0,2", "--no-tie-k-norm"])
    assert s.steps == 3 and s.target_layers == [0, 2] and not s.tie_k_norm and s.block_size == 4
    s = cli.parse_args(["--vocab", "4096"])
    assert s.vocab == 4096 and s.steps == Settings().steps


def test_console_scripts_and_module_run_reach_the_tools():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert all(callable(pkgutil.resolve_name(target)) for target in scripts.values())
    p = subprocess.run([sys.executable, "-m", "spec_plugins.tools.train_drafter", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "spec-plugins-train-drafter" in p.stdout and "--corpus" in p.stdout


def test_prompts_from_local_corpus_are_deterministic():
    a = corpus.build_prompts("local", 20, seed=3)
    assert a == corpus.build_prompts("local", 20, seed=3) and len(set(a)) > 10
    assert any("def " in p or "Python" in p for p in a)


def test_truncated_forward_gives_the_full_models_hidden_states(tiny_target):
    """Features skip the LM head and the top layers; the layers read are unchanged."""
    from transformers import AutoModelForCausalLM
    model, _ = tiny_target
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
        for deepest in (0, 1, 2):
            part = features.hidden_states(m, ids, att, deepest)
            for i in range(deepest + 1):
                torch.testing.assert_close(part[i + 1], full[i + 1])
    assert len(m.model.layers) == 4  # restored
    with pytest.raises(ValueError):
        features.hidden_states(m, ids, att, 3)


def test_corpus_sources_and_bad_names(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x")
    assert corpus.corpus_sources("local,self", 100) == [("local", 50), ("self", 50)]
    assert corpus.corpus_sources(f"local:30,{f}", 100) == [("local", 30), (str(f), 50)]
    with pytest.raises(ValueError, match="allowed: local, self"):
        corpus.corpus_sources("locl", 10)
    with pytest.raises(ValueError, match="no source"):
        corpus.corpus_sources(" , ", 10)


def test_decontaminator_drops_benchmark_like_prompts(tmp_path):
    bench = ["Why do cats purr?", "Complete this Python function.\n\ndef add(a, b):\n"
             "    \"\"\"Return the sum of a and b, checking both are integers first.\"\"\""]
    f = tmp_path / "ex.json"
    f.write_text(json.dumps(bench))
    drop = corpus.Decontaminator.from_file(str(f))
    assert drop("why do CATS purr??") and drop("Why do cats purr so loudly?")
    assert drop("Please write: Return the sum of a and b, checking both are integers first.")
    assert not drop("Why do dogs bark at night?") and not drop("How does a hash table work?")
    f.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list of strings"):
        corpus.Decontaminator.from_file(str(f))


def test_self_prompts_are_user_turns_sampled_from_the_target(tiny_target):
    """Magpie: the target continues its chat template from the start of a user turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, _ = tiny_target
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model).eval()
    before, after = generation.chat_turn_frame(tok)
    assert before == "<s>user\n" and after.startswith("</s>")
    a = generation.sample_self_prompts(str(model), tok, m, 6, seed=5, backend="transformers")
    assert a == generation.sample_self_prompts(str(model), tok, m, 6, seed=5, backend="transformers")
    assert 0 < len(a) <= 6 and len(set(a)) == len(a)
    assert all(len(corpus.words(p)) >= 3 and "</s>" not in p for p in a)


def test_init_from_an_earlier_drafter_maps_head_rows_by_token(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEC_PLUGINS_CACHE", str(tmp_path / "cache"))
    model, corpus = tiny_target
    first = _run(model, corpus, tmp_path / "a", steps=4)
    old = DFlashDrafter.from_pretrained(tmp_path / "a", embed_tokens=torch.zeros(1, 1))
    # A second run with another vocabulary size starts from the first drafter's weights.
    r = _run(model, corpus, tmp_path / "b", steps=0, vocab=48, init_from=str(tmp_path / "a"))
    assert r["step"] == 0 and first["step"] == 4
    new = DFlashDrafter.from_pretrained(tmp_path / "b", embed_tokens=torch.zeros(1, 1))
    torch.testing.assert_close(new.fc.weight, old.fc.weight)
    old_rows = {int(t): r for r, t in enumerate(old.draft_to_target(torch.arange(64)).tolist())}
    new_ids = new.draft_to_target(torch.arange(48)).tolist()
    shared = [(r, old_rows[t]) for r, t in enumerate(new_ids) if t in old_rows]
    assert shared
    for r_new, r_old in shared:
        torch.testing.assert_close(new.lm_head.weight[r_new], old.lm_head.weight[r_old])
    with pytest.raises(ValueError, match="target layers"):
        _run(model, corpus, tmp_path / "c", steps=0, target_layers=[0], init_from=str(tmp_path / "a"))
