"""Quotient-remainder embeddings (Shi, Mudigere, Naumov, Yang; KDD 2020, arXiv 1909.02107).

Two small tables give every id a unique row: the quotient i // m picks a row of one, the
remainder i % m a row of the other, and the two are combined element-wise (paper Sec. 3,
"mult" by default) or concatenated. Unlike the hashing trick, no two ids get the same row.

Shapes (V rows, d dim, m = buckets, w = d or d / 2 for concat):
    quotient   (ceil(V / m), w)
    remainder  (m, w)
Row i = quotient[i // m] (*|+|concat) remainder[i % m]. Bytes = 4 * (ceil(V / m) + m) * w.
Exported to the ``qr`` format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..config import FitConfig, MethodConfig, SpecError
from ..frozen.qr import FrozenQR, combine_parts
from ..progress import progress_bar
from ..registry import register
from .shared import bucket_grid

__all__ = ["QRConfig", "QRFit", "QuotientRemainderEmbedding"]


@dataclass(frozen=True)
class QRConfig(MethodConfig):
    method: ClassVar[str] = "qr"
    buckets: int = field(default=1024, metadata={"help": "rows m of the remainder table (the quotient has ceil(V/m))"})
    combine: Literal["mult", "add", "concat"] = field(
        default="mult", metadata={"help": "element-wise product (paper default), sum, or concatenation of halves"})

    def validate(self) -> None:
        if self.buckets < 1:
            raise SpecError(f"qr: buckets must be >= 1, got {self.buckets}")


def table_width(config: QRConfig, embedding_dim: int) -> int:
    if config.combine != "concat":
        return embedding_dim
    if embedding_dim % 2:
        raise SpecError(f"qr: combine='concat' gives each table d/2 columns, but embedding_dim={embedding_dim} "
                        "is odd; use combine='mult' or combine='add', or an even dim")
    return embedding_dim // 2


@dataclass(frozen=True)
class QRFit(FitConfig):
    method: ClassVar[str] = "qr"
    steps: int = field(default=30, metadata={
        "help": "alternating least-squares rounds (combine=concat is closed-form and ignores them)", "min": 0})


@register
class QuotientRemainderEmbedding(CompressedEmbedding[QRConfig]):
    """Rows composed from a quotient table and a remainder table."""

    Config = QRConfig
    Fit = QRFit

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        cfg = self.config
        width = table_width(cfg, embedding_dim)
        # Entries of the combined row start with variance ~1, like nn.Embedding's N(0, 1).
        std = 0.5 ** 0.5 if cfg.combine == "add" else 1.0
        self.quotient = nn.Parameter(torch.randn(math.ceil(num_embeddings / cfg.buckets), width) * std)
        self.remainder = nn.Parameter(torch.randn(cfg.buckets, width) * std)

    @classmethod
    def expected_bytes(cls, config: QRConfig, num_embeddings: int, embedding_dim: int) -> int:
        width = table_width(config, embedding_dim)
        return 4 * (math.ceil(num_embeddings / config.buckets) + config.buckets) * width

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: QRConfig,
                          fit_time: float = 1.0) -> list[QRConfig]:
        # Bytes are symmetric in m and V/m; keep the paper's side (a small remainder table, m <= sqrt(V)),
        # whose byte sizes fall in steps of at most ~1% (dense m up to 128).
        return [base.replace(buckets=m) for m in bucket_grid(math.isqrt(num_embeddings - 1) + 1)]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.config.buckets
        return combine_parts(F.embedding(ids // m, self.quotient), F.embedding(ids % m, self.remainder),
                             self.config.combine)

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: QRFit, progress: bool | None) -> QRFit:
        """Least squares for both tables; ``steps`` alternating rounds (default 30).

        concat: each half is a plain bucket mean (closed form). add: alternating means, a two-way
        additive fit. mult: per column, the fit of the (quotient x remainder) grid of entries by an
        outer product, i.e. a rank-1 approximation; alternating least squares from the remainder
        means is a power iteration towards it. Every round lowers the squared error.
        """
        weight = self._check_fit_weight(weight)
        cfg, m = self.config, self.config.buckets
        ids = torch.arange(self.num_embeddings)
        if self.padding_idx is not None:  # the padding row is masked to 0: it must not pull its rows
            ids = ids[ids != self.padding_idx]
        # The rows on a (quotient, remainder) grid: every update is a sum over one axis.
        nq, width = self.quotient.shape
        grid = torch.zeros(nq * m, self.embedding_dim)
        grid[ids] = weight[ids]
        present = torch.zeros(nq * m)
        present[ids] = 1.0
        grid, present = grid.reshape(nq, m, -1), present.reshape(nq, m)  # present: the id exists (< V, not padding)
        count_q, count_r = present.sum(1, keepdim=True).clamp_min(1), present.sum(0).unsqueeze(1).clamp_min(1)
        if cfg.combine == "concat":
            self.quotient.copy_(grid[..., :width].sum(1) / count_q)
            self.remainder.copy_(grid[..., width:].sum(0) / count_r)
            return settings
        rounds = progress_bar(range(settings.steps), desc="fit qr", enabled=progress)
        if cfg.combine == "add":
            # Sums over the grid are fixed; each half-round is then one small matmul.
            sum_q, sum_r = grid.sum(1), grid.sum(0)
            quo, rem = sum_q / count_q, torch.zeros(m, self.embedding_dim)
            for _ in rounds:
                rem = (sum_r - present.T @ quo) / count_r
                quo = (sum_q - present @ rem) / count_q
        else:
            quo, rem = torch.ones(nq, self.embedding_dim), grid.sum(0) / count_r
            by_column = grid.permute(2, 0, 1).contiguous()  # (d, nq, m): one matrix per column, for bmm
            for _ in rounds:
                num = torch.bmm(by_column, rem.T.unsqueeze(2)).squeeze(2).T  # sum_b x[a, b] rem[b]
                quo = _least_squares_scale(num, present @ rem.pow(2), quo)
                num = torch.bmm(by_column.transpose(1, 2), quo.T.unsqueeze(2)).squeeze(2).T  # sum_a x[a, b] quo[a]
                rem = _least_squares_scale(num, present.T @ quo.pow(2), rem)
        self.quotient.copy_(quo)
        self.remainder.copy_(rem)
        return settings

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.remainder.mul_(factor)
        if self.config.combine != "mult":  # add / concat: both halves are linear in the output
            self.quotient.mul_(factor)

    def export(self) -> FrozenQR:
        return FrozenQR(self.num_embeddings, self.embedding_dim, self.padding_idx, combine=self.config.combine,
                        quotient=self.quotient.detach().clone(), remainder=self.remainder.detach().clone())


def _least_squares_scale(num: torch.Tensor, den: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per-entry least squares t = sum(x * other) / sum(other^2), keeping ``previous`` where undetermined."""
    return torch.where(den > 1e-12, num / den.clamp_min(1e-12), previous)
