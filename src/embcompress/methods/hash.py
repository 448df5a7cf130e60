"""The hashing trick (Weinberger et al., ICML 2009): rows share a table of m buckets.

Baseline for MEmCom. Shapes: table (m, d); row i = table[h(i)], h = i mod m by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import FitConfig
from ..frozen import FrozenHashed
from ..registry import register
from .shared import HashedRowsConfig, HashedRowsTable, bucket_means

__all__ = ["HashConfig", "HashFit", "HashEmbedding"]


@dataclass(frozen=True)
class HashConfig(HashedRowsConfig):
    method: ClassVar[str] = "hash"


@dataclass(frozen=True)
class HashFit(FitConfig):
    """The fit is closed-form (each bucket's least-squares row): nothing to set but the common ``steps``."""

    method: ClassVar[str] = "hash"


@register
class HashEmbedding(HashedRowsTable[HashConfig]):
    """Rows hashed into a shared table of ``buckets`` rows."""

    Config = HashConfig
    Fit = HashFit

    @classmethod
    def expected_bytes(cls, config: HashConfig, num_embeddings: int, embedding_dim: int) -> int:
        return config.buckets * embedding_dim * 4

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.hash(ids), self.table)

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: FitConfig, progress: bool | None) -> FitConfig:
        weight = self._check_fit_weight(weight)
        self.table.copy_(bucket_means(weight, self.hash(torch.arange(self.num_embeddings)), self.config.buckets))
        return settings

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.table.mul_(factor)

    def export(self) -> FrozenHashed:
        return FrozenHashed(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            hash=self.hash.to_dict(), table=self.table.detach().clone())
