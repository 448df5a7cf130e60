"""Every method registers itself on import; add one line per new method file."""

from . import hashing, lowrank, pq, scalar  # noqa: F401
