"""Old public names kept importable, with a DeprecationWarning that names the new one."""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable

__all__ = ["renamed_names"]


def renamed_names(module: str, renamed: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) serving ``renamed`` old names as the new objects."""

    def __getattr__(name: str) -> Any:
        if name in renamed:
            warnings.warn(f"{module}.{name} is deprecated; use {renamed[name]}", DeprecationWarning, stacklevel=2)
            return getattr(sys.modules[module], renamed[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
