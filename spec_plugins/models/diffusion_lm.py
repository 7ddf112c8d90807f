"""A pretrained diffusion language model as a block drafter (the model side of DiffuSpec).

A diffusion LM that shares the target's tokenizer proposes the next ``block_len`` tokens
all at once: it is shown the committed context and a canvas of ``block_len`` noised
positions, and returns a distribution for every canvas position. Those per-position
distributions are the draft *lattice* (``DiffusionLMDrafter.lattice``: logits
``[B, block_len, vocab]``); a method searches it for the drafts the target verifies.
This module is engine-agnostic (torch + transformers, no vLLM import).

Two kinds of model are supported.

**DiffusionGemma** (transformers' ``diffusion_gemma``, ``DiffusionGemmaForBlockDiffusion``),
the first-class path. It is a block-diffusion encoder-decoder that shares its weights: a
causal *encoder* runs over the context and writes a KV cache; a *decoder* refines a canvas
with bidirectional self-attention over the canvas plus attention to that (read-only) cache.
How ``generate`` drives it, and what is reproduced here:

- canvas: ``config.canvas_length`` tokens (the trained block size; ``max_block`` here),
  initialised with tokens drawn **uniformly from the vocabulary**. DiffusionGemma is a
  uniform-noise diffusion model: there is no [MASK] token and no masked canvas; positions
  that are not yet accepted are re-noised with fresh uniform tokens.
- positions: the encoder runs the context at positions ``0..n-1``; the canvas sits at
  ``n..n+L-1``, straight after the last committed token, so canvas slot ``i`` is the
  token at absolute index ``n + i`` (no gap, no separator).
- prompt boundary: the boundary is just the cache: the decoder attends to every cached
  context key (all of them in full-attention layers; in sliding-window layers the
  ``DynamicCache`` keeps the last ``sliding_window - 1`` context keys) and to the whole
  canvas, with no mask inside the canvas. After a block is accepted, ``generate`` feeds
  it to the encoder (appending to the cache) and starts the next canvas after it;
  ``lattice`` does the same with whatever tokens were committed since the last call.
- self-conditioning: the decoder input embedding is
  ``self_conditioning(embed(canvas), softmax(prev_logits) @ E * sqrt(d))``; the first
  denoising step passes no logits (a zero signal), each later step passes the previous
  step's logits (``generate`` passes them temperature-scaled; here they are passed raw).
- logits: ``lm_head`` (tied to the embeddings) with ``final_logit_softcapping``, float32.
  ``generate`` then samples with a temperature schedule and accepts tokens under an
  entropy bound; none of that is reproduced: the lattice is the raw logits.
- the encoder is causal for text (``use_bidirectional_attention`` ``None``/``"vision"``),
  so encoding the context in pieces equals encoding it at once. A config with ``"all"``
  makes it bidirectional within each encoder call; then the cache depends on how the
  context was split (as it does in ``generate``, which encodes one block at a time).

One ``lattice`` call encodes the newly committed tokens of each request into its own
cache (batch 1 per request), then runs the decoder once over the batch: the per-request
caches are left-padded to a common length per layer and stacked, with a 4-D mask per
layer type hiding the padding, and per-row canvas position ids. ``steps > 1`` runs the
decoder again, fixing the most confident positions first (see ``lattice``).

**Generic masked diffusion LMs** (LLaDA / Dream style), where feasible: a bidirectional
model called as ``model(input_ids=context + [MASK] * L).logits``, loaded with
``AutoModel...`` (``trust_remote_code`` for checkpoints that ship their own code), with
``mask_token_id`` from the argument, the config, the tokenizer, or (LLaDA) its documented
id. Every token attends to the masks, so no context KV cache is exact: each call re-runs
the whole context (requests are batched only with others of the same length, so no
padding reaches the remote code).
Dream-style models, whose logits at ``i`` predict token ``i + 1``, are read one position
to the left (``shift_logits``, on by default for ``model_type == "Dream"``).
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Sequence

import torch

__all__ = ["DiffusionLMDrafter"]

_DIFFUSION_GEMMA = "diffusion_gemma"
_GENERIC_BLOCK = 256  # max_block of generic models whose config names no block size
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, context length) over generator seeds
# [MASK] ids of masked diffusion LMs whose config and tokenizer may not name them
_KNOWN_MASK_IDS = {"llada": 126336}  # LLaDA's reserved mask token (its GUIDELINES.md)


@dataclasses.dataclass
class _State:
    tokens: list[int]  # the committed tokens the state holds (encoded, for DiffusionGemma)
    cache: object = None  # DiffusionGemma: the encoder's DynamicCache, batch 1


def _has_tokenizer(path) -> bool:
    """Whether ``path`` may hold a tokenizer. A local directory without tokenizer files
    has none: ``AutoTokenizer`` would build an empty default one (with a made-up
    ``<mask>`` id) rather than fail."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return True  # a hub name: let AutoTokenizer decide
    names = (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json"
    )
    return any(os.path.exists(os.path.join(path, n)) for n in names)


