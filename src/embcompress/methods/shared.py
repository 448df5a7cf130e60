"""Parts several methods build on; not a method itself (it registers nothing).

- :func:`divisors`, :func:`check_groups`: the sub-vector groups of product quantization (pq, dpq);
- :func:`bucket_grid`, :func:`bucket_means`: bucket counts for a budget and least-squares bucket
  rows (hash, memcom, qr);
- :class:`HashedRowsTable` (+ :class:`HashedRowsConfig`): rows hashed into a shared table (hash, memcom);
- :class:`FactorsTable` (+ :class:`FactorsConfig`): E = f(U) W (+ b) (lowrank, distilled).

Methods import these, never each other, so each method file stands alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..config import MethodConfig, SpecError
from ..frozen import FrozenFactors
from ..frozen.factors import ACTIVATIONS
from ..hashing import HashFunction

__all__ = ["divisors", "check_groups", "bucket_grid", "bucket_means", "HashedRowsConfig", "HashedRowsTable",
           "FactorsConfig", "FactorsTable"]


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_groups(method: str, groups: int, embedding_dim: int) -> None:
    if embedding_dim % groups:
        raise SpecError(f"{method}: groups={groups} does not divide embedding_dim={embedding_dim}; "
                        f"valid groups: {', '.join(map(str, divisors(embedding_dim)))}")


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


def bucket_means(weight: torch.Tensor, buckets: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Least-squares shared rows: the mean of the rows hashed to each bucket (0 for empty ones)."""
    sums = torch.zeros(num_buckets, weight.shape[1]).index_add_(0, buckets, weight)
    counts = torch.bincount(buckets, minlength=num_buckets).clamp_min(1).unsqueeze(1)
    return sums / counts


@dataclass(frozen=True)
class HashedRowsConfig(MethodConfig):
    """Fields of every hashed-rows method (``hash``, ``memcom``)."""

    buckets: int = field(default=1024, metadata={"help": "rows m of the shared table"})
    hash: Literal["mod", "universal"] = field(default="mod", metadata={"help": "i mod m, or a stored universal hash"})
    init_std: float = field(default=1.0, metadata={"help": "std of the random initial table (nn.Embedding uses 1)"})

    def validate(self) -> None:
        if self.buckets < 1:
            raise SpecError(f"{self.method}: buckets must be >= 1, got {self.buckets}")
        if self.init_std < 0:
            raise SpecError(f"{self.method}: init_std must be >= 0, got {self.init_std}")


HC = TypeVar("HC", bound=HashedRowsConfig)


class HashedRowsTable(CompressedEmbedding[HC]):
    """A shared (buckets, d) table indexed by a hash of the row id; the hash is stored in the layout.
    Shapes: table (m, d); rows hash into it with h = i mod m by default."""

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
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: HC,
                          fit_time: float = 1.0) -> list[HC]:
        return [base.replace(buckets=m) for m in bucket_grid(num_embeddings)]


@dataclass(frozen=True)
class FactorsConfig(MethodConfig):
    """Fields of every factorized method (``lowrank``, ``distilled``)."""

    rank: int = field(default=32, metadata={"help": "inner dimension r"})

    def validate(self) -> None:
        if self.rank < 1:
            raise SpecError(f"{self.method}: rank must be >= 1, got {self.rank}")


FC = TypeVar("FC", bound=FactorsConfig)


class FactorsTable(CompressedEmbedding[FC]):
    """E = f(U) W (+ b): f is the config's ``activation`` (identity without one), b its ``bias``.
    Shapes: codes U (V, r), basis W (r, d), bias b (d,). Exported to the ``factors`` format."""

    @staticmethod
    def _activation_of(config: FactorsConfig) -> str:
        return getattr(config, "activation", "identity")

    @staticmethod
    def _has_bias(config: FactorsConfig) -> bool:
        return bool(getattr(config, "bias", False))

    @property
    def activation(self) -> str:
        return self._activation_of(self.config)

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        rank = self.config.rank
        if rank > min(num_embeddings, embedding_dim):
            raise SpecError(f"{self.config.method}: rank {rank} exceeds min(rows, dim) = "
                            f"{min(num_embeddings, embedding_dim)}; choose a smaller rank")
        # Entries of f(U) W start with variance ~1, like nn.Embedding's N(0, 1).
        self.codes = nn.Parameter(torch.randn(num_embeddings, rank))
        gain = 2.0 if self.activation == "relu" else 1.0  # relu halves the second moment
        self.basis = nn.Parameter(torch.randn(rank, embedding_dim) * (gain / rank) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(embedding_dim)) if self._has_bias(self.config) else None

    @classmethod
    def expected_bytes(cls, config: FC, num_embeddings: int, embedding_dim: int) -> int:
        if config.rank > min(num_embeddings, embedding_dim):
            raise SpecError(f"rank {config.rank} exceeds min(rows, dim)")
        bias = embedding_dim if cls._has_bias(config) else 0
        return 4 * (num_embeddings * config.rank + config.rank * embedding_dim + bias)

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: FC,
                          fit_time: float = 1.0) -> list[FC]:
        return [base.replace(rank=r) for r in range(1, min(num_embeddings, embedding_dim) + 1)]

    def activated_codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.codes if ids is None else F.embedding(ids, self.codes)
        return ACTIVATIONS[self.activation](codes)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.activated_codes(ids) @ self.basis
        return out if self.bias is None else out + self.bias

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output-layer logits ``hidden @ E^T`` without building the (V, d) table.

        hidden (*, d) -> (*, V), computed as (hidden W^T) f(U)^T (+ hidden . b for every row),
        O(V r) per hidden vector instead of O(V d) (distilled embedding, tied input/output
        embeddings). The padding row's logit is 0, as with ``materialize()``. Differentiable.
        """
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden must end with the embedding dim {self.embedding_dim}, "
                             f"got shape {tuple(hidden.shape)}")
        logits = (hidden @ self.basis.T) @ self.activated_codes().T
        if self.bias is not None:
            logits = logits + (hidden @ self.bias).unsqueeze(-1)
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, dtype=logits.dtype, device=logits.device)
            logits = logits * keep.index_fill(0, torch.tensor([self.padding_idx], device=keep.device), 0.0)
        return logits

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.basis.mul_(factor)  # f(U) W + b: the decoder side, whatever the activation f
        if self.bias is not None:
            self.bias.mul_(factor)

    def export(self) -> FrozenFactors:
        bias = None if self.bias is None else self.bias.detach().clone()
        return FrozenFactors(self.num_embeddings, self.embedding_dim, self.padding_idx,
                             activation=self.activation, codes=self.codes.detach().clone(),
                             basis=self.basis.detach().clone(), bias=bias)
