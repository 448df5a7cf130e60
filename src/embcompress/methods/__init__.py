"""Every method registers itself on import; add one line per new method file."""

from . import hashing, lowrank, scalar  # noqa: F401
