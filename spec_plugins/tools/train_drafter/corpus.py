"""Stage 1, the prompts: text on this machine turned into chat questions and code tasks,
or a text file; which sources and how many from each (``--corpus``); and decontamination
against excluded prompts (a benchmark's). User requests sampled from the target itself
(the ``self`` source) need the target: ``generation.sample_self_prompts``."""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path


def docstrings(limit_files: int = 400) -> list[dict]:
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


def doc_paragraphs(limit: int = 3000) -> list[str]:
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
        docs = docstrings()
        paras = doc_paragraphs()
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


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class Decontaminator:
    """Drops training prompts that match an excluded prompt (e.g. a benchmark's): the same
    word 8-gram, or word-set Jaccard similarity of at least 0.5."""

    N = 8

    def __init__(self, excluded: list[str]):
        self.sets = [set(words(t)) for t in excluded]
        self.grams = set()
        for t in excluded:
            w = words(t)
            self.grams.update(tuple(w[i:i + self.N]) for i in range(len(w) - self.N + 1))

    @classmethod
    def from_file(cls, path: str) -> "Decontaminator":
        data = json.loads(Path(path).read_text()) if path else []
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"--exclude-prompts {path}: expected a JSON list of strings")
        return cls(data)

    def __call__(self, prompt: str) -> bool:
        w = words(prompt)
        ws = set(w)
        if any(tuple(w[i:i + self.N]) in self.grams for i in range(len(w) - self.N + 1)):
            return True
        return any(ex and len(ws & ex) / len(ws | ex) >= 0.5 for ex in self.sets)


def split_heldout(prompts: list[str], exclude_prompts: str, heldout: float,
                  seed: int) -> tuple[list[int], list[int], int]:
    """(training ids, held-out ids, how many were dropped): sequences whose prompt matches
    one in the ``exclude_prompts`` file are dropped; a ``heldout`` share of the rest, drawn
    with ``seed``, is held out (at least one when there are two or more)."""
    excluded = Decontaminator.from_file(exclude_prompts)
    keep = [i for i, p in enumerate(prompts) if not excluded(p)]
    order = list(keep)
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(len(order) * heldout))) if len(order) > 1 else 0
    held, train = sorted(order[:n_held]), sorted(order[n_held:]) or order
    return train, held, len(prompts) - len(keep)
