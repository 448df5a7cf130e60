"""Codes + codebooks: the deployed format of DPQ, compositional codes and k-means PQ.

Shapes:
    packed     (ceil(V * books * bits / 8),) uint8   bit-packed codes, see ``bitpack``
    codebooks  (books, codewords, width) float32     one codebook per code position, or
               (1, codewords, width)                 one codebook shared by all ``books`` positions
               (float16 storage is kept as is: half the codebook bytes; decoding adds in float32)
    width = d / books (concat) or d (sum)
Row i = concat_j codebooks[j, code_ij]      (combine="concat", product quantization)
      = sum_j    codebooks[j, code_ij]      (combine="sum", additive / compositional codes)
(with a shared codebook, ``codebooks[j]`` reads ``codebooks[0]`` for every j).
    rotation   (d, d) float16, optional            rows are coded in a rotated basis: row i = decoded_i @ rotation^T
               (pq with rotation=pca); pooled bags and tied-head scores rotate once, after pooling / before scoring
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..bitpack import MAX_BITS, bits_for, pack_codes, packed_size, unpack_codes
from ..validation import json_choice, json_int
from .. import kernels
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenCodebook", "decode_codes", "straight_through"]


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
    table = codebooks.reshape(stored * codewords, width)
    if table.dtype == torch.float16:  # fp16-stored codebooks: decode in float32 (the codebook is small)
        table = table.float()
    if combine == "sum":  # a bag sum never holds the (N, books, width) parts: wide tables x many books
        return _BagSum.apply(codes, table) if table.requires_grad else F.embedding_bag(codes, table, mode="sum")
    # index_select, not F.embedding: the same gather, and its backward is an index_add, about ten
    # times cheaper than embedding's dense backward at training batch sizes.
    return table.index_select(0, codes.reshape(-1)).view(codes.shape[0], books * width)


class _BagSum(torch.autograd.Function):
    """``F.embedding_bag(codes, table, mode="sum")`` with a cheaper table gradient.

    embedding_bag's own backward sorts the N * books indices, which costs more than the whole
    forward. Here the C kernel adds each thread's rows into its own cached copy of the table;
    without it, one index_add of the upstream rows per code position (cheaper than a one-hot
    matmul). With a shared codebook two positions may pick the same row; both ways add up.
    """

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.rows = table.shape[0]
        return F.embedding_bag(codes, table, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (codes,) = ctx.saved_tensors
        if kernels.usable(codes, grad) and grad.dtype == torch.float32:
            return None, kernels.bag_sum_backward(codes.contiguous(), grad.contiguous(), ctx.rows)
        grad_table = grad.new_zeros(ctx.rows, grad.shape[1])
        for position in range(codes.shape[1]):
            grad_table.index_add_(0, codes[:, position], grad)
        return None, grad_table


class _SoftPathGradient(torch.autograd.Function):
    """Forward: the hard rows as they are. Backward: their gradient, plus the gradient ``probs`` would
    get if the rows were the soft decode ``probs @ codebooks`` (codebooks taken as constants)."""

    @staticmethod
    def forward(ctx: Any, hard: torch.Tensor, probs: torch.Tensor, codebooks: torch.Tensor,
                combine: str) -> torch.Tensor:
        ctx.save_for_backward(codebooks)
        ctx.combine, ctx.books = combine, probs.shape[1]
        return hard.view_as(hard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_probs = None
        if ctx.needs_input_grad[1]:
            (codebooks,) = ctx.saved_tensors
            n, books = grad.shape[0], ctx.books
            _, codewords, width = codebooks.shape
            table = codebooks.expand(books, -1, -1)  # a shared codebook serves every position
            if ctx.combine == "sum":  # d row / d probs[n, m, k] = codebooks[m, k]: one (N, d) @ (d, M K)
                grad_probs = grad.mm(table.reshape(books * codewords, width).t()).view(n, books, codewords)
            else:  # concat: group j of the row's gradient against codebook j, batched over groups
                grad_probs = torch.bmm(grad.view(n, books, width).transpose(0, 1),
                                       table.transpose(1, 2)).transpose(0, 1)
        return grad, grad_probs, None, None


def straight_through(hard: torch.Tensor, probs: torch.Tensor, codebooks: torch.Tensor, combine: str) -> torch.Tensor:
    """Straight-through rows: the value of ``hard``, the gradient of ``hard + soft - soft.detach()``.

    ``hard`` (N, d) is the decode of the chosen codes (differentiable in the codebooks), ``probs``
    (N, books, K) the relaxed choice, ``codebooks`` ((books or 1), K, width) taken as constants on
    the soft path. Same gradients as building ``soft = decode(probs, codebooks.detach())``, without
    computing the soft rows in the forward (their value cancels) or a one-hot (N, books, K) tensor.
    """
    codebooks = codebooks.detach()
    if codebooks.dtype == torch.float16:  # fp16-stored codebooks: the soft path runs in float32
        codebooks = codebooks.float()
    return _SoftPathGradient.apply(hard, probs, codebooks, combine)


def _rebuild_fast_path(module: "FrozenCodebook", _incompatible_keys: Any) -> None:
    module._build_fast_path()


@register_format
class FrozenCodebook(FrozenEmbedding):
    """Bit-packed codes plus fp32 (or fp16) codebooks.

    ``books`` is the number of codes per row; it defaults to ``codebooks.shape[0]``. Passing a
    larger ``books`` with codebooks of shape (1, K, width) shares that one codebook across all
    positions (DPQ with shared key/value sets), so the artifact holds a single copy.
    """

    format = "codebook"
    packed: torch.Tensor  # registered buffers, declared for the type checker
    codebooks: torch.Tensor
    _table: torch.Tensor
    _slot_offsets: torch.Tensor
    _window_cols: torch.Tensor
    _window_div: torch.Tensor
    _code_bits: torch.Tensor
    _pow2: torch.Tensor
    _group_weights: torch.Tensor
    _group_shifts: torch.Tensor
    _rotation_t: torch.Tensor
    rotation: torch.Tensor | None
    c_bags = True
    #: byte-indexed lookup tables (see ``_build_fast_path``) are built up to this many floats (8 MB)
    byte_table_floats: int = 1 << 21

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
        rotation: torch.Tensor | None = None,
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
        # float16 codebooks stay float16 (the stored bytes halve); any other dtype is stored as float32.
        dtype = torch.float16 if codebooks.dtype == torch.float16 else torch.float32
        self.register_buffer("codebooks", codebooks.detach().to(dtype).contiguous())
        if rotation is not None and (not isinstance(rotation, torch.Tensor) or not rotation.is_floating_point()
                                     or rotation.shape != (embedding_dim, embedding_dim)):
            got = tuple(rotation.shape) if isinstance(rotation, torch.Tensor) else type(rotation).__name__
            raise ValueError(f"rotation must be a float ({embedding_dim}, {embedding_dim}) matrix, got {got}")
        # Stored in float16 (half the bytes of the d x d matrix; pq's fit codes in the rounded basis).
        if rotation is None:
            self.rotation = None  # a plain attribute: no stored tensor (graph exporters refuse None buffers)
        else:
            self.register_buffer("rotation", rotation.detach().half().contiguous())
        self._build_fast_path()
        # The lookup tables derive from the codebooks: rebuild them when a state dict is loaded.
        self.register_load_state_dict_post_hook(_rebuild_fast_path)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, combine: str,
                   padding_idx: int | None = None, rotation: torch.Tensor | None = None) -> "FrozenCodebook":
        """Pack integer codes (V, books) with their codebooks ((books or 1), K, width) and an optional
        (d, d) rotation of the decoded rows."""
        books = codes.shape[1]
        _, codewords, width = codebooks.shape
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codewords):
            raise ValueError(f"codes must lie in [0, {codewords}) for {codewords} codewords, "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        dim = books * width if combine == "concat" else width
        bits = bits_for(codewords)
        return cls(codes.shape[0], dim, padding_idx, combine=combine, bits=bits,
                   packed=pack_codes(codes, bits), codebooks=codebooks, books=books, rotation=rotation)

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return unpack_codes(self.packed, ids, self.books, self.bits)

    # -- fast lookup ------------------------------------------------------------------------
    # The reference decode (unpack_codes + decode_codes) builds int64 (N, books) codes and, for
    # combine="sum", an (N, books, d) tensor; at N = 65,536 those temporaries cost more than the
    # output. The fast path reads each row's code bytes as uint8, turns them into int32 indices
    # of a small float32 table and makes the output with ONE parallel op: index_select (concat)
    # or embedding_bag with one bag per row (sum). Where 8 / bits codes share a byte (1, 2, 4 or
    # 8 bits), the table is indexed by the byte itself: entry (slot, byte) is the concat / sum of
    # the codewords of the codes in that byte, so a byte is one gather instead of 8 / bits.
    def _build_fast_path(self) -> None:
        rotation = self.rotation
        self.register_buffer("_rotation_t", torch.zeros(0) if rotation is None else rotation.float().t().contiguous(),
                             persistent=False)
        books, bits, codewords = self.books, self.bits, self.codewords
        stored = self.codebooks.shape[0]
        codebooks = self.codebooks.detach().float()
        row_bytes = books * bits // 8 if books * bits % 8 == 0 else 0
        per_byte = 8 // bits if 8 % bits == 0 else 0
        mode, table, slots, stride = "generic", codebooks, books, codewords
        if row_bytes and per_byte > 1:
            slots, stride = books // per_byte, 256
            width = codebooks.shape[2] * (per_byte if self.combine == "concat" else 1)
            if (1 if self.shared else slots) * 256 * width <= self.byte_table_floats:
                mode, table = "bytes", self._byte_table(codebooks, per_byte, 1 if self.shared else slots)
            else:  # too big to keep in cache: read each code from its byte window instead
                mode, slots, stride = "window", books, codewords
        elif row_bytes:
            mode = "bytes" if bits == 8 else ("wide" if bits == 16 else "window")
        if mode == "generic" or (stored == 1 and table is codebooks):
            stride = codewords
        shared_table = table.shape[0] == 1
        offsets = torch.zeros(slots, dtype=torch.int32) if shared_table else \
            torch.arange(slots, dtype=torch.int32) * stride
        self._fast_mode, self._row_bytes, self._slots = mode, row_bytes, slots
        # The C lookup reads slot s of a row as the slot_bits-bit field at s * slot_bits.
        self._slot_bits = {"bytes": 8, "wide": 16}.get(mode, bits)
        # float32 codebooks used as they are are read in place (a second buffer aliasing them would
        # trip torch.export); byte tables and float16 codebooks get their own float32 table.
        self._table_is_codebooks = table is codebooks and self.codebooks.dtype == torch.float32
        self.register_buffer("_table", table.new_zeros(0, table.shape[2]) if self._table_is_codebooks else
                             table.reshape(-1, table.shape[2]).contiguous(), persistent=False)
        self.register_buffer("_slot_offsets", offsets, persistent=False)
        # Window mode: code j starts at bit j * bits of its row: bytes first, first + 1, first + 2
        # (clamped to the row's last byte; clamped bytes only feed bits above the code, which are
        # masked). Built for every mode (tiny): torch.export refuses non-persistent None buffers.
        start = torch.arange(books) * bits
        first = start >> 3
        top = max(row_bytes - 1, 0)
        cols = torch.stack([first.clamp_max(top), (first + 1).clamp_max(top), (first + 2).clamp_max(top)])
        self.register_buffer("_window_cols", cols, persistent=False)
        self.register_buffer("_window_div", (1 << (start & 7)).to(torch.int32), persistent=False)
        self.register_buffer("_code_bits", torch.arange(books) * bits, persistent=False)
        self.register_buffer("_pow2", (1 << torch.arange(8)).to(torch.int32), persistent=False)
        # Grouped windows (eager window mode): every lcm(bits, 8) / 8 bytes of a row hold whole
        # codes (5 bytes = 8 five-bit codes), so a group is read as one integer and the codes are
        # cut out with shifts and a mask. Up to 6 bytes a group, so the float64 read is exact.
        group = math.lcm(bits, 8) // 8
        self._group = group if mode == "window" and group <= 6 and row_bytes % group == 0 else 0
        # int64, converted at use: a float64 buffer would follow module.float() / .half() and break the read.
        self.register_buffer("_group_weights", 256 ** torch.arange(max(self._group, 1)), persistent=False)
        self.register_buffer("_group_shifts", torch.arange(group * 8 // bits) * bits, persistent=False)

    def _byte_table(self, codebooks: torch.Tensor, per_byte: int, slots: int) -> torch.Tensor:
        """(slots, 256, width): entry (g, v) decodes the per_byte codes packed in byte value v of slot g."""
        mask = (1 << self.bits) - 1
        values = torch.arange(256)
        # Byte values holding a code >= codewords never occur in valid data; clamping keeps them finite.
        sub = [((values >> (s * self.bits)) & mask).clamp_max(self.codewords - 1) for s in range(per_byte)]
        tables = []
        for g in range(slots):
            parts = [codebooks[0 if self.shared else g * per_byte + s].index_select(0, sub[s])
                     for s in range(per_byte)]
            if self.combine == "concat":
                tables.append(torch.cat(parts, 1))
            else:
                total = parts[0].clone()
                for part in parts[1:]:
                    total += part
                tables.append(total)
        return torch.stack(tables)

    def _indices(self, ids: torch.Tensor) -> torch.Tensor:
        """int32 (N, slots) row indices into ``_table`` for 1-D int64 ids.

        Bit fields are read with +, *, // and % rather than |, << and &: the values are the same
        (the bytes of a window do not overlap) and every graph exporter, ONNX included, has them.
        """
        mask = 1 << self.bits
        if self._fast_mode == "generic":  # rows not byte-aligned: each code from its own bit offset
            bit = ids.unsqueeze(1) * (self.books * self.bits) + self._code_bits
            first, shift = bit // 8, bit % 8
            last = self.packed.shape[0] - 1
            window = self.packed[first].int() + self.packed[(first + 1).clamp_max(last)].int() * 256
            if self.bits > 9:
                window = window + self.packed[(first + 2).clamp_max(last)].int() * 65536
            codes = torch.div(window, self._pow2[shift], rounding_mode="floor") % mask
            return codes + self._slot_offsets
        rows = self.packed.view(self.num_embeddings, self._row_bytes).index_select(0, ids)  # (N, bytes) uint8
        if self._fast_mode == "bytes":
            codes = rows.int()
        elif self._fast_mode == "wide":  # 16 bits: two little-endian bytes per code
            codes = rows[:, 0::2].int() + rows[:, 1::2].int() * 256
        elif self._group and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            # Eager only (graph capture keeps the +, *, //, % path below; the same codes): one exact
            # float64 dot product per group, then int64 shift and mask: a few passes over the codes
            # where the byte-window arithmetic below makes one per code position.
            n = rows.shape[0]
            value = (rows.view(n, self._row_bytes // self._group, self._group).double()
                     @ self._group_weights.double()).long()
            codes = ((value.unsqueeze(-1) >> self._group_shifts) & (mask - 1)).view(n, self.books).int()
        else:
            wide = rows.int()
            window = wide[:, self._window_cols[0]] + wide[:, self._window_cols[1]] * 256
            if self.bits > 9:
                window = window + wide[:, self._window_cols[2]] * 65536
            codes = torch.div(window, self._window_div, rounding_mode="floor") % mask
        return codes + self._slot_offsets

    def _lookup_table(self) -> torch.Tensor:
        return self.codebooks.view(-1, self.codebooks.shape[2]) if self._table_is_codebooks else self._table

    def _c_lookup(self, ids: torch.Tensor, bags: "kernels.Bags | None" = None) -> torch.Tensor | None:
        """One fused pass in C (code bytes -> table rows -> output or pooled bags), or None where it cannot run."""
        table = self._lookup_table()
        if not (kernels.usable(ids, self.packed) and table.dtype == torch.float32):
            return None
        return kernels.codebook_lookup(ids.contiguous(), self.num_embeddings, self.packed, self.books * self.bits,
                                       self._slot_bits, self._slot_offsets, table, self.combine, bags)

    def _rotate(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.rotation is None else rows @ self._rotation_t

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rotate(self._coded_lookup(ids))

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None,
               mode: str) -> torch.Tensor | None:
        # Sum and mean are linear: pool in the coded basis, rotate the bags once.
        bags = super().pooled(ids, offsets, per_sample_weights, mode)
        return None if bags is None else self._rotate(bags)

    def _coded_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows in the basis the codes live in (before ``rotation``)."""
        rows = self._c_lookup(ids)
        if rows is not None:
            return rows
        table = self._lookup_table()
        n = ids.shape[0]
        index = self._indices(ids).view(-1)
        if self.combine == "concat":
            return table.index_select(0, index).view(n, self.embedding_dim)
        offsets = torch.arange(0, n * self._slots, self._slots, dtype=torch.int32)
        return F.embedding_bag(index, table, offsets, mode="sum")

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The plain decode (unpack every code to int64, gather, concat or sum); the fast path's oracle."""
        return self._rotate(decode_codes(self.codes(ids), self.codebooks, self.combine))

    def metadata(self) -> dict[str, Any]:
        return {"combine": self.combine, "bits": self.bits, "books": self.books}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        unknown = set(metadata) - {"combine", "bits", "books"}
        if unknown:
            raise ValueError(f"unknown codebook metadata {sorted(unknown)}")
        json_choice(metadata, "combine", ("concat", "sum"))
        json_int(metadata, "bits", 1, MAX_BITS)
        json_int(metadata, "books", 1, 1 << 16, optional=True)

    def check_stored(self, chunk_rows: int = 1 << 16) -> None:
        """Every stored code < K. With K a power of two every bit field is a valid code; otherwise a
        field >= K would read a neighbouring codeword (or past the table) in one path and be
        clamped in another. One vectorized unpack per chunk of rows. (Non-finite values, a rotation's
        included, are refused for every format when the file is read.)"""
        if self.codewords == 1 << self.bits:
            return
        for start in range(0, self.num_embeddings, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, self.num_embeddings))
            codes = unpack_codes(self.packed, rows, self.books, self.bits)
            bad = codes >= self.codewords
            if bool(bad.any()):
                row, slot = (int(v) for v in bad.nonzero()[0])
                raise ValueError(f"stored code {int(codes[row, slot])} at row {start + row}, slot {slot} is not "
                                 f"below the {self.codewords} codewords; the codes are damaged")


__getattr__ = renamed_names(__name__, {"CodebookEmbedding": "FrozenCodebook"})  # deprecated names
