"""Bit-packing of integer codes at exactly ``bits`` bits each, with random row access.

Layout: the codes of a (rows x books) matrix are laid out row-major as one little-endian bit
stream; code (i, j) occupies bits [(i*books + j)*bits, ... + bits). The stream is stored as
``ceil(rows*books*bits / 8)`` bytes, nothing more, so the byte count is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["bits_for", "packed_size", "pack_codes", "unpack_codes"]

MAX_BITS = 16  # a code is read from at most three bytes


def bits_for(num_codewords: int) -> int:
    """ceil(log2 K): bits needed to store a code in [0, K)."""
    if num_codewords < 2:
        raise ValueError(f"need at least 2 codewords, got {num_codewords}")
    return max(1, math.ceil(math.log2(num_codewords)))


def packed_size(rows: int, books: int, bits: int) -> int:
    return (rows * books * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int, chunk_rows: int = 65536) -> torch.Tensor:
    """Pack a (rows, books) integer tensor into a uint8 tensor of :func:`packed_size` bytes."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (rows, books), got shape {tuple(codes.shape)}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    array = codes.detach().cpu().numpy().astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to fit {bits} bits")
    rows, books = array.shape
    # Pack in chunks whose bit count is a multiple of 8, so chunks concatenate byte-aligned.
    step = max(8, chunk_rows - chunk_rows % 8)
    shifts = np.arange(bits, dtype=np.int64)
    pieces = []
    for start in range(0, rows, step):
        block = array[start:start + step]
        bit_matrix = ((block[..., None] >> shifts) & 1).astype(np.uint8)
        pieces.append(np.packbits(bit_matrix.reshape(-1), bitorder="little"))
    packed = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    assert packed.size == packed_size(rows, books, bits)
    return torch.from_numpy(packed)


def unpack_codes(packed: torch.Tensor, rows: torch.Tensor, books: int, bits: int) -> torch.Tensor:
    """Codes of the given rows, shape (len(rows), books), as int64."""
    if bits == 8:  # byte-aligned: a plain gather
        return packed.view(-1, books)[rows].long()
    offsets = (rows.long().unsqueeze(1) * books + torch.arange(books, device=rows.device)) * bits
    first = offsets >> 3
    last = packed.numel() - 1
    # Bytes past the end are clamped: they only feed bits above the code, which are masked.
    b0 = packed[first].int()
    b1 = packed[(first + 1).clamp_max(last)].int()
    window = b0 | (b1 << 8)
    if bits > 9:
        window = window | (packed[(first + 2).clamp_max(last)].int() << 16)
    return ((window >> (offsets & 7).int()) & ((1 << bits) - 1)).long()
