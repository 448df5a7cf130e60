"""Buckets + per-row scalars: the deployed format of MEmCom and the hashing trick.

Shapes:
    table  (buckets, d) float32      shared rows, indexed by hash(i)
    scale  (V,) float32, optional     MEmCom's per-entity weight w_i
    bias   (V,) float32, optional     per-entity scalar bias b_i
Row i = scale_i * table[hash(i)] + bias_i
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..hashing import PRIME, HashFunction
from ..validation import MAX_ROWS, json_choice, json_int, json_object
from .. import kernels
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenHashed"]


@register_format
class FrozenHashed(FrozenEmbedding):
    format = "hashed"
    table: torch.Tensor  # registered buffers, declared for the type checker
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    c_bags = True

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        hash: dict[str, Any],
        table: torch.Tensor,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.hash = HashFunction.from_dict(hash)
        if table.shape != (self.hash.buckets, embedding_dim):
            raise ValueError(f"table must be ({self.hash.buckets}, {embedding_dim}), got {tuple(table.shape)}")
        self.register_buffer("table", table.detach().float().contiguous())
        for name, value in (("scale", scale), ("bias", bias)):
            if value is not None and value.shape != (num_embeddings,):
                raise ValueError(f"{name} must have shape ({num_embeddings},), got {tuple(value.shape)}")
            self.register_buffer(name, None if value is None else value.detach().float().contiguous())

    def _c_lookup(self, ids: torch.Tensor, bags: "kernels.Bags | None" = None) -> torch.Tensor | None:
        """One fused pass in C (hash, gather, scale and bias per row; or pooled bags), or None where it cannot run."""
        if not (kernels.usable(ids, self.table) and all(t is None or t.dtype == torch.float32
                                                        for t in (self.table, self.scale, self.bias))):
            return None
        return kernels.hashed_lookup(ids.contiguous(), self.num_embeddings, self.hash, self.table, self.scale,
                                     self.bias, bags)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._c_lookup(ids)
        if rows is not None:
            return rows
        buckets = self.hash(ids)
        capture = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if not capture:
            # Eager: int32 indices and offsets take embedding_bag's fbgemm kernel, a faster gather than
            # F.embedding (index_select) or int64 embedding_bag (benchmarks/perf.py). Graph capture
            # keeps int64, as exporters expect.
            buckets = buckets.int()
        offsets = torch.arange(ids.shape[0], dtype=buckets.dtype)
        if self.scale is None:
            # One bag per row: the bag's sum is the row itself (0 + x == x).
            out = F.embedding(buckets, self.table) if capture else \
                F.embedding_bag(buckets, self.table, offsets, mode="sum")
        else:
            # Scale fused into the gather: embedding_bag with one bag per row and the row's scale as
            # its weight writes scale_i * table[h(i)] in one pass (no second (N, d) tensor).
            out = F.embedding_bag(buckets, self.table, offsets, mode="sum",
                                  per_sample_weights=self.scale.index_select(0, ids))
        if self.bias is not None:
            out.add_(self.bias.index_select(0, ids).unsqueeze(1))  # in place: out is fresh
        return out

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The plain formula scale_i * table[hash(i)] + bias_i; the fast path's oracle."""
        out = self.table[self.hash(ids)]
        if self.scale is not None:
            out = out * self.scale[ids].unsqueeze(1)
        return out if self.bias is None else out + self.bias[ids].unsqueeze(1)

    def metadata(self) -> dict[str, Any]:
        return {"hash": self.hash.to_dict()}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if set(metadata) != {"hash"}:
            raise ValueError(f"hashed metadata holds exactly 'hash', got {sorted(metadata)}")
        params = json_object(metadata, "hash")
        assert params is not None
        if set(params) - {"kind", "buckets", "a", "b"}:
            raise ValueError(f"unknown hash parameters {sorted(set(params) - {'kind', 'buckets', 'a', 'b'})}")
        kind = json_choice(params, "kind", ("mod", "universal"))
        json_int(params, "buckets", 1, MAX_ROWS)
        # universal: a in [1, p), b in [0, p), so a * id + b stays in int64 for every id < 2^31
        json_int(params, "a", 1 if kind == "universal" else 0, PRIME - 1, optional=True)
        json_int(params, "b", 0, PRIME - 1, optional=True)

    def check_stored(self) -> None:
        # (a * id + b) must not overflow int64 in either path: the universal hash is defined for ids < 2^31.
        if self.hash.kind == "universal" and self.num_embeddings > 1 << 31:
            raise ValueError(f"a universal hash serves at most 2^31 rows, the header says {self.num_embeddings}")


__getattr__ = renamed_names(__name__, {"HashedEmbedding": "FrozenHashed"})  # deprecated names
