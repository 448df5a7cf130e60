"""Codes + codebooks: the deployed format of DPQ, compositional codes and k-means PQ.

Shapes:
    packed     (ceil(V * books * bits / 8),) uint8   bit-packed codes, see ``bitpack``
    codebooks  (books, codewords, width) float32     width = d / books (concat) or d (sum)
Row i = concat_j codebooks[j, code_ij]      (combine="concat", product quantization)
      = sum_j    codebooks[j, code_ij]      (combine="sum", additive / compositional codes)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..bitpack import bits_for, pack_codes, packed_size, unpack_codes
from .base import FrozenEmbedding, register_format

__all__ = ["CodebookEmbedding", "decode_codes"]


def decode_codes(codes: torch.Tensor, codebooks: torch.Tensor, combine: str) -> torch.Tensor:
    """codes (N, books) int64, codebooks (books, K, width) -> rows (N, d). Differentiable in codebooks."""
    books, codewords, width = codebooks.shape
    offsets = torch.arange(books, device=codes.device) * codewords
    parts = F.embedding(codes + offsets, codebooks.reshape(books * codewords, width))  # (N, books, width)
    return parts.sum(1) if combine == "sum" else parts.reshape(codes.shape[0], books * width)


@register_format
class CodebookEmbedding(FrozenEmbedding):
    format = "codebook"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        combine: str,
        bits: int,
        packed: torch.Tensor,
        codebooks: torch.Tensor,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        if combine not in ("concat", "sum"):
            raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be (books, codewords, width), got {tuple(codebooks.shape)}")
        books, codewords, width = codebooks.shape
        want_width = embedding_dim // books if combine == "concat" else embedding_dim
        if (combine == "concat" and books * width != embedding_dim) or width != want_width:
            raise ValueError(f"codebooks of shape {tuple(codebooks.shape)} do not decode to dim {embedding_dim} "
                             f"with combine={combine!r}")
        if bits != bits_for(codewords):
            raise ValueError(f"bits={bits} does not match {codewords} codewords (need {bits_for(codewords)})")
        if packed.dtype != torch.uint8 or packed.shape != (packed_size(num_embeddings, books, bits),):
            raise ValueError(f"packed codes must be uint8 of {packed_size(num_embeddings, books, bits)} bytes, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        self.combine = combine
        self.bits = bits
        self.books = books
        self.codewords = codewords
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("codebooks", codebooks.detach().float().contiguous())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, combine: str,
                   padding_idx: int | None = None) -> "CodebookEmbedding":
        """Pack integer codes (V, books) with their codebooks."""
        books, codewords, width = codebooks.shape
        dim = books * width if combine == "concat" else width
        bits = bits_for(codewords)
        return cls(codes.shape[0], dim, padding_idx, combine=combine, bits=bits,
                   packed=pack_codes(codes, bits), codebooks=codebooks)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return unpack_codes(self.packed, ids, self.books, self.bits)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return decode_codes(self.codes(ids), self.codebooks, self.combine)

    def metadata(self) -> dict[str, Any]:
        return {"combine": self.combine, "bits": self.bits}
