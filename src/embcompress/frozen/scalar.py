"""Scalar quantization with a per-row scale: the deployed format of the `scalar` baseline.

Shapes (bits = 16 | 8 | 4):
    values  (V, d) float16            bits = 16 (no scale)
            (V, d) int8               bits = 8, row i = values_i * scale_i
            (V, ceil(d/2)) uint8      bits = 4, two signed 4-bit values per byte (low nibble first)
    scale   (V,) float32              bits = 8 | 4: max |row| / (2^(bits-1) - 1)
"""

from __future__ import annotations

from typing import Any

import torch

from ..validation import json_choice
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenScalar", "quantize_rows"]


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric per-row quantization: (values, scale) as stored by the format."""
    if bits == 16:
        return weight.half(), None
    qmax = (1 << (bits - 1)) - 1
    peak = weight.abs().amax(1)
    # Only all-zero rows need a stand-in scale; a floor such as 1e-12 would zero every tiny row.
    scale = torch.where(peak > 0, peak / qmax, torch.ones_like(peak))
    q = torch.round(weight / scale.unsqueeze(1)).clamp(-qmax, qmax).to(torch.int8)
    if bits == 8:
        return q, scale
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], 1)
    nibbles = (q & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, bits: int, dim: int) -> torch.Tensor:
    if bits == 16:
        return values.float()
    if bits == 4:
        low = (values & 0xF).to(torch.int8)
        high = (values >> 4).to(torch.int8)
        q = torch.stack([low, high], -1).reshape(values.shape[0], 2 * values.shape[1])[:, :dim]
        values = torch.where(q > 7, q - 16, q)  # sign-extend the nibbles
    assert scale is not None, "int8 / int4 rows carry a scale"
    return values.float() * scale.unsqueeze(1)


@register_format
class FrozenScalar(FrozenEmbedding):
    format = "scalar"
    values: torch.Tensor  # registered buffers, declared for the type checker
    scale: torch.Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        bits: int,
        values: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        expected = {16: ((num_embeddings, embedding_dim), torch.float16),
                    8: ((num_embeddings, embedding_dim), torch.int8),
                    4: ((num_embeddings, (embedding_dim + 1) // 2), torch.uint8)}
        if bits not in expected:
            raise ValueError(f"bits must be 16, 8 or 4, got {bits!r}")
        shape, dtype = expected[bits]
        if tuple(values.shape) != shape or values.dtype != dtype:
            raise ValueError(f"values must be {dtype} of shape {shape}, got {values.dtype} {tuple(values.shape)}")
        if (bits == 16) != (scale is None) or (scale is not None and scale.shape != (num_embeddings,)):
            raise ValueError(f"scale must be a ({num_embeddings},) tensor for bits 8 and 4, and absent for 16")
        self.bits = bits
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scale", None if scale is None else scale.float().contiguous())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.values.index_select(0, ids)
        if self.bits == 8 and self.scale is not None:  # scale in place on the fresh float copy: one (N, d) tensor
            return values.float().mul_(self.scale.index_select(0, ids).unsqueeze(1))
        scale = None if self.scale is None else self.scale.index_select(0, ids)
        return dequantize(values, scale, self.bits, self.embedding_dim)

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize the gathered rows with the plain formula; the fast path's oracle."""
        scale = None if self.scale is None else self.scale[ids]
        return dequantize(self.values[ids], scale, self.bits, self.embedding_dim)

    def metadata(self) -> dict[str, Any]:
        return {"bits": self.bits}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if set(metadata) != {"bits"}:
            raise ValueError(f"scalar metadata holds exactly 'bits', got {sorted(metadata)}")
        json_choice(metadata, "bits", (16, 8, 4))


__getattr__ = renamed_names(__name__, {"ScalarQuantizedEmbedding": "FrozenScalar"})  # deprecated names
