"""Deployed formats: few of them, each with its own fast inference code, shared by many methods."""

from .base import FORMATS, FrozenEmbedding, get_format, register_format
from .codebook import CodebookEmbedding
from .factors import FactorizedEmbedding
from .hashed import HashedEmbedding
from .qr import QREmbedding
from .scalar import ScalarQuantizedEmbedding
from .tt import TensorTrainCores

__all__ = ["FORMATS", "FrozenEmbedding", "get_format", "register_format", "CodebookEmbedding",
           "FactorizedEmbedding", "HashedEmbedding", "QREmbedding", "ScalarQuantizedEmbedding",
           "TensorTrainCores"]
