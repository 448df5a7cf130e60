"""Deployed formats: few of them, each with its own fast inference code, shared by many methods."""

from .._deprecation import renamed_names
from .base import FORMATS, FrozenEmbedding, get_format, register_format
from .codebook import FrozenCodebook
from .factors import FrozenFactors
from .hashed import FrozenHashed
from .qr import FrozenQR
from .scalar import FrozenScalar
from .tt import FrozenTensorTrain

__all__ = ["FORMATS", "FrozenEmbedding", "get_format", "register_format", "FrozenCodebook", "FrozenFactors",
           "FrozenHashed", "FrozenQR", "FrozenScalar", "FrozenTensorTrain"]

# The deployed formats' names before they said which side they are on (trainable tables keep theirs).
__getattr__ = renamed_names(__name__, {
    "CodebookEmbedding": "FrozenCodebook", "FactorizedEmbedding": "FrozenFactors", "HashedEmbedding": "FrozenHashed",
    "QREmbedding": "FrozenQR", "ScalarQuantizedEmbedding": "FrozenScalar", "TensorTrainCores": "FrozenTensorTrain"})
