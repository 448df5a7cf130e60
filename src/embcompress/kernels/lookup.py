"""C lookups of the deployed formats: codebook (concat | sum), hashed, tensor-train and factors rows,
and ``nn.EmbeddingBag``-style pooling of them (:class:`Bags`)."""

from __future__ import annotations

import torch

from ..hashing import PRIME, HashFunction
from ._extension import _address, _kernels

__all__ = ["Bags", "codebook_lookup", "hashed_lookup", "tt_lookup", "factors_lookup", "FACTOR_ACTIVATIONS"]


def codebook_lookup(ids: torch.Tensor, num_embeddings: int, packed: torch.Tensor, row_bits: int, slot_bits: int,
                    offsets: torch.Tensor, table: torch.Tensor, combine: str, bags: "Bags | None" = None
                    ) -> torch.Tensor:
    """Rows of ids (N,) int64 decoded from packed uint8 codes against table (rows, width) float32.

    Row r's slot s is the ``slot_bits``-bit field at bit ``r * row_bits + s * slot_bits`` of
    ``packed``; it indexes ``table`` at ``field + offsets[s]``. ``combine`` "concat" lays the slots'
    table rows side by side, "sum" adds them. With ``bags``, the pooled bags (B, d) instead.
    """
    if combine not in ("concat", "sum"):
        raise ValueError(f"combine must be 'concat' or 'sum', got {combine!r}")
    if offsets.dim() != 1 or table.dim() != 2:
        raise ValueError(f"offsets must be (slots,) and table (rows, width), got {tuple(offsets.shape)} and "
                         f"{tuple(table.shape)}")
    slots, width = offsets.shape[0], table.shape[1]
    dim = width if combine == "sum" else slots * width
    out = torch.empty(ids.shape[0] if bags is None else bags.count, dim)
    _kernels.codebook_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings,
                             _address(packed, torch.uint8), packed.numel(), row_bits, slot_bits, slots,
                             _address(offsets, torch.int32), _address(table, torch.float32), table.shape[0],
                             width, combine == "sum", out.data_ptr(), torch.get_num_threads(),
                             *(() if bags is None else bags.arguments()))
    return out


class Bags:
    """``nn.EmbeddingBag`` pooling for the C lookups of ``count`` ids: bag b holds the ids from
    ``starts[b]`` to the next start; optional per-id weights (sum mode); ids equal to
    ``padding_idx`` left out; sum or mean."""

    def __init__(self, count: int, starts: torch.Tensor, weights: torch.Tensor | None, padding_idx: int | None,
                 mode: str) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"the C bags pool by 'sum' or 'mean', not {mode!r}")
        if starts.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(starts.shape)}")
        if starts.numel() and (int(starts[0]) != 0 or bool((starts[1:] < starts[:-1]).any())
                               or int(starts[-1]) > count):
            raise ValueError(f"offsets must be the bags' starting positions: 0 first, never decreasing, at most "
                             f"the number of ids ({count}); got {starts.tolist()[:8]}"
                             f"{' ...' if starts.numel() > 8 else ''}")
        if weights is not None and weights.shape != (count,):
            raise ValueError(f"per_sample_weights must have one weight per id ({count}), got {tuple(weights.shape)}")
        self.count = starts.shape[0]
        # (B + 1) boundaries; the C side checks they start at 0, end at the id count and never decrease.
        self.bounds = torch.cat([starts.to(torch.int64), torch.tensor([count])]).contiguous()
        self.weights = None if weights is None else weights.to(torch.float32).contiguous()
        self.padding_idx = -1 if padding_idx is None else padding_idx
        self.mean = mode == "mean"

    def arguments(self) -> tuple:
        """The trailing arguments of the C lookups' bag mode (the tensors live as long as this object)."""
        return (self.bounds.data_ptr(), self.count, 0 if self.weights is None else self.weights.data_ptr(),
                self.padding_idx, self.mean)


def hashed_lookup(ids: torch.Tensor, num_embeddings: int, hash: HashFunction, table: torch.Tensor,
                  scale: torch.Tensor | None, bias: torch.Tensor | None, bags: Bags | None = None) -> torch.Tensor:
    """scale[i] * table[hash(i)] + bias[i] for ids (N,) int64 (scale and bias optional); with ``bags``,
    the pooled bags (B, d) instead."""
    if table.shape[0] != hash.buckets:
        raise ValueError(f"table has {table.shape[0]} rows, the hash {hash.buckets} buckets")
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None and value.shape != (num_embeddings,):
            raise ValueError(f"{name} must have shape ({num_embeddings},), got {tuple(value.shape)}")
    out = torch.empty(ids.shape[0] if bags is None else bags.count, table.shape[1])
    _kernels.hashed_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings, hash.kind == "universal",
                           hash.a, hash.b, PRIME, hash.buckets, _address(table, torch.float32), table.shape[1],
                           0 if scale is None else _address(scale, torch.float32),
                           0 if bias is None else _address(bias, torch.float32), out.data_ptr(),
                           torch.get_num_threads(), *(() if bags is None else bags.arguments()))
    return out


def tt_lookup(ids: torch.Tensor, num_embeddings: int, left: torch.Tensor, right: torch.Tensor,
              transposed: bool = False) -> torch.Tensor:
    """Row i = left[i // R] @ right[i % R], flattened; left (L, d_left, rank), right (R, rank, d_right).

    ``transposed``: the halves are stored as left^T (L, rank, d_left) and right^T (R, d_right, rank).
    """
    if transposed:
        left_rows, rank, d_left = left.shape
        right_rows, d_right, right_rank = right.shape
    else:
        left_rows, d_left, rank = left.shape
        right_rows, right_rank, d_right = right.shape
    if right_rank != rank:
        raise ValueError(f"half tables disagree on the rank: left {tuple(left.shape)}, right {tuple(right.shape)}")
    out = torch.empty(ids.shape[0], d_left * d_right)
    _kernels.tt_lookup(_address(ids, torch.int64), ids.shape[0], num_embeddings, _address(left, torch.float32),
                       left_rows, d_left, _address(right, torch.float32), right_rows, d_right, rank, transposed,
                       out.data_ptr(), torch.get_num_threads())
    return out


FACTOR_ACTIVATIONS = {"identity": 0, "relu": 1, "tanh": 2}  # the activations the C factors lookup applies


def factors_lookup(ids: torch.Tensor | None, codes: torch.Tensor, basis: torch.Tensor, bias: torch.Tensor | None,
                   activation: str = "identity") -> torch.Tensor:
    """Rows act(codes[ids]) @ basis + bias (act in FACTOR_ACTIVATIONS); with ``ids`` None, row i uses
    codes[i] (gathered and activated already)."""
    rows, rank = codes.shape
    if basis.shape[0] != rank or (bias is not None and bias.shape != (basis.shape[1],)):
        raise ValueError(f"codes {tuple(codes.shape)}, basis {tuple(basis.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit together")
    if activation not in FACTOR_ACTIVATIONS:
        raise ValueError(f"the C factors lookup applies {', '.join(FACTOR_ACTIVATIONS)}, not {activation!r}")
    count = rows if ids is None else ids.shape[0]
    out = torch.empty(count, basis.shape[1])
    _kernels.factors_lookup(0 if ids is None else _address(ids, torch.int64), count, rows,
                            _address(codes, torch.float32), rank, FACTOR_ACTIVATIONS[activation],
                            _address(basis, torch.float32), basis.shape[1],
                            0 if bias is None else _address(bias, torch.float32), out.data_ptr(),
                            torch.get_num_threads())
    return out
