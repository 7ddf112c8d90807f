"""An out-of-tree SGLang platform that serves on a plain CPU (no GPU, no CPU sgl_kernel).

Stock SGLang's CPU engine needs the AMX/AVX-512 build of ``sgl_kernel`` that PyPI does
not ship; without a GPU it cannot start at all. This platform (entry-point group
``sglang.srt.platforms``) runs SGLang's own layers through their torch-native paths,
with the plugin attention backend (``spec_plugins_cpu``, which adds speculative tree
verification) and torch stand-ins for the Triton helpers speculation calls.

It activates only where no GPU-like device exists and only on a supported SGLang;
anywhere else it registers nothing and SGLang picks its own platform. Nothing here may
raise into SGLang: a failure is logged and the platform stays inactive.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from spec_plugins.sglang import ATTENTION_BACKEND
from spec_plugins.sglang.version import logger, unsupported_reason

# What `activate` hands SGLang: resolved with pkgutil.resolve_name.
PLATFORM_CLASS = "spec_plugins.sglang.platform:CpuPlatform"
# Set to 0 to keep SGLang's own platform choice on a CPU-only machine.
ENABLE_ENV = "SPEC_PLUGINS_SGLANG_CPU_PLATFORM"
# Host memory the default KV cache may take (the user's --max-total-tokens wins).
KV_CACHE_BUDGET_BYTES = 256 << 20
# The KV size used when the model's config cannot be read.
FALLBACK_MAX_TOTAL_TOKENS = 4096


def activate() -> str | None:
    """Entry point of group ``sglang.srt.platforms``: the platform class's path when
    this machine and SGLang suit it, else None (SGLang then chooses as if it were not
    installed)."""
    try:
        reason = _inactive_reason()
        if reason is not None:
            logger.debug("spec_plugins CPU platform inactive: %s", reason)
            return None
        reason = unsupported_reason()
        if reason is not None:
            logger.warning(reason)
            return None
        _platform_class()  # built here, where a failure can still be caught
        _add_attention_backend_choice()
        _set_env_defaults()
        return PLATFORM_CLASS
    except Exception:  # never break SGLang's platform discovery
        logger.exception("spec_plugins: CPU platform activation failed; not used")
        return None


def _inactive_reason() -> str | None:
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return f"{ENABLE_ENV}=0"
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        # The user asked for SGLang's own CPU engine (an AMX build of sgl_kernel).
        return "SGLANG_USE_CPU_ENGINE=1 selects SGLang's in-tree CPU platform"
    import torch

    if torch.cuda.is_available():
        return "a CUDA/ROCm device is available"
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return "an XPU device is available"
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return "an NPU device is available"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "an MPS device is available"
    return None


def _add_attention_backend_choice() -> None:
    # `--attention-backend` has fixed argparse choices; the plugin backend joins them
    # here so that naming it on the command line parses (the factory itself is
    # registered in the engine process, where the attention registry is loaded).
    from sglang.srt.arg_groups.choices import (ATTENTION_BACKEND_CHOICES,
                                               add_attention_backend_choices)

    if ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND])


def _set_env_defaults() -> None:
    """OpenMP settings for the scheduler processes SGLang spawns later (they inherit
    this environment; a value the user set wins)."""
    # Workers that spin after each parallel region fight over the cores with everything
    # else on a small CPU: a 12-token verify forward ran 10-30x slower on a loaded
    # 2-core machine than with sleeping workers.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # SGLang applies SGLANG_CPU_OMP_THREADS_BIND only through its AMX kernels; for one
    # rank, OpenMP's own variables give the same binding.
    bind = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", "all")
    if bind != "all" and "|" not in bind:
        cpus = _cpu_list(bind)
        os.environ.setdefault("OMP_NUM_THREADS", str(len(cpus)))
        os.environ.setdefault("GOMP_CPU_AFFINITY", " ".join(map(str, cpus)))


def _cpu_list(spec: str) -> list[int]:
    """CPU ids of a list such as ``0-3,8``."""
    cpus = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def __getattr__(name: str):
    # The class subclasses SGLang internals, so it is built on first use: importing
    # this module (the entry point) must not fail on an SGLang it does not support.
    if name == "CpuPlatform":
        return _platform_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _logged(default=None):
    """A platform hook that logs its failure and returns ``default`` instead of raising
    into SGLang (vanilla serving does not need every hook to succeed)."""
    def wrap(hook):
        @functools.wraps(hook)
        def run(*args, **kwargs):
            try:
                return hook(*args, **kwargs)
            except Exception:
                logger.exception("spec_plugins: CPU platform hook %s failed", hook.__name__)
                return default
        return run
    return wrap


@functools.cache
def _platform_class() -> type:
    from sglang.srt.platforms.cpu import CpuDeviceMixin
    from sglang.srt.platforms.device_mixin import PlatformEnum
    from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

    class CpuPlatform(CpuDeviceMixin, SRTPlatform):
        """SGLang on a CPU without sgl_kernel: torch-native layers, no Triton, no
        graph capture, the plugin attention backend."""

        _enum = PlatformEnum.OOT
        device_name = "cpu"
        device_type = "cpu"
        # Everything off: no Triton launches, no device graphs, no HiCache kernels.
        capabilities = PlatformCapabilities()

        def get_device(self, device_id: int = 0):
            # SGLang's get_device() asks an out-of-tree platform for the device string.
            return "cpu"

        def get_default_attention_backend(self) -> str:
            return ATTENTION_BACKEND

        @_logged()
        def apply_server_args_defaults(self, server_args) -> None:
            apply_cpu_defaults(server_args)

        @_logged()
        def init_backend(self) -> None:
            # Runs while SGLang's model runner module is being imported: only what
            # needs no further SGLang imports (the rest is installed after load).
            from spec_plugins.sglang import cpu_ops

            cpu_ops.install_import_shims()

        @_logged()
        def post_load_model(self, model) -> None:
            from spec_plugins.sglang import cpu_attention, cpu_ops

            cpu_attention.register()
            cpu_ops.install()

        @_logged()
        def get_kv_pool_cls(self, *, kind):
            if kind != "mha":
                return None
            from spec_plugins.sglang import cpu_ops

            return cpu_ops.mha_kv_pool_cls()

        @_logged()
        def get_speculative_cache_locs_fn(self):
            from spec_plugins.sglang import cpu_ops

            return cpu_ops.assign_extend_cache_locs

        @_logged(default=True)
        def supports_speculative_algorithm(self, algorithm: str) -> bool:
            # Verification works for any algorithm (the attention backend and cpu_ops);
            # the built-in draft-model algorithms (EAGLE, DFLASH, ...) also draft
            # through Triton kernels and draft graph runners this platform lacks.
            from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

            name = str(algorithm).upper()
            return name == "NGRAM" or name not in SpeculativeAlgorithm.__members__

        @_logged()
        def get_speculative_worker_cls(self, algorithm: str):
            # Consulted before SGLang imports its built-in worker: the NGRAM worker's
            # module imports a CUDA-only kernel module, shimmed here first.
            from spec_plugins.sglang import cpu_ops

            cpu_ops.install_import_shims()
            return None

    CpuPlatform.__qualname__ = "CpuPlatform"
    return CpuPlatform


def apply_cpu_defaults(server_args) -> None:
    """CPU serving defaults, each only where the user left the field at SGLang's default.

    ``server_args`` is SGLang's recording stand-in during resolution: reads see what
    resolution decided so far, writes are declared as this platform's defaults.
    """
    user_set = _user_set_fields(server_args)
    if "dtype" not in user_set:
        # Without AMX/AVX512-BF16, torch's bf16/fp16 matmuls are far slower (~50x
        # measured on an AVX2 machine) than fp32.
        server_args.dtype = "float32"
    if "sleep_on_idle" not in user_set:
        # An idle scheduler otherwise busy-polls a whole core.
        server_args.sleep_on_idle = True
    if "attention_backend" not in user_set:
        # SGLang's CPU rule picked intel_amx, which needs the AMX sgl_kernel build.
        server_args.attention_backend = ATTENTION_BACKEND
    if "max_total_tokens" not in user_set:
        # SGLang sizes the KV cache from free host memory (GBs); a CPU serves a few
        # requests at a time.
        server_args.max_total_tokens = _default_max_total_tokens(server_args)
    if server_args.speculative_algorithm and "disable_overlap_schedule" not in user_set:
        # SGLang runs NGRAM on CPU without the overlap scheduler; plugin algorithms get
        # the same, so that one registered without overlap support needs no extra flag.
        server_args.disable_overlap_schedule = True
    _disable_graphs(server_args)


def _user_set_fields(server_args) -> set[str]:
    """Fields whose raw input differs from ServerArgs' default."""
    import dataclasses

    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.server_args import ServerArgs

    raw = getattr(server_args, "_raw_input", None)
    out = set()
    for field in record_fields(ServerArgs):
        if field.default is dataclasses.MISSING:
            continue
        value = raw[field.name] if raw is not None and field.name in raw else getattr(
            server_args, field.name, field.default)
        if value != field.default:
            out.add(field.name)
    return out


def _disable_graphs(server_args) -> None:
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    config = server_args.cuda_graph_config
    if config is None:
        return
    locked = getattr(server_args, "_cuda_graph_config_locked", None) or set()
    for phase in Phase.ALL:
        if (phase, "backend") not in locked:
            config = with_phase(config, phase, backend=Backend.DISABLED)
    server_args.cuda_graph_config = config


def _default_max_total_tokens(server_args) -> int:
    per_token = _kv_bytes_per_token(server_args)
    if not per_token:
        return FALLBACK_MAX_TOTAL_TOKENS
    return max(1024, KV_CACHE_BUDGET_BYTES // per_token)


def _kv_bytes_per_token(server_args) -> int | None:
    """K and V bytes per token summed over layers, from the model's config.json."""
    path = Path(str(server_args.model_path)) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return None
    dtype = str(server_args.kv_cache_dtype if server_args.kv_cache_dtype != "auto"
                else server_args.dtype)
    elem = 2 if any(s in dtype for s in ("16", "half")) else 1 if "8" in dtype else 4
    return layers * 2 * kv_heads * head_dim * elem
