"""Every method registers itself on import; add one line per new method file."""

from . import codes, dpq, hash, lowrank, pq, scalar  # noqa: F401
from . import distilled, memcom, qr  # noqa: F401
from . import tt  # noqa: F401
