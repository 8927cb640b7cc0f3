"""Argument checks shared by the layers and models (Keras's "Received: ..." style)."""

import math


def _is_number(value):
    # Python counts booleans as ints; as an argument they are mistakes.
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name, value, minimum=1, allow_none=False):
    """Raise `ValueError` naming `name` unless `value` is an int >= `minimum`.

    Booleans are refused although Python counts them as ints: `units=True` is
    a mistake, not a width of 1.

    Args:
        name: the argument's name, as the caller spells it.
        value: the value received.
        minimum: the smallest allowed value.
        allow_none: whether None is allowed too.

    Example:

    >>> check_int("units", 3)
    >>> check_int("units", 0)
    Traceback (most recent call last):
    ...
    ValueError: `units` must be an integer >= 1. Received: units=0
    """
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = f"None or an integer >= {minimum}" if allow_none else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}. Received: {name}={value!r}")


def check_number(name, value, minimum=0, inclusive=False):
    """Raise `ValueError` naming `name` unless `value` is a finite number above `minimum`.

    Booleans are refused, as in `check_int`; so are inf and nan.

    Args:
        name: the argument's name, as the caller spells it.
        value: the value received.
        minimum: the bound.
        inclusive: whether `value == minimum` is allowed.

    Example:

    >>> check_number("scale", 4.0)
    >>> check_number("alpha", 0.0, inclusive=True)
    >>> check_number("scale", float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: `scale` must be a finite number > 0. Received: scale=inf
    """
    if not _is_number(value) or not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        kind = f"a finite number {'>=' if inclusive else '>'} {minimum}"
        raise ValueError(f"`{name}` must be {kind}. Received: {name}={value!r}")


def check_rate(name, value):
    """Raise `ValueError` naming `name` unless `value` is a number in [0, 1) (a dropout rate).

    Example:

    >>> check_rate("dropout", 0.3)
    >>> check_rate("dropout", 1.0)
    Traceback (most recent call last):
    ...
    ValueError: `dropout` must be a number in [0, 1). Received: dropout=1.0
    """
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")


def check_capacity_factor(capacity_factor):
    """None (dropless dispatch) or `capacity_factor` as a float; ValueError naming it otherwise."""
    if capacity_factor is None:
        return None
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise ValueError(
            "`capacity_factor` must be None (dropless) or a number > 0. "
            f"Received: capacity_factor={capacity_factor!r}"
        )
    if capacity_factor <= 0:
        raise ValueError(
            f"`capacity_factor` must be > 0. Received: capacity_factor={capacity_factor}"
        )
    return float(capacity_factor)
