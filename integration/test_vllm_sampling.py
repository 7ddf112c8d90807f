"""Sampled drafts stay lossless: the joint distribution of the first sampled tokens with
a spec_plugins method whose drafts are *sampled* (chains through vLLM's rejection
sampler with ``draft_probs``, trees through the core verifier) equals vLLM's without
speculation. In-process engines on a tiny random model (``sampling_check.py``), thousands
of seeded requests each, compared by a chi-square test of homogeneity."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from integration.sampling_check import make_model
from integration.vllm_server import engine_env

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
N = 3000


def sample(model: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "integration.sampling_check", model, "--n", str(N),
                        *args], capture_output=True, text=True, timeout=900, cwd=HERE.parent,
                       env=engine_env(str(HERE / "method_pkg")))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny-sampling")))


@pytest.fixture(scope="module")
def vanilla_samples(tiny):
    return sample(tiny)["tokens"]


def homogeneity(a: list[tuple], b: list[tuple]) -> float:
    """p-value of a chi-square test that two samples come from one distribution
    (cells with fewer than 5 expected counts pooled)."""
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda k: -(ca[k] + cb[k]))
    table = np.array([[ca[k], cb[k]] for k in keys], dtype=float)
    big = table.sum(1) >= 10
    table = np.vstack([table[big], table[~big].sum(0, keepdims=True)])
    table = table[table.sum(1) > 0]
    return stats.chi2_contingency(table)[1]


@pytest.mark.parametrize("tree", [False, True], ids=["chains", "trees"])
def test_sampled_drafts_keep_the_target_distribution(tiny, vanilla_samples, tree):
    res = sample(tiny, "--method", "test_sampled", "--options",
                 json.dumps({"tree": tree, "depth": 3, "support": 8,
                                            "payoff_gate": False}))
    m = res["metrics"]
    drafted = m.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = m.get("vllm:spec_decode_num_accepted_tokens", 0)
    # Both paths of the verifier are exercised: some drafts accepted, some rejected.
    assert 0 < accepted < drafted, m
    spec = res["tokens"]
    assert all(len(t) == 3 for t in spec)
    for name, key in [("first two tokens", lambda t: tuple(t[:2])),
                      ("third token", lambda t: t[2])]:
        p = homogeneity([key(t) for t in vanilla_samples], [key(t) for t in spec])
        assert p > 1e-3, f"{name}: the speculative distribution differs (p = {p:.2e})"
