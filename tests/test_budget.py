import pytest

from spec_plugins import clock
from spec_plugins.budget import allocate
from spec_plugins.cost import CostModel, StepTimer

CPU = CostModel({1: 44.3, 2: 49.6, 4: 60.3, 8: 78.7, 16: 116.4, 32: 190.0})


def test_batch_of_one_verifies_plausible_guesses():
    assert allocate([[0.9, 0.7, 0.5, 0.3, 0.1, 0.02]], 1, 1, CPU) == [4]


def test_larger_batches_keep_only_confident_tokens():
    weak = [0.4, 0.2, 0.1]
    strong = [0.95, 0.9, 0.85, 0.8]
    keep = allocate([weak] * 7 + [strong], 8, 8, CPU)
    assert keep[-1] == 4 and all(k == 0 for k in keep[:-1])


def test_flat_cost_curve_verifies_everything():
    gpu = CostModel.linear(10.0, 0.01, max_n=256)
    gains = [[0.5, 0.2, 0.05]] * 8
    assert allocate(gains, 8, 8, gpu) == [3] * 8


def test_kept_tokens_are_prefixes_in_gain_order():
    keep = allocate([[0.9, 0.8], [0.85]], 2, 2, CostModel.linear(10.0, 0.5))
    assert keep in ([2, 1], [2, 0], [1, 1], [1, 0], [0, 0])
    assert allocate([[], []], 2, 2, CPU) == [0, 0]


def test_linear_prior_and_calibration():
    m = CostModel.linear(40.0, 4.0, max_n=64)
    assert m.time(1) == 40 and m.time(9) == pytest.approx(72)
    for _ in range(50):
        m.observe(8, 40.0)  # this machine turns out flat
    assert m.time(8) == pytest.approx(40.0, rel=0.01)


def test_step_timer_reads_the_shared_clock(monkeypatch):
    """Step times come from ``clock.now`` (the clock the payoff gate reads): a simulated
    clock sets the fitted cost; a step far slower than predicted is idle time, dropped."""
    t = [100.0]
    monkeypatch.setattr(clock, "now", lambda: t[0])
    timer = StepTimer(prior_per_token=0.5)
    timer.start()
    t[0] += 2.0
    timer.stop(1)
    assert timer.cost.time(1) == pytest.approx(2.0) and timer.cost.time(3) == pytest.approx(4.0)
    timer.start()
    t[0] += 60.0
    timer.stop(1)
    assert timer.cost.time(1) == pytest.approx(2.0)

