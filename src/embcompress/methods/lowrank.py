"""Truncated-SVD baseline: E ~ U W with U (V, r) and W (r, d), linear.

Shapes: codes U (V, r), basis W (r, d). Post hoc fit is the Eckart-Young optimum
(U = U_r S_r, W = V_r^T from the SVD of the table). The distilled method shares the table
(``methods.shared.FactorsTable``) with a non-linearity f and a bias: E = f(U) W + b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import FitConfig
from ..registry import register
from .shared import FactorsConfig, FactorsTable

__all__ = ["LowRankConfig", "LowRankFit", "LowRankEmbedding"]


@dataclass(frozen=True)
class LowRankConfig(FactorsConfig):
    method: ClassVar[str] = "lowrank"


@dataclass(frozen=True)
class LowRankFit(FitConfig):
    """The fit is the truncated SVD (closed-form): nothing to set but the common ``steps``."""

    method: ClassVar[str] = "lowrank"


@register
class LowRankEmbedding(FactorsTable[LowRankConfig]):
    """E = U W, the truncated SVD; trainable end to end like any table."""

    Config = LowRankConfig
    Fit = LowRankFit
    TAKES_ROW_WEIGHTS = True

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: FitConfig, progress: bool | None) -> FitConfig:
        return self._fit_weighted(weight, settings, progress, None)

    @torch.no_grad()
    def _fit_weighted(self, weight: torch.Tensor, settings: FitConfig, progress: bool | None,
                      row_weights: torch.Tensor | None) -> FitConfig:
        """Truncated SVD; with ``row_weights`` w the basis minimizes sum_i w_i ||e_i||^2 (SVD of
        diag(sqrt w) W) and every row's codes are its projection onto that basis."""
        weight = self._check_fit_weight(weight)
        rank = self.config.rank
        if row_weights is None:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            self.codes.copy_(u[:, :rank] * s[:rank])
        else:
            _, _, vh = torch.linalg.svd(weight * row_weights.sqrt().unsqueeze(1), full_matrices=False)
            self.codes.copy_(weight @ vh[:rank].T)
        self.basis.copy_(vh[:rank])
        return settings
