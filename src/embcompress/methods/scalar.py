"""Scalar quantization baseline: fp16, or int8 / int4 with a per-row scale.

Training keeps an fp32 table and fake-quantizes rows in the forward pass with a straight-through
gradient, so the trained module and its export decode identically.
Shapes: weight (V, d) while training; see ``frozen/scalar.py`` for what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..config import FitConfig, MethodConfig
from ..frozen import FrozenScalar
from ..frozen.scalar import dequantize, quantize_rows
from ..registry import register

__all__ = ["ScalarConfig", "ScalarFit", "ScalarEmbedding"]


@dataclass(frozen=True)
class ScalarConfig(MethodConfig):
    method: ClassVar[str] = "scalar"
    bits: Literal[16, 8, 4] = field(default=8, metadata={
        "help": "16 = fp16; 8 / 4 = signed ints with a per-row fp32 scale"})


@dataclass(frozen=True)
class ScalarFit(FitConfig):
    """The fit copies the table (quantized at lookup and export): nothing to set but the common ``steps``."""

    method: ClassVar[str] = "scalar"


@register
class ScalarEmbedding(CompressedEmbedding[ScalarConfig]):
    Config = ScalarConfig
    Fit = ScalarFit

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        self.weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim))

    @classmethod
    def expected_bytes(cls, config: ScalarConfig, num_embeddings: int, embedding_dim: int) -> int:
        if config.bits == 16:
            return num_embeddings * embedding_dim * 2
        per_row = embedding_dim if config.bits == 8 else (embedding_dim + 1) // 2
        return num_embeddings * (per_row + 4)  # values + fp32 scale

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: ScalarConfig) -> list[ScalarConfig]:
        return [base.replace(bits=bits) for bits in (4, 8, 16)]

    def _quantized(self, rows: torch.Tensor) -> torch.Tensor:
        values, scale = quantize_rows(rows.detach(), self.config.bits)
        return dequantize(values, scale, self.config.bits, self.embedding_dim)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        return rows + (self._quantized(rows) - rows).detach()  # straight-through estimator

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: ScalarFit, progress: bool | None) -> ScalarFit:
        self.weight.copy_(self._check_fit_weight(weight))
        return settings

    @torch.no_grad()
    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.weight.mul_(factor)

    def export(self) -> FrozenScalar:
        values, scale = quantize_rows(self.weight.detach(), self.config.bits)
        return FrozenScalar(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            bits=self.config.bits, values=values, scale=scale)
