"""Stage 5, evaluation on held-out sequences: per block position, how often the draft
equals the target's argmax, and the greedy acceptance length it implies."""

from __future__ import annotations

import numpy as np

from spec_plugins.tools.train_drafter.features import FeatureSet
from spec_plugins.tools.train_drafter.settings import Settings


def evaluate(d, feats: FeatureSet, idx: list[int], s: Settings, k: int, seed: int = 1234,
             image_ids=None) -> dict:
    """Per-position accuracy (draft argmax mapped to target ids == target argmax) on the
    held-out sequences, and the mean greedy acceptance length it implies per block."""
    import torch

    from spec_plugins.tools.train_drafter.training import drafter_inputs
    gen = torch.Generator().manual_seed(seed)
    correct = torch.zeros(k)
    count = torch.zeros(k)
    runs = []
    d.eval()
    with torch.no_grad():
        for i in idx:
            tok, pred, st, plen = feats.seq(i, s.max_len)
            L = len(tok)
            if L - 1 <= plen:
                continue
            anc = torch.arange(plen, L - 1)
            if len(anc) > s.eval_anchors:
                anc = anc[torch.randperm(len(anc), generator=gen)[:s.eval_anchors]].sort().values
            st, image = drafter_inputs(d, st[None], tok[None], image_ids)
            logits = d.forward_train(st, tok[anc][None], anc[None], k, image=image)[0]  # [A, k, Vd]
            draft = d.draft_to_target(logits.argmax(-1))  # [A, k] target ids
            src = anc[:, None] + torch.arange(k)[None]  # position p + j - 1
            lab = pred[src.clamp(max=L - 1)]
            ok = (src <= L - 1) & (lab >= 0)
            hit = (draft == lab) & ok
            correct += hit.float().sum(0)
            count += ok.float().sum(0)
            full = ok.all(1)  # blocks entirely inside the sequence
            lead = torch.cumprod(hit.float(), dim=1).sum(1)
            runs += lead[full].tolist()
    d.train()
    acc = (correct / count.clamp(min=1)).tolist()
    return {"per_position_accuracy": [round(a, 4) for a in acc], "positions": count.tolist(),
            "mean_accepted": float(np.mean(runs)) if runs else 0.0,
            "tokens_per_step": 1.0 + (float(np.mean(runs)) if runs else 0.0),
            "blocks": len(runs)}


def evaluate_heldout(d, feats: FeatureSet, held: list[int], s: Settings, image_ids=None) -> dict:
    """``evaluate`` at the trained block length, at the shortest one trained (when they
    differ), per prompt source (when there are several) and, for a drafter with a vision
    adaptor, with the adaptor silent (no image positions: what the adaptor adds)."""
    k = s.block_size - 1
    if not held:
        return {}
    ev = evaluate(d, feats, held, s, k, image_ids=image_ids)
    if d.vision is not None and image_ids is not None:
        ev["adaptor_off"] = evaluate(d, feats, held, s, k)
    if s.min_block < s.block_size:
        ev["short_block"] = evaluate(d, feats, held, s, max(s.min_block, 2) - 1,
                                     image_ids=image_ids)
    names = sorted(set(feats.names))
    if len(names) > 1:
        ev["per_source"] = {n: evaluate(d, feats, [i for i in held if feats.source(i) == n], s, k,
                                        image_ids=image_ids)
                            for n in names}
    return ev
