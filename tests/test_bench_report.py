"""The benchmarks' pure parts: phases of a concurrency sweep, the request pool, distinct
prompts per phase, and the rows/totals their JSON and plots are made of."""

import argparse
import threading
import time

import pytest

from integration.bench_report import (SWEEP_CONCURRENCY, add_run_args, phases,
                                      resolve_run_args, rows_of, send_all, totals_of)
from integration.prompts import CATEGORIES, MIX, prompts, size


def test_phases_follow_each_other_and_fill_the_batch():
    plan = phases(SWEEP_CONCURRENCY, n=8, per_client=2)
    assert [p.requests for p in plan] == [8, 8, 16, 32, 64, 128]
    # Each phase starts where the previous ended: no prompt is sent in two phases.
    assert [p.start for p in plan] == [0, 8, 16, 32, 64, 128]
    assert phases([1, 8], n=8) == [(1, 0, 8), (8, 8, 8)]


def test_sweep_prompts_are_distinct_across_phases_and_mixed():
    plan = phases(SWEEP_CONCURRENCY, n=8, per_client=2)
    sent = [m[-1]["content"] for p in plan for m in prompts(MIX, p.requests, p.start)]
    assert len(sent) == len(set(sent)) == 256
    # The mix takes the categories in turn.
    first = prompts(MIX, 3)
    assert [m for m in first] == [prompts(c, 1)[0] for c in CATEGORIES]


@pytest.mark.parametrize("category", CATEGORIES + (MIX,))
def test_a_category_never_repeats_a_prompt(category):
    everything = [m[-1]["content"] for m in prompts(category, size(category))]
    assert len(set(everything)) == len(everything)
    with pytest.raises(ValueError):
        prompts(category, 1, start=size(category))


def test_sweep_preset_and_running_out_of_prompts():
    ap = argparse.ArgumentParser()
    add_run_args(ap, ["vanilla", "a", "b"])
    a = ap.parse_args(["--sweep", "--model", "m"])
    resolve_run_args(ap, a, ["vanilla", "a", "b"], ["vanilla", "a"])
    assert (a.configs, a.categories, a.concurrency) == (["vanilla", "a"], [MIX],
                                                        SWEEP_CONCURRENCY)
    assert a.plan[-1].requests == 128
    # Explicit flags override the preset; vanilla is always there to compare to.
    a = ap.parse_args(["--sweep", "--model", "m", "--configs", "b", "--concurrency", "2"])
    resolve_run_args(ap, a, ["vanilla", "a", "b"], ["vanilla", "a"])
    assert (a.configs, a.concurrency) == (["vanilla", "b"], [2])
    # HumanEval alone has 164 problems: the sweep's 256 requests must fail before any
    # server starts, not repeat prompts.
    a = ap.parse_args(["--sweep", "--model", "m", "--categories", "humaneval"])
    with pytest.raises(SystemExit):
        resolve_run_args(ap, a, ["vanilla", "a", "b"], ["vanilla", "a"])


def test_send_all_keeps_concurrency_in_flight_and_order():
    lock, live, peak = threading.Lock(), [0], [0]

    def send(x):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02 if x % 3 else 0.05)     # uneven lengths, like real answers
        with lock:
            live[0] -= 1
        return x * 10

    outs, seconds = send_all(send, list(range(16)), 4)
    assert outs == [x * 10 for x in range(16)]
    assert peak[0] == 4
    assert seconds > 0


def result(tokens, seconds, outputs, mal=None, steps=0, preemptions=None):
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "mal": mal,
            "steps": steps, "outputs": outputs, "preemptions": preemptions}


def test_rows_and_totals_compare_to_vanilla():
    res = {
        "vanilla": {("chat", 4): result(100, 10.0, [[1], [2]], preemptions=0),
                    ("code", 4): result(100, 10.0, [[3], [4]], preemptions=1)},
        "m": {("chat", 4): result(100, 5.0, [[1], [9]], mal=3.0, steps=10, preemptions=2),
              ("code", 4): result(100, 10.0, [[3], [4]], mal=1.5, steps=30, preemptions=0),
              "per_position": [0.5]},
    }
    rows = {(r["config"], r["category"]): r for r in rows_of(res, ["vanilla", "m"])}
    assert rows[("m", "chat")]["speedup"] == pytest.approx(2.0)
    assert rows[("m", "chat")]["identical"] == 0.5
    assert rows[("m", "code")]["identical"] == 1.0
    (tv, tm) = totals_of(res, ["vanilla", "m"], ["chat", "code"], [4])
    assert tm["tok_s"] == pytest.approx(200 / 15)
    assert tm["speedup"] == pytest.approx((200 / 15) / (200 / 20))
    assert tm["identical"] == 0.75
    # Mean acceptance length over all verify steps, not the mean of the categories'.
    assert tm["mal"] == pytest.approx((3.0 * 10 + 1.5 * 30) / 40)
    assert tv["mal"] is None
    assert (tv["preemptions"], tm["preemptions"], tm["requests"]) == (1, 2, 4)


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from integration.bench_report import write_plot

    totals = [dict(config=c, concurrency=k, tok_s=t, speedup=t / 10, mal=m)
              for c, m in (("vanilla", None), ("m", 2.0)) for k, t in ((1, 10.0), (8, 40.0))]
    write_plot(str(tmp_path / "p.png"), totals, "t")
    write_plot(str(tmp_path / "p.svg"), totals, "t")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:500]
