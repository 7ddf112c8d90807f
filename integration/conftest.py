import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_model() -> str:
    from spec_plugins.default_model import build

    return str(build())


@pytest.fixture(scope="session")
def vanilla(default_model):
    """A vanilla server's greedy outputs (batch 1, 8 concurrent) and one logit-biased
    output, shared by every end-to-end module."""
    from client import CONVERSATIONS, banned_token, complete, run_all
    from vllm_server import vllm_server

    with vllm_server(default_model) as url:
        batch1, batch8 = run_all(url)
        ban = banned_token(batch1[0])
        biased = complete(url, CONVERSATIONS[0], temperature=0, logit_bias={str(ban): -100})
    return batch1, batch8, biased


@pytest.fixture(scope="session")
def sglang_vanilla(default_model):
    """SGLang's own greedy outputs without speculation (batch 1, 8 concurrent), shared by
    the SGLang end-to-end modules."""
    from client import SGLANG_IDS, run_all
    from sglang_server import SMALL_POOL, sglang_available, sglang_server

    if sglang_available() is not None:
        pytest.skip(sglang_available())
    with sglang_server(default_model, SMALL_POOL) as url:
        return run_all(url, extra_body=SGLANG_IDS)
