"""Validated method options.

Each method declares its options as a frozen dataclass whose fields carry their bounds
(``opt(default, lo=, hi=, choices=, help=)``). :func:`parse_options` turns the user's
mapping into that dataclass or raises :class:`OptionError` with a message that names the
offending field and lists what is allowed, as a server operator needs at start-up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class OptionError(ValueError):
    pass


def opt(default: Any, *, lo: float | None = None, hi: float | None = None,
        choices: tuple | None = None, help: str = "") -> Any:
    return dataclasses.field(default=default, metadata={
        "lo": lo, "hi": hi, "choices": choices, "help": help})


def _bounds(m) -> str:
    lo = "-inf" if m.get("lo") is None else m["lo"]
    hi = "inf" if m.get("hi") is None else m["hi"]
    return f"[{lo}, {hi}]"


def describe(cls: type) -> str:
    parts = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        rng = ""
        if m.get("choices"):
            rng = " one of " + ", ".join(repr(c) for c in m["choices"])
        elif m.get("lo") is not None or m.get("hi") is not None:
            rng = f" in {_bounds(m)}"
        parts.append(f"{f.name} ({f.type}{rng}, default {f.default!r})")
    return "; ".join(parts)


def parse_options(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build ``cls`` from ``values``; ``where`` names the config path for messages."""
    if not isinstance(values, Mapping):
        raise OptionError(f"{where} must be a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(
            f"unknown option {where}.{unknown[0]}; allowed options: {describe(cls)}")
    kwargs = {}
    for name, value in values.items():
        f = fields[name]
        want = type(f.default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is not type(None) and (type(value) is not want):
            raise OptionError(
                f"{where}.{name} must be {want.__name__}, got {value!r}; "
                f"allowed options: {describe(cls)}")
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise OptionError(f"{where}.{name}={value!r} is not allowed; "
                              f"allowed values: {', '.join(repr(c) for c in m['choices'])}")
        if m.get("lo") is not None and value < m["lo"] or m.get("hi") is not None and value > m["hi"]:
            raise OptionError(f"{where}.{name}={value!r} is out of range {_bounds(m)}")
        kwargs[name] = value
    return cls(**kwargs)
