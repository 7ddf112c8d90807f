"""The one place that says which SGLang builds the adapter supports."""

from __future__ import annotations

import logging

# A child of SGLang's own logger, so lines use the engine's format and level.
logger = logging.getLogger("sglang.spec_plugins")

# (major, minor, patch) releases whose internals the adapter was checked against: the
# worker contract, the verify input, and what the CPU platform replaces.
SUPPORTED = {(0, 5, 23)}


def sglang_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        import sglang

        return getattr(sglang, "__version__", "unknown")


def unsupported_reason() -> str | None:
    """None when this SGLang is supported, else a one-line reason."""
    ver = sglang_version()
    try:
        key = tuple(int(x) for x in ver.split("+")[0].split(".")[:3])
    except ValueError:
        return f"spec_plugins: SGLang version {ver!r} cannot be parsed; supported: {_supported()}"
    if key not in SUPPORTED:
        return (f"spec_plugins: SGLang {ver} is not supported (supported: {_supported()}); "
                "registering nothing")
    return None


def _supported() -> str:
    return ", ".join(".".join(map(str, v)) for v in sorted(SUPPORTED))
