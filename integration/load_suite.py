"""Load and fault suite: many concurrent clients with a mixed, bursty load against a real
server per configuration, vanilla first, with a KV cache small enough to force
preemption; every deterministic output must equal vanilla's.

The mix (seeded, the same for every configuration): greedy; greedy with a stop string;
greedy with logprobs; greedy JSON-schema structured output; greedy with a long prompt
near ``max_model_len``; greedy with frequency/presence penalties; seeded sampling; seeded
sampling with ``n=2``; and streamed requests the client abandons mid-flight (the server
aborts them). Per configuration: requests, errors (and which), lost requests, greedy
outputs identical to vanilla's, p50/p99 latency, output tok/s, whether the server is
healthy afterwards and its memory back at the level it had after warm-up.

    python -m integration.load_suite                            # vanilla + suffix tree, 64 clients
    python -m integration.load_suite --configs vanilla suffix-chain recycling-tree dflash-tree
    python -m integration.load_suite --clients 12 --requests 36 --kv-bytes 112M   # small
    python -m integration.load_suite --engine sglang --configs vanilla suffix-tree recycling-tree
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from integration.bench_vllm import CONFIGS, FLAGS, with_drafter
from integration.prompts import prompts
from integration.vllm_server import counter, healthy, process_tree_rss, vllm_server

MAX_MODEL_LEN = 2048
# Deterministic kinds: their outputs must equal vanilla's.
GREEDY_KINDS = ("greedy", "stop", "logprobs", "json", "long", "penalties")
KINDS = GREEDY_KINDS + ("sampled", "sampled_n2", "abandoned")
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                                "year": {"type": "integer"}},
               "required": ["name", "year"]}


def request_mix(n: int, seed: int = 0) -> list[dict]:
    """``n`` requests of every kind in turn, over the benchmark's prompt categories."""
    rng = random.Random(seed)
    pool = prompts("code_edit", 8) + prompts("humaneval", 8) + prompts("chat", 8)
    long_text = " ".join(m["content"] for c in prompts("code_edit", 8) for m in c)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        messages = pool[rng.randrange(len(pool))]
        req: dict = {"kind": kind, "messages": messages, "max_tokens": 64}
        if kind == "stop":
            req["stop"] = ["\n\n"]
        elif kind == "logprobs":
            req.update(logprobs=True, top_logprobs=3)
        elif kind == "json":
            req["messages"] = [{"role": "user", "content": "Give a famous person's name and "
                                                           "birth year as JSON."}]
            req["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "person", "schema": JSON_SCHEMA}}
        elif kind == "long":
            # About 1700 tokens of prompt: near max_model_len with the output.
            req["messages"] = [{"role": "user", "content": long_text[:6000] +
                                "\n\nSummarise the code above."}]
        elif kind == "penalties":
            req.update(frequency_penalty=0.5, presence_penalty=0.3)
        elif kind in ("sampled", "sampled_n2"):
            req.update(temperature=0.8, seed=1000 + i)
            if kind == "sampled_n2":
                req["n"] = 2
        elif kind == "abandoned":
            req["abandon_after"] = 2 + rng.randrange(6)
        out.append(req)
    return out


def send(client, req: dict) -> dict:
    kind = req["kind"]
    kw = {k: v for k, v in req.items() if k not in ("kind", "messages", "abandon_after")}
    kw.setdefault("temperature", 0)
    t0 = time.perf_counter()
    try:
        if kind == "abandoned":
            stream = client.chat.completions.create(model="default", messages=req["messages"],
                                                    stream=True, **kw)
            for k, _ in enumerate(stream):
                if k + 1 >= req["abandon_after"]:
                    break
            stream.close()
            return {"kind": kind, "ok": True, "seconds": time.perf_counter() - t0,
                    "tokens": 0, "output": None}
        r = client.chat.completions.create(model="default", messages=req["messages"], **kw)
        outputs = [c.message.content for c in r.choices]
        return {"kind": kind, "ok": True, "seconds": time.perf_counter() - t0,
                "tokens": r.usage.completion_tokens, "output": outputs}
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return {"kind": kind, "ok": False, "seconds": time.perf_counter() - t0,
                "tokens": 0, "output": None,
                "error": (f"{type(e).__name__}: {e}"
                          + (f" ({e.__cause__!r})" if e.__cause__ else ""))[:300]}


def vllm_engine(name: str, model: str, clients: int, kv: str, drafter: str, log: str | None):
    """A vLLM server for configuration ``name`` (bench_vllm's) with ``kv`` bytes of KV cache."""
    spec, extra = (with_drafter(c, drafter) for c in CONFIGS[name])
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", kv,
             "--max-num-seqs", str(clients), *FLAGS.get(name, [])]
    return vllm_server(model, spec, extra, extra=flags, log_path=log)


