"""The target's sampling distribution from its logits, for the stochastic verifier.

Engines whose own speculative sampler cannot serve a method (SGLang on a CPU verifies
greedily even for sampled requests) hand the core verifier the distribution a request
samples from: temperature, then top-k, top-p and min-p truncation, renormalised. Torch,
device-agnostic: it runs where the logits are.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """``logits [m, V]`` -> probabilities ``[m, V]`` (float32). ``top_k <= 0`` or
    ``>= V``: no top-k; ``top_p >= 1``: no top-p; ``min_p <= 0``: no min-p."""
    probs = torch.softmax(logits.float() / max(float(temperature), 1e-6), dim=-1)
    V = probs.shape[-1]
    if 0 < top_k < V:
        kth = probs.topk(int(top_k), dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p       # mass of the better tokens
        sorted_p = torch.where(before < top_p * sorted_p.sum(-1, keepdim=True), sorted_p,
                               torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if min_p > 0.0:
        top = probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs >= min_p * top, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True)