class _DiffusionGemmaBackend:
    """Encoder KV cache per request; one batched decoder pass per denoising step."""

    noise = "uniform"
    self_conditioning = True

    def __init__(self, model):
        self.model = model
        text = model.config.get_text_config()
        self.layer_types = list(text.layer_types)
        self.first_layer = {t: self.layer_types.index(t) for t in set(self.layer_types)}
        impl = model.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(
                f"DiffusionLMDrafter batches requests with padded 4-D masks, which needs "
                f"attn_implementation 'sdpa' or 'eager' (got {impl!r})"
            )
        self.additive_mask = impl == "eager"

    def new_state(self) -> _State:
        from transformers import DynamicCache

        return _State(tokens=[], cache=DynamicCache(config=self.model.config))

    def extend(self, state: _State, new: list[int], device, stats):
        n = len(state.tokens)
        ids = torch.tensor([new], dtype=torch.long, device=device)
        pos = torch.arange(n, n + len(new), device=device).unsqueeze(0)
        self.model.model.encoder(
            input_ids=ids, past_key_values=state.cache, position_ids=pos, use_cache=True
        )
        state.tokens.extend(new)
        stats["encoded_tokens"] += len(new)

    def prepare(self, states: list[_State], canvas_len: int, device):
        """The decoder's cache, masks and positions for this batch (reused by every step)."""
        lengths = torch.tensor([len(s.tokens) for s in states], device=device)
        positions = lengths[:, None] + torch.arange(canvas_len, device=device)
        if len(states) == 1:  # the request's own cache, unpadded: exactly what `generate` runs
            return states[0].cache, None, positions
        from transformers.cache_utils import Cache, DynamicLayer

        layers, cached = [], []
        for li in range(len(self.layer_types)):
            ks = [s.cache.layers[li].keys for s in states]
            vs = [s.cache.layers[li].values for s in states]
            t = max(k.shape[-2] for k in ks)
            k_all = ks[0].new_zeros((len(states), ks[0].shape[1], t, ks[0].shape[3]))
            v_all = vs[0].new_zeros((len(states), vs[0].shape[1], t, vs[0].shape[3]))
            # left padding: each context ends where the canvas starts
            for b, (k, v) in enumerate(zip(ks, vs)):
                k_all[b, :, t - k.shape[-2] :] = k[0]
                v_all[b, :, t - v.shape[-2] :] = v[0]
            layer = DynamicLayer()
            layer.lazy_initialization(k_all, v_all)
            layer.keys, layer.values = k_all, v_all
            layers.append(layer)
            cached.append([k.shape[-2] for k in ks])
        masks = {}
        for layer_type, li in self.first_layer.items():
            n_cached = torch.tensor(cached[li], device=device)
            t = layers[li].keys.shape[-2]
            keep = torch.cat(
                [
                    torch.arange(t, device=device)[None, :] >= (t - n_cached)[:, None],
                    torch.ones(len(states), canvas_len, dtype=torch.bool, device=device),
                ],
                dim=1,
            )
            mask = keep[:, None, None, :].expand(-1, 1, canvas_len, -1)
            if self.additive_mask:
                dtype = self.model.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
                    ~mask, torch.finfo(dtype).min
                )
            masks[layer_type] = mask
        return Cache(layers=layers), masks, positions

    def denoise(self, prepared, canvas, sc_logits):
        cache, masks, positions = prepared
        if sc_logits is not None:
            sc_logits = sc_logits.to(self.model.dtype)
        out = self.model(
            decoder_input_ids=canvas,
            past_key_values=cache,
            decoder_attention_mask=masks,
            decoder_position_ids=positions,
            self_conditioning_logits=sc_logits,
        )
        return out.logits.float()


