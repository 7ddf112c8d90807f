"""The seam never takes vLLM down: a real vLLM server whose functions differ from the ones
the hooks were written for (a parameter renamed, as a patch release might) starts, logs
one line naming the difference, installs no hook, and serves vanilla's outputs."""

from __future__ import annotations

import textwrap

import pytest

from integration.client import CONVERSATIONS, complete
from integration.vllm_server import vllm_server

pytestmark = pytest.mark.e2e
openai = pytest.importorskip("openai")

# Runs at interpreter start in every process of the server (API server, engine core).
RENAME = textwrap.dedent('''
    import vllm.sampling_params as _sp

    _orig = _sp.SamplingParams._validate_spec_decode

    def _validate_spec_decode(self, spec_config):   # was: speculative_config
        return _orig(self, spec_config)

    _sp.SamplingParams._validate_spec_decode = _validate_spec_decode
''')


def test_a_changed_vllm_serves_without_the_plugin(vanilla, default_model, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RENAME)
    log = tmp_path / "server.log"
    with vllm_server(default_model, log_path=str(log), extra_path=str(site)) as url:
        got = complete(url, CONVERSATIONS[0], temperature=0)
    assert got == vanilla[0][0]
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if "registering nothing" in line]
    assert lines and all("SamplingParams._validate_spec_decode takes (self, spec_config)"
                         in line for line in lines)
