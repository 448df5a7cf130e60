"""Codes + codebooks: the deployed format of DPQ, compositional codes and k-means PQ.

Shapes:
    packed     (ceil(V * books * bits / 8),) uint8   bit-packed codes, see ``bitpack``
    codebooks  (books, codewords, width) float32     one codebook per code position, or
               (1, codewords, width)                 one codebook shared by all ``books`` positions
    width = d / books (concat) or d (sum)
Row i = concat_j codebooks[j, code_ij]      (combine="concat", product quantization)
      = sum_j    codebooks[j, code_ij]      (combine="sum", additive / compositional codes)
(with a shared codebook, ``codebooks[j]`` reads ``codebooks[0]`` for every j).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..bitpack import bits_for, pack_codes, packed_size, unpack_codes
from .base import FrozenEmbedding, register_format

__all__ = ["CodebookEmbedding", "decode_codes"]


def decode_codes(codes: torch.Tensor, codebooks: torch.Tensor, combine: str) -> torch.Tensor:
    """codes (N, books) int64, codebooks (books or 1, K, width) -> rows (N, d). Differentiable in codebooks.

    A codebook tensor with a leading 1 is shared by every code position.
    """
    stored, codewords, width = codebooks.shape
    books = codes.shape[1]
    if stored == books:
        codes = codes + torch.arange(books, device=codes.device) * codewords
    elif stored != 1:
        raise ValueError(f"codes have {books} positions but codebooks {tuple(codebooks.shape)} hold {stored} "
                         f"codebooks; need {books} or 1 (shared)")
    parts = F.embedding(codes, codebooks.reshape(stored * codewords, width))  # (N, books, width)
    return parts.sum(1) if combine == "sum" else parts.reshape(codes.shape[0], books * width)


@register_format
class CodebookEmbedding(FrozenEmbedding):
    """Bit-packed codes plus fp32 codebooks.

    ``books`` is the number of codes per row; it defaults to ``codebooks.shape[0]``. Passing a
    larger ``books`` with codebooks of shape (1, K, width) shares that one codebook across all
    positions (DPQ with shared key/value sets), so the artifact holds a single copy.
    """

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
        books: int | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        if combine not in ("concat", "sum"):
            raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
        if codebooks.dim() != 3:
            raise ValueError(f"codebooks must be (books, codewords, width), got {tuple(codebooks.shape)}")
        stored, codewords, width = codebooks.shape
        books = stored if books is None else books
        if not isinstance(books, int) or books < 1 or stored not in (books, 1):
            raise ValueError(f"books={books!r} does not fit codebooks of shape {tuple(codebooks.shape)}: "
                             f"need one codebook per position ({books}) or one shared codebook (1)")
        want_width = embedding_dim // books if combine == "concat" else embedding_dim
        if (combine == "concat" and books * width != embedding_dim) or width != want_width:
            raise ValueError(f"{books} codes over codebooks of shape {tuple(codebooks.shape)} do not decode to "
                             f"dim {embedding_dim} with combine={combine!r}")
        if bits != bits_for(codewords):
            raise ValueError(f"bits={bits} does not match {codewords} codewords (need {bits_for(codewords)})")
        if packed.dtype != torch.uint8 or packed.shape != (packed_size(num_embeddings, books, bits),):
            raise ValueError(f"packed codes must be uint8 of {packed_size(num_embeddings, books, bits)} bytes, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        self.combine = combine
        self.bits = bits
        self.books = books
        self.shared = stored == 1 and books > 1
        self.codewords = codewords
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("codebooks", codebooks.detach().float().contiguous())

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, combine: str,
                   padding_idx: int | None = None) -> "CodebookEmbedding":
        """Pack integer codes (V, books) with their codebooks ((books or 1), K, width)."""
        books = codes.shape[1]
        _, codewords, width = codebooks.shape
        dim = books * width if combine == "concat" else width
        bits = bits_for(codewords)
        return cls(codes.shape[0], dim, padding_idx, combine=combine, bits=bits,
                   packed=pack_codes(codes, bits), codebooks=codebooks, books=books)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return unpack_codes(self.packed, ids, self.books, self.bits)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return decode_codes(self.codes(ids), self.codebooks, self.combine)

    def metadata(self) -> dict[str, Any]:
        return {"combine": self.combine, "bits": self.bits, "books": self.books}
