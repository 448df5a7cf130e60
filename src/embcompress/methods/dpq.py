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
from ..config import MethodConfig, SpecError
from ..frozen import CodebookEmbedding
from ..frozen.codebook import decode_codes, straight_through
from ..kmeans import kmeans
from ..progress import progress_bar
from ..registry import register
from .pq import check_groups, divisors

__all__ = ["DPQConfig", "DPQEmbedding"]

log = logging.getLogger(__name__)

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


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
                "needs an optimizer that takes them (SGD, SparseAdam, Adagrad); not under DDP, which only "
                "all-reduces sparse gradients of nn.Embedding/EmbeddingBag modules"})

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


@register
class DPQEmbedding(CompressedEmbedding):
    """Differentiable product quantization, a drop-in for ``nn.Embedding``.

    Example:
        >>> table = embcompress.build("dpq:variant=sx,groups=8,codewords=16", 10_000, 64)
        >>> loss = task_loss(table(ids)) + embcompress.aux_loss(model)   # aux is VQ's centroid term
        >>> frozen = table.export()                                      # codes + values only
    """

    Config = DPQConfig
    QUICK_FIT = {"steps": 50}  # the demo's fit; the default fit is slower and a little better

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
        self.query = nn.Parameter(torch.randn(num_embeddings, embedding_dim))
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
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: DPQConfig) -> list[DPQConfig]:
        # Small K first: among configs of equal size the first wins, and the paper found small K
        # with large D beats large K with small D (Section 3.3).
        return [base.replace(groups=g, codewords=2 ** b) for b in range(1, 9)
                for g in sorted(divisors(embedding_dim), reverse=True)]

    # -- forward ---------------------------------------------------------------------------
    def _keys(self) -> torch.Tensor:
        return self.values if self.keys is None else self.keys

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        """q (N, D, w) -> batch-normalized scores (N, D, K); updates running stats in training."""
        keys = self._keys().expand(self.groups, -1, -1)
        if self.config.variant == "vq":
            with torch.no_grad():  # VQ's codes take no gradient: Q learns straight through, C from aux
                scores = -(q.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("ndw,dkw->ndk", q, keys)
                           + keys.pow(2).sum(-1).unsqueeze(0))
        else:
            scores = torch.einsum("ndw,dkw->ndk", q, keys)
        if not self.config.batchnorm:
            return scores
        n = scores.shape[0]
        # Batch statistics need >= 2 rows; smaller batches, the post hoc fit and a fitted table
        # (batchnorm_stats="running") use the running ones.
        batch_stats = self.training and self.batchnorm_stats == "batch" and not self._fitting and n > 1
        flat = F.batch_norm(scores.reshape(n, self.groups * self.codewords), self.running_mean.view(-1), self.running_var.view(-1),
                            training=batch_stats, momentum=BN_MOMENTUM, eps=BN_EPS)
        return flat.view_as(scores)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of unique, non-padding ids (N,) -> (N, d)."""
        n, d = ids.shape[0], self.embedding_dim
        # Sparse query gradients (config.sparse, and always in the post hoc fit, which uses SparseAdam):
        # a dense (V, d) gradient and optimizer step per batch cost more than the rest of the step.
        q = F.embedding(ids, self.query, sparse=self.config.sparse or self._fitting).view(n, self.groups, self.width)
        scores = self._scores(q)
        codes = scores.max(-1).indices  # argmax (first maximum, like argmax), faster over a short last dim
        hard = decode_codes(codes, self.values, "concat")
        if not self.training:
            return hard  # exactly what the exported codes + values decode to
        if self.config.variant == "vq":
            # Section 2.2: straight-through to Q; centroids pulled toward stopgrad(Q) by aux.
            flat_q = q.reshape(n, d)
            self._last_aux = (hard - flat_q.detach()).pow(2).mean() if n else None
            return flat_q + (hard - flat_q).detach()
        # Section 2.1: forward = one-hot(argmax) @ V exactly; backward through softmax(s / tau) @ V.
        # Values take their gradient from the hard path only, as with p - stopgrad(p - onehot).
        # straight_through gives hard + soft - soft.detach() without computing soft in the forward.
        tau = self.config.tau
        probs = torch.softmax(scores if tau == 1.0 else scores / tau, -1)  # x / 1 == x: skip the pass
        return straight_through(hard, probs, self.values, "concat")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        # Dedupe first: scores and batch statistics are computed once per distinct row.
        unique, inverse = torch.unique(ids, return_inverse=True)
        if self.padding_idx is None:
            if unique.shape[0] == ids.shape[0]:  # no repeats: the same rows, in the caller's order
                return self._rows(ids)
            # index_select: its backward is an index_add (2 ms at 16k x 128) where [inverse]'s
            # accumulating index_put took 23 ms.
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
            parts = [self._scores(self.query[ids[s:s + chunk]].view(-1, self.groups, self.width)).argmax(-1)
                     for s in range(0, ids.shape[0], chunk)]
        finally:
            self.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, self.groups, dtype=torch.long)

    def export(self) -> CodebookEmbedding:
        """Codes of ALL rows recomputed in eval mode (never cached from training batches) + values."""
        return CodebookEmbedding.from_codes(self.codes(), self.values.detach().clone(), "concat",
                                            self.padding_idx)

    # -- post hoc ----------------------------------------------------------------------------
    def fit(self, weight: torch.Tensor, *, steps: int | None = None, progress: bool | None = None,
            batch_size: int = 4096, lr: float = 1e-3, iters: int = 25) -> "DPQEmbedding":
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
        """
        weight = self._check_fit_weight(weight)
        steps = 200 if steps is None else steps
        seed = int(torch.randint(0, 2**31 - 1, ()))
        self._start_from_kmeans(weight, iters, seed)
        if steps <= 0:
            return self
        start_state = {k: v.clone() for k, v in self.state_dict().items()}
        start_error = self._error(weight)
        self._refine(weight, steps, batch_size, lr, seed, progress)
        if self.config.variant == "sx":
            self._refit_values(weight)
        error = self._error(weight)
        if error > start_error:
            log.info("dpq fit: refinement raised the MSE from %.4g to %.4g; keeping the k-means start",
                     start_error, error)
            self.load_state_dict(start_state)
        return self

    @torch.no_grad()
    def _start_from_kmeans(self, weight: torch.Tensor, iters: int, seed: int) -> None:
        cfg = self.config
        sub = weight.reshape(self.num_embeddings, self.groups, self.width).transpose(0, 1)  # (D, V, w)
        if cfg.shared:
            sub = sub.reshape(1, -1, self.width)  # one k-means over every group's sub-vectors
        centroids, codes = kmeans(sub, self.codewords, iters=iters, seed=seed)
        codes = codes.reshape(self.groups, self.num_embeddings).T  # (V, D), group-major in both cases
        self.values.copy_(centroids)
        self.query.copy_(weight)
        if cfg.batchnorm:
            self.set_batchnorm_stats("running")  # fine-tuning keeps the fitted codes (see the method)
            self.running_mean.zero_()
            self.running_var.fill_(1.0 - BN_EPS)  # sqrt(var + eps) = 1: the identity in eval mode
        if cfg.variant == "vq":
            return
        if cfg.batchnorm:
            self.keys.copy_(centroids)
            self.running_mean.copy_((centroids.pow(2).sum(-1) / 2).expand(self.groups, -1))
            return
        generator = torch.Generator().manual_seed(seed)
        keys = F.normalize(torch.randn(self.keys.shape, generator=generator), dim=-1)
        self.keys.copy_(keys)
        group_keys = keys.expand(self.groups, -1, -1)
        placed = group_keys[torch.arange(self.groups), codes]  # (V, D, w): each row on its code's key
        self.query.copy_(placed.reshape(self.num_embeddings, -1))

    def _refine(self, weight: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
                progress: bool | None) -> None:
        generator = torch.Generator().manual_seed(seed + 1)
        dense = [p for p in self.parameters() if p.requires_grad and p is not self.query]
        optimizers = [torch.optim.Adam(dense, lr=lr)]
        if self.query.requires_grad:
            optimizers.append(torch.optim.SparseAdam([self.query], lr=lr))
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers]
        was_training = self.training
        self.train()
        self._fitting = True
        try:
            bar = progress_bar(range(steps), desc="fit dpq", enabled=progress)
            for _ in bar:
                rows = torch.randint(0, self.num_embeddings, (min(batch_size, self.num_embeddings),),
                                     generator=generator)
                loss = (self.lookup(rows) - weight[rows]).pow(2).mean()
                aux = self.aux_loss()
                total = loss if aux is None else loss + aux
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                total.backward()
                for optimizer, schedule in zip(optimizers, schedules):
                    optimizer.step()
                    schedule.step()
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(mse=f"{loss.item():.4g}", refresh=False)
        finally:
            self._fitting = False
            self._last_aux = None
            self.train(was_training)

    @torch.no_grad()
    def _refit_values(self, weight: torch.Tensor) -> None:
        """Set each value to the mean of the sub-vectors coded to it (optimal for fixed codes)."""
        codes = self.codes()  # (V, D)
        sub = weight.reshape(self.num_embeddings, self.groups, self.width)
        stored = self.values.shape[0]
        slot = codes if stored == 1 else codes + torch.arange(self.groups) * self.codewords
        sums = torch.zeros(stored * self.codewords, self.width).index_add_(
            0, slot.reshape(-1), sub.reshape(-1, self.width))
        counts = torch.bincount(slot.reshape(-1), minlength=stored * self.codewords).float()
        flat = self.values.view(-1, self.width)
        used = counts > 0
        flat[used] = sums[used] / counts[used].unsqueeze(1)

    @torch.no_grad()
    def _error(self, weight: torch.Tensor, chunk: int = 65536) -> float:
        codes = self.codes()
        total = 0.0
        for s in range(0, self.num_embeddings, chunk):
            rows = decode_codes(codes[s:s + chunk], self.values, "concat")
            total += float((rows - weight[s:s + chunk]).pow(2).sum())
        return total / weight.numel()
