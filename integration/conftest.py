import os
import subprocess
import sys

import pytest

# Test servers trace the model with Dynamo but run it without Inductor and skip the
# warm-up pass: vLLM's own switch for its CPU CI (`VLLM_CPU_CI_ENV`). Each vLLM server
# of a new configuration otherwise spends ~1-2.5 min compiling with Inductor on this
# machine, about half the suite's time. Vanilla and speculative servers run the same
# mode, so equality still compares like with like; the demo and the benchmarks serve
# with vLLM's default (Inductor). Set VLLM_CPU_CI_ENV=0 to test that mode.
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")


@pytest.fixture(scope="session")
def default_model() -> str:
    from spec_plugins.tools.default_model import build

    return str(build())


# The VLM testbed's size in the end-to-end tests: answers depend on the image, do not
# describe it, and the build takes about a minute.
VLM_ALIGN_STEPS = 40


@pytest.fixture(scope="session")
def vlm_model() -> str:
    from spec_plugins.tools.vlm.cli import build

    return str(build(steps=VLM_ALIGN_STEPS, caption_steps=0))


@pytest.fixture(scope="session")
def vanilla(default_model):
    """A vanilla server's greedy outputs (batch 1, 8 concurrent) and one logit-biased
    output, shared by every end-to-end module."""
    from integration.client import CONVERSATIONS, banned_token, complete, run_all
    from integration.vllm_server import vllm_server

    with vllm_server(default_model) as url:
        batch1, batch8 = run_all(url)
        ban = banned_token(batch1[0])
        biased = complete(url, CONVERSATIONS[0], temperature=0, logit_bias={str(ban): -100})
    return batch1, batch8, biased


@pytest.fixture(scope="session")
def sglang_vanilla(default_model):
    """SGLang's own greedy outputs without speculation (batch 1, 8 concurrent), shared by
    the SGLang end-to-end modules."""
    from integration.client import SGLANG_IDS, run_all
    from integration.sglang_server import SMALL_POOL, sglang_available, sglang_server

    if sglang_available() is not None:
        pytest.skip(sglang_available())
    with sglang_server(default_model, SMALL_POOL) as url:
        return run_all(url, extra_body=SGLANG_IDS)


# CI-sized drafter training: local prompts only, small data, one draft layer, a few dozen
# steps (about two minutes).
CI_TRAINING = ["--tiny", "--gen-backend", "vllm", "--corpus", "local", "--num-prompts", "24",
               "--max-new-tokens", "64", "--max-len", "192", "--vocab", "4096",
               "--draft-layers", "1", "--block-size", "7", "--steps", "60", "--batch", "4",
               "--anchors", "8", "--init-from-target"]


@pytest.fixture(scope="session")
def dflash_drafter(default_model, tmp_path_factory):
    """A DFlash drafter for the default model trained here (its drafts are poor, which is
    fine: every path must keep outputs exact), shared by the vLLM and SGLang tests."""
    from integration.vllm_server import engine_env

    out = tmp_path_factory.mktemp("dflash-drafter")
    p = subprocess.run([sys.executable, "-m", "spec_plugins.tools.train_drafter", "--model",
                        default_model, "--out", str(out), *CI_TRAINING],
                       capture_output=True, text=True, timeout=1200, env=engine_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert (out / "config.json").is_file()
    return str(out)


@pytest.fixture(scope="session")
def vision_drafters(dflash_drafter, tmp_path_factory) -> dict[str, str]:
    """The CI drafter with each vision adaptor (models/vision.py) added, its weights
    random (the global feature's projection too, so every path of the adaptor acts):
    ``{"vispec": dir, "msd": dir}``."""
    import torch

    from spec_plugins.models.dflash import DFlashDrafter
    from spec_plugins.models.vision import VisionConfig

    # The shared embedding / head are not saved: placeholders do.
    text = DFlashDrafter.from_pretrained(dflash_drafter, embed_tokens=torch.zeros(1, 1),
                                         lm_head_weight=torch.zeros(1, 1))
    g = torch.Generator().manual_seed(0)
    out = {}
    for style in ("vispec", "msd"):
        m = text.with_vision(VisionConfig(style))
        with torch.no_grad():
            for name, p in m.vision.named_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        d = tmp_path_factory.mktemp(f"dflash-{style}")
        m.save_pretrained(d)
        out[style] = str(d)
    return out
