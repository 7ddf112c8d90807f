"""Stage 2: align a randomly initialised vision encoder and its connector to the frozen
language model, on synthetic images (``images``).

The target of each image's token span is text the language model already reads: the
input embeddings of ``Image: <caption>.``, right-aligned in the span and preceded by spaces.
The encoder learns to write the caption of what was drawn as soft tokens, so the frozen
SmolLM2 answers about the image (greedy, it repeats or paraphrases the caption). The loss
is a mean squared error against those embeddings: no forward through the language model,
so thousands of steps fit in minutes on a CPU.
"""

from __future__ import annotations

import math
import time

import torch

from spec_plugins.tools.vlm.images import TRAIN_SEEDS, draw


def span_targets(tokenizer, captions: list[str], span: int) -> torch.Tensor:
    """Token ids each image span should read as: spaces, then ``Image: <caption>.``
    ([len(captions), span])."""
    space = tokenizer(" ").input_ids
    rows = []
    for caption in captions:
        ids = tokenizer(f"Image: {caption}.").input_ids[:span]
        rows.append(space * (span - len(ids)) + ids)
    return torch.tensor(rows)


def image_features(encoder, connector, pixel_values: torch.Tensor) -> torch.Tensor:
    """What Idefics3 feeds the language model for these pixels (encoder with its post-norm,
    pixel shuffle, linear connector), as the engines compute it for an unpadded image.
    [images, 3, H, W] -> [images, image_tokens, text_hidden]"""
    return connector(encoder(pixel_values=pixel_values).last_hidden_state)


def align(encoder, connector, processor, embed: torch.Tensor, *, steps: int,
          batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train ``encoder`` and ``connector`` in place; ``embed`` is the language model's input
    embedding matrix (frozen). Returns the final loss and the time taken."""
    torch.manual_seed(seed)
    params = list(encoder.parameters()) + list(connector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    scale = embed.pow(2).mean()
    encoder.train(), connector.train()
    started, loss_ema = time.monotonic(), None
    next_seed = TRAIN_SEEDS.start + seed * 10_000_000
    for step in range(steps):
        drawn = [draw(next_seed + i) for i in range(batch)]
        next_seed += batch
        pixels = processor.image_processor([[d.image] for d in drawn],
                                           return_tensors="pt")["pixel_values"][:, 0]
        feats = image_features(encoder, connector, pixels)
        target = embed[span_targets(processor.tokenizer, [d.caption for d in drawn],
                                    feats.shape[1])]
        loss = (feats - target).pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"align step {step}/{steps}: loss {loss_ema:.4f} "
                f"({time.monotonic() - started:.0f} s)")
    encoder.eval(), connector.eval()
    return {"loss": loss_ema, "seconds": time.monotonic() - started}
