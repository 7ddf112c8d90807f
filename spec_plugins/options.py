"""Validated method options.

Each method declares its options as a frozen dataclass deriving from
:class:`MethodOptions`; a field's type comes from its annotation (``bool``, ``int``,
``float``, ``str``, ``tuple[int, ...]`` from a JSON list, ``X | None``) and its bounds from
``opt(default, lo=, hi=, choices=, help=)``. :meth:`MethodOptions.parse` turns the user's
mapping into that dataclass or raises :class:`OptionError` with a message that names the
offending field and lists what is allowed, as a server operator needs at start-up;
cross-field checks go in :meth:`MethodOptions.validate`, which ``parse`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="MethodOptions")


class OptionError(ValueError):
    pass


def opt(default: Any, *, lo: float | None = None, hi: float | None = None,
        choices: tuple | None = None, help: str = "") -> Any:
    return dataclasses.field(default=default, metadata={
        "lo": lo, "hi": hi, "choices": choices, "help": help})


def budget_opt(drafts: str) -> Any:
    """The ``budget`` option of a method whose ``drafts`` (a tree, a block)
    ``builders.fit_batch`` cuts to what the verify-cost model pays for."""
    return opt(True, help="cut drafts to the nodes the verify-cost model says pay for "
                          f"themselves (False: always draft the whole {drafts}; for measuring "
                          "acceptance, with payoff_gate false)")


def _bounds(m) -> str:
    lo = "-inf" if m.get("lo") is None else m["lo"]
    hi = "inf" if m.get("hi") is None else m["hi"]
    return f"[{lo}, {hi}]"


def _type_name(tp) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return False, tp


def _convert(tp, value, where: str, describe_cls: type):
    """``value`` as type ``tp``, or OptionError naming ``where``."""
    optional, tp = _is_optional(tp)
    if value is None and optional:
        return None

    def bad():
        return OptionError(f"{where} must be {_type_name(tp)}{' or null' if optional else ''}, "
                           f"got {value!r}; allowed options: {describe(describe_cls)}")

    origin = typing.get_origin(tp)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return tuple(_convert(item, v, where, describe_cls) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:
        raise bad()
    return value


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options dataclass (declare it ``@dataclass(frozen=True)``):
    the options every method has."""

    payoff_gate: bool = opt(True, help="run the method only in batch-size classes where "
                            "decoding cycles with it are measured faster than without it "
                            "(the adapter session's payoff gate; false: always)")

    @classmethod
    def parse(cls: type[T], values: Mapping[str, Any] | None, where: str = "options") -> T:
        """Build the options from ``values``; ``where`` names the config path in messages."""
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            raise OptionError(f"{where} must be a JSON object, got {type(values).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise OptionError(
                f"unknown option {where}.{unknown[0]}; allowed options: {describe(cls)}")
        hints = _hints(cls)
        kwargs = {}
        for name, value in values.items():
            value = _convert(hints[name], value, f"{where}.{name}", cls)
            m = fields[name].metadata
            if m.get("choices") and value not in m["choices"]:
                raise OptionError(f"{where}.{name}={value!r} is not allowed; "
                                  f"allowed values: {', '.join(repr(c) for c in m['choices'])}")
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if v is None or isinstance(v, (str, bool)):
                    continue
                if (m.get("lo") is not None and v < m["lo"]) or (m.get("hi") is not None
                                                                  and v > m["hi"]):
                    raise OptionError(f"{where}.{name}={value!r} is out of range {_bounds(m)}")
            kwargs[name] = value
        options = cls(**kwargs)
        options.validate(where)
        return options

    def validate(self, where: str) -> None:
        """Cross-field checks; raise :class:`OptionError` naming the fields."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(cls: type) -> str:
    hints = _hints(cls)
    parts = []
    # The method's own options first, then those every method has.
    common = {f.name for f in dataclasses.fields(MethodOptions)}
    fields = dataclasses.fields(cls)
    for f in [f for f in fields if f.name not in common] + [f for f in fields if f.name in common]:
        m = f.metadata
        rng = ""
        if m.get("choices"):
            rng = " one of " + ", ".join(repr(c) for c in m["choices"])
        elif m.get("lo") is not None or m.get("hi") is not None:
            rng = f" in {_bounds(m)}"
        parts.append(f"{f.name} ({_type_name(hints[f.name])}{rng}, default {f.default!r})")
    return "; ".join(parts)
