"""Progress bars for long fits and training loops.

tqdm is optional: without it, or when stderr is not a terminal, or when asked to be quiet
(``enabled=False`` or ``EMBCOMPRESS_QUIET=1``), the iterable is returned unchanged.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

__all__ = ["progress_bar", "set_progress"]

T = TypeVar("T")
_DEFAULT: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Force bars on (True) or off (False) everywhere; None restores the automatic choice."""
    global _DEFAULT
    _DEFAULT = enabled


def _wanted(enabled: bool | None) -> bool:
    if enabled is not None:
        return enabled
    if _DEFAULT is not None:
        return _DEFAULT
    if os.environ.get("EMBCOMPRESS_QUIET"):
        return False
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable[T], desc: str = "", total: int | None = None,
                 enabled: bool | None = None) -> Iterable[T]:
    if not _wanted(enabled):
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