def sglang_engine(name: str, model: str, clients: int, kv: str, drafter: str, log: str | None):
    """An SGLang server for configuration ``name`` (bench_sglang's) with ``kv`` tokens of
    KV pool."""
    from integration.bench_sglang import CONFIGS as SGLANG_CONFIGS
    from integration.bench_sglang import admitting
    from integration.sglang_server import sglang_server

    args, options = SGLANG_CONFIGS[name]
    args = admitting(args, clients)
    # SGLang admits a request only with room for its whole output by default; a low
    # conservativeness admits more, so that decoding runs out of KV and retracts some.
    args += ["--context-length", str(MAX_MODEL_LEN), "--max-total-tokens", kv,
             "--schedule-conservativeness", "0.05", "--enable-metrics"]
    env = {"SPEC_PLUGINS_OPTIONS": json.dumps(options)} if options else None
    return sglang_server(model, args, env=env, log_path=log)


# Per engine: the server, its preemption counter, its configurations, the default KV size.
ENGINES = {
    "vllm": (vllm_engine, "vllm:num_preemptions_total", list(CONFIGS), "160M"),
    "sglang": (sglang_engine, "sglang:num_retracted_requests_total",
               ["vanilla", "ngram", "suffix-chain", "suffix-tree", "recycling-chain",
                "recycling-tree"], "2600"),
}


def run_config(name: str, model: str, mix: list[dict], clients: int, kv_bytes: str,
               drafter: str, log_dir: str | None, engine: str = "vllm",
               rounds: int = 1) -> dict:
    import httpx
    import openai

    server, preemption_counter, _, _ = ENGINES[engine]
    log = str(Path(log_dir) / f"load-{engine}-{name}.log") if log_dir else None
    with server(name, model, clients, kv_bytes, drafter, log) as url:
        # The engines' HTTP servers drop a keep-alive connection after 5 idle seconds;
        # a client that reuses one at that instant gets a connection error that is the
        # client's race, not the server's fault. Reusing only connections idle < 1 s
        # leaves every remaining connection error a finding.
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1800,
                               max_retries=0, http_client=openai.DefaultHttpxClient(
                                   limits=httpx.Limits(keepalive_expiry=1.0)))
        send(client, {"kind": "greedy", "messages": mix[0]["messages"], "max_tokens": 8})
        rss0 = process_tree_rss(url.pid)
        pre0 = counter(url, preemption_counter)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda r: send(client, r), mix))
        wall = time.perf_counter() - t0
        time.sleep(5)   # let aborted requests drain
        alive = healthy(url)
        rss1 = process_tree_rss(url.pid)
        rss2 = None
        if alive and rounds > 1:
            # The same load again: bounded caches (prefix cache, a method's cross-request
            # state) are full after the first round, so a second round must not grow.
            with ThreadPoolExecutor(clients) as pool:
                again = list(pool.map(lambda r: send(client, r), mix))
            time.sleep(5)
            alive = healthy(url)
            rss2 = process_tree_rss(url.pid)
            results_again = [x for x in again if not x["ok"]]
            results += results_again
        preempted = counter(url, preemption_counter) - pre0 if alive else None
    lat = sorted(r["seconds"] for r in results if r["ok"] and r["kind"] != "abandoned")
    return {"results": results, "requests": len(mix), "wall": wall, "healthy": alive,
            "rss_before": rss0,
            "rss_after": rss1, "rss_again": rss2, "preemptions": preempted,
            "p50": statistics.median(lat) if lat else None,
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "tok_s": sum(r["tokens"] for r in results) / wall}


def mix_of(r: dict) -> list[dict]:
    """The first round's results (a second round only adds its failures)."""
    return r["results"][:r["requests"]]


