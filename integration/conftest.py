import fcntl
import json
import os
import pickle
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
# Most test servers go further and run the model eagerly (``--enforce-eager``): on this
# CPU the traced-but-not-compiled forward decodes at about half eager's speed, with the
# same outputs (a vanilla server: 4 requests alone and 8 concurrent, 50 s traced against
# 24 s eager, every token equal). Servers of methods whose work happens inside the traced
# forward (dflash's hidden states, suffix trees' attention, DEL's KV at full depth) keep
# it: ``vllm_server(keep_graph=True)``; they are compared with eager vanilla servers.
os.environ.setdefault("SPEC_PLUGINS_TEST_EAGER", "1")

# ``scripts/test.sh`` splits the run over one pytest-xdist worker per core, a module at a
# time (``-n 2 --dist loadfile``). Each worker's engine servers compute on that worker's
# core (vLLM's and SGLang's own binding variables), so two servers never share one; a
# vLLM server computes on one core anyway (vLLM keeps the other for its front end).
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    _cpus = sorted(os.sched_getaffinity(0))
    _core = str(_cpus[int(WORKER.removeprefix("gw")) % len(_cpus)])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core)
    os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", _core)


def pytest_collection_modifyitems(items):
    """Split runs start with the end-to-end modules, so the many short unit-test modules
    fill in at the end and both workers finish together."""
    if WORKER:
        items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def once_per_run(tmp_path_factory, name: str, build):
    """A session fixture's value built once per run, however many workers ask: under a
    lock in the directory the workers' temporary directories share, the first builds and
    stores it, the others load it."""
    root = tmp_path_factory.getbasetemp()
    if WORKER:
        root = root.parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = root / f"{name}.pickle"
        if stored.exists():
            return pickle.loads(stored.read_bytes())
        value = build()
        stored.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(scope="session")
def default_model(tmp_path_factory) -> str:
    from spec_plugins.tools.default_model import build

    return once_per_run(tmp_path_factory, "default-model", lambda: str(build()))


# The VLM testbed's size in the end-to-end tests: answers depend on the image, do not
# describe it, and the build takes about a minute.
VLM_ALIGN_STEPS = 40


@pytest.fixture(scope="session")
def vlm_model(tmp_path_factory) -> str:
    from spec_plugins.tools.vlm.cli import build

    return once_per_run(tmp_path_factory, "vlm-model",
                        lambda: str(build(steps=VLM_ALIGN_STEPS, caption_steps=0)))


@pytest.fixture(scope="session")
def vanilla(default_model, tmp_path_factory):
    """A vanilla server's greedy outputs (batch 1, 8 concurrent) and one logit-biased
    output, shared by every end-to-end module."""
    from integration.client import CONVERSATIONS, banned_token, complete, run_all
    from integration.vllm_server import vllm_server

    def serve():
        with vllm_server(default_model) as url:
            batch1, batch8 = run_all(url)
            ban = banned_token(batch1[0])
            biased = complete(url, CONVERSATIONS[0], temperature=0,
                              logit_bias={str(ban): -100})
        return batch1, batch8, biased
    return once_per_run(tmp_path_factory, "vllm-vanilla", serve)


@pytest.fixture(scope="session")
def sglang_vanilla(default_model, tmp_path_factory):
    """SGLang's own greedy outputs without speculation (batch 1, 8 concurrent), shared by
    the SGLang end-to-end modules."""
    from integration.client import SGLANG_IDS, run_all
    from integration.sglang_server import SMALL_POOL, sglang_available, sglang_server

    if sglang_available() is not None:
        pytest.skip(sglang_available())

    def serve():
        with sglang_server(default_model, SMALL_POOL) as url:
            return run_all(url, extra_body=SGLANG_IDS)
    return once_per_run(tmp_path_factory, "sglang-vanilla", serve)


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

    def train():
        out = tmp_path_factory.mktemp("dflash-drafter")
        p = subprocess.run([sys.executable, "-m", "spec_plugins.tools.train_drafter",
                            "--model", default_model, "--out", str(out), *CI_TRAINING],
                           capture_output=True, text=True, timeout=1200, env=engine_env())
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert (out / "config.json").is_file()
        return str(out)
    return once_per_run(tmp_path_factory, "dflash-drafter", train)


@pytest.fixture(scope="session")
def vision_drafter(vlm_model, dflash_drafter, tmp_path_factory) -> str:
    """The image stage of the drafter trainer at CI's size on the VLM testbed, from the CI
    drafter (the testbed's language model is the default model), with the msd adaptor."""
    from integration.vllm_server import engine_env

    d = tmp_path_factory.mktemp("dflash-msd")
    p = subprocess.run([sys.executable, "-m", "spec_plugins.tools.train_drafter", "--tiny",
                        "--model", vlm_model, "--vision", "msd", "--init-from", dflash_drafter,
                        "--image-prompts", "8", "--max-new-tokens", "24", "--max-len", "256",
                        "--out", str(d)],
                       capture_output=True, text=True, timeout=1200, env=engine_env())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    report = json.loads((d / "train_report.json").read_text())
    assert report["eval"]["per_position_accuracy"] and report["step"] > 0
    # What the adaptor adds: the same held-out evaluation with the adaptor silent.
    assert len(report["eval"]["adaptor_off"]["per_position_accuracy"]) == \
        len(report["eval"]["per_position_accuracy"])
    assert json.loads((d / "config.json").read_text())["dflash_config"]["vision"]["style"] == "msd"
    return str(d)