class _MaskedLMBackend:
    """Bidirectional model on context + canvas; no cache (every token sees the canvas)."""

    noise = "mask"
    self_conditioning = False

    def __init__(self, model, shift_logits: bool):
        self.model = model
        self.shift = int(shift_logits)

    def new_state(self) -> _State:
        return _State(tokens=[])

    def extend(self, state: _State, new: list[int], device, stats):
        state.tokens.extend(new)

    def prepare(self, states: list[_State], canvas_len: int, device):
        groups = defaultdict(list)  # same-length contexts batch without padding
        for b, s in enumerate(states):
            groups[len(s.tokens)].append(b)
        contexts = [torch.tensor(s.tokens, dtype=torch.long, device=device) for s in states]
        return contexts, list(groups.items())

    def denoise(self, prepared, canvas, sc_logits):
        contexts, groups = prepared
        out = None
        canvas_len = canvas.shape[1]
        for n, rows in groups:
            idx = torch.tensor(rows, device=canvas.device)
            ids = torch.cat([torch.stack([contexts[b] for b in rows]), canvas[idx]], dim=1)
            res = self.model(input_ids=ids)
            logits = res.logits if hasattr(res, "logits") else res[0]
            logits = logits[:, n - self.shift : n - self.shift + canvas_len].float()
            if out is None:
                out = logits.new_empty((canvas.shape[0], canvas_len, logits.shape[-1]))
            out[idx] = logits
        return out


