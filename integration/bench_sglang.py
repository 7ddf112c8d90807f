"""Benchmark through SGLang: `sglang.launch_server` without speculation, with SGLang's own
`NGRAM`, and with each spec_plugins method, on the vLLM benchmark's prompts, greedy, at
batch 1 and 8 concurrent (c requests in flight at concurrency c); optionally vLLM
configurations on the same prompts in the same run (``--vllm-configs``), each engine
compared to its own vanilla.

Per configuration, category and concurrency: output tok/s, speedup over the engine's
vanilla, mean acceptance length (SGLang: output tokens per verify step, from each
response's ``spec_tokens_details``; vLLM: 1 + accepted / drafts) and the share of
outputs identical to vanilla's (text).

    python -m integration.bench_sglang --n 4 --max-tokens 128 --vllm-configs vanilla suffix-chain
    python -m integration.bench_sglang --sweep --json sweep.json --plot sweep.png

``--sweep`` as in ``bench_vllm``: concurrency 1, 4, 8, 16, 32, 64 over ``SWEEP_CONFIGS``
on the mixed prompts; the server admits as many requests as the highest concurrency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from integration import bench_vllm
from integration.bench_report import (add_run_args, print_tables, resolve_run_args, rows_of,
                                      run_info, send_all, totals_of, write_json, write_plot)
from integration.prompts import prompts
from integration.sglang_server import sglang_server

BASE = ["--max-running-requests", "8"]


def admitting(flags: list[str], requests: int) -> list[str]:
    """``flags`` with the server admitting ``requests`` at once (``BASE``'s 8 replaced)."""
    out = list(flags)
    out[out.index("--max-running-requests") + 1] = str(requests)
    return out


def spec(method: str, width: int, **options) -> tuple[list[str], dict]:
    return (BASE + ["--speculative-algorithm", f"spec_plugins.{method}",
                    "--speculative-num-draft-tokens", str(width)], options)


CONFIGS: dict[str, tuple[list[str], dict | None]] = {
    "vanilla": (BASE, None),
    # Without the overlap scheduler, as SGLang runs every speculative algorithm here.
    "vanilla-sync": (BASE + ["--disable-overlap-schedule"], None),
    # SGLang's own n-gram drafter with its defaults.
    "ngram": (BASE + ["--speculative-algorithm", "NGRAM"], None),
    "suffix-chain": spec("suffix", 9, tree=False),
    "suffix-tree": spec("suffix", 17, tree=True),
    "recycling-chain": spec("recycling", 9, tree=False),
    "recycling-tree": spec("recycling", 17, tree=True),
    # The block drafter (the drafter spec-plugins-train-drafter built for the model):
    # alone, and with suffix-trie drafts joined (the method's default).
    "dflash-chain": spec("dflash", 8, tree=False, suffix=False),
    "dflash-tree": spec("dflash", 13, tree=True, suffix=False),
    "dflash-suffix-chain": spec("dflash", 9, tree=False, suffix=True),
    "dflash-suffix": spec("dflash", 17, tree=True, suffix=True),
}
# --sweep: SGLang alone (with and without its overlap scheduler), its NGRAM and every
# spec_plugins method SGLang serves, at its defaults (dflash: suffix drafts joined).
SWEEP_CONFIGS = ["vanilla", "vanilla-sync", "ngram", "suffix-chain", "suffix-tree",
                 "recycling-chain", "recycling-tree", "dflash-suffix"]


def one(client, messages, max_tokens, draft_off=False):
    """(text, output tokens, verify steps) of one greedy chat completion."""
    extra = {"return_spec_tokens_details": True}
    if draft_off:
        extra["custom_params"] = bench_vllm.DRAFT_OFF
    r = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                       max_tokens=max_tokens, extra_body=extra)
    details = ((r.model_extra or {}).get("sglext") or {}).get("spec_tokens_details") or {}
    if isinstance(details, list):
        details = details[0] if details else {}
    return (r.choices[0].message.content, r.usage.completion_tokens,
            int(details.get("spec_verify_ct", 0) or 0))


