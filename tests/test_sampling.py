"""The target's sampling distribution for the stochastic verifier."""

from __future__ import annotations

import pytest
import torch

from spec_plugins.sampling import sampling_probs


def test_plain_temperature_is_the_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    got = sampling_probs(logits, 0.5)
    assert torch.allclose(got, torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("kw,support", [
    ({"top_k": 2}, [1, 2]),
    ({"top_p": 0.6}, [2]),            # p = .09 .24 .67: the best token alone covers 0.6
    ({"top_p": 0.9}, [1, 2]),
    ({"min_p": 0.3}, [1, 2]),         # 0.24 >= 0.3 * 0.67
    ({"min_p": 0.5}, [2]),
])
def test_truncations_keep_the_right_support_renormalised(kw, support):
    logits = torch.tensor([[1.0, 2.0, 3.0, -30.0]])
    got = sampling_probs(logits, 1.0, **kw)[0]
    assert torch.nonzero(got).flatten().tolist() == support
    full = torch.softmax(logits[0], -1)
    assert torch.allclose(got[support], full[support] / full[support].sum())
