"""Sample many seeded requests from a tiny random model in an in-process vLLM engine and
print the tokens as JSON: the distribution test (``test_vllm_sampling.py``) compares
engines with and without a spec_plugins method whose drafts are sampled.

    python -m integration.sampling_check MODEL_DIR --n 3000 \
        [--method test_sampled --options '{...}']

``make_model(dir)`` builds the model: a 2-layer Llama with a 64-token vocabulary whose LM
head favours the first 8 ids (so a few thousand samples cover the distribution of the
first tokens, and a drafter drafting from those 8 ids gets both accepted and rejected).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def make_model(path: str, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      initializer_range=0.3, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[8:] *= 0.2
    model.save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--method", default=None)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--options", default="{}")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    spec = None if a.method is None else {"model": f"spec_plugins.vllm.{a.method}",
                                          "num_speculative_tokens": a.k}
    llm = LLM(model=a.model, skip_tokenizer_init=True, dtype="float32", max_model_len=256,
              kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0,
              disable_log_stats=False,
              speculative_config=spec,
              additional_config={"spec_plugins": json.loads(a.options)} if a.method else {})
    prompts = [{"prompt_token_ids": [1, 5, 9, 3]}] * a.n
    params = [SamplingParams(temperature=1.0, top_k=a.top_k, max_tokens=a.max_tokens,
                             seed=i, ignore_eos=True, detokenize=False) for i in range(a.n)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value"):
            metrics[m.name] = m.value
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics},
              sys.stdout)


if __name__ == "__main__":
    main()
