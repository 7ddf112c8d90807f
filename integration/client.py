"""OpenAI-client helpers shared by the end-to-end tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from integration.prompts import prompts

MAX_TOKENS = 64
# What SGLang needs in a request's extra_body to return the output's token ids.
SGLANG_IDS = {"return_output_ids_in_sglext": True}
CONVERSATIONS = prompts("code_edit", 4) + prompts("humaneval", 2) + prompts("chat", 2)
# The conversations a speculating server is also sent one at a time: one or two of each
# kind (the single-request path; all eight also go concurrently). Vanilla runs all alone.
ALONE = (0, 1, 4, 6)


def complete(url, messages, **kw) -> list[int]:
    """Token ids of one chat completion: vLLM returns them with ``return_token_ids``,
    SGLang in ``sglext.output_ids`` when asked (``SGLANG_IDS``, through ``extra_body``)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)
    extra = {"return_token_ids": True, **kw.pop("extra_body", {})}
    r = client.chat.completions.create(model="default", messages=messages,
                                       max_tokens=kw.pop("max_tokens", MAX_TOKENS),
                                       extra_body=extra, **kw)
    ids = getattr(r.choices[0], "token_ids", None)
    if ids is None:
        sgl = ((r.model_extra or {}).get("sglext") or {}).get("output_ids")
        ids = sgl[0] if sgl else None
    # Outputs are compared as token ids: text would hide tokenisation differences.
    assert ids is not None, "the response has no token ids (SGLang needs extra_body=SGLANG_IDS)"
    return list(ids)


def run_all(url, conversations=CONVERSATIONS, alone=None, send=None, **kw):
    """Greedy outputs one request at a time (the conversations indexed by ``alone``,
    default all), then all of them concurrently; ``send``: ``complete`` (default) or
    ``sglang_complete`` (then each output is (ids, SGLang's speculation figures)).

    The concurrent requests arrive shortest prompt first and longest second, the rest
    after them, so that a server with ``vllm_server.PREEMPTING_CACHE`` preempts: those two
    are admitted first and fill the cache's blocks between them, and the first block
    either needs comes from a preemption. Sent all at once, long image prompts were
    admitted one or two at a time and each finished in the blocks it held."""
    import time

    send = send or complete
    alone = range(len(conversations)) if alone is None else alone
    batch1 = [send(url, conversations[i], temperature=0, **kw) for i in alone]
    by_length = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    first, second = by_length[0], by_length[-1]
    rest = [i for i in range(len(conversations)) if i not in (first, second)]
    with ThreadPoolExecutor(len(conversations)) as pool:
        futures = {}
        for i in [first, second] + rest:
            futures[i] = pool.submit(send, url, conversations[i], temperature=0, **kw)
            if i in (first, second):
                time.sleep(0.3)  # arrival order is admission order (FCFS)
        batch8 = [futures[i].result() for i in range(len(conversations))]
    return batch1, batch8


def check_greedy_equal(url, vanilla, label: str, conversations=CONVERSATIONS,
                       alone=ALONE, **kw) -> None:
    """A speculating server's greedy outputs equal vanilla's (``vanilla``: its batch-1 and
    concurrent outputs of every conversation): ``alone`` one at a time, then all at once."""
    batch1, batch8 = run_all(url, conversations, alone, **kw)
    for i, got in zip(alone, batch1):
        assert got == vanilla[0][i], f"{label}, batch 1, prompt {i}: output differs from vanilla"
    assert_outputs_equal(vanilla[1], batch8, f"{label}, {len(conversations)} concurrent")


def assert_outputs_equal(expected, got, label: str) -> None:
    """Per prompt, token for token (``label`` says which run, for the message)."""
    assert len(expected) == len(got), f"{label}: {len(got)} outputs, expected {len(expected)}"
    for i, (v, s) in enumerate(zip(expected, got)):
        assert s == v, f"{label}, prompt {i}: output differs from vanilla"


