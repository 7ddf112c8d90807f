"""The image stage's data (``--vision``): image prompts for a VLM target, the target's own
greedy answers (vLLM offline) and its features at every position (transformers, image
positions included; layer -1, the input embeddings, always stored first so every adaptor
style trains on the same cache).

Prompts: synthetic pictures (``spec_plugins.tools.vlm.images``) drawn from training
seeds, past those the testbed's own alignment draws (benchmarks draw from
``HELD_OUT_SEEDS``), with requests phrased unlike the benchmark's questions; every fourth
prompt shows two pictures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from spec_plugins.paths import content_key, training_data_dir
from spec_plugins.tools.train_drafter.console import log
from spec_plugins.tools.train_drafter.features import Features, extract_features
from spec_plugins.tools.train_drafter.generation import generate_vllm_chat, model_identity

REQUESTS = ("Tell me about this picture in detail.", "What do you see here? Give details.",
            "Describe everything in this image, then say what it could be used for.",
            "Write a few sentences about this picture.",
            "Explain this image to someone who cannot see it.")
TWO_IMAGES = "Look at both pictures. Describe each in turn, then compare them."
FIRST_SEED = 600_000     # in TRAIN_SEEDS, past the testbed alignment's draws


def requests(n: int, seed: int) -> list[tuple[list, str]]:
    """``n`` image requests: their pictures (PIL) and text."""
    from spec_plugins.tools.vlm.images import TRAIN_SEEDS, draw

    out = []
    for i in range(n):
        base = FIRST_SEED + 3 * (i + 1000 * seed)
        assert base + 1 in TRAIN_SEEDS
        if i % 4 == 3:
            out.append(([draw(base).image, draw(base + 1).image], TWO_IMAGES))
        else:
            out.append(([draw(base).image], REQUESTS[i % len(REQUESTS)]))
    return out


def conversation(images: list, text: str, uri: bool = True) -> list[dict]:
    """One user turn: the pictures, then the text; as OpenAI ``image_url`` data URIs, or
    (``uri=False``) as the ``{"type": "image"}`` parts of transformers' chat templates."""
    from spec_plugins.tools.vlm.images import data_uri

    parts = [{"type": "image_url", "image_url": {"url": data_uri(im)}} if uri else
             {"type": "image"} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@dataclass
class ImageData:
    features: Features
    prompts: list[str]          # a key per sequence (for the held-out split)
    generate_s: float
    features_s: float
    tokens_generated: int


def image_data(vlm_dir: str, layers: list[int], n: int, max_new: int, max_len: int,
               seed: int) -> ImageData:
    """The target's answers to ``n`` image requests and its states after ``[-1] + layers``
    (cached like the text stages, keyed by the model and what shapes the data)."""
    ident = model_identity(vlm_dir)
    gkey = content_key({"model": ident, "images": n, "max_new": max_new, "seed": seed, "v": 1})
    gdir = training_data_dir() / "gen-images" / gkey
    gen_s = 0.0
    if (gdir / "sequences.json").exists():
        data = json.loads((gdir / "sequences.json").read_text())
        log(f"image generation cached: {gdir}")
    else:
        t0 = time.time()
        log(f"generating the target's answers to {n} image requests with vllm "
            f"(max {max_new} new tokens)")
        convs = [conversation(*r) for r in requests(n, seed)]
        prompt_ids, outputs = generate_vllm_chat(vlm_dir, convs, max_new, seed)
        gen_s = time.time() - t0
        data = {"prompt_ids": prompt_ids, "outputs": outputs, "seconds": gen_s}
        gdir.mkdir(parents=True, exist_ok=True)
        (gdir / "sequences.json.tmp").write_text(json.dumps(data))
        (gdir / "sequences.json.tmp").replace(gdir / "sequences.json")
    stored = [-1] + list(layers)
    fdir = training_data_dir() / "feat" / content_key({"gen": gkey, "layers": stored,
                                                       "max_len": max_len, "v": 3})
    feat_s = 0.0
    if not (fdir / "meta.json").exists():
        fdir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        _extract(vlm_dir, data, stored, max_len, seed, fdir)
        feat_s = time.time() - t0
    else:
        log(f"image features cached: {fdir}")
    keys = [f"image request {i}" for i in range(n)]
    return ImageData(Features(fdir), keys, gen_s, feat_s,
                     sum(len(o) for o in data["outputs"]))


def _extract(vlm_dir: str, data: dict, layers: list[int], max_len: int, seed: int,
             out: Path) -> None:
    """Transformers' forward over each prompt + answer with its pictures: the processor
    expands the prompt as vLLM did (checked: a sequence whose ids differ is an error)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm_dir)
    model = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    pixels = []
    for i, ((images, text), ids) in enumerate(zip(requests(len(data["prompt_ids"]), seed),
                                                  data["prompt_ids"])):
        prompt = processor.tokenizer.apply_chat_template(
            conversation(images, text, uri=False), tokenize=False, add_generation_prompt=True)
        enc = processor(text=prompt, images=images, return_tensors="pt")
        if enc.input_ids[0].tolist() != list(ids):
            raise RuntimeError(f"image request {i}: transformers' processor expands the prompt "
                               "otherwise than vLLM did")
        pixels.append({k: v for k, v in enc.items() if k.startswith("pixel")})
    seqs = [(p + o)[:max_len] for p, o in zip(data["prompt_ids"], data["outputs"])]
    plens = [min(len(p), max_len) for p in data["prompt_ids"]]
    log(f"target features for {sum(map(len, seqs))} tokens of image requests, layers {layers}")

    def forward(group, ids, att):
        (g,) = group
        return model.model(input_ids=ids, attention_mask=att, output_hidden_states=True,
                           **pixels[g]).hidden_states

    extract_features(model, seqs, plens, layers, out, batch_tokens=1, forward=forward,
                     hidden_size=model.config.text_config.hidden_size)
