"""The part of a compressed table that grows with the vocabulary, held by TorchRec.

A table splits into a per-row part (V rows, held in a TorchRec ``EmbeddingCollection`` that DMP
shards) and everything else (codebooks, centroids, encoders, hashed tables, TT cores: plain
parameters that DMP's DDP wrapper all-reduces). Methods without a per-row part are used as they
are. Per method:

    dpq, codes    query table Q (V, d)            -> supplied to the method's ``_query_rows``
    memcom        per-entity scale, bias (V, 4: scale, bias, 0, 0) -> row = scale * T[h(i)] + bias

The split classes below are the methods themselves with the per-row tensor taken out, so the
decoding is the method's own code; :meth:`RowSupplied.decode` runs it on rows TorchRec looked up.
``to_plain`` rebuilds the ordinary method module (with the full per-row tensor) for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F

from ...base import CompressedEmbedding
from ...methods.codes import CompositionalCodeEmbedding
from ...methods.dpq import DPQEmbedding
from ...methods.memcom import MEmComEmbedding
from ...registry import get_method

__all__ = ["RowPart", "RowSupplied", "build_split", "row_part", "to_plain"]

# Sharding types that are safe for an unpooled EmbeddingCollection on CPU: its dense kernel and
# data-parallel sharding crash or silently pool there (an open FBGEMM bug), so they are never offered.
QUERY_SHARDING = ("table_wise", "row_wise", "column_wise")
# A column split of the (scale, bias) rows would leave a shard without its scale column.
SCALAR_SHARDING = ("table_wise", "row_wise")
SCALAR_WIDTH = 4


@dataclass(frozen=True)
class RowPart:
    """The per-row tensor of a split table: its width and how TorchRec initializes it."""

    name: str
    dim: int
    init: Callable[[torch.Tensor], Any]
    sharding_types: tuple[str, ...]


def _normal(weight: torch.Tensor) -> None:
    # Q starts N(0, 1), as the method draws it (nn.Embedding's init).
    with torch.no_grad():
        weight.normal_()


def _scale_one_bias_zero(weight: torch.Tensor) -> None:
    # w = 1, b = 0: the untrained MEmCom table is the hashing trick (paper Sec. 3).
    with torch.no_grad():
        weight.zero_()
        # A sharded table hands its init a flat view of the local rows; view both as (rows, 4).
        weight.view(-1, SCALAR_WIDTH)[:, 0] = 1.0


class RowSupplied:
    """Mixin: the method reads its per-row tensor from rows supplied for the current call."""

    _supplied: "tuple[torch.Tensor, torch.Tensor] | None" = None

    def decode(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Distinct ids (U,) and their per-row values (U, r) from TorchRec -> decoded rows (U, d)."""
        self._supplied = (ids, rows)
        try:
            return cast(Callable[[torch.Tensor], torch.Tensor], self)(ids)  # the mixin sits on a module
        finally:
            self._supplied = None

    def rows_scale_with_output(self) -> bool:
        """True if :meth:`rescale_output_` must also scale the per-row part TorchRec holds."""
        raise NotImplementedError

    def rescale_held_(self, factor: float) -> None:
        """The part of ``rescale_output_`` on the tensors this module holds (not the per-row part)."""
        raise NotImplementedError

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        if self.rows_scale_with_output():
            method = cast(CompressedEmbedding, self).config.method  # the mixin sits on a compressed table
            raise RuntimeError(f"{method}: rescaling also scales its per-row part, which lives in "
                               "TorchRec; call rescale_output_(table_name, factor) on the "
                               "CompressedEmbeddingBagCollection / CompressedEmbeddingCollection instead")
        self.rescale_held_(factor)

    def _rows_for(self, ids: torch.Tensor) -> torch.Tensor:
        supplied = self._supplied
        if supplied is None or supplied[0].shape != ids.shape or not torch.equal(supplied[0], ids):
            raise RuntimeError(f"{type(self).__name__}: its per-row part lives in TorchRec; call it through "
                               "CompressedEmbeddingBagCollection / CompressedEmbeddingCollection, or export it "
                               "with compressed_tables() for standalone use")
        return supplied[1]


