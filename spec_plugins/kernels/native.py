"""Build and load the C kernels in ``csrc/`` on first use.

The shared library is compiled with the machine's C compiler (``$CC``, else ``cc``) for
the CPU it runs on (``-march=native``), with OpenMP when the compiler has it, and cached
in spec_plugins' cache (``spec_plugins.paths.cache_root``), keyed by the source,
the flags, the compiler and the CPU, so a copied cache never runs code built for another
CPU. Compiling takes about a second and happens once per machine; processes that race
(the API server and its engine core) each write a private file and rename it into place.

No compiler, or a failed build, is not an error: :func:`tree_attention` returns None and
:func:`unavailable_reason` says why, and callers use the torch path (same math).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from spec_plugins.paths import cache_root

SOURCE = Path(__file__).with_name("csrc") / "tree_attention_cpu.c"
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> None:
    last = None
    for extra in (["-fopenmp"], []):
        cmd = [cc, *FLAGS, *extra, str(SOURCE), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0:
            return
        last = f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}"
    raise RuntimeError(last)


def _load() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH; set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join(
        [SOURCE.read_text(), " ".join(FLAGS), version, platform.machine(), _cpu_id()]
    ).encode()).hexdigest()[:16]
    cache = cache_root()
    path = cache / f"tree_attention_cpu-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            _compile(cc, Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    f = lib.tree_attention_f32
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    f.argtypes = [p, i64, p, i64, p, p, p, i64, p, p, p, i32, i32, i32, i32, i32,
                  ctypes.c_float]
    f.restype = ctypes.c_int
    f = lib.tree_attention_slots_f32
    f.argtypes = [p, i64, p, i64, p, p, p, p, i64, p, p, p, i32, i32, i32, i32,
                  ctypes.c_float]
    f.restype = ctypes.c_int
    return lib


def tree_attention():
    """The C function ``tree_attention_f32`` (vLLM's cache layout; see the source), or
    None."""
    lib = _library()
    return None if lib is None else lib.tree_attention_f32


def tree_attention_slots():
    """The C function ``tree_attention_slots_f32`` (a token-slot cache), or None."""
    lib = _library()
    return None if lib is None else lib.tree_attention_slots_f32


def _library() -> ctypes.CDLL | None:
    global _lib, _reason, _tried
    if not _tried:
        _tried = True
        if os.environ.get("SPEC_PLUGINS_NATIVE", "1") == "0":
            _reason = "disabled by SPEC_PLUGINS_NATIVE=0"
        else:
            try:
                _lib = _load()
            except Exception as e:  # a missing compiler must not break the engine
                _reason = str(e)
    return _lib


def unavailable_reason() -> str | None:
    tree_attention()
    return _reason
