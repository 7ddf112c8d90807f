"""The trainer's pipeline: each stage in its own module, run in order, cached on disk
(see the package docstring)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from spec_plugins.paths import drafter_dir
from spec_plugins.tools.train_drafter.console import log
from spec_plugins.tools.train_drafter.corpus import corpus_sources, split_heldout
from spec_plugins.tools.train_drafter.evaluation import evaluate_heldout
from spec_plugins.tools.train_drafter.features import FeatureSet, target_features
from spec_plugins.tools.train_drafter.generation import generate, resolve_backend
from spec_plugins.tools.train_drafter.settings import Settings
from spec_plugins.tools.train_drafter.training import (draft_vocabulary, make_drafter,
                                                        target_layers, train)


def load_target(s: Settings):
    """(checkpoint directory, tokenizer, float32 transformers model); the embedded default
    model (built on first use) when ``s.model`` is empty."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not s.model:
        from spec_plugins.tools.default_model import build
        s.model = str(build())
    model_dir = str(Path(s.model).resolve())
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, tok, target


@dataclass
class TrainingData:
    features: FeatureSet
    prompts: list[str]  # sequence i's prompt
    caches: list[dict]  # per source: its generation and features directories


def training_data(s: Settings, model_dir: str, tok, target, cost: dict) -> TrainingData:
    """Stages 1-3 for every prompt source: prompts, the target's continuations and its
    features. Adds the time and tokens spent to ``cost``."""
    backend = resolve_backend(s.gen_backend)
    cost["generate_s"] = cost["features_s"] = 0.0
    cost["tokens_generated"] = 0
    parts, names, prompts, caches = [], [], [], []
    for source, count in corpus_sources(s.corpus, s.num_prompts):
        gen = generate(s, source, count, model_dir, tok, target, backend)
        cost["generate_s"] += gen.seconds
        cost["tokens_generated"] += sum(len(o) for o in gen.outputs)
        feats, seconds = target_features(gen, target, s.target_layers, s.max_len, source)
        cost["features_s"] += seconds
        parts.append(feats)
        names.append(source if source in ("local", "self") else "file")
        prompts += gen.prompts
        caches.append({"source": source, "generation": str(gen.path), "features": str(feats.dir)})
    features = FeatureSet(parts, names)
    cost["feature_tokens"] = features.num_tokens
    return TrainingData(features, prompts, caches)


def run(s: Settings) -> dict:
    """Train (or with ``s.eval_only`` evaluate) a drafter; returns the report it also
    writes to the output directory."""
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.vision:
        return run_image_stage(s)
    t_start = time.time()
    cost = {"threads": torch.get_num_threads()}
    model_dir, tok, target = load_target(s)
    s.target_layers = target_layers(s.target_layers, target.config.num_hidden_layers)

    data = training_data(s, model_dir, tok, target, cost)
    feats = data.features
    train_ids, held, dropped = split_heldout(data.prompts, s.exclude_prompts, s.heldout, s.seed)
    vocab = draft_vocabulary(feats, train_ids, tok, target.config.vocab_size, s.vocab)
    log(f"{len(train_ids)} training / {len(held)} held-out sequences ({dropped} dropped as "
        f"matching an excluded prompt); draft vocabulary {vocab.size} covers "
        f"{vocab.coverage:.1%} of the labels; mask token {vocab.mask_id}")

    out = Path(s.out) if s.out else drafter_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    drafter = make_drafter(s, target, s.target_layers, vocab)
    step, history = train(s, drafter, feats, train_ids, vocab.t2d, out, cost)

    return finish(s, drafter, feats, held, out, cost, t_start, step, history,
                  {"vocab_coverage": vocab.coverage, "mask_token_id": vocab.mask_id,
                   "caches": data.caches, "dropped_prompts": dropped})


