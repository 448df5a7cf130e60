"""The optional C extension ``embcompress._kernels`` and the switch that turns it on or off.

Shared by :mod:`embcompress.kernels.lookup` and :mod:`embcompress.kernels.training`, so one
:func:`set_enabled` (or ``EMBCOMPRESS_KERNELS=0``) governs both.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from .. import _kernels  # type: ignore[attr-defined]  # a C extension, no stubs
except ImportError:  # built without a C compiler: the torch path serves every lookup
    _kernels = None

__all__ = ["available", "enabled", "set_enabled", "usable", "TT_MAX_ROW", "DPQ_MAX_CODEWORDS", "DPQ_MAX_WIDTH",
           "DPQ_MAX_PAIRS"]

_OFF_WORDS = ("0", "false", "no", "off")
_ON_WORDS = ("", "1", "true", "yes", "on")


def _enabled_from_environment(value: str | None) -> bool:
    """EMBCOMPRESS_KERNELS read as a switch: 0/false/no/off turn the C lookups off, 1/true/yes/on
    (or unset) leave them on; anything else warns and leaves them on."""
    word = (value or "").strip().lower()
    if word in _OFF_WORDS:
        return False
    if word not in _ON_WORDS:
        warnings.warn(f"EMBCOMPRESS_KERNELS={value!r} is not a switch; the C kernels stay on "
                      f"(use one of {', '.join(_OFF_WORDS[:2])} to turn them off, 1 to keep them)", stacklevel=2)
    return True


_enabled = _enabled_from_environment(os.environ.get("EMBCOMPRESS_KERNELS"))
# Shape limits of the C kernels (read from the extension; past them the torch path runs):
TT_MAX_ROW = getattr(_kernels, "TT_MAX_ROW", 0)  # floats of a transposed tt row on the kernel's stack
DPQ_MAX_CODEWORDS = getattr(_kernels, "DPQ_MAX_CODEWORDS", 0)
DPQ_MAX_WIDTH = getattr(_kernels, "DPQ_MAX_WIDTH", 0)
DPQ_MAX_PAIRS = getattr(_kernels, "DPQ_MAX_PAIRS", 0)  # codewords x group width


def available() -> bool:
    """True if the C extension was built and imports."""
    return _kernels is not None


def enabled() -> bool:
    """True if lookups will use the C extension where they can."""
    return _kernels is not None and _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the C lookups on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def usable(*tensors: torch.Tensor | None) -> bool:
    """True if a lookup over these tensors may run in C (eager mode, CPU, extension on)."""
    if not (_enabled and _kernels is not None):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _address(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    if tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"kernel input must be contiguous {dtype}, got {tensor.dtype} "
                         f"({'contiguous' if tensor.is_contiguous() else 'strided'})")
    return tensor.data_ptr()
