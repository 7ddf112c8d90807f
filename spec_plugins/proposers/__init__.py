"""Drafting methods, one module each, all implementing :class:`base.Proposer`.

``METHODS`` maps the method name users select to ``module:Class``; modules are imported
only when their method is used.
"""

from __future__ import annotations

import importlib

from spec_plugins.options import OptionError

METHODS: dict[str, str] = {
    "suffix": "spec_plugins.proposers.suffix:SuffixProposer",
    "recycling": "spec_plugins.proposers.recycling:RecyclingProposer",
    "swift": "spec_plugins.proposers.swift:SwiftProposer",
    "del": "spec_plugins.proposers.del_exit:DelProposer",
}


def proposer_class(name: str):
    if name not in METHODS:
        raise OptionError(
            f"unknown spec_plugins method {name!r}; allowed methods: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
