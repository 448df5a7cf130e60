"""MEmCom: multi-embedding compression (Pansare et al., MLSys 2022, arXiv 2203.10135).

The hashing trick plus one trainable scalar per entity: entities that collide in a bucket share
a direction and differ by scale (paper Sec. 3). Optionally a per-entity scalar bias.

Shapes (V rows, d dim, m buckets):
    table  (m, d)   shared rows T, indexed by h(i) (i mod m by default)
    scale  (V,)     per-entity weight w_i, initialized to 1 (training starts as the hashing trick)
    bias   (V,)     per-entity bias b_i, optional (off by default)
Row i = w_i * T[h(i)] + b_i. Ratio = V*d / (m*d + V [+ V]): always below d.
Exported to the ``hashed`` format (table + scale [+ bias]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import FitConfig
from ..frozen import FrozenHashed
from ..progress import progress_bar
from ..registry import register
from .shared import HashedRowsConfig, HashedRowsTable, bucket_means

__all__ = ["MEmComConfig", "MEmComFit", "MEmComEmbedding", "row_scales"]

TINY = 1e-12


@dataclass(frozen=True)
class MEmComConfig(HashedRowsConfig):
    method: ClassVar[str] = "memcom"
    bias: bool = field(default=False, metadata={"help": "add a per-entity scalar bias b_i (V more floats)"})


@dataclass(frozen=True)
class MEmComFit(FitConfig):
    method: ClassVar[str] = "memcom"
    steps: int = field(default=30, metadata={"help": "alternating least-squares rounds", "min": 0})


@register
class MEmComEmbedding(HashedRowsTable[MEmComConfig]):
    """Hashed shared rows scaled (and optionally shifted) per entity."""

    Config = MEmComConfig
    Fit = MEmComFit
    QUICK_FIT = {"steps": 10}  # the demo's fit; the default fit is slower and a little better

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx, layout)
        self._add_entity_scalars(num_embeddings, self.config.bias)

    def _add_entity_scalars(self, num_embeddings: int, bias: bool) -> None:
        """The per-entity scale (and bias), V floats each: the part that grows with the vocabulary,
        held elsewhere when an engine shards it (``embcompress.integrations.torchrec``)."""
        # w = 1 makes the untrained table exactly the hashing trick (paper Sec. 3).
        self.scale = nn.Parameter(torch.ones(num_embeddings))
        self.bias = nn.Parameter(torch.zeros(num_embeddings)) if bias else None

    @classmethod
    def expected_bytes(cls, config: MEmComConfig, num_embeddings: int, embedding_dim: int) -> int:
        per_entity = 2 if config.bias else 1
        return 4 * (config.buckets * embedding_dim + per_entity * num_embeddings)

    @classmethod
    def budget_note(cls, num_embeddings: int, embedding_dim: int, base: MEmComConfig) -> str:
        """Why a budget may be out of reach: the per-entity scalars alone cost V floats."""
        per_entity = 2 if base.bias else 1
        best = num_embeddings * embedding_dim / (embedding_dim + per_entity * num_embeddings)
        formula, ceiling = ("V*d / (m*d + V)", "d") if per_entity == 1 else ("V*d / (m*d + 2*V)", "d/2")
        return (f"memcom's ratio {formula} is always below {ceiling} = {embedding_dim / per_entity:g}; "
                f"at most {best:.2f}x here, with 1 bucket")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        out = _ScaledRows.apply(self.hash(ids), ids, self.table, self.scale)
        return out if self.bias is None else out + self.bias[ids].unsqueeze(1)

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: MEmComFit, progress: bool | None) -> MEmComFit:
        """Alternating least squares for table, scales (and biases); ``steps`` rounds (default 30).

        Without bias, each bucket's best (table row, member scales) is the rank-1 truncated SVD
        of its members' rows; ALS started from the bucket means (w = 1, the hashing-trick fit) is
        a power iteration towards it, vectorized over all buckets with index_add. Every round
        lowers the squared error, so the result is never worse than the hashing trick's.
        """
        weight = self._check_fit_weight(weight)
        ids = torch.arange(self.num_embeddings)
        if self.padding_idx is not None:  # the padding row is masked to 0: it must not pull its bucket
            ids = ids[ids != self.padding_idx]
        x, bucket, m = weight[ids], self.hash(ids), self.config.buckets
        count = torch.bincount(bucket, minlength=m).unsqueeze(1)
        table = bucket_means(x, bucket, m)
        w = torch.ones(len(ids))
        b = torch.zeros(len(ids)) if self.bias is not None else None
        for _ in progress_bar(range(settings.steps), desc="fit memcom", enabled=progress):
            w, b = row_scales(x, table[bucket], self.bias is not None)
            target = x if b is None else x - b.unsqueeze(1)
            # T_b = sum_i w_i target_i / sum_i w_i^2 over the bucket's members.
            num = torch.zeros(m, self.embedding_dim).index_add_(0, bucket, target * w.unsqueeze(1))
            den = torch.zeros(m).index_add_(0, bucket, w * w).unsqueeze(1)
            table = torch.where((den > TINY) & (count > 0), num / den.clamp_min(TINY), table)
        self.table.copy_(table)
        self.scale.fill_(1.0)
        self.scale[ids] = w
        if self.bias is not None:
            self.bias.zero_()
            assert b is not None  # solved with the bias above
            self.bias[ids] = b
        return settings

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.scale.mul_(factor)  # the per-row weights, so the shared table keeps its scale
        if self.bias is not None:
            self.bias.mul_(factor)

    def export(self) -> FrozenHashed:
        bias = None if self.bias is None else self.bias.detach().clone()
        return FrozenHashed(self.num_embeddings, self.embedding_dim, self.padding_idx,
                            hash=self.hash.to_dict(), table=self.table.detach().clone(),
                            scale=self.scale.detach().clone(), bias=bias)


def row_scales(x: torch.Tensor, t: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares w_i (and b_i) of each row x_i (N, d) on its bucket row t_i (N, d): x_i ~ w_i t_i + b_i."""
    if not bias:
        norm = t.pow(2).sum(1)  # w_i = <x_i, t> / |t|^2
        return torch.where(norm > TINY, (x * t).sum(1) / norm.clamp_min(TINY), torch.zeros_like(norm)), None
    # (w_i, b_i) = least squares of x_i on [t, 1]: a 2x2 system per row.
    tt, ts, d = t.pow(2).sum(1), t.sum(1), float(x.shape[1])
    xt, xs = (x * t).sum(1), x.sum(1)
    det = tt * d - ts * ts
    ok = det > TINY * d * tt.clamp_min(1.0)
    w = torch.where(ok, (xt * d - ts * xs) / det.clamp_min(TINY), torch.zeros_like(tt))
    return w, torch.where(ok, (tt * xs - ts * xt) / det.clamp_min(TINY), xs / d)