class _SuppliedQuery(RowSupplied):
    def _add_query_table(self, num_embeddings: int, embedding_dim: int, sparse: bool) -> None:
        pass  # Q is a TorchRec table

    def _query_rows(self, ids: torch.Tensor, sparse: bool) -> torch.Tensor:
        return self._rows_for(ids)


class SplitDPQ(_SuppliedQuery, DPQEmbedding):
    """DPQ whose query table is a TorchRec table."""

    def rows_scale_with_output(self) -> bool:
        return self.config.variant == "vq"

    @torch.no_grad()
    def rescale_held_(self, factor: float) -> None:
        self._rescale_all_but_query_(factor)


class SplitCodes(_SuppliedQuery, CompositionalCodeEmbedding):
    """Compositional codes (learning state) whose query table is a TorchRec table."""

    def rows_scale_with_output(self) -> bool:
        return False  # the codes come from the query alone: only the codebooks scale

    def rescale_held_(self, factor: float) -> None:
        CompositionalCodeEmbedding.rescale_output_(self, factor)


class SplitMEmCom(RowSupplied, MEmComEmbedding):
    """MEmCom whose per-entity scale (and bias) are columns of a TorchRec table."""

    def _add_entity_scalars(self, num_embeddings: int, bias: bool) -> None:
        self.scale = None  # type: ignore[assignment]  # column 0 of the TorchRec table; column 1 is the bias
        self.bias = None

    def rows_scale_with_output(self) -> bool:
        return True  # the per-entity scale and bias (the shared table keeps its scale)

    def rescale_held_(self, factor: float) -> None:
        pass

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        scalars = self._rows_for(ids)
        out = F.embedding(self.hash(ids), self.table) * scalars[:, :1]
        return out + scalars[:, 1:2] if self.config.bias else out


_SPLITS: dict[type[CompressedEmbedding[Any]], type[CompressedEmbedding[Any]]] = {
    DPQEmbedding: SplitDPQ, CompositionalCodeEmbedding: SplitCodes, MEmComEmbedding: SplitMEmCom}


def row_part(table: CompressedEmbedding) -> RowPart | None:
    """The per-row part a split table leaves to TorchRec, or None (the whole table is small)."""
    if isinstance(table, _SuppliedQuery):
        return RowPart("query", table.embedding_dim, _normal, QUERY_SHARDING)
    if isinstance(table, SplitMEmCom):
        # FBGEMM's kernels take rows of a multiple of 4 floats: (scale, bias, 0, 0); the unused columns
        # get no gradient and stay 0 (12 or 8 bytes per row of training memory, none in the artifact).
        return RowPart("scalars", SCALAR_WIDTH, _scale_one_bias_zero, SCALAR_SHARDING)
    return None


def build_split(config: Any, num_embeddings: int, embedding_dim: int, split: bool = True) -> CompressedEmbedding:
    """The method's module for this table, with its per-row part left out when it has one (and ``split``)."""
    cls = get_method(config.method)
    return (_SPLITS.get(cls, cls) if split else cls)(num_embeddings, embedding_dim, config)


@torch.no_grad()
def to_plain(table: CompressedEmbedding, rows: torch.Tensor | None) -> CompressedEmbedding:
    """The ordinary method module of a split table, its per-row part filled from ``rows`` (V, r)."""
    if row_part(table) is None:
        return table
    plain_cls = next(base for base in type(table).__mro__[1:] if base in _SPLITS)
    plain = plain_cls(table.num_embeddings, table.embedding_dim, table.config, layout=table.layout())
    state = {key: value for key, value in table.state_dict().items()}
    assert rows is not None, "a split table needs its per-row part"
    if isinstance(table, SplitMEmCom):
        state["scale"] = rows[:, 0].clone()
        if table.config.bias:
            state["bias"] = rows[:, 1].clone()
    else:
        state["query"] = rows.clone()
    plain.load_state_dict(state)
    return plain.train(table.training)
