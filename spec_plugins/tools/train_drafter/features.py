"""Stage 3, the target's features: one transformers forward per sequence with
``output_hidden_states``, the residual stream after each chosen target layer (bf16 on
disk, flat memmaps) and the target's argmax at every position."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spec_plugins.paths import atomic_dir, content_key, training_data_dir
from spec_plugins.tools.train_drafter.console import log, progress
from spec_plugins.tools.train_drafter.generation import Generation

FEATURE_DTYPE = "bfloat16"  # hidden states on disk (half the size of fp32, fp32's range)


class Features:
    """Flat memmaps of the cached data: tokens, per-position target argmax, hidden states."""

    def __init__(self, d: Path):
        meta = json.loads((d / "meta.json").read_text())
        self.dir, self.meta = d, meta
        self.offsets = np.load(d / "offsets.npy")
        self.prompt_lens = np.load(d / "prompt_lens.npy")
        total = int(self.offsets[-1])
        self.tokens = np.memmap(d / "tokens.bin", dtype=np.int32, mode="r", shape=(total,))
        self.preds = np.memmap(d / "preds.bin", dtype=np.int32, mode="r", shape=(total,))
        self.states = np.memmap(d / "states.bin", dtype=np.uint16, mode="r",
                                shape=(total, meta["feature_dim"]))

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def seq(self, i: int, max_len: int):
        import torch
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        b = min(b, a + max_len)
        st = torch.from_numpy(np.array(self.states[a:b])).view(torch.bfloat16)
        return (torch.from_numpy(np.array(self.tokens[a:b], dtype=np.int64)),
                torch.from_numpy(np.array(self.preds[a:b], dtype=np.int64)),
                st.float(), int(self.prompt_lens[i]))


class FeatureSet:
    """Several sources' ``Features`` as one indexable set of sequences."""

    def __init__(self, parts: list[Features], names: list[str]):
        self.parts, self.names = parts, names
        self.index = [(j, i) for j, f in enumerate(parts) for i in range(len(f))]

    def __len__(self) -> int:
        return len(self.index)

    def seq(self, i: int, max_len: int):
        j, k = self.index[i]
        return self.parts[j].seq(k, max_len)

    def source(self, i: int) -> str:
        return self.names[self.index[i][0]]

    def response_labels(self, i: int) -> np.ndarray:
        """The target's predictions over sequence i's response (from its last prompt token)."""
        j, k = self.index[i]
        f = self.parts[j]
        a, b = int(f.offsets[k]) + int(f.prompt_lens[k]), int(f.offsets[k + 1])
        lab = np.asarray(f.preds[max(a - 1, 0):b], dtype=np.int64)
        return lab[lab >= 0]

    def token_ids(self) -> set[int]:
        return set().union(*(np.unique(np.asarray(f.tokens)).tolist() for f in self.parts))

    @property
    def num_tokens(self) -> int:
        return sum(int(f.offsets[-1]) for f in self.parts)


def hidden_states(model_obj, ids, att, deepest: int):
    """The residual stream after each layer 0..deepest (``[i + 1]`` = output of layer i),
    running only layers 0..deepest + 1 (transformers normalises the LAST hidden state it
    returns, so the stack keeps one layer above the deepest one read) and no LM head."""
    body = model_obj.get_decoder() if hasattr(model_obj, "get_decoder") else model_obj.model
    full = body.layers
    if deepest >= len(full) - 1:
        raise ValueError("the deepest target layer must be below the last one")
    keep = min(deepest + 2, len(full))
    body.layers = full[:keep]
    try:
        o = body(input_ids=ids, attention_mask=att, output_hidden_states=True)
    finally:
        body.layers = full
    return o.hidden_states


def extract_features(model_obj, seqs: list[list[int]], prompt_lens: list[int], layers: list[int],
                     out: Path, batch_tokens: int = 2048, forward=None,
                     hidden_size: int | None = None) -> dict:
    """Layer ``-1`` is the input embeddings. ``forward(group, ids, att)``: the hidden-state
    tuple of sequences ``group`` (default: the text model's, :func:`hidden_states`)."""
    import torch
    if forward is None:
        def forward(group, ids, att):
            return hidden_states(model_obj, ids, att, max(layers))
    with atomic_dir(out) as tmp:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        lens = [len(s) for s in seqs]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lens)
        total = int(offsets[-1])
        H = hidden_size or model_obj.config.hidden_size
        F = len(layers) * H
        tokens = np.memmap(tmp / "tokens.bin", dtype=np.int32, mode="w+", shape=(total,))
        preds = np.memmap(tmp / "preds.bin", dtype=np.int32, mode="w+", shape=(total,))
        states = np.memmap(tmp / "states.bin", dtype=np.uint16, mode="w+", shape=(total, F))
        pbar = progress(total, "target features (tokens)")
        t0 = time.time()
        i = 0
        while i < len(order):
            n = max(1, batch_tokens // max(lens[order[i]], 1))
            group = order[i:i + n]
            i += len(group)
            S = max(lens[g] for g in group)
            ids = torch.zeros(len(group), S, dtype=torch.long)
            att = torch.zeros(len(group), S, dtype=torch.long)
            for r, g in enumerate(group):
                ids[r, :lens[g]] = torch.tensor(seqs[g])
                att[r, :lens[g]] = 1
            with torch.no_grad():
                hidden = forward(group, ids, att)
            hs = torch.cat([hidden[l + 1] for l in layers], dim=-1)  # output of layer l
            for r, g in enumerate(group):
                a, L = int(offsets[g]), lens[g]
                tokens[a:a + L] = np.asarray(seqs[g], dtype=np.int32)
                # Labels: the target's argmax at every position. The sequences are the target's
                # own greedy continuations, so past the prompt the argmax at i is token i + 1
                # (checked: 100% agreement between vLLM's fp32 generation and transformers'
                # forward on SmolLM2); the forward skips the LM head and the layers above the
                # deepest one read. The last position's prediction is unknown (-1, ignored).
                preds[a:a + L - 1] = np.asarray(seqs[g][1:], dtype=np.int32)
                preds[a + L - 1] = -1
                states[a:a + L] = hs[r, :L].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                pbar.update(L)
        pbar.close()
        for m in (tokens, preds, states):
            m.flush()
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "prompt_lens.npy", np.asarray(prompt_lens, dtype=np.int32))
        meta = {"feature_dim": F, "layers": layers, "hidden": H, "tokens": total,
                "seconds": time.time() - t0, "dtype": FEATURE_DTYPE}
        (tmp / "meta.json").write_text(json.dumps(meta))
    return meta


def target_features(gen: Generation, target, layers: list[int], max_len: int,
                    source: str) -> tuple[Features, float]:
    """The target's features of ``gen``'s sequences (each cut to ``max_len`` tokens) and
    the seconds spent extracting them now (0 when they came from the cache)."""
    seqs = [(p + o)[:max_len] for p, o in zip(gen.prompt_ids, gen.outputs)]
    plens = [min(len(p), max_len) for p in gen.prompt_ids]
    fdir = training_data_dir() / "feat" / content_key({"gen": gen.key, "layers": layers,
                                                       "max_len": max_len, "v": 2})
    seconds = 0.0
    if not (fdir / "meta.json").exists():
        fdir.parent.mkdir(parents=True, exist_ok=True)
        log(f"target features for {sum(map(len, seqs))} tokens ({source}), layers {layers}")
        seconds = extract_features(target, seqs, plens, layers, fdir)["seconds"]
    else:
        log(f"features cached ({source}): {fdir}")
    return Features(fdir), seconds
