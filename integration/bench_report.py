"""Tables, JSON and a plot from a benchmark run (shared by ``bench_vllm.py`` and
``bench_sglang.py``).

``res[config][(category, concurrency)]`` holds ``tokens``, ``seconds``, ``tok_s``, ``mal``
(mean acceptance length or None) and ``outputs``; ``res[config]["per_position"]``
optionally the share of drafts accepted through each position. The first config of
``baseline`` (default ``vanilla``) is what speedups and identical outputs compare to.
"""

from __future__ import annotations

import json
from pathlib import Path


def rows_of(res: dict, configs, baseline: str = "vanilla") -> list[dict]:
    rows = []
    for c in configs:
        for key, r in res[c].items():
            if not isinstance(key, tuple):
                continue
            cat, conc = key
            base = res[baseline][key]
            same = sum(x == y for x, y in zip(r["outputs"], base["outputs"]))
            rows.append(dict(config=c, category=cat, concurrency=conc, tok_s=r["tok_s"],
                             speedup=r["tok_s"] / base["tok_s"], mal=r["mal"],
                             identical=same / len(base["outputs"])))
    return rows


def totals_of(res: dict, configs, categories, concurrencies,
              baseline: str = "vanilla") -> list[dict]:
    """Per config and concurrency over all categories: total tokens over total time."""
    out = []
    for c in configs:
        for conc in concurrencies:
            rs = [res[c][(cat, conc)] for cat in categories]
            bs = [res[baseline][(cat, conc)] for cat in categories]
            tps = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
            btps = sum(r["tokens"] for r in bs) / sum(r["seconds"] for r in bs)
            same = sum(x == y for r, b in zip(rs, bs) for x, y in zip(r["outputs"], b["outputs"]))
            total = sum(len(b["outputs"]) for b in bs)
            out.append(dict(config=c, concurrency=conc, tok_s=tps, speedup=tps / btps,
                            identical=same / total))
    return out


def print_tables(rows: list[dict], totals: list[dict], res: dict, configs) -> None:
    print("| config | category | concurrency | tok/s | speedup | mean acc. len | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mal = "-" if r["mal"] is None else f"{r['mal']:.2f}"
        print(f"| {r['config']} | {r['category']} | {r['concurrency']} | {r['tok_s']:.1f} | "
              f"{r['speedup']:.2f}x | {mal} | {100 * r['identical']:.0f}% |")
    print("\n| config | concurrency | tok/s (all categories) | speedup | identical |")
    print("|---|---|---|---|---|")
    for t in totals:
        print(f"| {t['config']} | {t['concurrency']} | {t['tok_s']:.1f} | {t['speedup']:.2f}x | "
              f"{100 * t['identical']:.0f}% |")
    for c in configs:
        if res[c].get("per_position"):
            print(f"\n{c}: drafts accepted through draft position 1..k (whole run): " +
                  " ".join(f"{p:.2f}" for p in res[c]["per_position"]))


def write_json(path: str, rows, totals, extra: dict | None = None) -> None:
    Path(path).write_text(json.dumps({"rows": rows, "totals": totals, **(extra or {})},
                                     indent=1))


def write_svg(path: str, rows: list[dict], title: str) -> None:
    """Grouped bars per category and concurrency: tok/s per config (its mean acceptance
    length written on the bar). Plain SVG: no plotting library needed."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    groups = list(dict.fromkeys((r["category"], r["concurrency"]) for r in rows))
    by = {(r["config"], r["category"], r["concurrency"]): r for r in rows}
    top = max(r["tok_s"] for r in rows) * 1.15
    bw, gap, h, left, base_y = 14, 24, 260, 50, 300
    width = left + len(groups) * (len(configs) * bw + gap) + 200
    colors = ["#888888", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
              "#e377c2", "#17becf", "#bcbd22"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{base_y + 70}" '
           'font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="16" font-size="13">{title}</text>',
           f'<line x1="{left}" y1="{base_y}" x2="{width - 200}" y2="{base_y}" stroke="black"/>',
           f'<text x="4" y="{base_y - h}" >{top:.0f}</text><text x="4" y="{base_y}">0</text>',
           f'<text x="4" y="{base_y - h - 12}">tok/s</text>']
    x = left + gap / 2
    for cat, conc in groups:
        for i, c in enumerate(configs):
            r = by.get((c, cat, conc))
            if r is None:
                continue
            bh = h * r["tok_s"] / top
            out.append(f'<rect x="{x + i * bw:.1f}" y="{base_y - bh:.1f}" width="{bw - 2}" '
                       f'height="{bh:.1f}" fill="{colors[i % len(colors)]}"><title>{c} '
                       f'{cat} c={conc}: {r["tok_s"]:.1f} tok/s, {r["speedup"]:.2f}x'
                       '</title></rect>')
            if r["mal"] is not None:
                out.append(f'<text x="{x + i * bw + 1:.1f}" y="{base_y - bh - 3:.1f}" '
                           f'font-size="7">{r["mal"]:.1f}</text>')
        out.append(f'<text x="{x:.1f}" y="{base_y + 14}">{cat} c={conc}</text>')
        x += len(configs) * bw + gap
    for i, c in enumerate(configs):
        y = 40 + 14 * i
        out.append(f'<rect x="{width - 190}" y="{y - 9}" width="10" height="10" '
                   f'fill="{colors[i % len(colors)]}"/><text x="{width - 175}" y="{y}">{c}</text>')
    out.append(f'<text x="{left}" y="{base_y + 32}">numbers on bars: mean acceptance '
               'length</text></svg>')
    Path(path).write_text("\n".join(out))