class _ScaledRows(torch.autograd.Function):
    """scale[ids] * table[buckets] as (N, d), the same numbers and gradients as
    ``F.embedding(buckets, table) * scale[ids].unsqueeze(1)`` with fewer passes over (N, d):
    forward, embedding_bag with one bag per row and the scale as its weight (gather and scale in one
    pass); backward, the table's gradient by one index_add of grad * scale (embedding's backward
    sorts the buckets first) and the scales' by embedding_bag's fused per-row dot product of grad
    with the table rows (no gathered (N, d) copy); benchmarks/perf.py measures the training step."""

    @staticmethod
    def forward(ctx: Any, buckets: torch.Tensor, ids: torch.Tensor, table: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        weights = scale.index_select(0, ids)
        ctx.save_for_backward(buckets, ids, table, weights)
        ctx.rows = scale.shape[0]
        bags = torch.arange(buckets.shape[0], device=buckets.device)
        return torch.nn.functional.embedding_bag(buckets, table, bags, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        buckets, ids, table, weights = ctx.saved_tensors
        grad_table = grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros_like(table).index_add_(0, buckets, grad * weights.unsqueeze(1))
        if ctx.needs_input_grad[3]:
            bags = torch.arange(buckets.shape[0], device=buckets.device)
            dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad.contiguous(), table, buckets, bags, bags, 0)  # mode 0 = sum: <grad_n, table[bucket_n]>
            grad_scale = dots.new_zeros(ctx.rows).index_put_((ids,), dots, accumulate=True)
        return None, None, grad_table, grad_scale