def report(res: dict, configs: list[str]) -> list[str]:
    """Print the table; return the problems found (empty: the suite passes)."""
    base = mix_of(res["vanilla"])
    problems = []
    print("| config | requests | errors | greedy identical | p50 s | p99 s | tok/s | preemptions "
          "| healthy | memory after / before | after a second round / after the first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for c in configs:
        r = res[c]
        errors = [x for x in r["results"] if not x["ok"]]
        pairs = [(x, v) for x, v in zip(mix_of(r), base)
                 if x["kind"] in GREEDY_KINDS and x["ok"] and v["ok"]]
        same = sum(x["output"] == v["output"] for x, v in pairs)
        mem = r["rss_after"] / max(r["rss_before"], 1)
        again = r["rss_again"] / max(r["rss_after"], 1) if r.get("rss_again") else None
        print(f"| {c} | {len(mix_of(r))} | {len(errors)} | {same}/{len(pairs)} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} | {r['tok_s']:.1f} | {r['preemptions']} | "
              f"{r['healthy']} | {mem:.3f} | {'-' if again is None else f'{again:.3f}'} |")
        if not r["preemptions"]:
            problems.append(f"{c}: no request was preempted (a smaller --kv-bytes tests more)")
        vanilla_ok = {i for i, v in enumerate(base) if v["ok"]}
        lost = [i for i, x in enumerate(mix_of(r)) if i in vanilla_ok and not x["ok"]]
        if len(r["results"]) > r["requests"]:
            problems.append(f"{c}: {len(r['results']) - r['requests']} requests of the second "
                            "round failed")
        if lost:
            problems.append(f"{c}: {len(lost)} requests failed that vanilla answered, e.g. "
                            f"a {r['results'][lost[0]]['kind']} request after "
                            f"{r['results'][lost[0]]['seconds']:.1f} s: "
                            f"{r['results'][lost[0]].get('error')}")
        if same != len(pairs):
            kinds = sorted({x["kind"] for x, v in pairs if x["output"] != v["output"]})
            problems.append(f"{c}: {len(pairs) - same} greedy outputs differ from vanilla's "
                            f"(kinds: {', '.join(kinds)})")
        if not r["healthy"]:
            problems.append(f"{c}: server unhealthy after the load")
        if again is not None:
            # Growth across identical rounds beyond the engine's own (vanilla's: allocator,
            # prefix cache) is a leak; the first round fills bounded caches.
            base_again = (res["vanilla"]["rss_again"] or 0) / max(res["vanilla"]["rss_after"], 1)
            if again > max(base_again, 1.0) + 0.02:
                problems.append(f"{c}: memory grew {again:.3f}x over a second identical round "
                                f"(vanilla {base_again:.3f}x)")
        elif mem > 1.10:
            problems.append(f"{c}: memory {mem:.2f}x its level after warm-up")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", choices=list(ENGINES), default="vllm")
    ap.add_argument("--configs", nargs="+", default=["vanilla", "suffix-tree"],
                    help="configurations: bench_vllm.py's (vLLM) or bench_sglang.py's (SGLang)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--kv-bytes", default=None, help="KV cache, small to force preemption: "
                    "vLLM bytes (default 160M; at least one max_model_len sequence, ~95 MB for "
                    "the default model), SGLang tokens (default 2600)")
    ap.add_argument("--rounds", type=int, default=2, help="the load again on the same "
                    "server: memory must not grow over the second round")
    ap.add_argument("--json", default=None)
    ap.add_argument("--log-dir", default=None)
    a = ap.parse_args()
    _, _, allowed, default_kv = ENGINES[a.engine]
    bad = [c for c in a.configs if c not in allowed]
    if bad:
        ap.error(f"--configs {bad} unknown for {a.engine}; allowed: {', '.join(allowed)}")
    a.kv_bytes = a.kv_bytes or default_kv
    if a.model is None:
        from spec_plugins.tools.default_model import build

        a.model = str(build())
    from spec_plugins.paths import drafter_dir

    drafter = str(drafter_dir(a.model))
    if "vanilla" not in a.configs:
        a.configs.insert(0, "vanilla")
    if a.log_dir:
        Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    mix = request_mix(a.requests)
    res = {}
    for c in a.configs:
        res[c] = run_config(c, a.model, mix, a.clients, a.kv_bytes, drafter, a.log_dir,
                            a.engine, a.rounds)
        print(f"  {c}: {sum(not x['ok'] for x in res[c]['results'])} errors, "
              f"{res[c]['wall']:.0f} s", file=sys.stderr, flush=True)
    problems = report(res, a.configs)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
