"""Stage 2: align a randomly initialised vision encoder and its connector to the frozen
language model, on synthetic images (``images``), in two phases.

1. ``align``, embeddings: the target of each image's token span is text the language model
   already reads, the input embeddings of ``Image: <caption>.`` right-aligned in the span
   after spaces; a mean squared error, with no forward through the language model, so
   thousands of steps fit in minutes on a CPU. It gets the soft tokens near the embedding
   manifold, not near enough for the language model to read them (measured: relative
   error 0.21 after 2000 steps, and greedy answers were empty or repeated newlines).
2. ``caption``, through the language model: the frozen SmolLM2 reads a chat turn with the
   image span and a request for a description, and the loss is its cross-entropy on the
   caption as the assistant's answer (LLaVA's first stage, on synthetic captions).
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


def _train(encoder, connector, processor, loss_of, *, name: str, steps: int, batch: int,
           lr: float, seed: int, warmup: int, log_every: int, log) -> dict:
    """The loop both phases share: per step ``batch`` new training images, their features,
    ``loss_of(drawn, feats, step)``, one AdamW step on the encoder and connector (cosine
    schedule after ``warmup`` steps). Returns the final (smoothed) loss and the time."""
    torch.manual_seed(seed)
    params = list(encoder.parameters()) + list(connector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    encoder.train(), connector.train()
    started, loss_ema = time.monotonic(), None
    next_seed = TRAIN_SEEDS.start + seed * 10_000_000
    for step in range(steps):
        drawn = [draw(next_seed + i) for i in range(batch)]
        next_seed += batch
        pixels = processor.image_processor([[d.image] for d in drawn],
                                           return_tensors="pt")["pixel_values"][:, 0]
        loss = loss_of(drawn, image_features(encoder, connector, pixels), step)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps}: loss {loss_ema:.4f} "
                f"({time.monotonic() - started:.0f} s)")
    encoder.eval(), connector.eval()
    return {"loss": loss_ema, "seconds": time.monotonic() - started}


def align(encoder, connector, processor, embed: torch.Tensor, *, steps: int,
          batch: int = 32, lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train ``encoder`` and ``connector`` in place; ``embed`` is the language model's input
    embedding matrix (frozen). Returns the final loss and the time taken."""
    scale = embed.pow(2).mean()

    def loss_of(drawn, feats, step):
        target = embed[span_targets(processor.tokenizer, [d.caption for d in drawn],
                                    feats.shape[1])]
        return (feats - target).pow(2).mean() / scale

    return _train(encoder, connector, processor, loss_of, name="align", steps=steps,
                  batch=batch, lr=lr, seed=seed, warmup=max(1, steps // 20), log_every=100,
                  log=log)


def _chat_ids(tokenizer, shape_tokens: int, question: str) -> list[int]:
    """Token ids of a user turn holding one image (as the processor expands ``<image>``:
    framing, global-image token, the span, framing) and ``question``, up to the assistant's
    header, under the testbed's chat template."""
    from spec_plugins.tools.vlm.assemble import IMAGE_TOKEN

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    before, after = text.split(IMAGE_TOKEN)
    ids = tokenizer.convert_tokens_to_ids
    span = ([ids("<fake_token_around_image>"), ids("<global-img>")]
            + [ids(IMAGE_TOKEN)] * shape_tokens + [ids("<fake_token_around_image>")])
    return (tokenizer(before, add_special_tokens=False).input_ids + span
            + tokenizer(after, add_special_tokens=False).input_ids)


# Requests the captioning phase answers with the caption (benchmark questions differ).
CAPTION_REQUESTS = ("Describe the image.", "What is in this picture?", "Describe this picture briefly.")


def caption(encoder, connector, processor, lm, *, steps: int, batch: int = 8, lr: float = 3e-4,
            seed: int = 1, log=print) -> dict:
    """Train ``encoder`` and ``connector`` in place so that the frozen causal LM ``lm``
    answers a request for a description of the image with its caption."""
    import torch.nn.functional as F

    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.eval()
    embed = lm.get_input_embeddings()

    def loss_of(drawn, feats, step):                     # feats [b, span, hidden]
        rows, labels = [], []
        for i, d in enumerate(drawn):
            request = CAPTION_REQUESTS[(step + i) % len(CAPTION_REQUESTS)]
            prompt = _chat_ids(tok, feats.shape[1], request)
            answer = tok(d.caption[0].upper() + d.caption[1:] + ".<|im_end|>",
                         add_special_tokens=False).input_ids
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        target = torch.tensor([lab + [-100] * (n - len(lab)) for lab in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        x = embed(ids)
        x = x.masked_scatter((ids == image_id).unsqueeze(-1), feats.to(x.dtype))
        logits = lm(inputs_embeds=x, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten())

    return _train(encoder, connector, processor, loss_of, name="caption", steps=steps,
                  batch=batch, lr=lr, seed=seed, warmup=1, log_every=10, log=log)
