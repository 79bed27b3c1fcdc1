"""Checked constructor arguments, shared by the spec and by every block built on its own.

A block built directly (`ResBlock3D(..., kernel_size=3)`) must refuse a bad argument as clearly as
the spec does (`LevelSpec(stride=2)`), before any module exists: otherwise the mistake surfaces as
`'int' object is not iterable`, `integer modulo by zero` or a size mismatch deep inside torch at the
first forward. Every helper raises [`SpecError`][cpcbm_blocks.errors.SpecError] naming the argument,
the expected and the actual value, and what to do; those that also check a call's arguments take
`error=InputError`.
"""

import math
import numbers
from collections.abc import Iterable, Sequence, Set
from enum import Enum
from typing import Any, TypeVar

from cpcbm_blocks.errors import CpcbmError, SpecError

__all__ = ["Triple", "as_enum", "as_ints", "as_level_numbers", "as_triple", "check_bool", "check_counts", "check_int",
           "check_number", "fail"]

Triple = tuple[int, int, int]
"""A per-axis (depth, height, width) triple, such as a stride or a kernel size."""
E = TypeVar("E", bound=Enum)


def fail(where: str, expected: str, actual: Any, fix: str, *, error: type[CpcbmError] = SpecError) -> CpcbmError:
    """The error to raise: a `SpecError` for a constructor argument, or e.g. `InputError` for a call's."""
    return error(f"{where}: expected {expected}, got {actual!r}. {fix}")


def check_int(where: str, value: Any, *, minimum: int, error: type[CpcbmError] = SpecError,
              fix: str | None = None) -> int:
    """`value` as an int, if it is a whole number (an int or a NumPy integer, not a bool) of at least `minimum`.

    `fix` replaces the generic advice (e.g. with an example value for this argument)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(where, f"an int >= {minimum}", value, fix or "Pass a whole number.", error=error)
    if value < minimum:
        raise fail(where, f"an int >= {minimum}", value, fix or f"Use a value of at least {minimum}.", error=error)
    return int(value)


def check_bool(where: str, value: Any, *, error: type[CpcbmError] = SpecError) -> bool:
    """`value` itself, if it is a bool (a string such as "no" would otherwise read as True)."""
    if not isinstance(value, bool):
        raise fail(where, "True or False", value, "Pass a bool.", error=error)
    return value


def check_optional_bool(where: str, value: Any, *, none_means: str, error: type[CpcbmError] = SpecError) -> bool | None:
    """`value` itself, if it is a bool or None (`none_means` says what None stands for, in the message)."""
    if value is not None and not isinstance(value, bool):
        raise fail(where, f"True, False or None (None: {none_means})", value, "Pass a bool, or None.", error=error)
    return value


def check_number(where: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, error: type[CpcbmError] = SpecError, fix: str | None = None) -> float:
    """`value` as a float, if it is a finite real number within the given bounds (`above` and `below` exclusive).

    `fix` replaces the generic advice (e.g. with an example value for this argument)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise fail(where, "a finite number", value, fix or "Pass an int or a float.", error=error)
    bounds = [(f"> {limit}", value > limit) for limit in [above] if limit is not None]
    bounds += [(f">= {limit}", value >= limit) for limit in [at_least] if limit is not None]
    bounds += [(f"< {limit}", value < limit) for limit in [below] if limit is not None]
    if not all(holds for _, holds in bounds):
        wanted = " and ".join(text for text, _ in bounds)
        raise fail(where, f"a number {wanted}", value, fix or "Pick a value in that range.", error=error)
    return float(value)


def as_triple(where: str, value: Any, *, odd: bool = False) -> Triple:
    """A per-axis (depth, height, width) triple of positive ints (odd ones, for a kernel with "same" padding)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise fail(where, "a (depth, height, width) triple of 3 ints", value,
                   f"Give one value per axis, e.g. {(value,) * 3 if isinstance(value, int) else (3, 3, 3)}.")
    for axis, item in zip(("depth", "height", "width"), value):
        check_int(f"{where} ({axis})", item, minimum=1)
        if odd and item % 2 == 0:
            raise fail(f"{where} ({axis})", "an odd kernel size (1, 3, 5, ...)", item,
                       "Even kernels cannot keep the size with symmetric padding; use an odd one.")
    return (int(value[0]), int(value[1]), int(value[2]))


def as_enum(where: str, value: Any, kind: type[E], *, error: type[CpcbmError] = SpecError) -> E:
    """`value` as a member of the enum `kind` (a member or its value)."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in kind)
        raise fail(where, f"one of {choices}", value, "Pick one of the listed values.", error=error) from None


def as_ints(where: str, value: Any, *, minimum: int) -> tuple[int, ...]:
    """A non-empty sequence of ints, each at least `minimum`, as a tuple (one per level, say)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise fail(where, f"a non-empty tuple of ints >= {minimum}", value,
                   f"Give one value per level, e.g. {(value, value * 2) if isinstance(value, int) else (32, 64)}.")
    return tuple(check_int(f"{where}[{i}]", item, minimum=minimum) for i, item in enumerate(value))


def as_level_numbers(where: str, value: Any, *, levels: int, error: type[CpcbmError] = SpecError) -> tuple[int, ...]:
    """1-based level numbers in `1..levels` (a tuple, list, set, range or other iterable of ints), as a
    sorted tuple without repeats; an empty one selects none."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        numbers_given = None
    else:
        numbers_given = value if isinstance(value, (Sequence, Set)) else tuple(value)  # a generator is read once
    if numbers_given is None or any(
            isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= levels for n in numbers_given):
        raise fail(where, f"a tuple of 1-based level numbers in 1..{levels}", value if numbers_given is None
                   else numbers_given, f"Levels are numbered from 1 (shallowest); pass a tuple such as {(levels,)}, "
                   f"or range(1, {levels + 1}) for all of them.", error=error)
    return tuple(sorted({int(n) for n in numbers_given}))


def check_counts(block: str, **counts: Any) -> None:
    """Every keyword a positive int (channels, groups, heads, experts): `check_counts("ResBlock3D", num_groups=8)`."""
    for name, value in counts.items():
        check_int(f"{block}({name}=...)", value, minimum=1)
