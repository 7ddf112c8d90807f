"""``spec-plugins-vlm``: build the VLM testbed once (cached, atomic) and print its path."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from spec_plugins.paths import atomic_dir, vlm_model_dir

# Embedding phase: steps of 32 images (~1 s each on 2 cores).
DEFAULT_STEPS = 2000
# Captioning phase, through the language model: steps of 8 images (~5 s each).
DEFAULT_CAPTION_STEPS = 150


def build(steps: int = DEFAULT_STEPS, caption_steps: int = DEFAULT_CAPTION_STEPS,
          out: Path | None = None, log=print) -> Path:
    out = Path(out) if out else vlm_model_dir(steps, caption_steps)
    if (out / "spec_plugins_vlm.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    from spec_plugins.tools.default_model import build as build_default_model
    from spec_plugins.tools.vlm.align import align, caption
    from spec_plugins.tools.vlm.assemble import VisionShape, parts, write

    lm_dir = build_default_model()
    shape = VisionShape()
    with atomic_dir(out) as tmp:
        encoder, connector, processor, config = parts(lm_dir, tmp, shape)
        embed = load_file(str(lm_dir / "model.safetensors"))["model.embed_tokens.weight"]
        about = {"language_model": str(lm_dir), "align_steps": steps,
                 "caption_steps": caption_steps, "vision": vars(shape)}
        about["align_loss"] = align(encoder, connector, processor, embed, steps=steps,
                                    log=log)["loss"]
        if caption_steps:
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(lm_dir)
            about["caption_loss"] = caption(encoder, connector, processor, lm,
                                            steps=caption_steps, log=log)["loss"]
        write(tmp, lm_dir, encoder, connector, processor, config, about=about)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="embedding-alignment steps (32 images each); default %(default)s")
    ap.add_argument("--caption-steps", type=int, default=DEFAULT_CAPTION_STEPS,
                    help="captioning steps through the language model (8 images each); "
                         "default %(default)s")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: the cache's SmolLM2-135M-Idefics3-synthetic-a<steps>-c<caption-steps>")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N",
                    help="then print what the build sees on N held-out images")
    args = ap.parse_args(argv)
    out = build(args.steps, args.caption_steps, args.out)
    print(out)
    if args.evaluate:
        from spec_plugins.tools.vlm.evaluate import evaluate

        counts = evaluate(out, args.evaluate)
        print(f"of {counts['images']} held-out images, the answer to 'Describe the image.' "
              f"names the kind of picture for {counts['kind']}, the background colour for "
              f"{counts['background']}, the foreground colour for {counts['foreground']}")


if __name__ == "__main__":
    main()
