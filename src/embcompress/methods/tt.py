"""Tensor-train embeddings (Hrinchuk, Khrulkov, Mirvakhabova, Orlova, Oseledets; arXiv 1901.10787,
Findings of EMNLP 2020), also the basis of TT-Rec (Yin et al., MLSys 2021).

The (V, d) table is viewed as a tensor of shape (v_1 d_1, ..., v_n d_n) with V' = prod v_k >= V
(padded vocabulary) and d = prod d_k, and stored in tensor-train format (paper, Section 3).

Shapes:
    core k    (r_{k-1}, v_k, d_k, r_k), r_0 = r_n = 1, internal ranks r_1..r_{n-1} = ``rank``
    row i     digits (i_1..i_n) of i in the mixed radix (v_1..v_n), row-major (i_1 most significant)
    E[i]      G_1[:, i_1] @ G_2[:, i_2] @ ... @ G_n[:, i_n]  -> (d_1, ..., d_n) read row-major
    bytes     4 * sum_k r_{k-1} v_k d_k r_k  (ratio against the real V, not V')

Shape choice ("auto"): the factorization with the smallest sum of factors (core sizes grow
linearly in each factor), ties broken by the highest entropy (T3nsor's criterion); the
vocabulary may be padded up to V rounded to 10^j (T3nsor / TT-Rec candidates) when that gives a
smaller sum. Cores are then ordered so the smallest v_k d_k sit in the middle, where a core costs
r^2 instead of r per slice. Resolved shapes are stored in :meth:`layout`, never recomputed.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..base import CompressedEmbedding
from ..config import FitConfig, MethodConfig, SpecError
from ..frozen.tt import FrozenTensorTrain, check_tt_shapes, choose_split, tt_half_table, tt_rows
from ..registry import register

__all__ = ["TTConfig", "TTFit", "TensorTrainEmbedding", "resolve_shapes", "tt_svd", "best_factorization"]

MAX_CORES = 8
_SHAPE = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class TTConfig(MethodConfig):
    method: ClassVar[str] = "tt"
    cores: int = field(default=3, metadata={"help": "number n of TT cores (2..8)"})
    rank: int = field(default=16, metadata={"help": "internal TT rank r_1 = ... = r_{n-1}"})
    vocab_shape: str = field(default="auto", metadata={
        "help": "factors v_1..v_n of the padded vocabulary V' >= V, like 25x30x40, or auto"})
    dim_shape: str = field(default="auto", metadata={
        "help": "factors d_1..d_n of the embedding dim (exact product), like 4x8x8, or auto"})
    init_std: float = field(default=1.0, metadata={
        "help": "std of the reconstructed entries at random init (nn.Embedding uses 1)"})

    def validate(self) -> None:
        if not 2 <= self.cores <= MAX_CORES:
            raise SpecError(f"tt: cores must be in 2..{MAX_CORES}, got {self.cores}")
        if self.rank < 1:
            raise SpecError(f"tt: rank must be >= 1, got {self.rank}")
        if not self.init_std > 0:
            raise SpecError(f"tt: init_std must be > 0, got {self.init_std}")
        for name in ("vocab_shape", "dim_shape"):
            parse_shape(getattr(self, name), name, self.cores)


def parse_shape(text: str, name: str, cores: int) -> list[int] | None:
    """``"auto"`` -> None; ``"25x30x40"`` -> [25, 30, 40], checked against ``cores``."""
    if text == "auto":
        return None
    example = "x".join(["8"] * cores)
    if not _SHAPE.match(text):
        raise SpecError(f"tt: {name}={text!r} must be 'auto' or {cores} positive integers joined by 'x', "
                        f"like {example}")
    factors = [int(part) for part in text.split("x")]
    if len(factors) != cores or min(factors) < 1:
        raise SpecError(f"tt: {name}={text!r} needs exactly {cores} positive factors (cores={cores}), "
                        f"like {example}, or 'auto'")
    return factors


# -- automatic shapes -------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _factorizations(value: int, parts: int, smallest: int = 1) -> tuple[tuple[int, ...], ...]:
    """Every non-decreasing tuple of ``parts`` integers >= ``smallest`` whose product is ``value``."""
    if parts == 1:
        return ((value,),) if value >= smallest else ()
    found: list[tuple[int, ...]] = []
    factor = smallest
    while factor ** parts <= value:
        if value % factor == 0:
            found.extend((factor, *rest) for rest in _factorizations(value // factor, parts - 1, factor))
        factor += 1
    return tuple(found)


def _entropy(factors: Sequence[int]) -> float:
    total = sum(factors)
    return -sum(f / total * math.log(f / total) for f in factors)


@lru_cache(maxsize=1024)
def best_factorization(value: int, parts: int) -> tuple[int, ...]:
    """Ascending factors of ``value``: smallest sum, then the most balanced (highest entropy)."""
    return min(_factorizations(value, parts), key=lambda f: (sum(f), -_entropy(f)))


@lru_cache(maxsize=1024)
def auto_vocab_shape(rows: int, parts: int) -> tuple[int, ...]:
    """Factors of V' >= rows; V' is rows rounded up to a multiple of 10^j when that is cheaper.

    The candidates are T3nsor's; among them we keep the smallest sum of factors (parameters are
    linear in each v_k), so 25,000 rows in 3 cores stay 25x25x40 while 97 rows become 4x5x5.
    """
    candidates = sorted({-(-rows // 10**j) * 10**j for j in range(len(str(rows)))})
    scored = [(sum(f), -_entropy(f), v, f) for v in candidates for f in [best_factorization(v, parts)]]
    return min(scored)[3]


def _params(vocab: Sequence[int], dims: Sequence[int], rank: int) -> int:
    ranks = [1] + [rank] * (len(vocab) - 1) + [1]
    return sum(ranks[k] * v * x * ranks[k + 1] for k, (v, x) in enumerate(zip(vocab, dims)))


def _arrange(vocab: Sequence[int], dims: Sequence[int], rank: int, vocab_fixed: bool,
             dims_fixed: bool) -> tuple[list[int], list[int]]:
    """Order the free factor lists to minimize parameters at this rank.

    End cores cost r per (v_k, d_k) slice, middle cores r^2: the smallest products go in the
    middle. With one list fixed this is an assignment solved by the rearrangement inequality;
    with both free we try every choice of the two end factors of each list.
    """
    n = len(vocab)
    weights = [rank if k in (0, n - 1) else rank * rank for k in range(n)]
    if vocab_fixed and dims_fixed:
        return list(vocab), list(dims)
    if vocab_fixed or dims_fixed:
        fixed, free = (vocab, dims) if vocab_fixed else (dims, vocab)
        # Largest weight * fixed factor gets the smallest free factor.
        positions = sorted(range(n), key=lambda k: (-weights[k] * fixed[k], k))
        placed = [0] * n
        for position, factor in zip(positions, sorted(free)):
            placed[position] = factor
        return (list(vocab), placed) if vocab_fixed else (placed, list(dims))
    best = None
    for v_ends in set(itertools.combinations(sorted(vocab), 2)):
        v_mid = list(sorted(vocab))
        for f in v_ends:
            v_mid.remove(f)
        for d_ends in set(itertools.combinations(sorted(dims), 2)):
            d_mid = list(sorted(dims))
            for f in d_ends:
                d_mid.remove(f)
            # Middles: smallest vocab factor with the largest dim factor (minimal sum of products).
            mids = sorted(zip(sorted(v_mid), sorted(d_mid, reverse=True)), key=lambda p: (p[0] * p[1], p))
            for first, last in ((0, 1), (1, 0)):
                ends = sorted([(v_ends[0], d_ends[first]), (v_ends[1], d_ends[last])],
                              key=lambda p: (p[0] * p[1], p))
                pairs = [ends[0], *mids, ends[1]]
                vs, ds = [p[0] for p in pairs], [p[1] for p in pairs]
                key = (_params(vs, ds, rank), vs, ds)
                if best is None or key < best:
                    best = key
    assert best is not None  # there is always a factorization (1 x ... x n)
    return best[1], best[2]


def resolve_shapes(config: TTConfig, num_embeddings: int, embedding_dim: int) -> tuple[list[int], list[int]]:
    """The (vocab_shape, dim_shape) this config gives a (num_embeddings, embedding_dim) table."""
    n = config.cores
    vocab = parse_shape(config.vocab_shape, "vocab_shape", n)
    dims = parse_shape(config.dim_shape, "dim_shape", n)
    auto_vocab = list(auto_vocab_shape(num_embeddings, n))
    if vocab is not None and math.prod(vocab) < num_embeddings:
        raise SpecError(f"tt: vocab_shape={config.vocab_shape!r} covers {math.prod(vocab)} rows, fewer than "
                        f"num_embeddings={num_embeddings}; use e.g. vocab_shape={'x'.join(map(str, auto_vocab))} "
                        "or auto")
    if dims is not None and math.prod(dims) != embedding_dim:
        valid = "x".join(map(str, best_factorization(embedding_dim, n)))
        raise SpecError(f"tt: dim_shape={config.dim_shape!r} multiplies to {math.prod(dims)}, not "
                        f"embedding_dim={embedding_dim}; use e.g. dim_shape={valid} or auto")
    return _arrange(vocab or auto_vocab, dims or list(best_factorization(embedding_dim, n)), config.rank,
                    vocab is not None, dims is not None)


def _ranks(config: TTConfig) -> list[int]:
    return [1] + [config.rank] * (config.cores - 1) + [1]


# -- TT-SVD -------------------------------------------------------------------------------------

@torch.no_grad()
def tt_svd(weight: torch.Tensor, vocab_shape: Sequence[int], dim_shape: Sequence[int],
           ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) of the zero-padded table as a (v_1 d_1, ..., v_n d_n) tensor.

    Returns cores (r_{k-1}, v_k, d_k, r_k); a bond whose unfolding has fewer than r_k singular
    values is padded with zeros (the TT is then exact at that bond).
    """
    n = len(vocab_shape)
    padded = weight.new_zeros(math.prod(vocab_shape), weight.shape[1])
    padded[: weight.shape[0]] = weight
    # (v_1..v_n, d_1..d_n) -> (v_1, d_1, ..., v_n, d_n): the k-th mode of the TT is (v_k, d_k).
    order = [axis for k in range(n) for axis in (k, n + k)]
    rest = padded.reshape(*vocab_shape, *dim_shape).permute(*order).contiguous()
    cores = []
    for k in range(n - 1):
        rows = ranks[k] * vocab_shape[k] * dim_shape[k]
        u, s, vh = torch.linalg.svd(rest.reshape(rows, -1), full_matrices=False)
        keep = min(ranks[k + 1], s.shape[0])
        core = weight.new_zeros(rows, ranks[k + 1])
        core[:, :keep] = u[:, :keep]
        cores.append(core.reshape(ranks[k], vocab_shape[k], dim_shape[k], ranks[k + 1]))
        rest = weight.new_zeros(ranks[k + 1], vh.shape[1])
        rest[:keep] = s[:keep, None] * vh[:keep]
    cores.append(rest.reshape(ranks[n - 1], vocab_shape[n - 1], dim_shape[n - 1], 1))
    # TT-SVD leaves orthonormal cores and all the scale in the last one; spread it evenly (the
    # product is unchanged) so one Adam learning rate suits every core during refinement.
    scales = [float(c.pow(2).mean().sqrt()) for c in cores]
    if min(scales) > 0:
        target = math.exp(sum(math.log(s) for s in scales) / n)
        cores = [c * (target / s) for c, s in zip(cores, scales)]
    return cores


