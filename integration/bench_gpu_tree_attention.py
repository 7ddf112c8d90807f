"""GPU microbenchmark: tree attention for one layer, per path, on the same paged cache.

Paths (``triton`` and ``fi_split`` are spec_plugins', the others the baselines):

- ``triton``: ``spec_plugins.kernels.triton_tree`` (prefix unmasked, tree tiles masked);
- ``fi_split``: FlashInfer, prefix prefill without mask + tree-part prefill with a
  ``T x T`` mask, merged with ``merge_state`` (``spec_plugins.kernels.flashinfer_tree``);
- ``fi_custom``: FlashInfer's plain custom-mask prefill (mask over prefix and tree);
- ``sdpa``: torch SDPA with the same boolean mask, per request over K/V gathered from
  the pages and expanded to the query heads (what a torch fallback does).

Grid: 16/64/256 tree nodes over 1K/4K/16K-token prefixes at batch 1/8/32, Llama-3-8B's
attention shape (32 query heads, 8 KV heads, head_dim 128), bfloat16, 16-token pages,
random trees. Times are medians of ``triton.testing.do_bench`` (L2 flushed between
calls, as a layer's cache is not in L2); plan times are per step (host work included).
Each path's output is checked against SDPA's (``max_err``). The configuration of the
issue's target (64 nodes, 4K prefix, batch 8) runs first; ``--budget-s`` stops starting
new configurations (the rest are listed as skipped).

Writes ``tree_attention_gpu.json`` and, when matplotlib is importable,
``tree_attention_gpu.png`` to ``--out``; ``--plot FILE.json`` redraws the plot from a
JSON anywhere. ``--smoke``: one tiny configuration on the CPU through Triton's
interpreter (FlashInfer paths skip), to exercise this script without a GPU.

    python integration/bench_gpu_tree_attention.py --out $OUT        # on the GPU machine
    python integration/bench_gpu_tree_attention.py --smoke --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

H, KVH, D, PAGE = 32, 8, 128, 16
NODES, PREFIXES, BATCHES = (16, 64, 256), (1024, 4096, 16384), (1, 8, 32)
TARGET = (64, 4096, 8)
PATHS = ("triton", "fi_split", "fi_custom", "sdpa")


def configs(smoke: bool):
    if smoke:
        return [(4, 24, 2), (6, 9, 1)]
    grid = [(n, p, b) for b in BATCHES for p in PREFIXES for n in NODES]
    grid.remove(TARGET)
    return [TARGET] + grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--prefix-backend", default="fa2",
                    help="FlashInfer backend of fi_split's unmasked prefix (fa2, auto)")
    ap.add_argument("--plot", metavar="JSON", help="only redraw the plot of this JSON")
    args = ap.parse_args()
    if args.plot:
        res = json.loads(Path(args.plot).read_text())
        print(plot(res, Path(args.plot).with_suffix(".png")))
        return
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # before Triton is imported
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tree_attention_gpu.json"
    res = run_grid(args, lambda res: path.write_text(json.dumps(res, indent=1)))
    print(f"wrote {path}")
    print(plot(res, out / "tree_attention_gpu.png"))


def run_grid(args, save) -> dict:
    """The grid's results; ``save(results)`` after each configuration (a run cut short
    keeps what it measured)."""
    import numpy as np
    import torch

    from spec_plugins.kernels import flashinfer_tree as fi
    from spec_plugins.kernels import triton_tree as tt
    from spec_plugins.kernels.tree_attention import ancestor_masks

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --smoke")
    h, kvh, d, page = (4, 2, 16, 4) if smoke else (H, KVH, D, PAGE)
    dtype = torch.bfloat16
    scale = d ** -0.5
    fi_reason = fi.unavailable_reason()
    wrappers = {}
    if fi_reason is None:
        wrappers = {"fi_split": fi.Wrappers(device, "split",
                                            prefix_backend=args.prefix_backend),
                    "fi_custom": fi.Wrappers(device, "custom_mask")}

    def timed(fn) -> float:
        fn()                                           # compiles (Triton, FlashInfer JIT)
        if smoke:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))

    def host_ms(fn):
        if not smoke:
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn()
        if not smoke:
            torch.cuda.synchronize()
        return r, (time.perf_counter() - t) * 1e3

    dev = "cpu (Triton interpreter)" if smoke else torch.cuda.get_device_name()
    results, skipped = [], []
    res = dict(device=dev, torch=torch.__version__, triton=_version("triton"),
               flashinfer=_version("flashinfer"), flashinfer_unavailable=fi_reason,
               shape=dict(heads=h, kv_heads=kvh, head_dim=d, page_size=page,
                          dtype=str(dtype)),
               prefix_backend=args.prefix_backend,
               target=dict(zip(("nodes", "prefix", "batch"), TARGET)),
               results=results, skipped=skipped)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for nodes, prefix, batch in configs(smoke):
        if time.perf_counter() - start > args.budget_s:
            skipped.append(dict(nodes=nodes, prefix=prefix, batch=batch))
            continue
        parents = [[-1 if i == 0 else int(rng.integers(-1, i)) for i in range(nodes)]
                   for _ in range(batch)]
        anc = ancestor_masks(parents)
        q_len = nodes + 1
        pages_per = -(-(prefix + q_len) // page)
        n_pages = batch * pages_per
        table = torch.randperm(n_pages, device=device, dtype=torch.int64).to(
            torch.int32).view(batch, pages_per)
        key = torch.randn(n_pages, page, kvh, d, device=device, dtype=dtype)
        value = torch.randn(n_pages, page, kvh, d, device=device, dtype=dtype)
        query = torch.randn(batch * q_len, h, d, device=device, dtype=dtype)
        prefixes = [prefix] * batch
        row = dict(nodes=nodes, prefix=prefix, batch=batch, ms={}, plan_ms={}, max_err={},
                   unavailable={})

        # SDPA: the baseline every output is checked against.
        masks = []
        for m in anc:
            full = torch.ones(q_len, prefix + q_len, dtype=torch.bool)
            full[:, prefix:] = torch.from_numpy(m)
            masks.append(full.to(device))
        pos = torch.arange(prefix + q_len, device=device)

        def sdpa():
            outs = []
            for r in range(batch):
                blk = table[r, pos // page].long()
                k = key[blk, pos % page].repeat_interleave(h // kvh, 1).transpose(0, 1)
                v = value[blk, pos % page].repeat_interleave(h // kvh, 1).transpose(0, 1)
                qr = query[r * q_len:(r + 1) * q_len].transpose(0, 1)
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    qr, k, v, attn_mask=masks[r], scale=scale).transpose(0, 1))
            return torch.cat(outs)

        want = sdpa().float()
        row["ms"]["sdpa"] = timed(sdpa)

        p, row["plan_ms"]["triton"] = host_ms(
            lambda: tt.plan(prefixes, parents, table, page, h, kvh, d, ancestors=anc))
        got = tt.run(p, query, key, value, scale)
        row["max_err"]["triton"] = float((got.float() - want).abs().max())
        row["ms"]["triton"] = timed(lambda: tt.run(p, query, key, value, scale))
        row["triton_splits"] = p.num_splits

        for name, w in wrappers.items():
            fp, row["plan_ms"][name] = host_ms(
                lambda: fi.plan(w, prefixes, parents, table, page, h, kvh, d, dtype, scale,
                                ancestors=anc))
            got = fi.run(fp, query, key, value)
            row["max_err"][name] = float((got.float() - want).abs().max())
            row["ms"][name] = timed(lambda: fi.run(fp, query, key, value))
        if fi_reason is not None:
            row["unavailable"] = {"fi_split": fi_reason, "fi_custom": fi_reason}
        base = row["ms"].get("fi_custom")
        if base:
            row["speedup_vs_fi_custom"] = {k: base / v for k, v in row["ms"].items()}
        print(json.dumps(row), flush=True)
        results.append(row)
        save(res)
        del key, value, query, masks
        if not smoke:
            torch.cuda.empty_cache()

    save(res)
    return res


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def plot(res: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no plot (redraw later with --plot JSON)"
    rows = res["results"]
    batches = sorted({r["batch"] for r in rows})
    prefixes = sorted({r["prefix"] for r in rows})
    fig, axes = plt.subplots(len(batches), len(prefixes), squeeze=False,
                             figsize=(4 * len(prefixes), 3.2 * len(batches)))
    for i, b in enumerate(batches):
        for j, pre in enumerate(prefixes):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["batch"] == b and r["prefix"] == pre),
                         key=lambda r: r["nodes"])
            for name in PATHS:
                pts = [(r["nodes"], r["ms"][name]) for r in sel if name in r["ms"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"batch {b}, prefix {pre}", fontsize=9)
            ax.set_xlabel("tree nodes")
            ax.set_ylabel("ms per layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"tree attention per layer, {res['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


if __name__ == "__main__":
    main()