def check_aborts_leave_others_intact(url, vanilla, conversations=CONVERSATIONS, **kw) -> None:
    """Abort the first half of the conversations mid-stream while the other half runs:
    those must equal vanilla's concurrent outputs; then the aborted prompts, re-sent (their
    cached blocks reused by prefix caching), must equal vanilla's batch-1 outputs.
    ``kw``: more request arguments (SGLang: ``extra_body=SGLANG_IDS``)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)

    def abandoned(messages):
        stream = client.chat.completions.create(model="default", messages=messages,
                                                max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True)
        for k, _ in enumerate(stream):
            if k == 6:
                break
        stream.close()  # the server aborts the request mid-generation

    half = len(conversations) // 2
    with ThreadPoolExecutor(len(conversations)) as pool:
        aborted = [pool.submit(abandoned, m) for m in conversations[:half]]
        kept = [pool.submit(complete, url, m, temperature=0, **kw) for m in conversations[half:]]
        for f in aborted:
            f.result()
        for i, f in enumerate(kept):
            assert f.result() == vanilla[1][half + i], f"prompt {half + i} changed by aborts"
    for i in range(half):
        assert complete(url, conversations[i], temperature=0, **kw) == vanilla[0][i], \
            f"prompt {i} re-sent after its abort"


# Two seeds for sampled requests; seeded outputs differ from greedy ones and between seeds.
SEEDS = (1234, 4321)
# Tokens per request of the seeded check: half of MAX_TOKENS, plenty for two seeds to
# answer apart, and its 19 requests cost half the time.
SEEDED_TOKENS = 32


def check_seeded(url, seeded=None, traffic=CONVERSATIONS, temperature: float = 0.8,
                 **kw) -> None:
    """Seeded sampling is reproducible whatever else the server did, and really samples.
    The seeded request is sent cold (a prompt nothing else sent; ``seeded``, default a
    chat prompt outside ``CONVERSATIONS``), with another seed, then again after concurrent
    traffic (greedy, sampled and seeded requests) that includes it three times, so every
    cross-request state (a suffix tree of earlier outputs, token recycling's matrix,
    drafter caches, calibration, the prefix cache) holds its continuations by then and
    the second run's drafts are accepted: a method whose drafts for the seeded request
    depended on that state would verify other drafts, draw other random numbers, and
    answer otherwise. The seeds answer differently and neither answer is greedy's.
    ``kw``: more request arguments (SGLang: ``extra_body=SGLANG_IDS``)."""
    seeded = seeded or prompts("chat", 1, start=4)[0]
    kw.setdefault("max_tokens", SEEDED_TOKENS)

    def sample(seed):
        return complete(url, seeded, temperature=temperature, seed=seed, **kw)

    first, other = sample(SEEDS[0]), sample(SEEDS[1])
    kinds = ({"temperature": 0}, {"temperature": 0.9}, {"temperature": 0.7, "seed": 11})
    sent = [(m, kinds[i % 3]) for i, m in enumerate(list(traffic) + [seeded] * 3)]
    with ThreadPoolExecutor(len(sent)) as pool:
        list(pool.map(lambda a: complete(url, a[0], **a[1], **kw), sent))
    assert sample(SEEDS[0]) == first, f"seed {SEEDS[0]}: another output after other traffic"
    assert first != other, f"seeds {SEEDS}: the same output (is the seed ignored?)"
    assert complete(url, seeded, temperature=0, **kw) not in (first, other), \
        "a sampled output equals the greedy one"


def banned_token(tokens):
    """The most frequent token of an output: banning it changes the output early."""
    return max(set(tokens), key=tokens.count)


def sglang_complete(url, messages, **kw) -> tuple[list[int], dict]:
    """One SGLang chat completion: output token ids and SGLang's per-request speculation
    figures (``spec_accept_length``: output tokens per verify step,
    ``spec_num_correct_drafts``, ``spec_verify_ct``; empty without speculation)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600)
    r = client.chat.completions.create(
        model="default", messages=messages, max_tokens=kw.pop("max_tokens", MAX_TOKENS),
        extra_body={**SGLANG_IDS, "return_spec_tokens_details": True,
                    **kw.pop("extra_body", {})}, **kw)
    ext = (r.model_extra or {}).get("sglext") or {}
    details = ext.get("spec_tokens_details") or {}
    return ext["output_ids"][0], (details[0] if isinstance(details, list) else details)
