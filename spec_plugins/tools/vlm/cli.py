"""``spec-plugins-vlm``: build the VLM testbed once (cached, atomic) and print its path."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spec_plugins.paths import atomic_dir, vlm_model_dir

# Steps of 32 images: enough that the greedy answers name the drawn colours and shapes.
DEFAULT_STEPS = 2000


def build(steps: int = DEFAULT_STEPS, out: Path | None = None, log=print) -> Path:
    out = Path(out) if out else vlm_model_dir(steps)
    if (out / "spec_plugins_vlm.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    from spec_plugins.tools.default_model import build as build_default_model
    from spec_plugins.tools.vlm.align import align
    from spec_plugins.tools.vlm.assemble import VisionShape, parts, write

    lm_dir = build_default_model()
    shape = VisionShape()
    with atomic_dir(out) as tmp:
        encoder, connector, processor, config = parts(lm_dir, tmp, shape)
        embed = load_file(str(lm_dir / "model.safetensors"))["model.embed_tokens.weight"]
        result = align(encoder, connector, processor, embed, steps=steps, log=log)
        write(tmp, lm_dir, encoder, connector, processor, config,
              about={"language_model": str(lm_dir), "align_steps": steps,
                     "align_loss": result["loss"], "vision": vars(shape)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="alignment steps (32 images each); default %(default)s")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: the cache's SmolLM2-135M-Idefics3-synthetic-<steps>")
    args = ap.parse_args(argv)
    print(build(args.steps, args.out))


if __name__ == "__main__":
    main()
