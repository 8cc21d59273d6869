"""Validating what users pass: integers with a lower bound, and closed sets of named choices.

Every option of T-GATE goes through one of these two checks, so every bad value gets the same
kind of error: a ``TypeError`` for a value of the wrong type, a ``ValueError`` for one out of
range, each naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import enum
import numbers
from typing import TypeVar

Choice = TypeVar("Choice", bound=enum.Enum)


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return int(value)


def choose(name: str, value, choices: type[Choice]) -> Choice:
    """``value`` as a member of ``choices``, given as the member or its string value."""
    try:
        return choices(value)
    except ValueError:
        allowed = tuple(member.value for member in choices)
        meanings = "; ".join(f"{member.value!r}: {member.__doc__}" for member in choices if member.__doc__)
        raise ValueError(f"`{name}` must be one of {allowed} ({meanings}), got {value!r}.") from None


class _DocumentedChoice(str, enum.Enum):
    def __new__(cls, value: str, doc: str = ""):
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member


class KernelMode(_DocumentedChoice):
    """How transformer blocks run after the gate."""

    AUTO = ("auto", "fused post-gate blocks with the best kernel available")
    OFF = ("off", "plain PyTorch, bit-exact with the reference")
