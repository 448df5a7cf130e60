"""Scalar quantization baseline: fp16, or 8/4/3/2-bit ints with a per-row or block-wise scale.

Block-wise scales follow llama.cpp's Q4_0 (symmetric) / Q4_1 (with ``offset``) block formats and
torchao's group-wise int4: one fp16 scale (and minimum) per ``block`` consecutive values of a row.

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
from ..bitpack import packed_size
from ..config import FitConfig, MethodConfig, SpecError
from ..frozen import FrozenScalar
from ..frozen.scalar import (block_codes, block_decode, check_scale_range, dequantize, is_blockwise, num_blocks,
                             quantize_rows)
from ..registry import register

__all__ = ["ScalarConfig", "ScalarFit", "ScalarEmbedding"]


@dataclass(frozen=True)
class ScalarConfig(MethodConfig):
    method: ClassVar[str] = "scalar"
    bits: Literal[16, 8, 4, 3, 2] = field(default=8, metadata={
        "help": "16 = fp16; 8 / 4 = signed ints with a per-row fp32 scale (or block-wise); 3 / 2 always block-wise"})
    block: int = field(default=0, metadata={
        "help": "values per fp16 scale (32-128 like llama.cpp/torchao); 0 = one scale per row"})
    offset: bool = field(default=False, metadata={
        "help": "also store an fp16 minimum per block (asymmetric, llama.cpp Q4_1); block-wise layout"})

    def validate(self) -> None:
        if self.block < 0:
            raise SpecError(f"scalar: block must be >= 0 (0 = one scale per row), got {self.block}")
        if self.bits == 16 and (self.block or self.offset):
            raise SpecError("scalar: block and offset apply to bits 8, 4, 3 and 2; drop them for bits=16")


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
        if is_blockwise(config.bits, config.block, config.offset):
            scalars = num_embeddings * num_blocks(embedding_dim, config.block) * (2 if config.offset else 1)
            return packed_size(num_embeddings, embedding_dim, config.bits) + 2 * scalars  # codes + fp16 scalars
        per_row = embedding_dim if config.bits == 8 else (embedding_dim + 1) // 2
        return num_embeddings * (per_row + 4)  # values + fp32 scale

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: ScalarConfig,
                          fit_time: float = 1.0) -> list[ScalarConfig]:
        """Per-row 4/8/16 bits and every width x block (32, 64, 128) x offset; the largest that fits wins."""
        out = [base.replace(bits=bits, block=0, offset=False) for bits in (4, 8, 16)]
        out += [base.replace(bits=bits, block=block, offset=offset) for bits in (2, 3, 4, 8)
                for block in (128, 64, 32) for offset in (False, True)]
        return out

    def _quantized(self, rows: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if is_blockwise(cfg.bits, cfg.block, cfg.offset):
            return block_decode(*block_codes(rows.detach(), cfg.bits, cfg.block, cfg.offset), cfg.bits, cfg.block)
        values, scale = quantize_rows(rows.detach(), cfg.bits)
        return dequantize(values, scale, cfg.bits, self.embedding_dim)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        return rows + (self._quantized(rows) - rows).detach()  # straight-through estimator

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: ScalarFit, progress: bool | None) -> ScalarFit:
        self.weight.copy_(self._check_fit_weight(weight))
        check_scale_range(self.weight, self.config.bits, self.config.block, self.config.offset)
        return settings

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.weight.mul_(factor)
        cfg = self.config
        check_scale_range(self.weight, cfg.bits, cfg.block, cfg.offset)  # refuse now, not at export

    def export(self) -> FrozenScalar:
        cfg = self.config
        return FrozenScalar.from_weight(self.weight.detach(), cfg.bits, cfg.block, cfg.offset,
                                        padding_idx=self.padding_idx)
