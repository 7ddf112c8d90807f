"""Phases, tables, JSON and plots of a benchmark run (shared by ``bench_vllm.py`` and
``bench_sglang.py``).

``res[config][(category, concurrency)]`` holds ``tokens``, ``seconds``, ``tok_s``, ``mal``
(mean acceptance length or None), ``steps`` (the verify steps ``mal`` is an average over),
``outputs`` and optionally ``preemptions``; ``res[config]["per_position"]`` optionally the
share of drafts accepted through each position. The first config of ``baseline``
(default ``vanilla``) is what speedups and identical outputs compare to.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

from integration.prompts import ALL, CATEGORIES, MIX, size

# --sweep: the concurrencies operators run at.
SWEEP_CONCURRENCY = [1, 4, 8, 16, 32, 64]


class Phase(NamedTuple):
    """One concurrency level of a run: ``requests`` prompts from the ``start``-th on."""
    concurrency: int
    start: int
    requests: int


def phases(concurrencies, n: int, per_client: int = 0) -> list[Phase]:
    """Each concurrency's share of the prompts: ``max(n, per_client * c)`` requests (enough
    to keep ``c`` in flight for a while), after every earlier phase's (a method with a
    cross-request cache must not be measured on outputs it has just served)."""
    out, start = [], 0
    for c in concurrencies:
        k = max(n, per_client * c)
        out.append(Phase(c, start, k))
        start += k
    return out


def add_run_args(ap, configs: list[str]) -> None:
    """The flags both benchmarks take; ``resolve_run_args`` fills in the defaults."""
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--configs", nargs="+", default=None, choices=configs,
                    help="default: all (--sweep: the engine's SWEEP_CONFIGS); vanilla is added")
    ap.add_argument("--categories", nargs="+", default=None, choices=ALL,
                    help=f"default: {' '.join(CATEGORIES)} (--sweep: {MIX}, the three in turn)")
    ap.add_argument("--n", type=int, default=8, help="prompts per category and concurrency "
                    "(at least; see --per-client)")
    ap.add_argument("--per-client", type=int, default=None, help="at concurrency c, send "
                    "max(n, PER_CLIENT * c) requests (keeps c in flight for a while; "
                    "default 0, --sweep 2)")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="default: 1 8 (--sweep: " + " ".join(map(str, SWEEP_CONCURRENCY)) + ")")
    ap.add_argument("--sweep", action="store_true", help="the concurrency curve: the "
                    "defaults of --configs, --categories, --concurrency and --per-client above")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--plot", default=None, help="write tok/s, the ratio to vanilla and the "
                    "mean acceptance length per concurrency here (.png or .svg; needs "
                    "matplotlib: pip install -e '.[bench]')")
    ap.add_argument("--log-dir", default=None, help="keep each server's log here")
    ap.add_argument("--draft-off", action="store_true", help="every request asks for no "
                    "drafts (spec_plugins_max_draft_tokens 0): what each method costs when it "
                    "does not draft")


def resolve_run_args(ap, a, configs: list[str], sweep_configs: list[str]) -> None:
    """``add_run_args``' defaults (the --sweep preset where asked), the default model,
    ``a.plan`` (the phases); errors before any server starts where prompts or matplotlib
    would run out mid-run."""
    a.configs = a.configs or list(sweep_configs if a.sweep else configs)
    if "vanilla" not in a.configs:
        a.configs.insert(0, "vanilla")
    a.categories = a.categories or ([MIX] if a.sweep else list(CATEGORIES))
    a.concurrency = a.concurrency or (SWEEP_CONCURRENCY if a.sweep else [1, 8])
    a.per_client = (2 if a.sweep else 0) if a.per_client is None else a.per_client
    a.plan = phases(a.concurrency, a.n, a.per_client)
    needed = a.plan[-1].start + a.plan[-1].requests
    for cat in a.categories:
        if needed > size(cat):
            ap.error(f"{needed} prompts needed, category {cat} has {size(cat)} (fewer --n, "
                     f"--per-client or concurrencies; {MIX} has the most)")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib: pip install -e '.[bench]'")
    if a.model is None:
        from spec_plugins.tools.default_model import build

        a.model = str(build())
    if a.log_dir:
        Path(a.log_dir).mkdir(parents=True, exist_ok=True)


def run_info(a, engine: str) -> dict:
    """What a run's JSON needs to say how it was made."""
    return {"engine": engine, "model": a.model, "max_tokens": a.max_tokens,
            "categories": a.categories, "draft_off": a.draft_off,
            "phases": [p._asdict() for p in a.plan]}


