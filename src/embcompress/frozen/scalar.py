"""Scalar quantization: the deployed format of the `scalar` baseline, per-row or block-wise scales.

Two layouts. Per-row (``block=0``, bits 16 | 8 | 4, no offset), the original format:
    values  (V, d) float16            bits = 16 (no scale)
            (V, d) int8               bits = 8, row i = values_i * scale_i
            (V, ceil(d/2)) uint8      bits = 4, two signed 4-bit values per byte (low nibble first)
    scale   (V,) float32              bits = 8 | 4: max |row| / (2^(bits-1) - 1)

Block-wise (``block`` = B > 0, or bits 3 | 2, or ``offset``), like llama.cpp's Q4_0 / Q4_1 and
torchao's group-wise int4: each row is cut into nb = ceil(d / B') blocks of B' = B (or d when
B = 0) values, and every block has its own fp16 scale (and with ``offset`` an fp16 minimum):
    values   (packed_size(V, d, bits),) uint8   unsigned codes u in [0, 2^bits), row-major,
                                                bit-packed as in ``embcompress.bitpack``
    scale    (V, nb) float16
    minimum  (V, nb) float16                    offset only
Decoding: x = (u - 2^(bits-1)) * scale (symmetric; the block's largest-magnitude value maps to the
code -2^(bits-1) exactly, Q4_0's trick, so all 2^bits levels are used), or x = u * scale + minimum.
"""

from __future__ import annotations

from typing import Any

import torch

from .._deprecation import renamed_names
from ..bitpack import pack_codes, packed_size, unpack_codes
from ..validation import json_choice, json_int
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenScalar", "quantize_rows", "block_codes", "block_decode", "is_blockwise", "num_blocks",
           "BLOCK_BITS"]

BLOCK_BITS = (8, 4, 3, 2)


def is_blockwise(bits: int, block: int, offset: bool) -> bool:
    """True when the settings need the block-wise layout (the per-row one cannot hold them)."""
    return bits != 16 and (block > 0 or offset or bits in (3, 2))


