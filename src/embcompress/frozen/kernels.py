"""Deprecated location: the kernels live in :mod:`embcompress.kernels` (lookups in
``embcompress.kernels.lookup``, training kernels in ``embcompress.kernels.training``).
Importing ``embcompress.frozen.kernels`` still works and gives the same functions and switch."""

from ..kernels import *  # noqa: F401,F403
from ..kernels import __all__  # noqa: F401
