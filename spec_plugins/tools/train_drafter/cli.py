"""``spec-plugins-train-drafter``: the command line (options in ``Settings``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from spec_plugins.tools import train_drafter
from spec_plugins.tools.train_drafter.settings import Settings


def parse_args(argv) -> Settings:
    d = Settings()
    ap = argparse.ArgumentParser(prog="spec-plugins-train-drafter",
                                 description=train_drafter.__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="", help="output directory (default: under the cache)")
    ap.add_argument("--corpus", default=None,
                    help="prompt sources, comma-separated name[:count]: local (docs on this "
                         "machine), self (user requests sampled from the target), a text file")
    ap.add_argument("--corpus-file", default="", help="a text file as the only source")
    ap.add_argument("--exclude-prompts", default=None,
                    help="JSON list of prompts never trained on (e.g. a benchmark's)")
    ap.add_argument("--init-from", default=None, help="start from this drafter checkpoint")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite's)")
    ap.add_argument("--vision", choices=["vispec", "msd", "none"], default=None,
                    help="the image stage: --model is a VLM, --init-from the text stage's "
                         "drafter for its language model; adds this vision adaptor (none: "
                         "the same drafter trained on the image data without one)")
    for f in ("num_prompts", "max_new_tokens", "max_len", "draft_layers", "block_size", "min_block",
              "vocab",
              "steps", "batch", "anchors", "warmup", "save_every", "seed", "threads", "eval_anchors",
              "num_queries", "image_prompts"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    for f in ("lr", "weight_decay", "gamma", "heldout"):
        ap.add_argument("--" + f.replace("_", "-"), type=float, default=None)
    ap.add_argument("--gen-backend", choices=["auto", "vllm", "transformers"], default=None)
    ap.add_argument("--target-layers", default=None, help="comma-separated target layer ids")
    ap.add_argument("--tie-k-norm", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--init-from-target", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--eval-only", action="store_true", default=None,
                    help="evaluate the last checkpoint in --out on the held-out data; no training")
    a = ap.parse_args(argv)
    given = {f: getattr(a, f) for f in vars(a) if getattr(a, f) is not None
             and f not in ("tiny", "corpus_file", "target_layers")}
    if a.target_layers:
        given["target_layers"] = [int(x) for x in a.target_layers.split(",")]
    if a.corpus_file:
        given["corpus"] = a.corpus_file
    s = Settings.tiny(**given) if a.tiny else Settings(**{**asdict(d), **given})
    return s


def main(argv: list[str] | None = None) -> None:
    from spec_plugins.tools.train_drafter.pipeline import run

    run(parse_args(sys.argv[1:] if argv is None else argv))
