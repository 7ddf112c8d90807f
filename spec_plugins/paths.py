"""Where spec_plugins keeps files: one cache root and the paths under it.

Standard library only (no engine, no torch), so the kernels, the ``dflash`` proposer and
the tools all read their paths here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Overrides the cache root (tests point it at a temporary directory).
CACHE_ENV = "SPEC_PLUGINS_CACHE"
# The embedded default model (spec_plugins.tools.default_model builds it).
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The VLM testbed built on it (spec_plugins.tools.vlm).
VLM_MODEL_NAME = "SmolLM2-135M-Idefics3-synthetic"


def cache_root() -> Path:
    """spec_plugins' cache: ``$SPEC_PLUGINS_CACHE``, else ``$XDG_CACHE_HOME/spec_plugins``
    (``~/.cache/spec_plugins``). Holds the default model, the built C kernels, the trained
    drafters and the drafter trainer's data."""
    return Path(os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spec_plugins"))


def default_model_dir() -> Path:
    return cache_root() / DEFAULT_MODEL_NAME


def vlm_model_dir(align_steps: int, caption_steps: int) -> Path:
    """The VLM testbed of that many alignment and captioning steps (each its own build)."""
    return cache_root() / f"{VLM_MODEL_NAME}-a{align_steps}-c{caption_steps}"


def training_data_dir() -> Path:
    """The drafter trainer's cached generations and target features, and the drafters
    it builds by default."""
    return cache_root() / "dflash-train"


def content_key(obj) -> str:
    """A short stable key of a JSON-like value (cache directory names)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def drafter_dir(model: str | Path) -> Path:
    """The drafter ``spec-plugins-train-drafter`` builds for ``model`` without ``--out``,
    where the ``dflash`` method looks when its ``drafter`` option is empty: keyed by the
    model's directory name and config, so a rebuilt copy of the same checkpoint finds it."""
    p = Path(model).resolve()
    key = content_key(json.loads((p / "config.json").read_text()))[:12]
    return training_data_dir() / "drafters" / f"{p.name}-{key}"


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a new directory beside ``out`` to build into; when the block ends without an
    error it replaces ``out`` in one rename (nobody reads a half-written build, and an
    interrupted one leaves nothing behind)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
