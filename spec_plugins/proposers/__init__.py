"""Drafting methods, one module each, all implementing :class:`base.Proposer`.

Methods register under the entry-point group ``spec_plugins.methods`` (name = the method
name users select, value = ``module:Class``), the built-ins included (``pyproject.toml``),
so another installed package adds a method that users select exactly like ours. Modules
are imported only when their method is used.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from spec_plugins.options import OptionError

GROUP = "spec_plugins.methods"


@functools.cache
def methods() -> dict[str, EntryPoint]:
    """Every installed method by name (empty when the package is not installed)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def proposer_class(name: str):
    from spec_plugins.proposers.base import Proposer

    eps = methods()
    if not eps:
        raise RuntimeError(f"no spec_plugins methods are registered under the entry-point "
                           f"group {GROUP!r}: install the package (pip install spec_plugins, "
                           f"or pip install -e . from a checkout)")
    if name not in eps:
        raise OptionError(
            f"unknown spec_plugins method {name!r}; allowed methods: {', '.join(sorted(eps))}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Proposer)) or cls.name != name:
        raise TypeError(f"entry point {name!r} of {GROUP!r} ({eps[name].value}) must be a "
                        f"spec_plugins.proposers.base.Proposer subclass named {name!r}")
    return cls
