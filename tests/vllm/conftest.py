import json

import pytest

pytest.importorskip("vllm")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama checkpoint (config only is enough to build a VllmConfig)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    }))
    return str(d)
