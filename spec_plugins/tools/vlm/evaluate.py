"""Stage 4: what a testbed build sees, on held-out images: greedy answers to "Describe
the image." (through transformers, one image at a time), scored against how each image
was drawn."""

from __future__ import annotations

from pathlib import Path

from spec_plugins.tools.vlm.images import HELD_OUT_SEEDS, Drawn, draw


def evaluate(model_dir: Path, n: int = 40, max_new_tokens: int = 30) -> dict:
    """Counts, over ``n`` held-out images, of answers that name the kind of picture, the
    background colour and the foreground colour (the left shape's, for two shapes)."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir).eval()
    chat = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Describe the image."}]}]
    text = processor.tokenizer.apply_chat_template(chat, tokenize=False,
                                                   add_generation_prompt=True)
    counts = {"images": n, "kind": 0, "background": 0, "foreground": 0}
    for i in range(n):
        d = draw(HELD_OUT_SEEDS[0] + 500 + i)
        inputs = processor(text=text, images=[d.image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        said = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
        for key, hit in score(d, said).items():
            counts[key] += hit
    return counts


def score(drawn: Drawn, said: str) -> dict[str, bool]:
    """Whether ``said`` names the picture's kind, its background colour (as "<colour>
    background") and its foreground colour (elsewhere in the answer)."""
    said, f = said.lower(), drawn.facts
    background = f"{f['background']} background"
    foreground = f.get("colour") or f["left"].split()[0]
    return {"kind": {"chart": "bar chart" in said, "word": "word" in said,
                     "shape": f.get("shape", "?") in said,
                     "two shapes": "left" in said and "right" in said}[drawn.kind],
            "background": background in said,
            "foreground": foreground in said.replace(background, "")}
