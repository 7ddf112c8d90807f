"""The SGLang adapter's settings: method from --speculative-algorithm, options from
SPEC_PLUGINS_OPTIONS, the verify width; errors name the field and the allowed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from spec_plugins.options import OptionError
from spec_plugins.sglang.config import settings_from


def args(algo, n=None):
    return SimpleNamespace(speculative_algorithm=algo, speculative_num_draft_tokens=n)


def test_our_method_options_and_width():
    s = settings_from(args("SPEC_PLUGINS.SUFFIX", 5), {"SPEC_PLUGINS_OPTIONS": '{"tree": true}'})
    assert (s.method, s.options.tree, s.num_draft_tokens) == ("suffix", True, 5)
    assert settings_from(args("spec_plugins.recycling"), {}).num_draft_tokens == 9
    assert settings_from(args("NGRAM"), {}) is None and settings_from(args(None), {}) is None


@pytest.mark.parametrize("algo,env,n,msg", [
    ("SPEC_PLUGINS.NOSUCH", {}, None, "--speculative-algorithm='spec_plugins.nosuch' is not a "
     "spec_plugins method; allowed values: spec_plugins.del, spec_plugins.dflash"),
    ("SPEC_PLUGINS.SWIFT", {}, None, "method 'swift' needs \\['target_model'\\], which the "
     "SGLang adapter does not supply yet \\(target_model: running a subset of the target's "
     "layers: .*residual stream"),
    ("SPEC_PLUGINS.SUFFIX", {"SPEC_PLUGINS_OPTIONS": "{bad"}, None,
     "SPEC_PLUGINS_OPTIONS is not valid JSON"),
    ("SPEC_PLUGINS.SUFFIX", {"SPEC_PLUGINS_OPTIONS": '{"depth": 3}'}, None,
     "unknown option SPEC_PLUGINS_OPTIONS.depth"),
    ("SPEC_PLUGINS.SUFFIX", {}, 1, "--speculative-num-draft-tokens must be an integer >= 2"),
])
def test_errors_name_the_field(algo, env, n, msg):
    with pytest.raises(OptionError, match=msg):
        settings_from(args(algo, n), env)
