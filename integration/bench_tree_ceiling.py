"""How much longer do suffix trees make accepted runs than suffix chains, timing aside?

Runs vLLM in-process with the suffix method's verify-cost budget switched off
(``fit_batch`` returns every draft as built, up to ``--nodes``), greedy, batch 1, and
prints committed tokens per decode step per category. Acceptance does not depend on
timing, so this ceiling is exact even on a noisy machine:

    LD_PRELOAD=.venv/lib/libiomp5.so .venv/bin/python -m integration.bench_tree_ceiling chain
    LD_PRELOAD=.venv/lib/libiomp5.so .venv/bin/python -m integration.bench_tree_ceiling tree
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # patches must reach the engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=["chain", "tree"])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--n", type=int, default=6, help="prompts per category")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import integration.prompts as P
    import spec_plugins.proposers.suffix as suffix
    from spec_plugins.tools.default_model import build

    suffix.fit_batch = lambda trees, *a, **k: list(trees)
    steps = [0]
    execute = GPUModelRunner.execute_model

    def counted(self, *a, **k):
        steps[0] += 1
        return execute(self, *a, **k)

    GPUModelRunner.execute_model = counted
    llm = LLM(model=str(build()), dtype="float32", kv_cache_memory_bytes=1 << 30,
              max_model_len=4096, seed=0,
              speculative_config={"model": "spec_plugins.vllm.suffix",
                                  "num_speculative_tokens": args.nodes},
              additional_config={"spec_plugins": {"tree": args.shape == "tree"}})
    tok = llm.get_tokenizer()
    res = {}
    for cat in ["humaneval", "code_edit", "chat"]:
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in P.prompts(cat, args.n)]
        steps[0], n = 0, 0
        for t in texts:   # one at a time: one prefill step, then decode steps
            out = llm.generate([t], SamplingParams(temperature=0, max_tokens=args.max_tokens),
                               use_tqdm=False)
            n += len(out[0].outputs[0].token_ids)
        res[cat] = round((n - len(texts)) / (steps[0] - len(texts)), 3)
    print(f"suffix {args.shape}, budget off, {args.nodes} nodes: tokens per decode step",
          json.dumps(res))


if __name__ == "__main__":
    main()
