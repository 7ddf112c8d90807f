"""The one wall clock of drafting and step timings (the payoff gate, the draft and step
timers). Read it as ``clock.now()`` through the module, never ``from ... import now``, so
that tests can substitute a simulated clock with ``monkeypatch.setattr(clock, "now", ...)``."""

from __future__ import annotations

import time

now = time.perf_counter