def send_all(send: Callable, convs: list, concurrency: int) -> tuple[list, float]:
    """``send(conv)`` for every conversation, ``concurrency`` in flight (that many workers
    take the next conversation as they finish one): outputs in ``convs`` order, seconds."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(send, convs))
    return outs, time.perf_counter() - t0


def rows_of(res: dict, configs, baseline: str = "vanilla") -> list[dict]:
    rows = []
    for c in configs:
        for key, r in res[c].items():
            if not isinstance(key, tuple):
                continue
            cat, conc = key
            base = res[baseline][key]
            same = sum(x == y for x, y in zip(r["outputs"], base["outputs"]))
            rows.append(dict(config=c, category=cat, concurrency=conc,
                             requests=len(r["outputs"]), tok_s=r["tok_s"],
                             speedup=r["tok_s"] / base["tok_s"], mal=r["mal"],
                             identical=same / len(base["outputs"]),
                             preemptions=r.get("preemptions")))
    return rows


def totals_of(res: dict, configs, categories, concurrencies,
              baseline: str = "vanilla") -> list[dict]:
    """Per config and concurrency over all categories: total tokens over total time; the
    mean acceptance length over all their verify steps."""
    out = []
    for c in configs:
        for conc in concurrencies:
            rs = [res[c][(cat, conc)] for cat in categories]
            bs = [res[baseline][(cat, conc)] for cat in categories]
            tps = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
            btps = sum(r["tokens"] for r in bs) / sum(r["seconds"] for r in bs)
            same = sum(x == y for r, b in zip(rs, bs) for x, y in zip(r["outputs"], b["outputs"]))
            total = sum(len(b["outputs"]) for b in bs)
            steps = sum(r.get("steps") or 0 for r in rs)
            mal = (sum(r["mal"] * (r.get("steps") or 0) for r in rs if r["mal"] is not None)
                   / steps if steps else None)
            pre = [r.get("preemptions") for r in rs]
            out.append(dict(config=c, concurrency=conc, requests=total, tok_s=tps,
                            speedup=tps / btps, mal=mal, identical=same / total,
                            preemptions=None if None in pre else sum(pre)))
    return out


def print_tables(rows: list[dict], totals: list[dict], res: dict, configs) -> None:
    print("| config | category | concurrency | tok/s | speedup | mean acc. len | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mal = "-" if r["mal"] is None else f"{r['mal']:.2f}"
        print(f"| {r['config']} | {r['category']} | {r['concurrency']} | {r['tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {mal} | {100 * r['identical']:.0f}% |")
    print("\n| config | concurrency | requests | tok/s (all categories) | speedup | mean acc. len "
          "| identical | preemptions |")
    print("|---|---|---|---|---|---|---|---|")
    for t in totals:
        mal = "-" if t["mal"] is None else f"{t['mal']:.2f}"
        pre = "-" if t["preemptions"] is None else f"{t['preemptions']:.0f}"
        print(f"| {t['config']} | {t['concurrency']} | {t['requests']} | {t['tok_s']:.1f} | "
              f"{t['speedup']:.2f}x | {mal} | {100 * t['identical']:.0f}% | {pre} |")
    for c in configs:
        if res[c].get("per_position"):
            print(f"\n{c}: drafts accepted through draft position 1..k (whole run): " +
                  " ".join(f"{p:.2f}" for p in res[c]["per_position"]))


def write_json(path: str, rows, totals, extra: dict | None = None) -> None:
    Path(path).write_text(json.dumps({"rows": rows, "totals": totals, **(extra or {})},
                                     indent=1))


def write_plot(path: str, totals: list[dict], title: str) -> None:
    """Per concurrency (all categories): tok/s, the ratio to vanilla and the mean acceptance
    length, one line per config; the format from ``path``'s suffix (.png, .svg, .pdf).
    Needs matplotlib (the ``bench`` extra)."""
    from matplotlib.figure import Figure    # no pyplot: no GUI backend, no global state

    configs = list(dict.fromkeys(t["config"] for t in totals))
    concs = sorted({t["concurrency"] for t in totals})
    fig = Figure(figsize=(17, 5.5), layout="constrained")
    panels = fig.subplots(1, 3)
    for ax, key, label, name in zip(
            panels, ("tok_s", "speedup", "mal"),
            ("output tok/s", "tok/s / vanilla's", "mean acceptance length"),
            ("throughput", "ratio to vanilla (same engine)", "tokens per verify step "
             "(configs that draft)")):
        for i, c in enumerate(configs):
            pts = [(t["concurrency"], t[key]) for t in totals
                   if t["config"] == c and t[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=c, color=f"C{i % 10}",
                        linestyle="-" if i < 10 else "--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.minorticks_off()
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    panels[1].axhline(1.0, color="black", linewidth=0.8)
    panels[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
