import pytest

from spec_plugins.calibration import Calibrator, walk
from spec_plugins.tree import DraftTree


def small_tree():
    """root -> a(10), b(11); a -> c(12), d(13); d -> e(14)"""
    t = DraftTree()
    a = t.add(-1, 10)
    t.add(-1, 11)
    t.add(a, 12)
    d = t.add(a, 13)
    t.add(d, 14)
    return t


@pytest.mark.parametrize("committed, want", [
    # a accepted, then d, then e rejected by the bonus 99
    ([10, 13, 99], [(0, True), (1, False), (2, False), (3, True), (4, False)]),
    # b accepted; it has no children, so nothing deeper was reached
    ([11, 5], [(0, False), (1, True)]),
    # nothing accepted: only the root's children were reached
    ([7], [(0, False), (1, False)]),
    # all of a, d, e accepted (then the bonus)
    ([10, 13, 14, 3], [(0, True), (1, False), (2, False), (3, True), (4, True)]),
])
def test_walk_marks_reached_and_accepted_nodes(committed, want):
    assert walk(small_tree(), committed) == want


def test_calibrated_estimate_moves_from_the_raw_one_to_the_observed_rate():
    cal = Calibrator(prior=2.0, memory=10_000)
    chain = DraftTree.chain([1])
    assert cal.prob("b", 0.9) == pytest.approx(0.9)       # nothing observed: the raw estimate
    for i in range(1000):
        cal.record(chain, ["b"], [1 if i % 10 < 3 else 2])  # accepted 30% of the time
    assert cal.prob("b", 0.9) == pytest.approx(0.3, abs=0.01)
    assert cal.prob("other", 0.9) == pytest.approx(0.9)   # buckets are independent
    assert cal.rates()["b"][1] == 1000


def test_memory_lets_the_estimate_follow_a_change():
    cal = Calibrator(prior=2.0, memory=50)
    chain = DraftTree.chain([1])
    for _ in range(500):
        cal.record(chain, ["b"], [1])
    for _ in range(200):
        cal.record(chain, ["b"], [2])
    assert cal.prob("b", 1.0) < 0.1
