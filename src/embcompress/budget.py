"""Choose a method's hyperparameters from a byte budget.

A budget is given as total bytes, bits per row, or a compression ratio against fp32; all count
every byte the artifact holds (codes, codebooks, cores, scalars). The chosen config is the
largest candidate of the method that fits, so it is reported and stored like any other spec.

    >>> config_for_budget("dpq", 400_000, 50, bits_per_row=80).to_spec()
    'dpq:variant=sx,groups=25,codewords=8,shared=false,batchnorm=true,tau=1.0,sparse=false'
"""

from __future__ import annotations

import math
import numbers

from .config import MethodConfig, SpecError, parse_spec, split_spec
from .registry import get_method

__all__ = ["budget_bytes", "config_for_budget"]


def budget_bytes(num_embeddings: int, embedding_dim: int, *, bytes: int | None = None,
                 bits_per_row: float | None = None, ratio: float | None = None) -> int:
    given = [name for name, value in (("bytes", bytes), ("bits_per_row", bits_per_row), ("ratio", ratio))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one budget of bytes, bits_per_row or ratio (got {given or 'none'})")
    name, value = given[0], {"bytes": bytes, "bits_per_row": bits_per_row, "ratio": ratio}[given[0]]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"the budget {name} must be a positive finite number, got {value!r}; "
                         "e.g. bits_per_row=80 or ratio=20")
    if bytes is not None:
        total = int(bytes)
    elif bits_per_row is not None:
        total = int(num_embeddings * bits_per_row // 8)
    elif ratio is not None:
        total = int(num_embeddings * embedding_dim * 4 / ratio)
    if total <= 0:
        raise ValueError(f"the budget must be positive, got {total} bytes")
    return total


def config_for_budget(spec: "str | MethodConfig", num_embeddings: int, embedding_dim: int, *,
                      bytes: int | None = None, bits_per_row: float | None = None,
                      ratio: float | None = None, fit_time: float = 1.0) -> MethodConfig:
    """The method's config with the most bytes within the budget (fields set in ``spec`` are kept).

    ``fit_time`` lets methods whose default fit grows with the setting (``codes``: with the number of
    books) choose settings whose fit may take that many times the default bound of about two CPU
    minutes; at the default 1.0 a wide table may be left part of its budget.
    """
    if not (isinstance(fit_time, numbers.Real) and math.isfinite(fit_time) and fit_time > 0):
        raise ValueError(f"fit_time must be a positive finite number, got {fit_time!r}; e.g. fit_time=4")
    base = parse_spec(spec)
    fixed = _explicit_keys(spec)
    cls = get_method(base.method)
    limit = budget_bytes(num_embeddings, embedding_dim, bytes=bytes, bits_per_row=bits_per_row, ratio=ratio)
    best: MethodConfig | None = None
    best_bytes, smallest = -1, None
    for candidate in cls.budget_candidates(num_embeddings, embedding_dim, base, fit_time=fit_time):
        if any(getattr(candidate, key) != getattr(base, key) for key in fixed):
            continue  # the user fixed this field in the spec
        try:
            size = cls.expected_bytes(candidate, num_embeddings, embedding_dim)
        except SpecError:
            continue  # not valid for this table shape
        smallest = size if smallest is None else min(smallest, size)
        if best_bytes < size <= limit:
            best, best_bytes = candidate, size
    if best is None:
        fixed_note = f" with {', '.join(sorted(fixed))} fixed" if fixed else ""
        floor = f"; its smallest setting needs {smallest} bytes" if smallest is not None else ""
        note = cls.budget_note(num_embeddings, embedding_dim, base)  # e.g. memcom's ratio ceiling
        floor += f" ({note})" if note else ""
        raise SpecError(f"method {base.method!r} cannot fit a ({num_embeddings}, {embedding_dim}) table in "
                        f"{limit} bytes{fixed_note}{floor}; raise the budget, fix fewer fields, or pick another method")
    return best


def _explicit_keys(spec: "str | MethodConfig") -> set[str]:
    """Fields a spec string sets explicitly (a config object fixes none)."""
    return set(split_spec(spec)[1]) if isinstance(spec, str) else set()
