"""Truncated-SVD baseline: E ~ U W with U (V, r) and W (r, d), linear.

Shapes: codes U (V, r), basis W (r, d). Post hoc fit is the Eckart-Young optimum
(U = U_r S_r, W = V_r^T from the SVD of the table). The distilled method subclasses this
table with a non-linearity f and a bias: E = f(U) W + b.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..config import MethodConfig, SpecError
from ..frozen import FactorizedEmbedding
from ..frozen.factors import ACTIVATIONS
from ..registry import register

__all__ = ["LowRankConfig", "LowRankEmbedding"]


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    method: ClassVar[str] = "lowrank"
    rank: int = field(default=32, metadata={"help": "inner dimension r"})

    def validate(self) -> None:
        if self.rank < 1:
            raise SpecError(f"{self.method}: rank must be >= 1, got {self.rank}")


@register
class LowRankEmbedding(CompressedEmbedding):
    """E = f(U) W (+ b); f is the identity here, a non-linearity in the distilled method."""

    Config = LowRankConfig

    @staticmethod
    def _activation_of(config: LowRankConfig) -> str:
        return getattr(config, "activation", "identity")

    @staticmethod
    def _has_bias(config: LowRankConfig) -> bool:
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
    def expected_bytes(cls, config: LowRankConfig, num_embeddings: int, embedding_dim: int) -> int:
        if config.rank > min(num_embeddings, embedding_dim):
            raise SpecError(f"rank {config.rank} exceeds min(rows, dim)")
        bias = embedding_dim if cls._has_bias(config) else 0
        return 4 * (num_embeddings * config.rank + config.rank * embedding_dim + bias)

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: LowRankConfig) -> list[LowRankConfig]:
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
    def fit(self, weight: torch.Tensor, *, row_weights: torch.Tensor | None = None, **_: Any) -> "LowRankEmbedding":
        """Truncated SVD; with ``row_weights`` w the basis minimizes sum_i w_i ||e_i||^2 (SVD of
        diag(sqrt w) W) and every row's codes are its projection onto that basis."""
        weight = self._check_fit_weight(weight)
        rank = self.config.rank
        if row_weights is None:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            self.codes.copy_(u[:, :rank] * s[:rank])
            self.basis.copy_(vh[:rank])
            return self
        scaled = weight * row_weights.float().clamp_min(0).sqrt().unsqueeze(1)
        _, _, vh = torch.linalg.svd(scaled, full_matrices=False)
        self.basis.copy_(vh[:rank])
        self.codes.copy_(weight @ vh[:rank].T)
        return self

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.basis.mul_(factor)  # f(U) W + b: the decoder side, whatever the activation f
        if self.bias is not None:
            self.bias.mul_(factor)

    def export(self) -> FactorizedEmbedding:
        bias = None if self.bias is None else self.bias.detach().clone()
        return FactorizedEmbedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                                   activation=self.activation, codes=self.codes.detach().clone(),
                                   basis=self.basis.detach().clone(), bias=bias)