class DiffusionLMDrafter:
    """Wraps a transformers diffusion LM as a block drafter.

    Supported: DiffusionGemma (``model_type == "diffusion_gemma"``, block diffusion with an
    encoder KV cache per request, uniform-noise canvas, self-conditioning) as the
    first-class path; LLaDA / Dream-style masked diffusion LMs (a bidirectional model on
    ``context + [MASK] * L`` returning logits) through a generic path without caching.
    See the module docstring for how each is driven.

    Attributes: ``mask_token_id`` (the [MASK] id of masked models; DiffusionGemma has none
    and noises with uniform tokens, so it is the tokenizer's mask token if one is found,
    else ``None``), ``vocab_size`` (the width of the lattice), ``max_block`` (the longest
    canvas: DiffusionGemma's ``canvas_length``), ``stats`` (encoded tokens, re-encodes,
    decoder passes; counters for tests and logs).
    """

    def __init__(
        self,
        model,
        *,
        mask_token_id: int | None = None,
        max_block: int | None = None,
        shift_logits: bool | None = None,
        full_canvas: bool = False,
        seed: int = 0,
    ):
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.kind = config.model_type
        text = config.get_text_config()
        self.vocab_size: int = int(text.vocab_size)
        if self.kind == _DIFFUSION_GEMMA:
            self._backend = _DiffusionGemmaBackend(model)
            self.max_block: int = int(max_block or config.canvas_length)
        else:
            if mask_token_id is None:
                mask_token_id = getattr(config, "mask_token_id", None)
            if mask_token_id is None:
                mask_token_id = _KNOWN_MASK_IDS.get(self.kind.lower())
            if mask_token_id is None:
                raise ValueError(
                    f"{self.kind!r} is not DiffusionGemma, so it is driven as a masked diffusion "
                    "LM, which needs mask_token_id (not found in the config or tokenizer; pass it)"
                )
            if shift_logits is None:
                shift_logits = self.kind.lower() == "dream"
            self._backend = _MaskedLMBackend(model, shift_logits)
            names = ("canvas_length", "block_length", "block_size")
            block = next((getattr(config, k) for k in names if getattr(config, k, None)), None)
            block = block or _GENERIC_BLOCK
            self.max_block = int(max_block or block)
        self.mask_token_id: int | None = None if mask_token_id is None else int(mask_token_id)
        self.full_canvas = full_canvas
        self.seed = int(seed)
        self.stats = {"encoded_tokens": 0, "reencodes": 0, "decoder_passes": 0}
        self._states: dict[str, _State] = {}

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        device=None,
        dtype=None,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        mask_token_id: int | None = None,
        **kwargs,
    ) -> DiffusionLMDrafter:
        """Load a checkpoint directory (or hub name). ``device`` defaults to CUDA when
        available, ``dtype`` to the checkpoint's. DiffusionGemma loads as
        ``DiffusionGemmaForBlockDiffusion``; anything else as a masked diffusion LM through
        the auto class its ``auto_map`` names (remote code) or ``AutoModelForMaskedLM``.
        Other keywords go to the constructor (``max_block``, ``shift_logits``,
        ``full_canvas``, ``seed``)."""
        import transformers

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        load = {
            "dtype": dtype if dtype is not None else "auto",
            "attn_implementation": attn_implementation,
        }
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if config.model_type == _DIFFUSION_GEMMA:
            model = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(path, **load)
        else:
            auto_map = getattr(config, "auto_map", None) or {}
            names = ("AutoModelForMaskedLM", "AutoModel", "AutoModelForCausalLM")
            names = [n for n in names if n in auto_map]
            auto = getattr(transformers, names[0] if names else "AutoModelForMaskedLM")
            model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, **load)
        wants_tokenizer = mask_token_id is None and getattr(config, "mask_token_id", None) is None
        if wants_tokenizer and _has_tokenizer(path):
            try:
                tok = transformers.AutoTokenizer.from_pretrained(
                    path, trust_remote_code=trust_remote_code
                )
                mask_token_id = tok.mask_token_id
            except Exception:  # an unloadable tokenizer: the id must come from elsewhere
                mask_token_id = None
        return cls(model.to(device), mask_token_id=mask_token_id, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- per-request state ---------------------------------------------------------------

    def finish(self, req_id) -> None:
        """Drop the request's state (its encoder cache)."""
        self._states.pop(req_id, None)

    def reset(self, req_id) -> None:
        """Forget what was encoded for the request; the next call re-encodes its context.
        (Not needed for correctness: a call whose tokens do not extend the cached ones is
        detected and re-encoded anyway.)"""
        self._states.pop(req_id, None)

    def cached_len(self, req_id) -> int:
        """How many committed tokens of the request the drafter holds (0 if none)."""
        state = self._states.get(req_id)
        return len(state.tokens) if state is not None else 0

    def _sync(self, req_id, tokens: list[int]) -> _State:
        device = self.device
        state = self._states.get(req_id)
        if state is not None:
            n = len(state.tokens)
            if len(tokens) < n or tokens[:n] != state.tokens:  # truncated or rewritten: start over
                self.stats["reencodes"] += 1
                state = None
        if state is None:
            state = self._backend.new_state()
            self._states[req_id] = state
        if len(tokens) > len(state.tokens):
            self._backend.extend(state, tokens[len(state.tokens) :], device, self.stats)
        return state

    # ---- drafting ------------------------------------------------------------------------

    def _noise(self, lengths: list[int], shape: tuple[int, int], device) -> torch.Tensor:
        """Canvas fill ``[B, shape]``: the mask token, or uniform tokens from a generator
        seeded by (seed, context length): the same for a request whatever it is batched
        with, fresh for every new context."""
        rows = len(lengths)
        if self._backend.noise == "mask":
            return torch.full((rows, *shape), self.mask_token_id, dtype=torch.long, device=device)
        out = torch.empty((rows, *shape), dtype=torch.long)
        for b, n in enumerate(lengths):
            gen = torch.Generator().manual_seed((self.seed * _SEED_MIX + n) % (1 << 63))
            out[b] = torch.randint(0, self.vocab_size, shape, generator=gen)
        return out.to(device)

    @torch.inference_mode()
    def lattice(
        self, requests: Sequence[tuple[str, Sequence[int]]], block_len: int, steps: int = 1
    ) -> torch.Tensor:
        """Logits ``[B, block_len, vocab_size]`` (float32) for the ``block_len`` positions
        after each request's committed tokens.

        ``requests``: ``(req_id, committed token ids so far)``, the ids including the last
        token the target committed. Each request's state holds what it has encoded; a call
        encodes only the tokens committed since the last one, and re-encodes from scratch
        when the tokens no longer extend what was cached (e.g. resumed after preemption
        with a different history).

        ``steps == 1``: one decoder pass over a fully noised canvas (uniform tokens for
        DiffusionGemma, [MASK] for masked models). ``steps > 1`` (at most ``block_len``
        are used): after each pass but the last, the most confident not-yet-fixed positions
        (highest max probability; ``block_len * s // steps`` fixed after pass ``s``) are
        fixed to their argmax, the rest re-noised, and the decoder runs again (with the
        previous logits as self-conditioning, for DiffusionGemma). A position's lattice
        row is its logits from the pass that fixed it; the last pass gives the rest.
        """
        if not 1 <= block_len <= self.max_block:
            raise ValueError(
                f"block_len={block_len} must be in [1, max_block={self.max_block}] "
                f"(the longest canvas this {self.kind} drafter runs)"
            )
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if not requests:
            return torch.empty((0, block_len, self.vocab_size), device=self.device)
        ids = [r for r, _ in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a request appears twice in one lattice call")
        device = self.device
        states = []
        for req_id, tokens in requests:
            tokens = list(map(int, tokens))
            if not tokens:
                raise ValueError(
                    f"request {req_id!r} has no committed tokens: the drafter needs context"
                )
            states.append(self._sync(req_id, tokens))

        canvas_len = self.max_block if self.full_canvas else block_len
        steps = min(steps, block_len)
        lengths = [len(s.tokens) for s in states]
        noise = self._noise(lengths, (steps, canvas_len), device)
        prepared = self._backend.prepare(states, canvas_len, device)
        rows = torch.arange(len(states), device=device)[:, None]

        canvas = noise[:, 0]
        fixed = torch.zeros((len(states), block_len), dtype=torch.bool, device=device)
        out = None
        sc_logits = None
        for s in range(1, steps + 1):
            logits = self._backend.denoise(prepared, canvas, sc_logits)
            self.stats["decoder_passes"] += 1
            block = logits[:, :block_len]
            if out is None:
                out = block.clone() if steps > 1 else block
            if s == steps:
                out = torch.where(fixed[..., None], out, block)
                break
            k = block_len * s // steps - block_len * (s - 1) // steps
            conf = block.softmax(-1).amax(-1).masked_fill(fixed, -1.0)
            newly = torch.zeros_like(fixed)
            newly[rows, conf.topk(k, dim=-1).indices] = True
            out = torch.where(newly[..., None], block, out)
            tokens_now = torch.where(newly, block.argmax(-1), canvas[:, :block_len])
            fixed |= newly
            canvas = noise[:, s].clone()
            canvas[:, :block_len] = torch.where(fixed, tokens_now, canvas[:, :block_len])
            sc_logits = logits if self._backend.self_conditioning else None
        return out
