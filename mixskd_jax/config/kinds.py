"""The kinds of value a config field may hold (`Rule` and its constructors: `integer`,
`number`, `flag`, `choice`, `text`), for the one rule per field in `field_rules.RULES`.

A bool is refused where a number is wanted (Python counts True as 1).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import numpy as np



def is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
  """A finite int or float (an int is a fine float: ml_collections casts it the same way)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(value))


def is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field may hold.

  Attributes:
    valid: value -> whether it is allowed (None is handled by `none_means`).
    allowed: what `valid` accepts, completing "must be ...", e.g. "an int >= 1".
    none_means: for a placeholder field, what None means ("all examples"); None when the
      field must hold a value.
  """
  valid: Callable[[Any], bool]
  allowed: str
  none_means: str | None = None

  def error(self, value: Any) -> str | None:
    """Why `value` is refused (the "must be ..." part), or None when it is allowed."""
    if value is None and self.none_means is not None:
      return None
    try:
      if self.valid(value):
        return None
    except TypeError:  # a comparison with a value of another type: refused below
      pass
    unset = f", or None ({self.none_means})" if self.none_means is not None else ""
    return f"must be {self.allowed}{unset}"


def integer(minimum: int, why: str = "", *, also: tuple = (), maximum: int | None = None,
            none_means: str | None = None, also_why: str = "") -> Rule:
  """An int >= `minimum` (and <= `maximum`), or one of the special values `also`."""
  def valid(v):
    return is_int(v) and (v in also or (v >= minimum and (maximum is None or v <= maximum)))
  bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
  allowed = f"an int {bound}{f' ({why})' if why else ''}"
  if also:
    allowed += f", or {' or '.join(map(str, also))}{f' ({also_why})' if also_why else ''}"
  return Rule(valid, allowed, none_means)


def number(minimum: float, why: str = "", *, exclusive: bool = False,
           below: float | None = None, at_most: float | None = None,
           none_means: str | None = None) -> Rule:
  """A finite number >= `minimum` (> with `exclusive`), and < `below` or <= `at_most`."""
  def valid(v):
    return (is_number(v) and (v > minimum if exclusive else v >= minimum)
            and (below is None or v < below) and (at_most is None or v <= at_most))
  low = "(" if exclusive else "["
  if below is not None:
    bound = f"in {low}{minimum:g}, {below:g})"
  elif at_most is not None:
    bound = f"in {low}{minimum:g}, {at_most:g}]"
  else:
    bound = f"{'>' if exclusive else '>='} {minimum:g}"
  return Rule(valid, f"a finite number {bound}{f' ({why})' if why else ''}", none_means)


def flag() -> Rule:
  return Rule(is_bool, "True or False")


def choice(names: tuple, *, none_means: str | None = None) -> Rule:
  """One of `names` (a list of `choices.py`)."""
  return Rule(lambda v: isinstance(v, str) and v in names,
              "one of " + ", ".join(repr(n) for n in names), none_means)


def text(allowed: str, none_means: str) -> Rule:
  return Rule(lambda v: isinstance(v, str), allowed, none_means)
