import json
import os

import pytest

pytest.importorskip("transformers")

from spec_plugins.paths import CACHE_ENV, default_model_dir  # noqa: E402
from spec_plugins.tools.default_model import build, gguf_dir  # noqa: E402


def test_builds_a_plain_fp32_checkpoint_once(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # never the real cache
    assert os.path.exists(os.path.join(gguf_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    out = build()
    assert out == default_model_dir() and out.is_relative_to(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg  # a normal checkpoint, not a GGUF wrapper
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert (out / "tokenizer.json").exists()
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert build() == out  # cached: the second call does not rebuild
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp
