"""Drafter models with their own weights (engine-agnostic torch): DFlash block drafters, diffusion LMs."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def drafter_dtype(choice: str, target_dtype: torch.dtype,
                  device: torch.device | None) -> torch.dtype:
    """A drafter option ``dtype`` as a torch dtype. ``auto``: the target's, except that a
    float32 target on a CPU with native bf16 matmul (AVX512-BF16, AMX) drafts in bfloat16:
    2-4x faster passes measured on SmolLM2's drafter; drafts may change, outputs cannot."""
    if choice != "auto":
        return getattr(torch, choice)
    if (target_dtype == torch.float32 and device is not None and torch.device(device).type == "cpu"
            and _cpu_has_native_bf16()):
        return torch.bfloat16
    return target_dtype