def run_config(name, model, cats, plan, max_tokens, log_dir, draft_off=False):
    """``plan``: bench_report.phases (each concurrency's own prompts)."""
    import openai

    flags, options = CONFIGS[name]
    flags = admitting(flags, max(8, *(p.concurrency for p in plan)))
    env = {"SPEC_PLUGINS_OPTIONS": json.dumps(options)} if options is not None else {}
    log = str(Path(log_dir or tempfile.mkdtemp(prefix="bench-")) / f"sglang-{name}.log")
    results = {}
    with sglang_server(model, flags, env=env, log_path=log) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1200)
        one(client, [{"role": "user", "content": "Hello!"}], 16)    # warm-up
        for cat in cats:
            for conc, start, requests in plan:
                outs, dt = send_all(
                    lambda c: one(client, c, max_tokens, draft_off and options is not None),
                    prompts(cat, requests, start), conc)
                tokens = sum(o[1] for o in outs)
                verifies = sum(o[2] for o in outs)
                drafts = verifies and "--speculative-algorithm" in flags
                results[(cat, conc)] = {
                    "tokens": tokens, "seconds": dt, "tok_s": tokens / dt,
                    "mal": tokens / verifies if drafts else None,
                    "steps": verifies if drafts else 0,
                    "outputs": [o[0] for o in outs]}
                print(f"  sglang {name:15s} {cat:10s} c={conc}: {tokens / dt:.1f} tok/s",
                      file=sys.stderr, flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap, list(CONFIGS))
    ap.add_argument("--vllm-configs", nargs="*", default=[], choices=list(bench_vllm.CONFIGS),
                    help="vLLM configurations on the same prompts in the same run")
    a = ap.parse_args()
    resolve_run_args(ap, a, list(CONFIGS), SWEEP_CONFIGS)
    if a.vllm_configs and "vanilla" not in a.vllm_configs:
        a.vllm_configs.insert(0, "vanilla")
    res = {}
    for c in a.configs:
        res[c] = run_config(c, a.model, a.categories, a.plan, a.max_tokens, a.log_dir,
                            a.draft_off)
    vllm = [f"vllm:{c}" for c in a.vllm_configs]
    drafter = None
    for c in a.vllm_configs:
        if drafter is None:
            from spec_plugins.paths import drafter_dir

            drafter = str(drafter_dir(a.model))
        res[f"vllm:{c}"], _ = bench_vllm.run_config(c, a.model, a.categories, a.plan,
                                                    a.max_tokens, a.log_dir, drafter,
                                                    a.draft_off)
    print(f"\nmodel {a.model}, fp32, greedy, max_tokens {a.max_tokens}, requests per "
          "category and concurrency: " + ", ".join(f"{p.requests} at {p.concurrency}"
                                                     for p in a.plan)
          + "; SGLang configs vs SGLang vanilla"
          + (", vllm: configs vs vLLM vanilla" if vllm else "") + "\n")
    rows = rows_of(res, a.configs) + (rows_of(res, vllm, "vllm:vanilla") if vllm else [])
    totals = totals_of(res, a.configs, a.categories, a.concurrency) + (
        totals_of(res, vllm, a.categories, a.concurrency, "vllm:vanilla") if vllm else [])
    print_tables(rows, totals, res, a.configs + vllm)
    if a.json:
        write_json(a.json, rows, totals, {"run": run_info(a, "sglang")})
    if a.plot:
        write_plot(a.plot, totals, "SGLang 0.5.23 (CPU)" + (" and vLLM" if vllm else "")
                   + f", {Path(a.model).name}, greedy, {a.max_tokens}-token answers, "
                   f"{' + '.join(a.categories)} prompts")


if __name__ == "__main__":
    main()
