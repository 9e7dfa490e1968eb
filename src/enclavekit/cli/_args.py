"""Argument helpers shared by the commands (private)."""

from __future__ import annotations

from enclavekit.errors import ConfigError

__all__ = ["bounded_int"]


def bounded_int(name: str, text: str, low: int, high: int) -> int:
    """``text`` as a decimal integer in ``low..high``, else E03 naming the argument (nitro-cli's wording)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise ConfigError(f"Invalid argument provided: {name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"Invalid argument provided: {name} must be in {low}..{high}, got {value}")
    return value
