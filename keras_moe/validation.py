"""Argument checks shared by the layers and models (Keras's "Received: ..." style)."""


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
