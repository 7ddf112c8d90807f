"""The trainer's settings (one field per command-line option)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from spec_plugins.paths import content_key


@dataclass
class Settings:
    model: str = ""
    out: str = ""
    # Prompt sources, comma-separated, each ``name[:count]``: ``local`` (docs on this
    # machine), ``self`` (user turns sampled from the target itself) or a text file path;
    # a source without a count gets an equal share of ``num_prompts``.
    corpus: str = "local,self"
    exclude_prompts: str = ""  # JSON list of prompts never to train on (benchmark prompts)
    num_prompts: int = 1200
    max_new_tokens: int = 256
    max_len: int = 640  # tokens per sequence kept for training (prompt + continuation)
    gen_backend: str = "auto"  # vllm | transformers | auto
    target_layers: list[int] = field(default_factory=list)  # [] = spread over depth
    draft_layers: int = 2
    block_size: int = 8  # query slots (1 + drafts)
    min_block: int = 3  # each step trains one block length drawn from min_block..block_size
    vocab: int = 8192  # trimmed draft vocabulary (0: full)
    tie_k_norm: bool = True
    init_from_target: bool = True
    steps: int = 2000
    batch: int = 4  # sequences per step
    anchors: int = 16  # blocks per sequence
    lr: float = 6e-4
    warmup: int = 50
    weight_decay: float = 0.01
    gamma: float = 4.0
    heldout: float = 0.05
    save_every: int = 200
    seed: int = 0
    threads: int = 0  # 0: torch default
    eval_anchors: int = 64  # per held-out sequence (at most)
    eval_only: bool = False  # evaluate the last checkpoint in --out, train nothing
    init_from: str = ""  # start from this drafter checkpoint (same target; rows mapped by token)
    # The image stage (``--model`` a VLM whose language model the ``--init-from`` drafter
    # was trained for): "vispec" / "msd" add that vision adaptor (models/vision.py),
    # "none" trains the same drafter on the same image data without one; "" = text stage.
    vision: str = ""
    num_queries: int = 4  # vispec: context rows per image span
    image_prompts: int = 240

    @classmethod
    def tiny(cls, **kw) -> "Settings":
        base = dict(num_prompts=12, max_new_tokens=24, max_len=96, gen_backend="transformers",
                    draft_layers=1, block_size=4, min_block=4, vocab=64, steps=8, batch=2, anchors=4,
                    lr=3e-3, warmup=2, save_every=4, heldout=0.2, eval_anchors=8,
                    init_from_target=False)
        base.update(kw)
        return cls(**base)


def settings_key(s: Settings) -> str:
    """What a checkpoint must have been trained with to be resumed: every setting except
    those that only say how long to run, where to write and what to report."""
    keep = asdict(s)
    for f in ("steps", "save_every", "threads", "out", "eval_anchors", "eval_only"):
        keep.pop(f)
    return content_key(keep)
