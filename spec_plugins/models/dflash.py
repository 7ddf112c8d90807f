"""DFlash block-diffusion drafter in pure torch, in the checkpoint format of vLLM's ``dflash``.

A DFlash drafter drafts ``k`` tokens in ONE forward pass. Its inputs are

* the *context*: the target's hidden states at every committed token, taken after the
  target layers ``dflash_config.target_layer_ids`` (id ``i`` = the residual stream after
  target layer ``i``, 0-based; vLLM asks the target for auxiliary hidden state ``i + 1``)
  and concatenated in ascending layer order, ``[n, L * Ht]``;
* the *query block*: the last committed token ``x_p`` (the one the target sampled last,
  whose hidden state does not exist yet) at position ``p``, followed by ``k`` copies of the
  mask token at positions ``p + 1 .. p + k``.

Semantics (read from vLLM 0.32 ``models/qwen3_dflash.py``, ``v1/spec_decode/dflash.py`` and
the ``copy_and_expand_dflash_inputs`` kernel in ``v1/spec_decode/utils.py``):

* context: ``c = hidden_norm(fc(states))``; for every draft layer ``l`` the context keys
  are ``rope(k_norm(k_proj_l(c)), context positions)`` and the values ``v_proj_l(c)``.
  No ``input_layernorm`` on the context. The context K/V is the per-request state of the
  drafter: it grows by the accepted tokens every step.
* block: ``x = embed([x_p, mask, ..., mask])``; every draft layer is a pre-norm Qwen3
  layer (``input_layernorm``, q/k/v projections, per-head RMSNorm ``q_norm``/``k_norm``,
  RoPE at the block positions, attention, ``o_proj``, residual,
  ``post_attention_layernorm``, SiLU MLP, residual) whose queries attend NON-causally to
  the context K/V plus the block's own K/V (all ``k + 1`` slots see each other).
* output: ``norm`` -> LM head. Only the ``k`` mask slots are sampled (query offsets
  ``1..k``; the slot of ``x_p`` is not), and the mask slot at position ``p + j`` predicts
  the token AT position ``p + j`` (unmasking, not next-token prediction): draft ``j`` is
  the argmax of slot ``j``.
* the embedding of the mask slots is the input embedding row of
  ``dflash_config.mask_token_id`` unless the checkpoint ships ``mask_embedding.pt`` (a
  tensor ``[H]`` or ``{"mask_token_id": id, "embedding": tensor}``), which replaces it.
* without ``embed_tokens.weight`` / ``lm_head.weight`` in the checkpoint, the target's
  input embedding / LM head are used (vLLM shares them; here the caller passes them).
* a trimmed head (``draft_vocab_size`` rows) comes with ``d2t`` (int64
  ``[draft_vocab_size]``): draft id ``i`` is target id ``i + d2t[i]`` (EAGLE-3 convention);
  every target id outside the image gets logit ``-inf``.

Checkpoint (what :meth:`DFlashDrafter.save_pretrained` writes and vLLM reads):
``config.json`` (Qwen3 fields, ``architectures: ["DFlashDraftModel"]``,
``model_type: "qwen3"``, ``block_size`` = query slots used in training = 1 + drafts,
``dflash_config: {"mask_token_id", "target_layer_ids", "block_size"}``, ``draft_vocab_size``
/ ``target_hidden_size`` / ``num_target_layers`` where they apply), ``model.safetensors``
with keys ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.self_attn.{q,k}_norm.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.{input,post_attention}_layernorm.weight``,
``fc.weight`` ``[H, L * Ht]``, ``hidden_norm.weight``, ``norm.weight``, optional
``embed_tokens.weight``, ``lm_head.weight`` ``[draft_vocab_size, H]`` and ``d2t``; and
``mask_embedding.pt`` when the mask embedding is trained.

Everything here is plain torch (``scaled_dot_product_attention``) and works batched; tensor
shapes are in the comments: ``n`` context tokens, ``B`` requests, ``k`` drafts, ``T = k + 1``
query slots, ``L`` draft layers, ``nh``/``nkv`` query/KV heads, ``hd`` head size, ``H``
draft hidden size, ``Ht`` target hidden size, ``V`` target vocabulary, ``Vd`` draft vocabulary.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spec_plugins.models.vision import VisionAdaptor, VisionConfig, spans

ARCHITECTURE = "DFlashDraftModel"  # vLLM registry: DFlashDraftModel -> qwen3_dflash.DFlashQwen3ForCausalLM
MASK_EMBEDDING_FILE = "mask_embedding.pt"
WEIGHTS_FILE = "model.safetensors"

# Checkpoint-name aliases that vLLM's DFlash loader also accepts (same tensors).
_ALIASES = (("midlayer.", "layers.0."), ("encoder.output_norm_enc.", "hidden_norm."),
            ("encoder.fc.", "fc."))

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- config

@dataclass
class DFlashConfig:
    """The drafter's ``config.json``. Unknown keys (top level and inside ``dflash_config``)
    are kept in ``extra`` / ``dflash_extra`` so ``from_dict(d).to_dict()`` keeps them."""

    hidden_size: int
    num_hidden_layers: int  # draft layers
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # the TARGET's vocabulary (logits are over it)
    target_layer_ids: list[int]
    mask_token_id: int
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6  # vLLM's default for DFlash drafts without one
    rope_type: str = "default"
    rope_extra: dict = field(default_factory=dict)  # other rope_parameters keys
    max_position_embeddings: int = 32768
    draft_vocab_size: int | None = None  # rows of a trimmed LM head (None: vocab_size)
    target_hidden_size: int | None = None  # None: hidden_size
    num_target_layers: int | None = None
    block_size: int = 16  # query slots per block in training (1 + drafts)
    attention_bias: bool = False
    is_neox_style: bool = True
    causal: bool | None = None  # None: non-causal (standard DFlash)
    attention_value_scale: float | None = None
    logit_scale: float = 1.0
    tie_word_embeddings: bool = False
    dtype: str | None = None
    vision: VisionConfig | None = None  # dflash_config.vision (models/vision.py)
    extra: dict = field(default_factory=dict)
    dflash_extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if not self.target_layer_ids:
            raise ValueError("dflash_config.target_layer_ids must not be empty")

    # Derived sizes.
    @property
    def out_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def fc_in_features(self) -> int:
        return len(self.target_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @property
    def embedding_width(self) -> int:
        """Width of the target's input embeddings the drafter reads first in every state
        row (msd vision adaptor: layer -1), else 0."""
        reads = self.vision is not None and self.vision.reads_embeddings
        return (self.target_hidden_size or self.hidden_size) if reads else 0

    @property
    def state_width(self) -> int:
        """Width of the target states the drafter reads per token, in ascending layer
        order: the input embeddings (msd only), then ``target_layer_ids``' outputs."""
        return self.embedding_width + self.fc_in_features

    @property
    def aux_layer_ids(self) -> list[int]:
        """vLLM's auxiliary hidden-state ids for the target (``i + 1``: output of layer i)."""
        return [i + 1 for i in sorted(self.target_layer_ids)]

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashConfig":
        d = copy.deepcopy(dict(d))
        dflash = dict(d.pop("dflash_config", None) or {})
        kw: dict[str, Any] = {}
        names = {f.name for f in fields(cls)} - {"extra", "dflash_extra", "rope_type",
                                                  "rope_extra", "rope_theta", "causal",
                                                  "target_layer_ids", "mask_token_id",
                                                  "block_size", "dtype", "vision"}
        for name in names:
            if name in d:
                kw[name] = d.pop(name)
        # Rope: transformers 5 writes rope_parameters, older configs rope_theta/rope_scaling.
        rope = dict(d.pop("rope_parameters", None) or {})
        scaling = d.pop("rope_scaling", None) or {}
        theta = rope.pop("rope_theta", None)
        legacy_theta = d.pop("rope_theta", None)
        kw["rope_theta"] = float(theta if theta is not None else
                                 legacy_theta if legacy_theta is not None else 1e6)
        rtype = rope.pop("rope_type", None) or rope.pop("type", None) or \
            scaling.get("rope_type") or scaling.get("type") or "default"
        kw["rope_type"] = rtype
        kw["rope_extra"] = {**{k: v for k, v in scaling.items() if k not in ("rope_type", "type")},
                            **rope}
        for key in ("mask_token_id", "target_layer_ids"):
            if key in dflash:
                kw[key] = dflash.pop(key)
            elif key in d:
                kw[key] = d.pop(key)
            else:
                raise ValueError(f"DFlash config has no dflash_config.{key}")
        block = dflash.pop("block_size", None)
        top_block = d.pop("block_size", None)
        kw["block_size"] = int(block or top_block or 16)
        causal = d.pop("is_causal", None)
        dcausal = dflash.pop("causal", None)
        kw["causal"] = causal if causal is not None else dcausal
        if "attention_value_scale" in dflash:
            kw["attention_value_scale"] = dflash.pop("attention_value_scale")
        kw["vision"] = VisionConfig.from_dict(dflash.pop("vision", None))
        dt = d.pop("dtype", None) or d.pop("torch_dtype", None)
        kw["dtype"] = dt
        for k in ("architectures", "model_type"):
            d.pop(k, None)
        return cls(**kw, extra=d, dflash_extra=dflash)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                **self.rope_extra},
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "block_size": self.block_size,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for name in ("draft_vocab_size", "target_hidden_size", "num_target_layers"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if not self.is_neox_style:
            out["is_neox_style"] = False
        if self.causal is not None:
            out["is_causal"] = bool(self.causal)
        if self.logit_scale != 1.0:
            out["logit_scale"] = self.logit_scale
        if self.dtype is not None:
            out["dtype"] = self.dtype
        dflash = {"mask_token_id": self.mask_token_id,
                  "target_layer_ids": list(self.target_layer_ids),
                  "block_size": self.block_size, **self.dflash_extra}
        if self.attention_value_scale is not None:
            dflash["attention_value_scale"] = self.attention_value_scale
        if self.vision is not None:
            dflash["vision"] = self.vision.to_dict()
        out["dflash_config"] = dflash
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "DFlashConfig":
        with open(Path(path) / "config.json") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str | os.PathLike) -> None:
        with open(Path(path) / "config.json", "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def check_supported(self) -> None:
        """Raise NotImplementedError for checkpoint features this implementation lacks."""
        if self.hidden_act != "silu":
            raise NotImplementedError(f"DFlash drafter: hidden_act {self.hidden_act!r} (only silu)")
        if self.rope_type not in ("default", "linear"):
            raise NotImplementedError(f"DFlash drafter: rope_type {self.rope_type!r} "
                                      "(supported: default, linear)")
        if float(self.rope_extra.get("partial_rotary_factor", 1.0)) != 1.0:
            raise NotImplementedError("DFlash drafter: partial_rotary_factor != 1")
        layer_types = self.extra.get("layer_types") or []
        if any(t == "sliding_attention" for t in layer_types) or self.dflash_extra.get("use_swa"):
            raise NotImplementedError("DFlash drafter: sliding-window draft layers")
        if self.dflash_extra.get("attention_sink_bias") or self.extra.get("add_swa_attention_sink_bias"):
            raise NotImplementedError("DFlash drafter: attention sink bias")
        if self.dflash_extra.get("use_aux_hidden_state") is False:
            raise NotImplementedError("DFlash drafter: use_aux_hidden_state=false (no fc)")


# ----------------------------------------------------------------------------- pieces

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3/Llama RMSNorm (statistics in fp32, then ``* weight``) over the last dim."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # weight may be None
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return y if weight is None else y * weight


class Rope:
    """Rotary tables ``cos, sin [pos, hd / 2]`` (fp32, grown on demand) and their application
    to ``x [..., heads, hd]`` with ``cos/sin [..., 1, hd / 2]`` (neox: halves; else pairs)."""

    def __init__(self, head_dim: int, theta: float, neox: bool = True, linear_factor: float = 1.0):
        self.head_dim, self.neox, self.factor = head_dim, neox, float(linear_factor)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self._cos = self._sin = torch.empty(0, head_dim // 2)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        need = int(positions.max()) + 1 if positions.numel() else 1
        if need > self._cos.shape[0]:
            size = max(need, 2 * self._cos.shape[0], 256)
            t = torch.arange(size, dtype=torch.float) / self.factor
            freqs = torch.outer(t, self.inv_freq)
            self._cos, self._sin = freqs.cos(), freqs.sin()
        if self._cos.device != positions.device:
            self._cos, self._sin = self._cos.to(positions.device), self._sin.to(positions.device)
        return (self._cos[positions].unsqueeze(-2).to(dtype),
                self._sin[positions].unsqueeze(-2).to(dtype))

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.neox:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class _Attention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        hd, bias = cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)


class _MLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- context store

class DFlashContext:
    """One request's context K/V for every draft layer (the drafter's per-request state).

    Stored as ``k, v [L, nkv, capacity, hd]`` (sequence-strided, so one layer's
    ``[nkv, n + T, hd]`` is a view SDPA reads without a copy); the slots past ``length``
    are scratch that :meth:`DFlashDrafter.draft_block` fills with the query block's K/V,
    the way vLLM writes the block into not-yet-committed cache slots."""

    def __init__(self, drafter: "DFlashDrafter", capacity: int = 256):
        c = drafter.config
        self.drafter = drafter
        self.length = 0
        p = next(drafter.parameters())
        shape = (c.num_hidden_layers, c.num_key_value_heads, max(int(capacity), 1), c.head_dim)
        self.k = torch.empty(shape, dtype=p.dtype, device=p.device)
        self.v = torch.empty(shape, dtype=p.dtype, device=p.device)

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Memory held (allocated capacity, K and V)."""
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        k = self.k.new_empty(self.k.shape[:2] + (cap,) + self.k.shape[3:])
        v = torch.empty_like(k)
        k[:, :, :self.length] = self.k[:, :, :self.length]
        v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = k, v

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Append K/V ``[L, m, nkv, hd]`` (as :meth:`DFlashDrafter.context_kv` returns)."""
        m = k.shape[1]
        self.reserve(self.length + m)
        self.k[:, :, self.length:self.length + m] = k.transpose(1, 2)
        self.v[:, :, self.length:self.length + m] = v.transpose(1, 2)
        self.length += m
        return self.length

    def append(self, states: torch.Tensor, positions: torch.Tensor) -> int:
        """Project the target's hidden states ``[m, L * Ht]`` at ``positions [m]`` (text)
        and append them; returns the new length."""
        with torch.no_grad():
            k, v = self.drafter.context_kv(states, positions)
        return self.append_kv(k, v)

    def append_rows(self, h: torch.Tensor, positions: torch.Tensor) -> int:
        """Append context rows ``[m, H]`` (:meth:`DFlashDrafter.encode_context`)."""
        with torch.no_grad():
            k, v = self.drafter.rows_kv(h, positions)
        return self.append_kv(k, v)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` context tokens (e.g. after a rollback)."""
        self.length = max(0, min(int(n), self.length))

    def reset(self) -> None:
        self.length = 0

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``k, v [L, n, nkv, hd]`` of the stored context."""
        n = self.length
        return self.k[:, :, :n].transpose(1, 2), self.v[:, :, :n].transpose(1, 2)


# ----------------------------------------------------------------------------- drafter

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


class DFlashDrafter(nn.Module):
    """The drafter. Parameters are named exactly as the checkpoint keys.

    Shared pieces (the target's input embedding and LM head, when the checkpoint has none)
    are held outside the module's parameters: they are not saved and not trained."""

    def __init__(self, config: DFlashConfig, *, embed_tokens: EmbedFn | torch.Tensor | None = None,
                 lm_head_weight: torch.Tensor | None = None, own_embed: bool = False,
                 own_lm_head: bool | None = None, trained_mask: bool = False):
        super().__init__()
        config.check_supported()
        self.config = c = config
        if own_lm_head is None:
            own_lm_head = lm_head_weight is None
        if c.out_vocab_size != c.vocab_size and not own_lm_head:
            raise ValueError("a trimmed vocabulary (draft_vocab_size) needs the drafter's own lm_head")
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if own_embed else None
        self.lm_head = nn.Linear(c.hidden_size, c.out_vocab_size, bias=False) if own_lm_head else None
        if c.out_vocab_size != c.vocab_size:
            self.register_buffer("d2t", torch.zeros(c.out_vocab_size, dtype=torch.long))
        else:
            self.d2t = None
        self.mask_embedding = nn.Parameter(torch.zeros(c.hidden_size)) if trained_mask else None
        self.vision = (VisionAdaptor(c.vision, c.hidden_size, c.target_hidden_size or c.hidden_size,
                                     c.num_attention_heads, c.rms_norm_eps)
                       if c.vision is not None else None)
        # Not submodules / parameters: shared with the target.
        object.__setattr__(self, "_shared_embed", embed_tokens)
        object.__setattr__(self, "_shared_head", lm_head_weight)
        if self.embed_tokens is None and embed_tokens is None:
            raise ValueError("DFlash drafter has no embed_tokens: pass embed_tokens= (the target's "
                             "input embedding, a [vocab, hidden] weight or a callable ids -> [n, hidden])")
        if self.lm_head is None and lm_head_weight is None:
            raise ValueError("DFlash drafter has no lm_head: pass lm_head_weight= (the target's "
                             "LM head weight, [vocab, hidden])")
        factor = float(c.rope_extra.get("factor", 1.0)) if c.rope_type == "linear" else 1.0
        self.rope = Rope(c.head_dim, c.rope_theta, c.is_neox_style, factor)
        self._target_ids: torch.Tensor | None = None

    # -- shared pieces

    def set_shared(self, *, embed_tokens: EmbedFn | torch.Tensor | None = None,
                   lm_head_weight: torch.Tensor | None = None) -> None:
        if embed_tokens is not None:
            object.__setattr__(self, "_shared_embed", embed_tokens)
        if lm_head_weight is not None:
            object.__setattr__(self, "_shared_head", lm_head_weight)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``ids [...] -> [..., H]``."""
        if self.embed_tokens is not None:
            return self.embed_tokens(ids)
        e = self._shared_embed
        if isinstance(e, torch.Tensor):
            return F.embedding(ids, e)
        return e(ids)

    def mask_vector(self) -> torch.Tensor:
        """Embedding of a mask slot ``[H]``."""
        if self.mask_embedding is not None:
            return self.mask_embedding
        p = self.fc.weight
        return self.embed(torch.tensor([self.config.mask_token_id], device=p.device))[0].to(p.dtype)

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self._shared_head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., H]`` -> draft-vocabulary logits ``[..., Vd]``."""
        out = F.linear(h, self.head_weight())
        return out * self.config.logit_scale if self.config.logit_scale != 1.0 else out

    @property
    def target_ids(self) -> torch.Tensor | None:
        """Target id of every draft id ``[Vd]`` (None when the head is not trimmed)."""
        if self.d2t is None:
            return None
        if self._target_ids is None or self._target_ids.device != self.d2t.device:
            self._target_ids = torch.arange(self.d2t.shape[0], device=self.d2t.device) + self.d2t
        return self._target_ids

    def draft_to_target(self, ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids (identity without a trimmed head)."""
        return ids if self.d2t is None else ids + self.d2t[ids]

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``[..., Vd]`` -> target-vocabulary logits ``[..., V]``
        (``-inf`` outside the trimmed vocabulary), as vLLM's ``compute_logits``."""
        if self.d2t is None:
            return logits
        out = logits.new_full(logits.shape[:-1] + (self.config.vocab_size,), float("-inf"))
        out[..., self.target_ids] = logits
        return out

    # -- context

    def _kv_weight(self):
        ws = [t for l in self.layers for t in (l.self_attn.k_proj.weight, l.self_attn.v_proj.weight)]
        bs = None
        if self.config.attention_bias:
            bs = torch.cat([t for l in self.layers for t in (l.self_attn.k_proj.bias,
                                                              l.self_attn.v_proj.bias)])
        return torch.cat(ws), bs

    def context_features(self, states: torch.Tensor) -> torch.Tensor:
        """Target states ``[..., n, state_width]`` -> the context rows of text positions
        ``[..., n, H]`` (the projection of the target layers' states)."""
        E = self.config.embedding_width
        return self.hidden_norm(self.fc(states[..., E:].to(self.fc.weight.dtype)))

    def encode_context(self, states: torch.Tensor, positions: torch.Tensor,
                       image: torch.Tensor | None = None):
        """A segment of one sequence -> its context rows, image spans read by the vision
        adaptor (``models/vision.py``); without an adaptor or images, one row per token.

        states [n, state_width], positions [n], image [n] bool (image positions; a vispec
        span must be whole: the serving side holds back a span a chunk cut).
        Returns ``h [n', H]``, their positions ``[n']``, ``seen [n']`` (the last position
        a row depends on: a block at anchor ``p`` sees the rows with ``seen < p``) and
        the global features of the segment's spans with their ``seen``: ``[s, H]``, ``[s]``
        (None without a vispec adaptor)."""
        h = self.context_features(states)
        if self.vision is None or image is None or not bool(image.any()):
            return h, positions, positions, None
        hs, ps, seen, gs, gseen = [], [], [], [], []
        last = 0
        embeds = states[:, :self.config.embedding_width]
        for a, b in spans(image):
            hs.append(h[last:a]), ps.append(positions[last:a]), seen.append(positions[last:a])
            rows, g = self.vision.image_rows(h[a:b], embeds[a:b])
            hs.append(rows)
            ps.append(positions[a:a + len(rows)])
            seen.append(positions[a:a + len(rows)] if g is None
                        else positions[b - 1].expand(len(rows)))
            if g is not None:
                gs.append(g), gseen.append(positions[b - 1])
            last = b
        hs.append(h[last:]), ps.append(positions[last:]), seen.append(positions[last:])
        glob = (torch.stack(gs), torch.stack(gseen)) if gs else None
        return torch.cat(hs), torch.cat(ps), torch.cat(seen), glob

    def context_kv(self, states: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target hidden states ``[..., n, L * Ht]`` at ``positions [..., n]`` (text) ->
        the context keys and values of every draft layer, ``k, v [L, ..., n, nkv, hd]``."""
        return self.rows_kv(self.context_features(states), positions)

    def rows_kv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context rows ``h [..., n, H]`` at ``positions [..., n]`` -> their keys and
        values in every draft layer, ``k, v [L, ..., n, nkv, hd]``."""
        c = self.config
        L, nkv, hd = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        w, b = self._kv_weight()
        kv = F.linear(h, w, b).unflatten(-1, (L, 2, nkv, hd))  # [..., n, L, 2, nkv, hd]
        k, v = kv.select(-3, 0), kv.select(-3, 1)  # [..., n, L, nkv, hd]
        kn = torch.stack([l.self_attn.k_norm.weight for l in self.layers])  # [L, hd]
        k = rms_norm(k, None, c.rms_norm_eps) * kn.unsqueeze(-2)  # per-head, per-layer weight
        cos, sin = self.rope.tables(positions, k.dtype)  # [..., n, 1, hd/2]
        k = self.rope.apply(k, cos.unsqueeze(-2), sin.unsqueeze(-2))
        if c.attention_value_scale is not None:
            v = v * c.attention_value_scale
        return k.movedim(-3, 0), v.movedim(-3, 0)

    def new_context(self, capacity: int = 256) -> DFlashContext:
        return DFlashContext(self, capacity)

    # -- query block

    def _qkv(self, layer: _Layer, x: torch.Tensor, cos, sin):
        """Block hidden ``x [B, T, H]`` -> ``q [B, nh, T, hd]``, ``k, v [B, T, nkv, hd]``."""
        c = self.config
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_norm(a.q_proj(h).unflatten(-1, (c.num_attention_heads, c.head_dim)))
        k = a.k_norm(a.k_proj(h).unflatten(-1, (c.num_key_value_heads, c.head_dim)))
        v = a.v_proj(h).unflatten(-1, (c.num_key_value_heads, c.head_dim))
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        if c.attention_value_scale is not None:
            v = v * c.attention_value_scale
        return q.transpose(1, 2), k, v

    def _finish_layer(self, layer: _Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``attn [B, nh, T, hd]`` -> residual, MLP, residual: new ``x [B, T, H]``."""
        x = x + layer.self_attn.o_proj(attn.transpose(1, 2).flatten(-2))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _block_input(self, first_tokens: torch.Tensor, positions: torch.Tensor, k: int,
                     image_global: torch.Tensor | None = None):
        B, T = first_tokens.shape[0], k + 1
        dtype = self.fc.weight.dtype
        x = torch.empty(B, T, self.config.hidden_size, dtype=dtype, device=self.fc.weight.device)
        x[:, 0] = self.embed(first_tokens).to(dtype)
        x[:, 1:] = self.mask_vector().to(dtype)
        if image_global is not None and self.vision is not None and self.vision.config.style == "vispec":
            x = x + self.vision.draft_input(image_global.to(dtype)).unsqueeze(1)  # [B, 1, H]
        pos = positions.reshape(B, 1) + torch.arange(T, device=positions.device)  # [B, T]
        cos, sin = self.rope.tables(pos, dtype)  # [B, T, 1, hd/2]
        return x, cos, sin

    @torch.no_grad()
    def draft_block(self, contexts: Sequence[DFlashContext | tuple[torch.Tensor, torch.Tensor]],
                    first_tokens: torch.Tensor, positions: torch.Tensor, block_len: int,
                    *, target_vocab: bool = False,
                    image_global: torch.Tensor | None = None) -> torch.Tensor:
        """Draft ``block_len`` (= k) tokens for ``B`` requests in one pass.

        contexts: per request a :class:`DFlashContext` (no copies) or ``(k, v)``
          ``[L, n_b, nkv, hd]``; lengths may differ.
        first_tokens [B]: the last committed token of each request (not in its context).
        positions [B]: its position ``p`` (= the context length when the context is the
          whole sequence); the mask slots are at ``p + 1 .. p + k``.
        image_global [B, H]: each request's mean global image feature (zeros without
          images; vispec adaptor only).
        Returns logits ``[B, k, Vd]`` over the DRAFT vocabulary (cheapest: argmax / top-k on
        ``Vd`` and map ids with :meth:`draft_to_target`), or ``[B, k, V]`` over the target
        vocabulary with ``target_vocab=True`` (``-inf`` outside the trimmed vocabulary).
        Row ``j - 1`` is the distribution of the token at position ``p + j``."""
        c = self.config
        B, k = len(contexts), int(block_len)
        T = k + 1
        x, cos, sin = self._block_input(first_tokens, positions, k, image_global)
        causal = bool(c.causal)
        mask = None
        for li, layer in enumerate(self.layers):
            q, kb, vb = self._qkv(layer, x, cos, sin)  # q [B, nh, T, hd]; kb, vb [B, T, nkv, hd]
            outs = []
            for b, ctx in enumerate(contexts):
                if isinstance(ctx, DFlashContext):
                    n = ctx.length
                    ctx.reserve(n + T)
                    ctx.k[li, :, n:n + T] = kb[b].transpose(0, 1)
                    ctx.v[li, :, n:n + T] = vb[b].transpose(0, 1)
                    K, V = ctx.k[li, :, :n + T], ctx.v[li, :, :n + T]  # [nkv, n + T, hd]
                else:
                    n = ctx[0].shape[1]
                    K = torch.cat((ctx[0][li], kb[b])).transpose(0, 1)
                    V = torch.cat((ctx[1][li], vb[b])).transpose(0, 1)
                if causal:  # context all visible, causal inside the block
                    mask = torch.ones(T, n + T, dtype=torch.bool, device=x.device).tril(n)
                outs.append(F.scaled_dot_product_attention(
                    q[b:b + 1], K.unsqueeze(0), V.unsqueeze(0), attn_mask=mask,
                    enable_gqa=c.num_attention_heads != c.num_key_value_heads))
            x = self._finish_layer(layer, x, torch.cat(outs) if B > 1 else outs[0])
        logits = self.logits(self.norm(x[:, 1:]))  # [B, k, Vd]
        return self.to_target_logits(logits) if target_vocab else logits

    def forward_train(self, states: torch.Tensor, first_tokens: torch.Tensor,
                      anchors: torch.Tensor, block_len: int,
                      image: torch.Tensor | None = None) -> torch.Tensor:
        """Training pass over many blocks per sequence at once (differentiable).

        states [B, S, state_width]: target states at positions 0..S-1 of each sequence.
        anchors [B, A]: anchor positions p (block a sees context positions < p), with
          ``first_tokens [B, A]`` the tokens at those positions.
        image [B, S] bool: image positions (read by the vision adaptor, if any).
        Returns draft-vocabulary logits ``[B, A, k, Vd]`` (slot j predicts position p + j)."""
        c = self.config
        B, S = states.shape[:2]
        A, k = anchors.shape[1], int(block_len)
        T = k + 1
        dev = states.device
        ctx_pos = torch.arange(S, device=dev).expand(B, S)
        glob = None
        if self.vision is not None and image is not None and bool(image.any()):
            h, ctx_pos, seen, glob = self._train_rows(states, image, anchors)
            ck, cv = self.rows_kv(h, ctx_pos)  # [L, B, n, nkv, hd]
        else:
            seen = ctx_pos
            ck, cv = self.context_kv(states, ctx_pos)  # [L, B, S, nkv, hd]
        x, cos, sin = self._block_input(first_tokens.reshape(-1), anchors.reshape(-1), k, glob)
        x = x.view(B, A * T, -1)
        cos, sin = cos.view(B, A * T, 1, -1), sin.view(B, A * T, 1, -1)
        # Mask [B, 1, A*T, n + A*T]: block a sees context rows seen before anchor_a and
        # its own slots.
        qa = torch.arange(A, device=dev).repeat_interleave(T)  # block of each query slot
        ctx_ok = seen[:, None, :] < anchors.repeat_interleave(T, dim=1)[:, :, None]
        own = qa[:, None] == qa[None, :]
        if c.causal:
            slot = torch.arange(T, device=dev).repeat(A)
            own = own & (slot[None, :] <= slot[:, None])
        mask = torch.cat((ctx_ok, own.expand(B, -1, -1)), dim=2).unsqueeze(1)
        gqa = c.num_attention_heads != c.num_key_value_heads
        for li, layer in enumerate(self.layers):
            q, kb, vb = self._qkv(layer, x, cos, sin)
            K = torch.cat((ck[li], kb), dim=1).transpose(1, 2)  # [B, nkv, S + A*T, hd]
            V = torch.cat((cv[li], vb), dim=1).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=gqa)
            x = self._finish_layer(layer, x, attn)
        h = self.norm(x.view(B, A, T, -1)[:, :, 1:])
        return self.logits(h)  # [B, A, k, Vd]

    def _train_rows(self, states, image, anchors):
        """:meth:`encode_context` for a batch, padded: rows ``[B, n, H]``, positions and
        ``seen [B, n]`` (padding never seen), and each block's mean global image feature
        over the spans it sees ``[B * A, H]`` (None without a vispec adaptor)."""
        B, S = image.shape
        dev = states.device
        pos = torch.arange(S, device=dev)
        per = [self.encode_context(states[b], pos, image[b]) for b in range(B)]
        n = max(len(p[0]) for p in per)
        h = states.new_zeros(B, n, self.config.hidden_size, dtype=per[0][0].dtype)
        positions = torch.zeros(B, n, dtype=torch.long, device=dev)
        seen = torch.full((B, n), torch.iinfo(torch.long).max, dtype=torch.long, device=dev)
        for b, (hb, pb, sb, _) in enumerate(per):
            h[b, :len(hb)], positions[b, :len(hb)], seen[b, :len(hb)] = hb, pb, sb
        if self.vision.config.style != "vispec":
            return h, positions, seen, None
        glob = h.new_zeros(B, anchors.shape[1], self.config.hidden_size)
        for b, (*_, g) in enumerate(per):
            if g is not None:
                w = (g[1][None, :] < anchors[b][:, None]).to(h.dtype)   # [A, s]
                glob[b] = (w @ g[0]) / w.sum(1, keepdim=True).clamp(min=1)
        return h, positions, seen, glob.flatten(0, 1)

    # -- bookkeeping

    def parameter_count(self) -> int:
        """The drafter's own parameters (shared target embedding / head excluded)."""
        return sum(p.numel() for p in self.parameters())

    def memory_bytes(self) -> int:
        """Bytes of the drafter's own parameters and buffers."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))

    def describe(self) -> str:
        c = self.config
        return (f"DFlash drafter: {c.num_hidden_layers} layers x {c.hidden_size}, target layers "
                f"{c.target_layer_ids}, head {c.out_vocab_size}/{c.vocab_size} "
                f"({'own' if self.lm_head is not None else 'shared'}), embedding "
                f"{'own' if self.embed_tokens is not None else 'shared'}, mask "
                f"{'trained' if self.mask_embedding is not None else f'token {c.mask_token_id}'}, "
                f"{self._vision_text()}, "
                f"{self.parameter_count() / 1e6:.2f}M params, {self.memory_bytes() / 2**20:.1f} MiB")

    def with_vision(self, vision: VisionConfig | None) -> "DFlashDrafter":
        """A copy of this drafter with a freshly initialised vision adaptor (or none): the
        first step of the image training stage. Its global-feature projection starts at
        zero, so it drafts text as this drafter does."""
        cfg = copy.deepcopy(self.config)
        cfg.vision = vision
        new = type(self)(cfg, embed_tokens=self._shared_embed, lm_head_weight=self._shared_head,
                         own_embed=self.embed_tokens is not None,
                         own_lm_head=self.lm_head is not None,
                         trained_mask=self.mask_embedding is not None)
        p = next(self.parameters())
        new.to(device=p.device, dtype=p.dtype)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}
        missing, unexpected = new.load_state_dict(own, strict=False)
        assert not unexpected and all(k.startswith("vision.") for k in missing), (missing, unexpected)
        return new

    def _vision_text(self) -> str:
        v = self.config.vision
        if v is None:
            return "text-only"
        return ("vision adaptor vispec" + f" ({v.num_queries} queries per image)"
                if v.style == "vispec" else "vision adaptor msd (image rows from the input embeddings)")

    # -- checkpoints

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The tensors of ``model.safetensors`` (the mask embedding goes to its own file)."""
        sd = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items()
              if k != "mask_embedding"}  # clones: tied weights must not share memory in safetensors
        if self.d2t is not None:
            sd["d2t"] = self.d2t.to(torch.long).contiguous()
        return sd

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        cfg.dtype = _dtype_name(self.fc.weight.dtype)
        if self.lm_head is not None:
            cfg.tie_word_embeddings = False
        cfg.save(path)
        save_file(self.checkpoint_state(), str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.mask_embedding is not None:
            torch.save({"mask_token_id": self.config.mask_token_id,
                        "embedding": self.mask_embedding.detach().clone()}, path / MASK_EMBEDDING_FILE)
        elif (path / MASK_EMBEDDING_FILE).exists():
            (path / MASK_EMBEDDING_FILE).unlink()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
                        embed_tokens: EmbedFn | torch.Tensor | None = None,
                        lm_head_weight: torch.Tensor | None = None) -> "DFlashDrafter":
        """Load a DFlash checkpoint directory (ours or one published for vLLM ``dflash``).

        embed_tokens / lm_head_weight: the target's input embedding (a ``[V, Ht]`` weight or
        a callable ``ids [n] -> [n, H]``) and LM head weight ``[V, H]``, used when the
        checkpoint has none (a ``ValueError`` names the missing piece otherwise).
        dtype: default float32 (the checkpoint's own dtype is bf16 for published drafters,
        which is slow on CPUs without bf16 matmul)."""
        path = Path(path)
        cfg = DFlashConfig.from_pretrained(path)
        state = _load_state(path)
        own_embed = "embed_tokens.weight" in state
        own_head = "lm_head.weight" in state
        if not own_embed and embed_tokens is None:
            raise ValueError(f"DFlash checkpoint {path} has no embed_tokens.weight: pass "
                             "embed_tokens= (the target's input embedding: a [vocab, hidden] weight "
                             "or a callable ids -> [n, hidden])")
        if not own_head and lm_head_weight is None:
            raise ValueError(f"DFlash checkpoint {path} has no lm_head.weight: pass lm_head_weight= "
                             "(the target's LM head weight, [vocab, hidden])")
        if own_head and cfg.draft_vocab_size is None and state["lm_head.weight"].shape[0] != cfg.vocab_size:
            cfg.draft_vocab_size = state["lm_head.weight"].shape[0]
        if cfg.out_vocab_size != cfg.vocab_size and "d2t" not in state:
            raise ValueError(f"DFlash checkpoint {path}: a trimmed LM head ({cfg.out_vocab_size} of "
                             f"{cfg.vocab_size}) needs a d2t tensor")
        mask = _load_mask_embedding(path, cfg.mask_token_id)
        model = cls(cfg, embed_tokens=None if own_embed else embed_tokens,
                    lm_head_weight=None if own_head else lm_head_weight,
                    own_embed=own_embed, own_lm_head=own_head, trained_mask=mask is not None)
        if mask is not None:
            state["mask_embedding"] = mask
        state.pop("t2d", None)
        if cfg.out_vocab_size == cfg.vocab_size:
            state.pop("d2t", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"DFlash checkpoint {path}: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        dtype = dtype or torch.float32
        model.to(device=device, dtype=dtype)
        head = model._shared_head
        if head is not None and head.dtype != dtype:
            # A drafter in another dtype than the target (bf16 drafts for an fp32 target)
            # keeps its own converted copy of the head: converting per pass costs more.
            model.set_shared(lm_head_weight=head.to(device=device, dtype=dtype))
        if model.d2t is not None:
            model.d2t = model.d2t.to(torch.long)
        model.eval()
        return model


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = path / (WEIGHTS_FILE + ".index.json")
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / WEIGHTS_FILE).exists():
        files = [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    out = {}
    for name, t in state.items():
        name = name.removeprefix("model.")
        for old, new in _ALIASES:
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = t
    return out


def _load_mask_embedding(path: Path, mask_token_id: int) -> torch.Tensor | None:
    f = path / MASK_EMBEDDING_FILE
    if not f.exists():
        return None
    state = torch.load(f, weights_only=True, map_location="cpu")
    if isinstance(state, dict):
        if state.get("mask_token_id", mask_token_id) != mask_token_id:
            raise ValueError(f"{f}: mask_token_id {state.get('mask_token_id')} does not match "
                             f"dflash_config.mask_token_id {mask_token_id}")
        state = state["embedding"]
    return state.reshape(-1)