def run_image_stage(s: Settings) -> dict:
    """The image stage: the text stage's drafter (``--init-from``, trained for the VLM's
    language model) goes on training on the VLM's own answers to image requests, with the
    vision adaptor ``s.vision`` added (or none: the comparison it is measured against)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from spec_plugins.adapter.session import placeholder_token_ids
    from spec_plugins.models.dflash import DFlashDrafter
    from spec_plugins.models.vision import VisionConfig
    from spec_plugins.tools.train_drafter.features import FeatureSet
    from spec_plugins.tools.train_drafter.images import image_data
    from spec_plugins.tools.train_drafter.training import target_to_draft, tie_k_norm

    if not s.model or not s.init_from:
        raise SystemExit("--vision trains the image stage: --model VLM_DIR --init-from "
                         "TEXT_DRAFTER (the text stage's drafter for the VLM's language model)")
    t_start = time.time()
    cost = {"threads": torch.get_num_threads()}
    vlm_dir = str(Path(s.model).resolve())
    vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32)
    text = DFlashDrafter.from_pretrained(
        s.init_from, embed_tokens=vlm.get_input_embeddings().weight.detach(),
        lm_head_weight=vlm.get_output_embeddings().weight.detach())
    del vlm
    # The stage goes on training the text stage's drafter: its block length.
    s.block_size, s.min_block = text.config.block_size, min(s.min_block, text.config.block_size)
    data = image_data(vlm_dir, text.config.target_layer_ids, s.image_prompts,
                      s.max_new_tokens, s.max_len, s.seed)
    cost.update(generate_s=data.generate_s, features_s=data.features_s,
                tokens_generated=data.tokens_generated)
    feats = FeatureSet([data.features], ["images"])
    cost["feature_tokens"] = feats.num_tokens
    train_ids, held, dropped = split_heldout(data.prompts, s.exclude_prompts, s.heldout, s.seed)
    image_ids = torch.tensor(sorted(placeholder_token_ids(AutoConfig.from_pretrained(vlm_dir),
                                                          vlm_dir)))
    drafter = text.with_vision(None if s.vision == "none" else
                               VisionConfig(s.vision, s.num_queries))
    if s.tie_k_norm:
        tie_k_norm(drafter)
    drafter.train()
    log(f"image stage: {len(train_ids)} training / {len(held)} held-out image requests; "
        f"{drafter.describe()}")
    rows = drafter.target_ids
    t2d = target_to_draft(rows if rows is not None else torch.arange(drafter.config.vocab_size),
                          drafter.config.vocab_size)
    out = Path(s.out) if s.out else drafter_dir(vlm_dir)
    out.mkdir(parents=True, exist_ok=True)
    step, history = train(s, drafter, feats, train_ids, t2d, out, cost, image_ids)
    return finish(s, drafter, feats, held, out, cost, t_start, step, history,
                  {"dropped_prompts": dropped, "image_token_ids": image_ids.tolist()},
                  image_ids)


def finish(s: Settings, drafter, feats, held, out: Path, cost: dict, t_start: float, step: int,
           history: list[float], extra: dict, image_ids=None) -> dict:
    """Evaluate on the held-out sequences, write and print the report."""
    t0 = time.time()
    ev = evaluate_heldout(drafter, feats, held, s, image_ids)
    cost["eval_s"] = time.time() - t0
    cost["wall_s"] = time.time() - t_start
    report = {"out": str(out), "settings": asdict(s), "cost": cost, "eval": ev,
              "loss_first": history[:5], "loss_last": history[-5:], "step": step, **extra}
    name = f"eval_report_step{step}.json" if s.eval_only else "train_report.json"
    (out / name).write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(r: dict) -> None:
    c, ev = r["cost"], r["eval"]
    tr = c.get("train_s", 0.0)
    lines = [f"drafter: {r['out']}",
             f"cost on {os.cpu_count()} CPUs ({c['threads']} torch threads): wall {c['wall_s']:.0f} s; "
             f"generation {c['generate_s']:.0f} s for {c['tokens_generated']} tokens; target features "
             f"{c['features_s']:.0f} s for {c['feature_tokens']} tokens; training {tr:.0f} s for "
             f"{c['positions_trained']} block positions ({c['positions_trained'] / max(tr, 1e-9):.0f}/s)"]
    if ev:
        lines.append("held-out accuracy per block position: " +
                     " ".join(f"{j + 1}:{a:.2f}" for j, a in enumerate(ev["per_position_accuracy"])) +
                     f"; mean accepted {ev['mean_accepted']:.2f} (+1 bonus = "
                     f"{ev['tokens_per_step']:.2f} tokens per greedy step)")
        for name, e in ev.get("per_source", {}).items():
            lines.append(f"held-out {name}: " + " ".join(
                f"{j + 1}:{a:.2f}" for j, a in enumerate(e["per_position_accuracy"])) +
                f"; {e['tokens_per_step']:.2f} tokens per greedy step")
        if "adaptor_off" in ev:
            off = ev["adaptor_off"]
            lines.append("with the vision adaptor silent: " + " ".join(
                f"{j + 1}:{a:.2f}" for j, a in enumerate(off["per_position_accuracy"])) +
                f"; {off['tokens_per_step']:.2f} tokens per greedy step")
        if "short_block" in ev:
            sb = ev["short_block"]
            lines.append(f"with k = {len(sb['per_position_accuracy'])}: " + " ".join(
                f"{j + 1}:{a:.2f}" for j, a in enumerate(sb["per_position_accuracy"])) +
                f"; {sb['tokens_per_step']:.2f} tokens per greedy step")
    for line in lines:
        log(line)
