"""Tensor-train cores: the deployed format of TT embeddings (Hrinchuk et al., Findings of EMNLP 2020).

Shapes:
    core k      (r_{k-1}, v_k, d_k, r_k) float32, k = 0..n-1, r_0 = r_n = 1
    vocab_shape (v_1..v_n), prod >= V (the vocabulary is padded to V'; padded rows are never read)
    dim_shape   (d_1..d_n), prod == d
Row i has digits (i_1..i_n) in row-major order (first core most significant); the row is the
chained product G_1[:, i_1] G_2[:, i_2] ... G_n[:, i_n], a (d_1, ..., d_n) tensor read row-major.

Lookup splits the chain into a left half (cores < m) and a right half (cores >= m). A row is then
one small matmul ``L[i_left] (D_l, r_m) @ R[i_right] (r_m, D_r)``: d * r_m multiply-adds per row,
the same for every split. The frozen module precomputes both halves' full products once (they
are tiny next to V x d: 10^4 x 16 x 16 floats for V = 10^6, d = 128, rank 16, i.e. 10 MB next to
the 0.5 MB of cores and the 512 MB dense table), so a lookup is two gathers and one batched
matmul, with no per-call chain and no V' x d rebuild. The cache is a non-persistent buffer:
``num_bytes`` counts the cores only (the artifact); ``cache_bytes`` reports the cache.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..validation import MAX_DIM, MAX_ROWS, json_int_list
from .. import kernels
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenTensorTrain", "tt_half", "tt_half_table", "tt_rows", "tt_rows_cached", "choose_split",
           "check_tt_shapes", "row_digits"]


def check_tt_shapes(num_embeddings: int, embedding_dim: int, vocab_shape: Sequence[int],
                    dim_shape: Sequence[int]) -> None:
    """Raise ValueError unless the factorization covers a (num_embeddings, embedding_dim) table."""
    if len(vocab_shape) != len(dim_shape) or len(vocab_shape) < 2:
        raise ValueError(f"vocab_shape {list(vocab_shape)} and dim_shape {list(dim_shape)} must have the "
                         "same number (>= 2) of factors, one per core")
    if any(int(v) < 1 for v in vocab_shape) or any(int(x) < 1 for x in dim_shape):
        raise ValueError(f"factors must be positive: vocab_shape {list(vocab_shape)}, dim_shape {list(dim_shape)}")
    if math.prod(vocab_shape) < num_embeddings:
        raise ValueError(f"vocab_shape {list(vocab_shape)} covers {math.prod(vocab_shape)} rows, fewer than "
                         f"num_embeddings={num_embeddings}")
    if math.prod(dim_shape) != embedding_dim:
        raise ValueError(f"dim_shape {list(dim_shape)} multiplies to {math.prod(dim_shape)}, "
                         f"not embedding_dim={embedding_dim}")


def choose_split(vocab_shape: Sequence[int], dim_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """The core m where the chain is cut: the smallest total size of the two half tables.

    ``ranks`` = (r_0..r_n). The left table has prod(v[:m]) * prod(d[:m]) * r_m floats, the right
    one prod(v[m:]) * prod(d[m:]) * r_m; per-row work (d * r_m) and gathered floats
    (r_m (D_l + D_r)) favour the same balanced cut.
    """
    n = len(vocab_shape)

    def size(m: int) -> int:
        left = math.prod(vocab_shape[:m]) * math.prod(dim_shape[:m])
        right = math.prod(vocab_shape[m:]) * math.prod(dim_shape[m:])
        return (left + right) * ranks[m]

    return min(range(1, n), key=size)


def tt_half(cores: Sequence[torch.Tensor], digits: Sequence[torch.Tensor], side: str) -> torch.Tensor:
    """Contract a run of cores for given per-core digits.

    Left half (cores 0..m-1, r_0 = 1): returns (N, d_1..d_m flattened, r_m).
    Right half (cores m..n-1, r_n = 1): returns (N, r_m, d_{m+1}..d_n flattened).
    """
    count = digits[0].shape[0]
    if side == "left":
        out = cores[0][0].index_select(0, digits[0])  # (N, d_1, r_1)
        width = out.shape[1]
        for core, digit in zip(cores[1:], digits[1:]):
            r_in, _, dk, r_out = core.shape
            g = core.permute(1, 0, 2, 3).reshape(core.shape[1], r_in, dk * r_out).index_select(0, digit)
            width *= dk
            out = torch.bmm(out, g).reshape(count, width, r_out)  # (N, D * d_k, r_k)
        return out
    out = cores[-1][..., 0].permute(1, 0, 2).index_select(0, digits[-1])  # (N, r_{n-1}, d_n)
    width = out.shape[2]
    for core, digit in zip(reversed(cores[:-1]), reversed(digits[:-1])):
        r_in, _, dk, r_out = core.shape
        g = core.permute(1, 0, 2, 3).reshape(core.shape[1], r_in * dk, r_out).index_select(0, digit)
        width *= dk
        out = torch.bmm(g, out).reshape(count, r_in, width)  # (N, r_{k-1}, d_k * D)
    return out


def tt_half_table(cores: Sequence[torch.Tensor], side: str) -> torch.Tensor:
    """Every row of a half at once (differentiable): one matmul per core instead of a batched chain.

    Left half (r_0 = 1): (prod v, prod d, r_m); right half (r_n = 1): (prod v, r_m, prod d); rows in
    row-major digit order, the same as ``tt_half`` on ``row_digits(arange)``. Each step is a single
    (P D, r) @ (r, v d r') matmul, which MKL runs far faster than P small batched products.
    """
    if side == "left":
        table = cores[0][0]  # (v_1, d_1, r_1)
        for core in cores[1:]:
            prefixes, width, rank = table.shape
            r_in, v, dk, r_out = core.shape
            step = table.reshape(prefixes * width, rank).mm(core.reshape(r_in, v * dk * r_out))
            table = step.view(prefixes, width, v, dk, r_out).permute(0, 2, 1, 3, 4).reshape(
                prefixes * v, width * dk, r_out)
        return table
    table = cores[-1][..., 0].permute(1, 0, 2)  # (v_n, r_{n-1}, d_n)
    for core in reversed(cores[:-1]):
        suffixes, rank, width = table.shape
        r_in, v, dk, r_out = core.shape
        step = core.reshape(r_in * v * dk, r_out).mm(table.permute(1, 0, 2).reshape(rank, suffixes * width))
        table = step.view(r_in, v, dk, suffixes, width).permute(1, 3, 0, 2, 4).reshape(
            v * suffixes, r_in, dk * width)
    return table


def row_digits(index: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Row-major digits of ``index`` in a mixed radix ``shape`` (first digit most significant)."""
    digits = []
    for radix in reversed(shape):
        digits.append(index % radix)
        index = index // radix
    return digits[::-1]


def tt_rows(
    cores: Sequence[torch.Tensor],
    vocab_shape: Sequence[int],
    split: int,
    ids: torch.Tensor,
    left_table: torch.Tensor | None = None,
    right_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (N, d) for 1-D int64 ``ids`` by chaining core slices (differentiable).

    Repeated ids are computed once, and so is each distinct half-index (the first cores' digits
    repeat across a batch far more than whole ids do). A precomputed half table, if given,
    replaces that half's chain.
    """
    inverse = None
    if ids.numel() > 1:
        unique_ids, where_ids = torch.unique(ids, return_inverse=True)
        if unique_ids.shape[0] < ids.shape[0]:  # repeats: compute each distinct row once
            ids, inverse = unique_ids, where_ids
    right_rows = math.prod(vocab_shape[split:])
    left_index, right_index = ids // right_rows, ids % right_rows
    halves = []
    for side, index, table, part in (("left", left_index, left_table, slice(0, split)),
                                     ("right", right_index, right_table, slice(split, None))):
        if table is not None:
            halves.append(table.index_select(0, index))
            continue
        size = math.prod(vocab_shape[part])
        if 4 * index.shape[0] >= size:
            # As many ids as a quarter of the half's rows: build all of them with one matmul per
            # core rather than chaining the distinct ones as many tiny batched products, which MKL
            # runs at a fraction of its matmul speed (and slower still in backward). Deciding by
            # the id count, not the distinct count, skips a sort.
            halves.append(tt_half_table(cores[part], side).index_select(0, index))
            continue
        unique, where = torch.unique(index, return_inverse=True)
        half = tt_half(cores[part], row_digits(unique, vocab_shape[part]), side)
        halves.append(half.index_select(0, where))
    rows = torch.bmm(halves[0], halves[1]).reshape(ids.shape[0], halves[0].shape[1] * halves[1].shape[2])
    return rows if inverse is None else rows.index_select(0, inverse)


@torch.no_grad()
def tt_rows_cached(left_table: torch.Tensor, right_table: torch.Tensor, ids: torch.Tensor,
                   transposed: bool = False, chunk: int = 4096) -> torch.Tensor:
    """Rows (N, d) from both half tables: per row two gathers and one small matmul.

    ``transposed=False``: left_table (V_l, D_l, r), right_table (V_r, r, D_r); row = L @ R.
    ``transposed=True``: the tables hold L^T (V_l, r, D_l) and R^T (V_r, D_r, r); the matmul is
    R^T @ L^T = row^T, copied transposed into the output. MKL's batched matmul runs faster when
    the result's rows are the wider side (D_l > D_r, e.g. 16 > 8 at V = 10^6, d = 128), enough
    to pay for the copy.
    Chunks of 4096 rows keep the gathered halves (r (D_l + D_r) floats a row, 3x the output)
    cache-sized; a few dozen ops per call. No dedupe: sorting the ids costs more than it saves.
    """
    right_rows = right_table.shape[0]
    left_index, right_index = ids // right_rows, ids % right_rows
    count = ids.shape[0]
    d_left = left_table.shape[2] if transposed else left_table.shape[1]
    d_right = right_table.shape[1] if transposed else right_table.shape[2]
    out = left_table.new_empty(count, d_left, d_right)
    for start in range(0, count, chunk):
        stop = start + chunk
        left = left_table.index_select(0, left_index[start:stop])
        right = right_table.index_select(0, right_index[start:stop])
        if transposed:
            out[start:stop].copy_(torch.bmm(right, left).transpose(1, 2))
        else:
            torch.bmm(left, right, out=out[start:stop])
    return out.reshape(count, d_left * d_right)


@register_format
class FrozenTensorTrain(FrozenEmbedding):
    """The TT cores and nothing else; half tables are a non-persistent lookup cache.

    Example:
        >>> import embcompress
        >>> frozen = embcompress.build("tt:cores=3,rank=8", 1000, 128).export()
        >>> frozen(torch.tensor([3, 5])).shape
        torch.Size([2, 128])
    """

    format = "tt"
    _left_table: torch.Tensor | None  # the lookup cache (non-persistent buffers)
    _right_table: torch.Tensor | None
    #: a half's full product is cached when it has at most this many floats (16 MB)
    cache_floats: int = 1 << 22

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        vocab_shape: Sequence[int],
        dim_shape: Sequence[int],
        **cores: torch.Tensor,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        vocab_shape, dim_shape = [int(v) for v in vocab_shape], [int(x) for x in dim_shape]
        check_tt_shapes(num_embeddings, embedding_dim, vocab_shape, dim_shape)
        n = len(vocab_shape)
        names = [f"core{k}" for k in range(n)]
        if sorted(cores) != sorted(names):
            raise ValueError(f"a {n}-core TT needs tensors {names}, got {sorted(cores)}")
        ranks = [1]
        for k, name in enumerate(names):
            core = cores[name]
            expected = (ranks[-1], vocab_shape[k], dim_shape[k])
            if core.dim() != 4 or tuple(core.shape[:3]) != expected:
                raise ValueError(f"{name} must have shape (r_{k}, v_{k + 1}, d_{k + 1}, r_{k + 1}) with "
                                 f"leading dims {expected}, got {tuple(core.shape)}")
            if core.shape[3] < 1:
                raise ValueError(f"{name} has rank {core.shape[3]}; TT ranks must be >= 1")
            ranks.append(int(core.shape[3]))
            self.register_buffer(name, core.detach().float().contiguous())
        if ranks[-1] != 1:
            raise ValueError(f"the last core must end in rank 1, got {ranks[-1]}")
        self.vocab_shape, self.dim_shape, self.ranks = vocab_shape, dim_shape, ranks
        self.split = choose_split(vocab_shape, dim_shape, ranks)
        self._build_cache()

    @property
    def cores(self) -> list[torch.Tensor]:
        return [getattr(self, f"core{k}") for k in range(len(self.vocab_shape))]

    @torch.no_grad()
    def _build_cache(self) -> None:
        m, cores = self.split, self.cores
        # Both halves cached: store them in the orientation whose per-row matmul result is wider
        # (see tt_rows_cached). A lone cached half stays as tt_rows reads it.
        d_left, d_right = math.prod(self.dim_shape[:m]), math.prod(self.dim_shape[m:])
        tables: dict[str, torch.Tensor | None] = {}
        for side, part in (("left", slice(0, m)), ("right", slice(m, None))):
            shape = self.vocab_shape[part]
            floats = math.prod(shape) * math.prod(self.dim_shape[part]) * self.ranks[m]
            tables[side] = None
            if floats <= self.cache_floats:
                tables[side] = tt_half_table(cores[part], side)
        both = tables["left"] is not None and tables["right"] is not None
        self._transposed = both and d_left > d_right
        for side, table in tables.items():
            if table is not None:
                table = (table.transpose(1, 2) if self._transposed else table).contiguous()
            self.register_buffer(f"_{side}_table", table, persistent=False)

    def cache_bytes(self) -> int:
        """Bytes of the lookup cache (derived from the cores at load time; never stored)."""
        return sum(t.numel() * t.element_size() for t in (self._left_table, self._right_table) if t is not None)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        left, right = self._left_table, self._right_table
        if left is not None and right is not None:
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                # Graph capture: one gather + bmm (the same numbers); the chunk loop and out= writes
                # of tt_rows_cached would be frozen to the example's size.
                right_rows = right.shape[0]
                gathered_left, gathered_right = left[ids // right_rows], right[ids % right_rows]
                rows = torch.bmm(gathered_right, gathered_left).transpose(1, 2) if self._transposed else \
                    torch.bmm(gathered_left, gathered_right)
                return rows.reshape(ids.shape[0], self.embedding_dim)
            if kernels.usable(ids, left) and left.dtype == right.dtype == torch.float32 and \
                    (not self._transposed or self.embedding_dim <= kernels.TT_MAX_ROW):
                return kernels.tt_lookup(ids.contiguous(), self.num_embeddings, left, right, self._transposed)
            return tt_rows_cached(left, right, ids, self._transposed)
        return tt_rows(self.cores, self.vocab_shape, self.split, ids, left, right)

    def metadata(self) -> dict[str, Any]:
        return {"vocab_shape": list(self.vocab_shape), "dim_shape": list(self.dim_shape)}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if set(metadata) != {"vocab_shape", "dim_shape"}:
            raise ValueError(f"tt metadata holds exactly 'vocab_shape' and 'dim_shape', got {sorted(metadata)}")
        json_int_list(metadata, "vocab_shape", 1, MAX_ROWS, min_len=2, max_len=16)
        json_int_list(metadata, "dim_shape", 1, MAX_DIM, min_len=2, max_len=16)


__getattr__ = renamed_names(__name__, {"TensorTrainCores": "FrozenTensorTrain"})  # deprecated names
