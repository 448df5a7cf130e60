"""DPQ: Differentiable Product Quantization (Chen, Li, Sun; arXiv 1908.09756, ICML 2020).

End-to-end trained product-quantized codes. A query table Q is split into D groups; in each
group a row's code is the argmax of its scores against K keys, and the output is the concat of
the chosen values (Section 2). Only codes and values are deployed; Q and keys are training-only.

- DPQ-SX (Section 2.1): score = <q, key>; forward uses the hard one-hot of the argmax, backward
  the gradient of softmax(score / tau) (straight-through).
- DPQ-VQ (Section 2.2): score = -||q - c||^2, keys = values = centroids; output
  Q + stopgrad(V[c] - Q) so the task gradient reaches Q, and the centroids learn from the
  auxiliary loss mean((V[c] - stopgrad(Q))^2) (weight 1, commitment 0 as in the reference code).
- Like the reference code, scores are batch-normalized without scale/shift (statistics per
  group and codeword index) before the argmax. Eval-mode codes therefore depend on the running
  statistics, so :meth:`DPQEmbedding.export` recomputes the codes of every row in eval mode.

Shapes (N ids, D groups, K codewords, w = d / D, G = 1 if shared else D):
    query         (V, d)       training only
    keys          (G, K, w)    training only, SX (VQ uses the values as keys)
    values        (G, K, w)    deployed codebooks
    running_mean  (D, K)       batch-norm statistics of the scores (training only)
    running_var   (D, K)
    scores        (N, D, K) -> codes (N, D) -> rows (N, d)
Artifact: V * D * log2(K) bits of codes + 32 * K * w * G bits of values (the paper's formula,
Section 3.4, with the value term 32 * K * d / D when shared).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CompressedEmbedding
from ..bitpack import bits_for, packed_size
from ..config import FitConfig, MethodConfig, SpecError
from .. import kernels
from ..frozen import FrozenCodebook
from ..frozen.codebook import decode_codes
from ..kmeans import fit_sample, kmeans
from ..query import QueryTableMixin
from ..registry import register
from ..training import adam_steps
from .shared import check_groups, divisors

__all__ = ["DPQConfig", "DPQFit", "DPQEmbedding"]

log = logging.getLogger(__name__)

BN_MOMENTUM = 0.1
BN_EPS = 1e-5
#: Scores (rows x groups x codewords) one post hoc refinement step computes at most: a step costs about
#: this many scores forward and backward, so wide tables with many groups take fewer rows per step and
#: the fit stays bounded (50,000 x 1,024 at 10x: 512 groups x 64 codewords, 1,024 rows per step).
MAX_STEP_SCORES = 1 << 25


@dataclass(frozen=True)
class DPQConfig(MethodConfig):
    method: ClassVar[str] = "dpq"
    variant: Literal["sx", "vq"] = field(default="sx", metadata={
        "help": "sx: dot-product scores with softmax straight-through; vq: nearest centroid with an auxiliary loss"})
    groups: int = field(default=32, metadata={"help": "D, code positions per row (must divide the dim)"})
    codewords: int = field(default=16, metadata={"help": "K, codewords per group (code bits = ceil(log2 K))"})
    shared: bool = field(default=False, metadata={"help": "one key/value set for all groups (stored once)"})
    batchnorm: bool = field(default=True, metadata={
        "help": "batch-normalize scores without scale/shift, per group and codeword (reference code)"})
    tau: float = field(default=1.0, metadata={"help": "softmax temperature of the SX backward pass"})
    sparse: bool = field(default=False, metadata={
        "help": "the query table gets sparse gradients (rows looked up only), like nn.Embedding(sparse=True); "
                "needs an optimizer that takes them (SGD, SparseAdam, Adagrad); works under DDP"})

    def validate(self) -> None:
        if self.groups < 1:
            raise SpecError(f"dpq: groups must be >= 1, got {self.groups}")
        if not 2 <= self.codewords <= 65536:
            raise SpecError(f"dpq: codewords must be in 2..65536, got {self.codewords}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise SpecError(f"dpq: tau must be a positive number, got {self.tau}")


def check_shape(config: DPQConfig, embedding_dim: int) -> None:
    """Groups divide the dim, and SX groups are at least 2 wide: a 1-dim group's dot-product score
    q * k is monotone in q, so (batch-normalized or not) only the codewords with the largest and the
    smallest key can ever win: 2 of K codes (measured: 2.0 distinct eval codes per group of 128)."""
    check_groups("dpq", config.groups, embedding_dim)
    if config.variant == "sx" and config.groups == embedding_dim:
        wider = [g for g in divisors(embedding_dim) if g < embedding_dim]
        hint = f"groups={wider[-1]} or less, or " if wider else ""
        raise SpecError(f"dpq: variant=sx with groups={config.groups} gives 1-dim groups, which can only use 2 of "
                        f"their {config.codewords} codewords; use {hint}variant=vq")


@dataclass(frozen=True)
class DPQFit(FitConfig):
    method: ClassVar[str] = "dpq"
    steps: int = field(default=200, metadata={"help": "gradient refinement steps after the k-means start", "min": 0})
    iters: int = field(default=25, metadata={"help": "k-means iterations of the start", "min": 0})
    sample: int = field(default=0, metadata={
        "help": "rows the k-means start fits on before coding every row (0 = 256 per codeword, at most 65,536)",
        "min": 0})
    batch_size: int = field(default=4096, metadata={
        "help": "rows per refinement step (fewer where rows x groups x codewords would pass 2^25 scores)", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (cosine-annealed to 0)", "min": 0.0})
    seed: int | None = field(default=None, metadata={"help": "seed of k-means and the row sampling; none = drawn"})


@register
class DPQEmbedding(QueryTableMixin, CompressedEmbedding[DPQConfig]):
    """Differentiable product quantization, a drop-in for ``nn.Embedding``.

    Example:
        >>> import embcompress
        >>> table = embcompress.build("dpq:variant=vq,groups=8,codewords=16", 10_000, 64)
        >>> out = table(torch.randint(0, 10_000, (4, 7)))                # (4, 7, 64)
        >>> loss = out.pow(2).mean() + embcompress.aux_loss(table)       # aux is VQ's centroid term
        >>> frozen = table.export()                                      # codes + values only
        >>> frozen.num_bytes()                                           # 10,000 x 8 x 4 bits + 16 x 64 fp32
        44096
    """

    Config = DPQConfig
    Fit = DPQFit
    running_mean: torch.Tensor  # registered buffers (batchnorm=true), declared for the type checker
    running_var: torch.Tensor
    # The demo's fit; the default fit is slower and a little better. Ten k-means iterations keep the
    # quick fit within its 30 CPU s bound at 50,000 x 1,024 (benchmarks/results/fit_grid.md).
    QUICK_FIT = {"steps": 50, "iters": 10}
    TAKES_ROW_WEIGHTS = True

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        cfg = self.config
        check_shape(cfg, embedding_dim)
        self.groups, self.codewords = cfg.groups, cfg.codewords
        self.width = embedding_dim // cfg.groups
        stored = 1 if cfg.shared else cfg.groups
        shape = (stored, cfg.codewords, self.width)
        # Q starts like nn.Embedding (N(0, 1)); values too, so outputs have the usual scale.
        self._add_query_table(num_embeddings, embedding_dim, cfg.sparse)
        if cfg.variant == "sx":
            self.keys = nn.Parameter(torch.randn(shape) / math.sqrt(self.width))
        else:
            self.register_parameter("keys", None)  # VQ scores against the values (centroids)
        self.values = nn.Parameter(torch.randn(shape))
        if cfg.batchnorm:
            self.register_buffer("running_mean", torch.zeros(cfg.groups, cfg.codewords))
            self.register_buffer("running_var", torch.ones(cfg.groups, cfg.codewords))
        self._fitting = False  # post hoc fit: running statistics only, sparse query gradients
        self.set_batchnorm_stats((layout or {}).get("batchnorm_stats", "batch"))
        self._last_aux: torch.Tensor | None = None

    def layout(self) -> dict[str, Any]:
        return {"batchnorm_stats": self.batchnorm_stats}

    def set_batchnorm_stats(self, mode: str) -> "DPQEmbedding":
        """Which statistics batch norm uses in training: ``"batch"`` (the paper's end-to-end training)
        or ``"running"`` (frozen, as in eval). A post hoc fit sets ``"running"``: its codes live in the
        running statistics, and batch statistics would change about half of them at the first
        training step (GloVe 20k rows, 10 x 64: 47% of a batch's codes; 100 fine-tuning steps on the
        same reconstruction loss then took relative MSE from 0.24 to 0.45)."""
        if mode not in ("batch", "running"):
            raise ValueError(f"dpq: batchnorm_stats must be 'batch' or 'running', got {mode!r}")
        self.batchnorm_stats = mode
        return self

    # -- size ------------------------------------------------------------------------------
    @classmethod
    def expected_bytes(cls, config: DPQConfig, num_embeddings: int, embedding_dim: int) -> int:
        check_shape(config, embedding_dim)
        stored = 1 if config.shared else config.groups
        width = embedding_dim // config.groups
        return (packed_size(num_embeddings, config.groups, bits_for(config.codewords))
                + 4 * stored * config.codewords * width)

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: DPQConfig,
                          fit_time: float = 1.0) -> list[DPQConfig]:
        # Small K first: among configs of equal size the first wins, and the paper found small K
        # with large D beats large K with small D (Section 3.3).
        return [base.replace(groups=g, codewords=2 ** b) for b in range(1, 9)
                for g in sorted(divisors(embedding_dim), reverse=True)]

    # -- forward ---------------------------------------------------------------------------
    def _keys(self) -> torch.Tensor:
        return self.values if self.keys is None else self.keys

    def _batch_stats(self, q: torch.Tensor) -> bool:
        # Batch statistics need >= 2 rows; smaller batches, the post hoc fit and a fitted table
        # (batchnorm_stats="running") use the running ones.
        return self.training and self.batchnorm_stats == "batch" and not self._fitting and q.shape[0] > 1

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        """VQ: q (N, D, w) -> batch-normalized scores (N, D, K); updates running stats in training."""
        keys = self._keys().expand(self.groups, -1, -1)
        with torch.no_grad():  # VQ's codes take no gradient: Q learns straight through, C from aux
            scores = -(q.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("ndw,dkw->ndk", q, keys)
                       + keys.pow(2).sum(-1).unsqueeze(0))
        if not self.config.batchnorm:
            return scores
        n = scores.shape[0]
        flat = F.batch_norm(scores.reshape(n, self.groups * self.codewords), self.running_mean.view(-1),
                            self.running_var.view(-1), training=self._batch_stats(q), momentum=BN_MOMENTUM,
                            eps=BN_EPS)
        return flat.view_as(scores)

    @torch.no_grad()
    def _vq_codes(self, q: torch.Tensor) -> torch.Tensor:
        """VQ: q (N, d) -> codes (N, D), the first maximum of the (batch-normalized) scores; updates
        the running statistics in training, like :meth:`_scores` (its torch equivalent)."""
        n = q.shape[0]
        centroids = self.values.expand(self.groups, -1, -1)
        if not kernels.dpq_supported(q, centroids):
            return self._scores(q.view(n, self.groups, self.width)).max(-1).indices  # first maximum, like argmax
        qt = q.t().contiguous().view(self.groups, self.width, n)
        centroids = centroids.contiguous()
        if not self.config.batchnorm:
            return kernels.dpq_vq_codes(qt, centroids)
        if self._batch_stats(q):
            total, total_sq = kernels.dpq_vq_stats(qt, centroids)
            mean = total / n
            var = (total_sq / n - mean * mean).clamp_min_(0.0)  # biased, as batch norm normalizes with
            mean, var = mean.float(), var.float()
            self.running_mean.mul_(1 - BN_MOMENTUM).add_(mean, alpha=BN_MOMENTUM)
            self.running_var.mul_(1 - BN_MOMENTUM).add_(var * (n / (n - 1)), alpha=BN_MOMENTUM)
        else:
            mean, var = self.running_mean, self.running_var
        return kernels.dpq_vq_codes(qt, centroids, mean.contiguous(), torch.rsqrt(var + BN_EPS).contiguous())

    def _affine_scores(self, qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SX: qt (D, w, N) -> (keys', bias) (D, K, w), (D, K) with normalized scores = keys' . q - bias.

        A batch-normalized dot-product score is affine in q: with per-group batch mean m and
        covariance C of q (biased, as batch norm uses), score k has mean <m, key_k> and variance
        key_k^T C key_k, so keys' = key / sqrt(var + eps) and bias = mean / sqrt(var + eps). These
        are (D, K) statistics from (D, w, w) moments, where batch norm reduces the (N, D, K) scores
        twice forward and three times backward; autograd differentiates the moments, which is the
        batch-norm backward. Updates the running statistics in training, like F.batch_norm.
        """
        keys = self.keys.expand(self.groups, -1, -1)
        if not self.config.batchnorm:
            return keys, keys.new_zeros(self.groups, self.codewords)
        if self._batch_stats(qt.transpose(0, 2)):
            n = qt.shape[2]
            mean, cov = _Moments.apply(qt)  # (D, w), (D, w, w)
            mu = (keys * mean.unsqueeze(1)).sum(-1)
            var = (torch.bmm(keys, cov) * keys).sum(-1)
            with torch.no_grad():  # F.batch_norm's update: the running variance is the unbiased one
                self.running_mean.mul_(1 - BN_MOMENTUM).add_(mu, alpha=BN_MOMENTUM)
                self.running_var.mul_(1 - BN_MOMENTUM).add_(var * (n / (n - 1)), alpha=BN_MOMENTUM)
        else:
            mu, var = self.running_mean, self.running_var
        inv_std = torch.rsqrt(var + BN_EPS)
        return keys * inv_std.unsqueeze(-1), mu * inv_std

    def _transposed(self, q: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (D, w, N) contiguous: one 2-d transpose (cheaper than permuting (N, D, w) to
        (D, w, N)). SX works in this layout: each group's rows are one contiguous (w, N) matrix,
        which the batched products read several times faster than strided views."""
        return _Transpose.apply(q).view(self.groups, self.width, q.shape[0])

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of unique, non-padding ids (N,) -> (N, d)."""
        n = ids.shape[0]
        # Sparse query gradients (config.sparse, and always in the post hoc fit, which uses SparseAdam):
        # a dense (V, d) gradient and optimizer step per batch cost more than the rest of the step.
        q = self._query_rows(ids, sparse=self.config.sparse or self._fitting)
        if self.config.variant == "sx":
            qt = self._transposed(q)
            keys, bias = self._affine_scores(qt)
            soft = self.training and torch.is_grad_enabled()
            codes, probs = _sx_codes(qt, keys, bias, self.config.tau if soft else None)
            if soft:
                # Section 2.1: forward = one-hot(argmax) @ V exactly; backward through softmax(s / tau) @ V.
                # Values take their gradient from the hard path only, as with p - stopgrad(p - onehot).
                hard = decode_codes(codes, self.values.detach(), "concat")
                values = self.values.expand(self.groups, -1, -1)
                return _SoftPath.apply(hard, qt, keys, bias, values, self.config.tau, probs, codes)
        else:
            codes = self._vq_codes(q)
        if self.config.variant == "vq" and self.training and torch.is_grad_enabled():
            # The aux loss's gradient to the centroids by one scatter along K (index_select's
            # backward would be an index_add of N * D rows of w floats, see _values_grad).
            hard = _HardRows.apply(codes, self.values.expand(self.groups, -1, -1))
        else:
            hard = decode_codes(codes, self.values, "concat")
        if not self.training or self.config.variant == "sx":
            return hard  # eval: exactly what the exported codes + values decode to; SX without autograd
        # Section 2.2: straight-through to Q; centroids pulled toward stopgrad(Q) by aux.
        self._last_aux = (hard - q.detach()).pow(2).mean() if n else None
        return q + (hard - q).detach()

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # Dedupe first: scores and batch statistics are computed once per distinct row.
        unique, inverse = torch.unique(ids, return_inverse=True)
        if self.padding_idx is None:
            if unique.shape[0] == ids.shape[0]:  # no repeats: the same rows, in the caller's order
                return self._rows(ids)
            # index_select: its backward is an index_add, an order of magnitude cheaper than the
            # accumulating index_put of [inverse].
            return self._rows(unique).index_select(0, inverse)
        keep = unique != self.padding_idx  # padding takes no part in the batch statistics
        out = self.query.new_zeros(unique.shape[0], self.embedding_dim)
        out[keep] = self._rows(unique[keep])
        return out.index_select(0, inverse)

    def aux_loss(self) -> torch.Tensor | None:
        """DPQ-VQ: mean((V[c] - stopgrad(Q))^2) of the last training forward (weight 1); SX: None."""
        return self._last_aux

    def __getstate__(self) -> dict[str, Any]:
        # The last aux loss holds an autograd graph, which copy.deepcopy and pickle cannot copy.
        state = self.__dict__.copy()
        state["_last_aux"] = None
        return state

    # -- codes and export ------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, ids: torch.Tensor | None = None, chunk: int = 65536) -> torch.Tensor:
        """Eval-mode codes (N, D) of ``ids`` (default: every row), as the artifact stores them."""
        ids = torch.arange(self.num_embeddings) if ids is None else ids.reshape(-1).long()
        was_training = self.training
        self.eval()
        try:
            parts = [self._codes(self.query[ids[s:s + chunk]])
                     for s in range(0, ids.shape[0], chunk)]
        finally:
            self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.groups, dtype=torch.long)

    def _codes(self, q: torch.Tensor) -> torch.Tensor:
        """Rows (N, d) -> codes (N, D), as the training forward computes them."""
        if self.config.variant == "sx":
            qt = self._transposed(q)
            return _sx_codes(qt, *self._affine_scores(qt))[0]
        return self._vq_codes(q)

    def can_rescale_output(self, factor: float) -> bool:
        # VQ's codes compare the scaled query with the values in float32 (squares), and batch norm
        # keeps the scores' variance (factor^4): beyond 2^24 those overflow.
        return self.config.variant == "sx" or factor <= 2.0 ** 24

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        if self._rescale_all_but_query_(factor):
            self.query.mul_(factor)

    def _rescale_all_but_query_(self, factor: float) -> bool:
        """Scale the values (and VQ's batch-norm statistics); True if the query table must scale too."""
        self.values.mul_(factor)
        if self.config.variant != "vq":
            return False
        # VQ's codes compare the query with the values: scale both, and the batch-norm statistics
        # of the scores -||q - c||^2 with them (by factor^2, variance by factor^4).
        if self.config.batchnorm:
            self.running_mean.mul_(factor ** 2)
            self.running_var.mul_(factor ** 4)
        return True

    def export(self) -> FrozenCodebook:
        """Codes of ALL rows recomputed in eval mode (never cached from training batches) + values."""
        return FrozenCodebook.from_codes(self.codes(), self.values.detach().clone(), "concat", self.padding_idx)

    # -- post hoc ----------------------------------------------------------------------------
    def _fit(self, weight: torch.Tensor, settings: DPQFit, progress: bool | None) -> DPQFit:
        return self._fit_weighted(weight, settings, progress, None)

    def _fit_weighted(self, weight: torch.Tensor, settings: DPQFit, progress: bool | None,
                      row_weights: torch.Tensor | None) -> DPQFit:
        """Compress ``weight`` (V, d): k-means start, then gradient refinement of the reconstruction.

        Start (exact: the eval-mode codes are the k-means codes):
          - Q = weight; values = per-group k-means centroids (pooled over groups when shared).
          - VQ: the centroids are the keys; the running statistics are set to the identity, so the
            argmax of -||q - c||^2 is the nearest centroid.
          - SX with batchnorm: keys = centroids and running mean = ||c||^2 / 2, running var = 1, so
            the normalized score <q, c> - ||c||^2 / 2 ranks codewords as the distance does
            (the batch-norm shift serves as the bias a dot product lacks).
          - SX without batchnorm: a dot product has no per-codeword offset, so no keys make its
            argmax the nearest centroid of Q = weight. Instead keys are distinct unit vectors and
            each query row is placed on the key of its k-means code; SX outputs only the values,
            so Q is free to be any point that selects the right code.
        Refinement: ``steps`` Adam steps (default 200; SparseAdam for Q) on the reconstruction MSE (+ aux for VQ)
        of random row batches, with batch norm using the running statistics (batch statistics
        would reorder the scores away from the start), then an exact value update (mean of the
        rows assigned to each codeword; SX only, since VQ's values are also its keys). If the
        refined table reconstructs worse than the start, the start is kept.

        With ``row_weights`` w every stage minimizes sum_i w_i ||e_i||^2: weighted k-means, batches
        drawn with probability proportional to w, weighted value means and error.
        """
        weight = self._check_fit_weight(weight)
        steps, seed = settings.steps, settings.seed
        assert seed is not None  # fit() draws it
        sample = settings.sample or fit_sample(self.codewords)
        start_codes = self._start_from_kmeans(weight, settings.iters, seed, sample, row_weights)
        if steps <= 0:
            return settings
        start_state = {k: v.clone() for k, v in self.state_dict().items()}
        # Each pass over every row's codes costs a few refinement steps on wide tables: reuse them.
        start_error = self._error(weight, row_weights, codes=start_codes)
        self._refine(weight, steps, self.step_rows(settings.batch_size), settings.lr, seed, progress, row_weights)
        codes = self.codes()  # SX codes do not depend on the values, so the value update keeps them
        if self.config.variant == "sx":
            self._refit_values(weight, row_weights, codes=codes)
        error = self._error(weight, row_weights, codes=codes)
        if error > start_error:
            log.info("dpq fit: refinement raised the MSE from %.4g to %.4g; keeping the k-means start",
                     start_error, error)
            self.load_state_dict(start_state)
        return settings

    def step_rows(self, batch_size: int) -> int:
        """Rows per refinement step: ``batch_size``, fewer if a step would score more than :data:`MAX_STEP_SCORES`."""
        return max(1, min(batch_size, MAX_STEP_SCORES // (self.groups * self.codewords)))

    @torch.no_grad()
    def _start_from_kmeans(self, weight: torch.Tensor, iters: int, seed: int, sample: int = 65536,
                           row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Set the k-means start (see :meth:`_fit`); returns its codes (V, D), the start's eval-mode codes."""
        cfg = self.config
        sub = weight.reshape(self.num_embeddings, self.groups, self.width).transpose(0, 1)  # (D, V, w)
        weights = row_weights
        if cfg.shared:
            sub = sub.reshape(1, -1, self.width)  # one k-means over every group's sub-vectors
            weights = None if row_weights is None else row_weights.repeat(self.groups)  # group-major, like sub
        centroids, codes = kmeans(sub, self.codewords, iters=iters, seed=seed, sample=sample, weights=weights)
        codes = codes.reshape(self.groups, self.num_embeddings).T  # (V, D), group-major in both cases
        self.values.copy_(centroids)
        self.query.copy_(weight)
        if cfg.batchnorm:
            self.set_batchnorm_stats("running")  # fine-tuning keeps the fitted codes (see the method)
            self.running_mean.zero_()
            self.running_var.fill_(1.0 - BN_EPS)  # sqrt(var + eps) = 1: the identity in eval mode
        if cfg.variant == "vq":
            return codes
        if cfg.batchnorm:
            self.keys.copy_(centroids)
            self.running_mean.copy_((centroids.pow(2).sum(-1) / 2).expand(self.groups, -1))
            return codes
        generator = torch.Generator().manual_seed(seed)
        keys = F.normalize(torch.randn(self.keys.shape, generator=generator), dim=-1)
        self.keys.copy_(keys)
        group_keys = keys.expand(self.groups, -1, -1)
        placed = group_keys[torch.arange(self.groups), codes]  # (V, D, w): each row on its code's key
        self.query.copy_(placed.reshape(self.num_embeddings, -1))
        return codes

    def _refine(self, weight: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
                progress: bool | None, row_weights: torch.Tensor | None = None) -> None:
        step = self._reconstruction_step(weight, batch_size, torch.Generator().manual_seed(seed + 1), row_weights)
        dense = [p for p in self.parameters() if p.requires_grad and p is not self.query]
        sparse = [self.query] if self.query.requires_grad else []
        was_training = self.training
        self.train()
        self._fitting = True
        try:
            adam_steps(step, dense, sparse_params=sparse, steps=steps, lr=lr, desc="fit dpq", progress=progress)
        finally:
            self._fitting = False
            self._last_aux = None
            self.train(was_training)

    @torch.no_grad()
    def _refit_values(self, weight: torch.Tensor, row_weights: torch.Tensor | None = None,
                      codes: torch.Tensor | None = None) -> None:
        """Set each value to the (weighted) mean of the sub-vectors coded to it (optimal for fixed codes)."""
        codes = self.codes() if codes is None else codes  # (V, D)
        sub = weight.reshape(self.num_embeddings, self.groups, self.width)
        mass = None
        if row_weights is not None:
            mass = row_weights.unsqueeze(1).expand(-1, self.groups).reshape(-1)  # (V * D,), row-major like slot
            sub = sub * row_weights.view(-1, 1, 1)
        stored = self.values.shape[0]
        slot = codes if stored == 1 else codes + torch.arange(self.groups) * self.codewords
        sums = torch.zeros(stored * self.codewords, self.width).index_add_(
            0, slot.reshape(-1), sub.reshape(-1, self.width))
        counts = torch.bincount(slot.reshape(-1), weights=mass, minlength=stored * self.codewords).float()
        flat = self.values.view(-1, self.width)
        used = counts > 0
        flat[used] = sums[used] / counts[used].unsqueeze(1)

    @torch.no_grad()
    def _error(self, weight: torch.Tensor, row_weights: torch.Tensor | None = None,
               codes: torch.Tensor | None = None, chunk: int = 65536) -> float:
        codes = self.codes() if codes is None else codes
        total = 0.0
        for s in range(0, self.num_embeddings, chunk):
            rows = decode_codes(codes[s:s + chunk], self.values, "concat")
            errors = (rows - weight[s:s + chunk]).pow(2).sum(1)
            total += float(errors.sum() if row_weights is None else (errors * row_weights[s:s + chunk]).sum())
        return total / weight.numel()


# -- SX scores in blocks ------------------------------------------------------------------------
# SX's scores, their argmax and the softmax of the straight-through backward are (N, D, K) tensors:
# 32 MB at the benchmark's 16k rows x 32 groups x 16 codewords, where the rest of a step moves a few
# (N, d) = 8 MB tensors. The scores are made once, laid out (D, K, N) so that the reductions over K
# run along contiguous rows, and the backward reuses the forward's probabilities. They are made in
# blocks of rows below glibc's largest mmap threshold (32 MB), so without a caching allocator they
# come from reused heap memory instead of fresh pages (page-faulting a fresh 32 MB costs far more
# than an in-place pass over it).
BLOCK_FLOATS = 1 << 21  # 8 MB score blocks


def _block_rows(groups: int, codewords: int) -> int:
    return max(1, BLOCK_FLOATS // (groups * codewords))


@torch.no_grad()
def _sx_codes(qt: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, tau: float | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """qt (D, w, N) -> codes (N, D): argmax_k (keys_k . q - bias_k), the first maximum on ties.

    With ``tau``, also the blocks of softmax((keys . q - bias) / tau), each (D, K, rows), for
    :class:`_SoftPath`'s backward; from the C kernel, one (D, ceil(N / 16), K, 16) block.
    """
    groups, _, n = qt.shape
    codewords = keys.shape[1]
    if kernels.dpq_supported(qt, keys):  # one fused pass per group in C (frozen/kernels.py)
        codes, blocked = kernels.dpq_sx_forward(qt, keys.contiguous(), bias.contiguous(), tau)
        return codes, [] if blocked is None else [blocked]
    codes = torch.empty(groups, n, dtype=torch.long, device=qt.device)
    # Tensor.max(dim).indices over a short K is much slower than amax; instead the first index
    # attaining the maximum is the largest of (K - k) over the k that attain it.
    rank_dtype = torch.uint8 if codewords < 256 else torch.int32
    rank = torch.arange(codewords, 0, -1, dtype=rank_dtype, device=qt.device).view(1, codewords, 1)
    bias = bias.unsqueeze(2)
    probs: list[torch.Tensor] = []
    step = _block_rows(groups, codewords)
    for start in range(0, n, step):
        # bmm then an in-place subtraction: baddbmm's broadcast copy of the bias took longer than the product.
        scores = torch.bmm(keys, qt[:, :, start:start + step]).sub_(bias)  # (D, K, rows)
        top = (scores >= scores.amax(1, keepdim=True)).view(torch.uint8).to(rank_dtype).mul_(rank).amax(1)
        # A NaN score matches nothing (top = 0): clamp keeps the code in range, as argmax would.
        torch.sub(codewords, top, out=codes[:, start:start + step]).clamp_(max=codewords - 1)
        if tau is not None:
            probs.append(torch.softmax(scores if tau == 1.0 else scores.mul_(1.0 / tau), 1))
    return codes.t(), probs


def _values_grad(codes: torch.Tensor, gt: torch.Tensor, codewords: int) -> torch.Tensor:
    """Gradient (D, K, w) of values[d, codes[n, d]] for row gradients gt (D, w, N): each value gets the sum
    of its rows'. A scatter along the last dim (each of the D * w rows sums into its own K bins) is
    several times cheaper than index_select's backward, an index_add of N * D rows of w floats."""
    groups, width, n = gt.shape
    grad_t = gt.new_zeros(groups, width, codewords).scatter_add_(2, codes.t().unsqueeze(1).expand(groups, width, n), gt)
    return grad_t.transpose(1, 2)


class _HardRows(torch.autograd.Function):
    """``decode_codes(codes, values, "concat")`` for codes (N, D) and values (D, K, w), whose values
    gradient is one scatter along K in the (D, w, N) layout (as in :class:`_SoftPath`)."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.shape = values.shape
        return decode_codes(codes, values.detach(), "concat")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (codes,) = ctx.saved_tensors
        groups, codewords, width = ctx.shape
        return None, _values_grad(codes, grad.t().contiguous().view(groups, width, codes.shape[0]), codewords)


class _Transpose(torch.autograd.Function):
    """x (N, d) -> x^T contiguous, with a contiguous gradient: autograd's own backward of
    t().contiguous() hands the embedding a transposed gradient, and a sparse query gradient with
    transposed values broke the optimizer's in-place update of the table."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.t().contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.t().contiguous()


class _Moments(torch.autograd.Function):
    """qt (D, w, N) -> per-group mean (D, w) and biased covariance (D, w, w) of the N columns.

    Backward in one product: d/dq of <G_m, mean> + <G_C, cov> is G_m / N + (G_C + G_C^T) (q - mean) / N
    (the mean's effect on cov cancels, as the centered rows sum to zero); autograd through
    mean, subtraction and bmm took five passes over (D, w, N)."""

    @staticmethod
    def forward(ctx: Any, qt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = qt.shape[2]
        mean = qt.mean(2)
        centered = qt - mean.unsqueeze(2)
        ctx.save_for_backward(centered)
        return mean, torch.bmm(centered, centered.transpose(1, 2)).div_(n)

    @staticmethod
    def backward(ctx: Any, grad_mean: torch.Tensor, grad_cov: torch.Tensor) -> torch.Tensor:
        (centered,) = ctx.saved_tensors
        n = centered.shape[2]
        grad = torch.bmm((grad_cov + grad_cov.transpose(1, 2)).div_(n), centered)
        return grad.add_((grad_mean / n).unsqueeze(2))


class _SoftPath(torch.autograd.Function):
    """Forward: the hard rows (values[codes], computed by the caller without autograd) as they are.
    Backward: the hard rows' gradient to the values (the chosen codewords' sums), plus the gradient of
    the soft rows softmax((keys . q - bias) / tau) @ values (values as constants) with respect to q
    (as qt (D, w, N)), keys and bias, from the forward's probability blocks (:func:`_sx_codes`)."""

    @staticmethod
    def forward(ctx: Any, hard: torch.Tensor, qt: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor,
                values: torch.Tensor, tau: float, probs: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qt, keys, values, codes)
        ctx.tau, ctx.probs = tau, probs
        return hard.view_as(hard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qt, keys, values, codes = ctx.saved_tensors
        probs, ctx.probs = ctx.probs, None
        groups, width, n = qt.shape
        codewords = keys.shape[1]
        gt = grad.t().contiguous().view(groups, width, n)  # the layout of qt
        grad_qt = grad_keys = grad_bias = None
        if len(probs) == 1 and probs[0].dim() == 4:  # the C forward's blocked probabilities
            grad_qt, grad_keys, grad_bias = kernels.dpq_sx_backward(
                qt, keys.contiguous(), values.detach().contiguous(), probs[0], ctx.tau, gt)
        grad_values = _values_grad(codes, gt, codewords)  # the hard path's
        if grad_qt is not None:
            return None, grad_qt, grad_keys, grad_bias, grad_values, None, None, None
        grad_qt = torch.empty_like(qt)
        grad_keys_t = qt.new_zeros(groups, width, codewords)  # transposed: qt @ grad_scores^T
        grad_bias = qt.new_zeros(groups, codewords)
        keys_t = keys.transpose(1, 2)
        values = values.detach()
        start = 0
        for block in probs:
            stop = start + block.shape[2]
            grad_probs = torch.bmm(values, gt[:, :, start:stop])  # (D, K, rows)
            # grad_scores = p * (grad_probs - sum_k p grad_probs)
            grad_scores = torch._softmax_backward_data(grad_probs, block, 1, block.dtype)
            if ctx.tau != 1.0:
                grad_scores.mul_(1.0 / ctx.tau)
            if len(probs) == 1:
                torch.bmm(keys_t, grad_scores, out=grad_qt)
            else:
                grad_qt[:, :, start:stop] = torch.bmm(keys_t, grad_scores)
            grad_keys_t.baddbmm_(qt[:, :, start:stop], grad_scores.transpose(1, 2))
            grad_bias.sub_(grad_scores.sum(2))
            start = stop
        return None, grad_qt, grad_keys_t.transpose(1, 2), grad_bias, grad_values, None, None, None
