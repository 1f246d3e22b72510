"""Small formatting helpers shared by the loaders, the verifier, the benchmark and the localizer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__).strip()


def format_shape(shape: Sequence[Any]) -> str:
    """``[1, ?, 224]``: a shape with unknown dimensions (``None``) as ``?``."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def is_fixed(dim: Any) -> bool:
    """A dimension that is a known non-negative integer (not a symbol or unknown)."""
    return isinstance(dim, (int, np.integer)) and bool(dim >= 0)


def finite_or_none(value: float) -> float | None:
    """``value``, or ``None`` for NaN/Inf (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def format_ms(value: float) -> str:
    """Three significant digits, no exponent: 0.0961, 1.23, 12.3, 1234."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    decimals = min(4, max(0, 2 - math.floor(math.log10(abs(value)))))
    return f"{value:.{decimals}f}"
