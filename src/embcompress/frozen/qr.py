"""Quotient-remainder tables: the deployed format of the QR trick (Shi et al., KDD 2020).

Shapes (m remainder rows; w = d, or d / 2 for combine="concat"):
    quotient   (ceil(V / m), w) float32
    remainder  (m, w) float32
Row i = quotient[i // m] * remainder[i % m]     (combine="mult", the paper's default)
      = quotient[i // m] + remainder[i % m]     (combine="add")
      = [quotient[i // m], remainder[i % m]]    (combine="concat")
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..validation import json_choice
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenQR", "COMBINES", "combine_parts", "qr_width"]

COMBINES = ("mult", "add", "concat")


def qr_width(combine: str, embedding_dim: int) -> int:
    """Columns of each table: d, or d / 2 for concat (ValueError when d is odd)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if combine != "concat":
        return embedding_dim
    if embedding_dim % 2:
        raise ValueError(f"combine='concat' splits the dim in two halves, but embedding_dim={embedding_dim} "
                         "is odd; use combine='mult' or combine='add'")
    return embedding_dim // 2


def combine_parts(quotient_rows: torch.Tensor, remainder_rows: torch.Tensor, combine: str) -> torch.Tensor:
    """(N, w) and (N, w) -> (N, d) by the combine rule (paper Sec. 3, the "operation")."""
    if combine == "mult":
        return quotient_rows * remainder_rows
    if combine == "add":
        return quotient_rows + remainder_rows
    return torch.cat([quotient_rows, remainder_rows], 1)


@register_format
class FrozenQR(FrozenEmbedding):
    format = "qr"
    quotient: torch.Tensor  # registered buffers, declared for the type checker
    remainder: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        combine: str,
        quotient: torch.Tensor,
        remainder: torch.Tensor,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        width = qr_width(combine, embedding_dim)
        if remainder.dim() != 2 or remainder.shape[0] < 1:
            raise ValueError(f"remainder must be a (buckets, {width}) table, got {tuple(remainder.shape)}")
        buckets = remainder.shape[0]
        want_q, want_r = (-(-num_embeddings // buckets), width), (buckets, width)
        if tuple(quotient.shape) != want_q or tuple(remainder.shape) != want_r:
            raise ValueError(f"quotient {tuple(quotient.shape)} and remainder {tuple(remainder.shape)} do not "
                             f"decode a ({num_embeddings}, {embedding_dim}) table with combine={combine!r}; "
                             f"expected {want_q} and {want_r}")
        self.combine = combine
        self.buckets = buckets
        self.register_buffer("quotient", quotient.detach().float().contiguous())
        self.register_buffer("remainder", remainder.detach().float().contiguous())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        quotient = F.embedding(ids // self.buckets, self.quotient)
        remainder = F.embedding(ids % self.buckets, self.remainder)
        if self.combine == "mult":  # in place on the fresh gather: no third (N, d) tensor
            return quotient.mul_(remainder)
        if self.combine == "add":
            return quotient.add_(remainder)
        return torch.cat([quotient, remainder], 1)

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """combine_parts on the two gathers; the fast path's oracle."""
        return combine_parts(self.quotient[ids // self.buckets], self.remainder[ids % self.buckets], self.combine)

    def metadata(self) -> dict[str, Any]:
        return {"combine": self.combine}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if set(metadata) != {"combine"}:
            raise ValueError(f"qr metadata holds exactly 'combine', got {sorted(metadata)}")
        json_choice(metadata, "combine", COMBINES)


__getattr__ = renamed_names(__name__, {"QREmbedding": "FrozenQR"})  # deprecated names