def num_blocks(dim: int, block: int) -> int:
    """Scales per row: ceil(d / block); block 0 means one block spanning the row."""
    return 1 if block <= 0 else -(-dim // block)


def quantize_rows(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Symmetric per-row quantization: (values, scale) as stored by the per-row layout."""
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
    """Rows of the per-row layout as float32."""
    if bits == 16:
        return values.float()
    if bits == 4:
        low = (values & 0xF).to(torch.int8)
        high = (values >> 4).to(torch.int8)
        q = torch.stack([low, high], -1).reshape(values.shape[0], 2 * values.shape[1])[:, :dim]
        values = torch.where(q > 7, q - 16, q)  # sign-extend the nibbles
    assert scale is not None, "int8 / int4 rows carry a scale"
    return values.float() * scale.unsqueeze(1)


def _blocked(weight: torch.Tensor, block: int) -> torch.Tensor:
    """(V, d) -> (V, nb, B), the last block padded with zeros (they never reach a stored code)."""
    rows, dim = weight.shape
    size = dim if block <= 0 else block
    blocks = num_blocks(dim, block)
    pad = blocks * size - dim
    if pad:
        weight = torch.cat([weight, weight.new_zeros(rows, pad)], 1)
    return weight.reshape(rows, blocks, size)


def _expand(per_block: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """(N, nb) -> (N, d): each block's value repeated over its columns."""
    size = dim if block <= 0 else block
    return per_block.repeat_interleave(size, dim=1)[:, :dim]


@torch.no_grad()
def block_codes(weight: torch.Tensor, bits: int, block: int,
                offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Block-wise quantization: (codes (V, d) int64 in [0, 2^bits), scale (V, nb) fp16, minimum or None).

    Scales are rounded to fp16 before the codes are chosen, so the codes are optimal for the
    stored scale, and the trained module's fake quantization decodes exactly like the export."""
    weight = weight.float()
    dim = weight.shape[1]
    levels = 1 << bits
    blocks = _blocked(weight, block)
    if offset:
        low = blocks.amin(-1)
        high = blocks.amax(-1)
        if block > 0 and dim % block:  # the zero padding must not widen the last block's range
            tail = weight[:, (num_blocks(dim, block) - 1) * block:]
            low[:, -1], high[:, -1] = tail.amin(1), tail.amax(1)
        minimum = low.half()
        scale = ((high - minimum.float()) / (levels - 1)).half()
        step = _expand(scale.float(), block, dim)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((weight - _expand(minimum.float(), block, dim)) / safe).clamp_(0, levels - 1)
        return codes.long(), scale, minimum
    # Q4_0: the signed value of largest magnitude sets scale = value / -2^(bits-1).
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale = (extreme / -(levels // 2)).half()
    step = _expand(scale.float(), block, dim)
    safe = torch.where(step != 0, step, torch.ones_like(step))
    half = levels // 2
    q = torch.round(weight / safe).clamp_(-half, half - 1)
    q = torch.where(step != 0, q, torch.zeros_like(q))
    return (q + half).long(), scale, None


# A scale below 8 x the dtype's smallest subnormal keeps under 3 significant bits (>= 6% rounding):
# the table would decode to zeros or noise, so such tables are refused instead of stored.
_SMALLEST_SCALE = {torch.float16: 2.0 ** -21, torch.float32: 2.0 ** -146}


def check_scale_range(weight: torch.Tensor, bits: int, block: int = 0, offset: bool = False) -> None:
    """Raise a ValueError naming the remedy when the stored scale type cannot represent this table:
    values so small that even the largest scale underflows, or block minimums beyond fp16."""
    if bits == 16 or weight.numel() == 0:
        return
    peak = float(weight.detach().abs().max())
    if peak == 0.0 or peak != peak:  # all zeros are exact; non-finite input is refused elsewhere
        return
    blockwise = is_blockwise(bits, block, offset)
    dtype = torch.float16 if blockwise else torch.float32
    levels = 1 << bits
    if offset:  # the widest block's range sets the largest scale
        blocks = _blocked(weight.detach().float(), block)
        largest_scale = float((blocks.amax(-1) - blocks.amin(-1)).max()) / (levels - 1)
    else:
        largest_scale = peak / (levels // 2 if blockwise else levels // 2 - 1)
    layout = "fp16 block scales" if blockwise else "float32 row scales"
    if largest_scale < _SMALLEST_SCALE[dtype]:
        alternative = "per-row scales (scalar:bits=8)" if blockwise else "scalar:bits=16"
        raise ValueError(f"scalar: this table's values (max |x| = {peak:.3g}) are too small for {layout}, "
                         f"which would round them to zero; multiply the table by a constant first, "
                         f"or use {alternative}")
    if offset and peak > float(torch.finfo(torch.float16).max):
        raise ValueError(f"scalar: this table's values (max |x| = {peak:.3g}) exceed the fp16 block minimums' "
                         f"range (65504); divide the table by a constant first, or use per-row scales "
                         f"(scalar:bits=8)")


def _gather_codes(packed: torch.Tensor, ids: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Codes (N, d) of the given rows with + * // % only (no bitwise ops): every graph exporter,
    ONNX included, has them. A code of at most 8 bits spans at most two bytes."""
    offsets = (ids.unsqueeze(1) * dim + torch.arange(dim, device=ids.device)) * bits
    first = torch.div(offsets, 8, rounding_mode="floor")
    last = packed.numel() - 1
    window = packed[first].int() + packed[(first + 1).clamp_max(last)].int() * 256
    shift = torch.pow(2, offsets % 8).int()
    return torch.div(window, shift, rounding_mode="floor") % (1 << bits)


def block_decode(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int,
                 block: int) -> torch.Tensor:
    """codes (N, d), scale/minimum (N, nb) -> rows (N, d) float32."""
    dim = codes.shape[1]
    step = _expand(scale.float(), block, dim)
    if minimum is None:
        return (codes - (1 << (bits - 1))).float().mul_(step)
    return codes.float().mul_(step).add_(_expand(minimum.float(), block, dim))


@register_format
class FrozenScalar(FrozenEmbedding):
    format = "scalar"
    values: torch.Tensor  # registered buffers, declared for the type checker
    scale: torch.Tensor | None
    minimum: torch.Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        bits: int,
        values: torch.Tensor,
        scale: torch.Tensor | None = None,
        block: int = 0,
        offset: bool = False,
        minimum: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        if bits not in (16, *BLOCK_BITS):
            raise ValueError(f"bits must be 16, 8, 4, 3 or 2, got {bits!r}")
        if block < 0 or (bits == 16 and (block or offset)):
            raise ValueError(f"block must be >= 0, and block/offset apply to bits 8, 4, 3, 2 (got bits={bits}, "
                             f"block={block}, offset={offset})")
        self.bits, self.block, self.offset = bits, int(block), bool(offset)
        self.blockwise = is_blockwise(bits, block, offset)
        shape: tuple[int, ...]
        scale_shape: tuple[int, ...]
        if self.blockwise:
            blocks = num_blocks(embedding_dim, block)
            shape, dtype = (packed_size(num_embeddings, embedding_dim, bits),), torch.uint8
            scale_shape, scale_dtype = (num_embeddings, blocks), torch.float16
            if (minimum is None) == offset or (minimum is not None and tuple(minimum.shape) != scale_shape):
                raise ValueError(f"minimum must be a {scale_shape} tensor with offset=True, and absent otherwise")
        else:
            shape, dtype = {16: ((num_embeddings, embedding_dim), torch.float16),
                            8: ((num_embeddings, embedding_dim), torch.int8),
                            4: ((num_embeddings, (embedding_dim + 1) // 2), torch.uint8)}[bits]
            scale_shape, scale_dtype = (num_embeddings,), torch.float32
            if minimum is not None:
                raise ValueError("minimum is stored only with offset=True")
        if tuple(values.shape) != shape or values.dtype != dtype:
            raise ValueError(f"values must be {dtype} of shape {shape}, got {values.dtype} {tuple(values.shape)}")
        if (bits == 16) != (scale is None) or (scale is not None and tuple(scale.shape) != scale_shape):
            raise ValueError(f"scale must be a {scale_shape} tensor for bits {bits}, and absent for bits 16")
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scale", None if scale is None else scale.to(scale_dtype).contiguous())
        self.register_buffer("minimum", None if minimum is None else minimum.half().contiguous())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, block: int = 0, offset: bool = False,
                    padding_idx: int | None = None) -> "FrozenScalar":
        """Quantize a (V, d) matrix into this format."""
        rows, dim = weight.shape
        check_scale_range(weight, bits, block, offset)
        if is_blockwise(bits, block, offset):
            codes, block_scale, minimum = block_codes(weight, bits, block, offset)
            return cls(rows, dim, padding_idx, bits=bits, block=block, offset=offset,
                       values=pack_codes(codes, bits), scale=block_scale, minimum=minimum)
        values, row_scale = quantize_rows(weight.detach(), bits)
        return cls(rows, dim, padding_idx, bits=bits, values=values, scale=row_scale)

    def _block_scale(self) -> torch.Tensor:
        if self.scale is None:  # the constructor requires it for every block-wise layout
            raise ValueError("a block-wise scalar table needs its scale tensor")
        return self.scale

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.blockwise:
            codes = _gather_codes(self.values, ids, self.embedding_dim, self.bits)
            minimum = None if self.minimum is None else self.minimum.index_select(0, ids)
            return block_decode(codes, self._block_scale().index_select(0, ids), minimum, self.bits, self.block)
        values = self.values.index_select(0, ids)
        if self.bits == 8 and self.scale is not None:  # scale in place on the fresh float copy: one (N, d) tensor
            return values.float().mul_(self.scale.index_select(0, ids).unsqueeze(1))
        scale = None if self.scale is None else self.scale.index_select(0, ids)
        return dequantize(values, scale, self.bits, self.embedding_dim)

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize the gathered rows with the plain formula; the fast path's oracle."""
        if self.blockwise:
            dim = self.embedding_dim
            codes = unpack_codes(self.values, ids, dim, self.bits)
            column_block = torch.arange(dim) // (self.block or dim)
            step = self._block_scale()[ids].float()[:, column_block]
            if self.minimum is None:
                return (codes - 2 ** (self.bits - 1)).float() * step
            return codes.float() * step + self.minimum[ids].float()[:, column_block]
        scale = None if self.scale is None else self.scale[ids]
        return dequantize(self.values[ids], scale, self.bits, self.embedding_dim)

    def metadata(self) -> dict[str, Any]:
        # Per-row artifacts keep their original header (bits only).
        extra = {"block": self.block} if self.block else {}
        return {"bits": self.bits, **extra, **({"offset": True} if self.offset else {})}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if not {"bits"} <= set(metadata) <= {"bits", "block", "offset"}:
            raise ValueError(f"scalar metadata holds 'bits' and optionally 'block', 'offset'; got {sorted(metadata)}")
        json_choice(metadata, "bits", (16, *BLOCK_BITS))
        json_int(metadata, "block", 1, 1 << 20, optional=True)
        json_choice(metadata, "offset", (True,), optional=True)


__getattr__ = renamed_names(__name__, {"ScalarQuantizedEmbedding": "FrozenScalar"})  # deprecated names
