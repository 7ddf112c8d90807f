"""Start `vllm serve` with a spec_plugins method on the default model, send one chat
request, print the answer and the acceptance figures from ``/metrics``."""

from __future__ import annotations

import argparse
import shlex
import time

from integration.vllm_server import mean_acceptance_length, serve_command, spec_metrics, vllm_server

SPEC = {"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 8}
PROMPT = ("Rewrite this function with type hints and a docstring, and return the full code:\n\n"
          "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
          "    return total / len(xs)\n")


def main() -> None:
    import openai

    from spec_plugins.tools.default_model import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args()
    model = str(build())
    print("$", shlex.join(serve_command(model, 0, SPEC)).replace("--port 0", "--port <free>"),
          flush=True)
    with vllm_server(model, SPEC) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": a.prompt}],
            temperature=0, max_tokens=256)
        dt = time.perf_counter() - t0
        m = spec_metrics(url)
    print("\n--- answer ---\n" + r.choices[0].message.content)
    print("--- speculative decoding (vllm:spec_decode_* from /metrics) ---")
    print(f"completion tokens {r.usage.completion_tokens} in {dt:.1f}s "
          f"({r.usage.completion_tokens / dt:.1f} tok/s)")
    print(f"drafts {m.get('num_drafts', 0):.0f}, draft tokens {m.get('num_draft_tokens', 0):.0f}, "
          f"accepted tokens {m.get('num_accepted_tokens', 0):.0f}, "
          f"mean acceptance length {mean_acceptance_length(m):.2f}")


if __name__ == "__main__":
    main()
