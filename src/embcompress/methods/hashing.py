"""The hashing trick (Weinberger et al., ICML 2009): rows share a table of m buckets.

Baseline for MEmCom. Shapes: table (m, d); row i = table[h(i)], h = i mod m by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..config import MethodConfig, SpecError
from ..frozen import HashedEmbedding
from ..hashing import HashFunction
from ..registry import register

__all__ = ["HashConfig", "HashEmbedding", "bucket_means", "bucket_grid"]


def bucket_grid(limit: int, dense: int = 4096, step: float = 1.01) -> list[int]:
    """Sizes 1..dense, then growing by ``step`` up to ``limit``: budget candidates for a bucket count.

    A full range 1..V would build hundreds of thousands of configs; a 1% grid wastes at most
    about 1% of a budget.
    """
    sizes = set(range(1, min(dense, limit) + 1))
    size = float(dense)
    while size < limit:
        size *= step
        sizes.add(min(limit, int(size)))
    sizes.add(limit)
    return sorted(sizes)


@dataclass(frozen=True)
class HashConfig(MethodConfig):
    method: ClassVar[str] = "hash"
    buckets: int = field(default=1024, metadata={"help": "rows m of the shared table"})
    hash: Literal["mod", "universal"] = field(default="mod", metadata={"help": "i mod m, or a stored universal hash"})
    init_std: float = field(default=1.0, metadata={"help": "std of the random initial table (nn.Embedding uses 1)"})

    def validate(self) -> None:
        if self.buckets < 1:
            raise SpecError(f"{self.method}: buckets must be >= 1, got {self.buckets}")
        if self.init_std < 0:
            raise SpecError(f"{self.method}: init_std must be >= 0, got {self.init_std}")


def bucket_means(weight: torch.Tensor, buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Least-squares shared rows: the mean of the rows hashed to each bucket (0 for empty ones)."""
    sums = torch.zeros(num_buckets, weight.shape[1]).index_add_(0, buckets, weight)
    counts = torch.bincount(buckets, minlength=num_buckets).clamp_min(1).unsqueeze(1)
    return sums / counts


@register
class HashEmbedding(CompressedEmbedding):
    """Rows hashed into a shared table of ``buckets`` rows."""

    Config = HashConfig

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        cfg = self.config
        self.hash = (HashFunction.from_dict(layout["hash"]) if layout
                     else HashFunction.create(cfg.hash, cfg.buckets))
        self.table = nn.Parameter(torch.randn(cfg.buckets, embedding_dim) * cfg.init_std)

    def layout(self) -> dict[str, Any]:
        return {"hash": self.hash.to_dict()}

    @classmethod
    def expected_bytes(cls, config: HashConfig, num_embeddings: int, embedding_dim: int) -> int:
        return config.buckets * embedding_dim * 4

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: HashConfig) -> list[HashConfig]:
        return [base.replace(buckets=m) for m in bucket_grid(num_embeddings)]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.hash(ids), self.table)

    @torch.no_grad()
    def fit(self, weight: torch.Tensor, *, progress: bool | None = None, **_: Any) -> "HashEmbedding":
        weight = self._check_fit_weight(weight)
        self.table.copy_(bucket_means(weight, self.hash(torch.arange(self.num_embeddings)), self.config.buckets))
        return self

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.table.mul_(factor)

    def export(self) -> HashedEmbedding:
        return HashedEmbedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                               hash=self.hash.to_dict(), table=self.table.detach().clone())
