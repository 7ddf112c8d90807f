"""What one served decoding step costs for k draft tokens (k + 1 query tokens), batch 1.

A test-only method (``method_pkg``'s ``test_sampled``: argmax drafts of a fixed random
distribution, which the target rejects almost always) drafts exactly ``k`` tokens every
step, so every step commits one token and tokens per second is the step rate. ``k = 0`` is
vanilla without async scheduling (as vLLM runs every custom proposer). The difference
between rows is what verification of the extra tokens costs on this machine, the
quantity the verify-cost model calibrates online. ``--tree``: the k tokens form a tree
(two branches at the first position, k/2 deep), verified through the tree path (tree
attention, tree sampler) instead of vLLM's chain path:

    .venv/bin/python -m integration.bench_verify_cost --depths 0 1 2 4 6 8 12
    .venv/bin/python -m integration.bench_verify_cost --depths 2 4 8 --tree
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from integration.prompts import prompts
from integration.vllm_server import vllm_server

METHOD_PKG = str(Path(__file__).parent / "method_pkg")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4, 8, 12])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many rounds")
    ap.add_argument("--tree", action="store_true", help="k tokens as a two-branch tree "
                    "(k even)")
    args = ap.parse_args()

    import openai

    from spec_plugins.tools.default_model import build

    model = str(build())
    convs = prompts("chat", 3, start=12)
    base = None
    for k in args.depths:
        spec, extra, flags = None, None, ["--no-async-scheduling"]
        if k:
            spec = {"model": "spec_plugins.vllm.test_sampled", "num_speculative_tokens": k}
            options = {"depth": k // 2, "tree": True} if args.tree else {"depth": k}
            extra, flags = {"spec_plugins": options}, []
        with vllm_server(model, spec, extra, extra=flags, extra_path=METHOD_PKG) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)
            client.chat.completions.create(model="default", max_tokens=16,
                                           messages=[{"role": "user", "content": "Hi"}])
            best = 0.0
            for _ in range(args.rounds):
                t0, tokens = time.perf_counter(), 0
                for conv in convs:
                    r = client.chat.completions.create(model="default", messages=conv,
                                                       max_tokens=args.max_tokens,
                                                       temperature=0)
                    tokens += r.usage.completion_tokens
                best = max(best, tokens / (time.perf_counter() - t0))
        step = 1000 / best
        base = base or step
        shape = "tree" if args.tree and k else "chain"
        print(f"{k:3d} draft tokens ({shape}): {step:5.1f} ms per step ({step / base:.2f}x "
              "the first row's)",
              flush=True)


if __name__ == "__main__":
    main()
