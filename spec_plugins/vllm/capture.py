"""Target hidden states for a drafter, captured inside the target's compiled forward on
vLLM's CPU backend without vLLM's auxiliary hidden-state outputs.

vLLM's EAGLE-3 path returns the chosen layers' states as extra outputs of the compiled
forward. On the CPU backend that costs far more than the states themselves: measured
on SmolLM2-135M fp32 (2 cores, in-process, batch 1), 5 auxiliary layers made every
step's forward ~2.1 ms slower (11.4 vs 9.3 ms), though the same states in eager mode
cost nothing. Here a side-effecting custom op, called where the model would append an
auxiliary state (``EagleModelMixin._maybe_add_hidden_state``), hands the state to the
:class:`HiddenCapture` that owns the step's states; the compiled forward returns what it
returns without speculation (measured: ~0.9 ms for the same 5 layers).

CPU only: inside a CUDA graph the op would run once, at capture, and never on replay;
on a GPU the hooks keep vLLM's auxiliary outputs (``hooks._setup_aux``).
"""

from __future__ import annotations

from typing import Sequence

import torch

# The capture the op hands states to: set when a drafter installs its capture on the
# target (an engine process has one target). A compiled graph can pass an op only
# tensors and constants, and vLLM may run a graph an earlier process compiled (its
# compile cache), so the op cannot name its capture by a per-process value.
_active: "HiddenCapture | None" = None
_LIB: torch.library.Library | None = None


def _register_op() -> None:
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("spec_plugins", "FRAGMENT")
    lib.define("capture_hidden(Tensor x, Tensor? residual, int layer) -> ()")

    def capture_hidden(x, residual, layer: int) -> None:
        # The residual stream after the layer; copied now, before the next layer's fused
        # add-and-norm overwrites its inputs in place.
        _active.states[layer] = x + residual if residual is not None else x.clone()

    lib.impl("capture_hidden", capture_hidden, "CPU")
    lib._register_fake("capture_hidden", lambda x, residual, layer: None)
    # No outputs: without this the graph would drop the call as dead code.
    torch.fx.node.has_side_effect(torch.ops.spec_plugins.capture_hidden.default)
    _LIB = lib


class HiddenCapture:
    """The target's states after ``layer_ids`` (vLLM's auxiliary ids: ``i + 1`` is the
    output of layer ``i``) for every token of the last forward pass."""

    def __init__(self, layer_ids: Sequence[int]):
        self.layer_ids = tuple(layer_ids)
        self.states: dict[int, torch.Tensor] = {}      # layer id -> [num_tokens, hidden]

    @staticmethod
    def supported(model) -> bool:
        """On vLLM's CPU backend (no CUDA graphs to freeze the op), for a model whose
        forward appends auxiliary states (``EagleModelMixin``)."""
        from vllm.platforms import current_platform

        return current_platform.is_cpu() and _eagle_module(model) is not None

    @staticmethod
    def module(model):
        """The part of ``model`` whose forward calls ``_maybe_add_hidden_state``."""
        return _eagle_module(model)

    def hook(self):
        """The function the model's forward calls in place of the mixin's
        ``_maybe_add_hidden_state`` (``hooks.install_capture`` puts it there): it hands
        the states at ``layer_ids`` to this capture."""
        global _active
        _register_op()
        _active = self
        ids, op = frozenset(self.layer_ids), torch.ops.spec_plugins.capture_hidden

        def _maybe_add_hidden_state(aux, layer_idx, hidden_states, residual):
            if layer_idx in ids:
                op(hidden_states, residual, layer_idx)
            return aux

        return _maybe_add_hidden_state

    def outputs(self) -> list[torch.Tensor]:
        """The last forward's states, one ``[num_tokens, hidden]`` tensor per layer id in
        ``layer_ids`` order (vLLM's auxiliary outputs' layout)."""
        missing = [i for i in self.layer_ids if i not in self.states]
        if missing:
            raise RuntimeError(
                f"spec_plugins: the target's forward captured no hidden states for layer ids "
                f"{missing}: vLLM ran a graph compiled for other layers (its compile cache, "
                f"~/.cache/vllm/torch_compile_cache, predates this drafter); remove it")
        return [self.states[i] for i in self.layer_ids]


def _eagle_module(model):
    from vllm.model_executor.models.interfaces import EagleModelMixin

    for m in model.modules():
        if isinstance(m, EagleModelMixin):
            return m
    return None