# -- the table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TTFit(FitConfig):
    method: ClassVar[str] = "tt"
    steps: int = field(default=100, metadata={"help": "Adam steps after the TT-SVD start", "min": 0})
    lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate; none = 1% of the TT-SVD cores' RMS entry", "min": 0.0})
    batch_size: int = field(default=2048, metadata={"help": "rows per Adam step", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the row sampling"})


@register
class TensorTrainEmbedding(CompressedEmbedding[TTConfig]):
    """A drop-in ``nn.Embedding`` stored as TT cores.

    Example:
        >>> table = TensorTrainEmbedding(25_000, 256, "tt:cores=3,rank=16")
        >>> table.layout()
        {'vocab_shape': [25, 25, 40], 'dim_shape': [8, 4, 8]}
    """

    Config = TTConfig
    Fit = TTFit
    QUICK_FIT = {"steps": 30}  # the demo's fit; the default fit is slower and a little better

    def __init__(self, num_embeddings: int, embedding_dim: int, config: Any = None,
                 padding_idx: int | None = None, layout: dict[str, Any] | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, config, padding_idx)
        cfg = self.config
        if layout:
            vocab, dims = [int(v) for v in layout["vocab_shape"]], [int(x) for x in layout["dim_shape"]]
            if len(vocab) != cfg.cores:
                raise SpecError(f"tt: stored layout has {len(vocab)} cores but the spec says cores={cfg.cores}")
            try:
                check_tt_shapes(num_embeddings, embedding_dim, vocab, dims)
            except ValueError as exc:
                raise SpecError(f"tt: stored layout does not fit this table: {exc}") from None
        else:
            vocab, dims = resolve_shapes(cfg, num_embeddings, embedding_dim)
        self.vocab_shape, self.dim_shape, self.ranks = vocab, dims, _ranks(cfg)
        self.split = choose_split(vocab, dims, self.ranks)
        # Each reconstructed entry sums prod(r_1..r_{n-1}) products of n core entries, so its
        # variance is prod(r) * s^(2n); s = (sigma / sqrt(prod r))^(1/n) gives std sigma.
        internal = math.prod(self.ranks[1:-1])
        std = (cfg.init_std / math.sqrt(internal)) ** (1.0 / cfg.cores)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(self.ranks[k], vocab[k], dims[k], self.ranks[k + 1]) * std)
            for k in range(cfg.cores))

    def layout(self) -> dict[str, Any]:
        return {"vocab_shape": list(self.vocab_shape), "dim_shape": list(self.dim_shape)}

    @classmethod
    def expected_bytes(cls, config: TTConfig, num_embeddings: int, embedding_dim: int) -> int:
        vocab, dims = resolve_shapes(config, num_embeddings, embedding_dim)
        return 4 * _params(vocab, dims, config.rank)

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: TTConfig,
                          fit_time: float = 1.0) -> list[TTConfig]:
        """Every rank up to the first that no longer compresses, for the user's number of cores.

        Core counts are not mixed: sizes of different core counts interleave, and the largest
        fitting size would pick the core count by accident rather than by quality.
        """
        dense = 4 * num_embeddings * embedding_dim
        candidates = []
        rank = 0
        while True:
            rank += 1
            config = base.replace(rank=rank)
            candidates.append(config)
            if cls.expected_bytes(config, num_embeddings, embedding_dim) > dense:
                return candidates

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        cores = list(self.cores)
        right_rows = math.prod(self.vocab_shape[self.split:])
        if 4 * ids.shape[0] < max(math.prod(self.vocab_shape[:self.split]), right_rows):
            return tt_rows(cores, self.vocab_shape, self.split, ids)
        # Batches that need a quarter or more of each half's rows (the benchmark's 16k ids into
        # 10^4 x 10^2 halves): both halves whole (what tt_rows builds in this case too), then one
        # gather of each per id and a batched product, without tt_rows' dedupe: its sort, final
        # gather and that gather's backward cost more than the repeated rows they spare.
        left = tt_half_table(cores[:self.split], "left")  # (V_l, D_l, r)
        right = tt_half_table(cores[self.split:], "right")  # (V_r, r, D_r)
        left_index, right_index = ids // right_rows, ids % right_rows
        if left.shape[1] > right.shape[2]:
            # row^T = R^T @ L^T: with D_l > D_r this orientation plus the transposed copy beats L @ R
            # (see frozen.tt.tt_lookup).
            left_t = left.transpose(1, 2).contiguous().index_select(0, left_index)
            right_t = right.transpose(1, 2).contiguous().index_select(0, right_index)
            return torch.bmm(right_t, left_t).transpose(1, 2).reshape(ids.shape[0], -1)
        rows = torch.bmm(left.index_select(0, left_index), right.index_select(0, right_index))
        return rows.reshape(ids.shape[0], -1)

    def _fit(self, weight: torch.Tensor, settings: TTFit, progress: bool | None) -> TTFit:
        """TT-SVD of the zero-padded table, then Adam on the MSE over real rows (paper, Section 4).

        ``lr`` defaults to 1% of the cores' RMS entry: Adam moves every entry by about ``lr`` per
        step, and an absolute rate large enough for rank 4 wrecks the TT-SVD start at rank 100.
        Refinement is kept only if it lowers the error on the real rows (checked on up to 65,536).
        """
        weight = self._check_fit_weight(weight)
        start = tt_svd(weight, self.vocab_shape, self.dim_shape, self.ranks)
        with torch.no_grad():
            for param, core in zip(self.cores, start):
                param.copy_(core)
        steps, lr = settings.steps, settings.lr
        if steps <= 0:
            return settings
        if lr is None:
            lr = 1e-2 * float(torch.cat([c.reshape(-1) for c in start]).pow(2).mean().sqrt())
        check = torch.arange(self.num_embeddings)
        if self.num_embeddings > 65536:
            check = torch.randperm(self.num_embeddings, generator=torch.Generator().manual_seed(1))[:65536]

        def error() -> float:
            with torch.no_grad():
                return float((self.lookup(check) - weight[check]).pow(2).mean())

        before = error()
        self.fit_by_gradient(weight, steps=steps, lr=lr, batch_size=settings.batch_size, seed=settings.seed,
                             progress=progress)
        if error() > before:
            with torch.no_grad():
                for param, core in zip(self.cores, start):
                    param.copy_(core)
        return settings.replace(lr=lr)

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        self.cores[0].mul_(factor)

    def export(self) -> FrozenTensorTrain:
        cores = {f"core{k}": core.detach().clone() for k, core in enumerate(self.cores)}
        return FrozenTensorTrain(self.num_embeddings, self.embedding_dim, self.padding_idx,
                                 vocab_shape=self.vocab_shape, dim_shape=self.dim_shape, **cores)

    def extra_repr(self) -> str:
        shapes = f", vocab_shape={self.vocab_shape}, dim_shape={self.dim_shape}"
        return super().extra_repr() + shapes
