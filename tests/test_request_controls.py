import pytest

from spec_plugins.options import OptionError
from spec_plugins.request_controls import MAX_DRAFT_KEY, max_draft_tokens


@pytest.mark.parametrize("extra,want", [
    (None, None), ({}, None), ({"other": 1}, None), ({MAX_DRAFT_KEY: 0}, 0),
    ({MAX_DRAFT_KEY: 3}, 3), ({MAX_DRAFT_KEY: "2"}, 2), ({MAX_DRAFT_KEY: 4.0}, 4),
])
def test_values(extra, want):
    assert max_draft_tokens(extra, "vllm_xargs") == want


@pytest.mark.parametrize("bad", [-1, 1.5, "many", True, [1]])
def test_bad_values_name_the_field(bad):
    with pytest.raises(OptionError, match=r"vllm_xargs\.spec_plugins_max_draft_tokens must be "
                                          r"an integer >= 0"):
        max_draft_tokens({MAX_DRAFT_KEY: bad}, "vllm_xargs")
