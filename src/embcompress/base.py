"""The contract every compressed table meets, whatever the method.

- ``forward(ids)``: ``nn.Embedding`` call semantics (any integer dtype and shape, output
  ``(*ids.shape, d)``, the ``padding_idx`` row is zero and gets no gradient), never a tuple;
- ``aux_loss()``: a method's auxiliary training loss, or None (summed by ``embcompress.aux_loss``);
- ``from_pretrained(weight, config)``: fit the method to a given matrix (post hoc compression);
- ``materialize()``: the dense table the module decodes to in eval mode;
- ``export()``: a frozen inference module holding only what is deployed, and ``num_bytes()``.

A subclass implements :meth:`lookup`, :meth:`export`, and usually :meth:`_fit` with its own
:class:`~embcompress.config.FitConfig` (``Fit``): :meth:`fit` validates the settings, runs
``_fit`` and keeps the resolved settings in ``fit_settings``, which :meth:`export` hands to the
frozen module so artifacts record how they were made. Values a method
resolves from the table shape (a tensor-train factorization, hash parameters) go in
:meth:`layout` and are passed back on load, so they are never recomputed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, cast

from typing_extensions import TypeVar

import torch
from torch import nn

from .config import FitConfig, FitLike, MethodConfig, SpecError, parse_spec
from .frozen.base import FrozenEmbedding
from .training import StepFn, adam_steps
from .validation import check_ids, check_table_shape, check_weight, normalize_padding_idx

__all__ = ["CompressedEmbedding", "GradientFit", "fit_scale", "row_weighted_methods"]

log = logging.getLogger(__name__)

E = TypeVar("E", bound="CompressedEmbedding[Any]")
# The default keeps a bare ``CompressedEmbedding`` meaning "any method's table" (PEP 696).
C = TypeVar("C", bound=MethodConfig, default=MethodConfig)

# Inputs whose largest value exceeds SAFE_PEAK are fitted scaled down: the fits square values and
# sum thousands of squares, which overflows float32 (3.4e38) from about 1e16 on. Inputs below
# TINY_PEAK are fitted scaled up: their squares underflow and fall under the fits' epsilons
# (a 1e-40 table came back as zeros from scalar, memcom, pq, dpq and codes).
SAFE_PEAK = 2.0 ** 20
TINY_PEAK = 2.0 ** -20


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no guard
        return None


def _check_affordable(cls: "type[CompressedEmbedding[Any]]", config: MethodConfig, num_embeddings: int,
                      embedding_dim: int) -> None:
    """Refuse, before allocating, a config whose stored tensors alone exceed this machine's memory
    (a bucket count or TT rank with a few digits too many would otherwise ask for terabytes)."""
    if torch.empty(0).device.type == "meta":
        return  # a dry run on the meta device (io's load check) allocates nothing
    memory = _physical_memory()
    try:
        need = cls.expected_bytes(config, num_embeddings, embedding_dim)
    except (NotImplementedError, SpecError, ValueError):
        return  # the constructor reports an invalid config itself
    if memory is not None and need > memory:
        raise SpecError(f"{config.to_spec()} would store {need / 1e9:,.1f} GB for a ({num_embeddings}, "
                        f"{embedding_dim}) table, more than this machine's {memory / 1e9:.1f} GB of memory; "
                        "choose a smaller setting or a byte budget (bits_per_row, ratio)")


def fit_scale(weight: torch.Tensor) -> float:
    """1.0 for tables in a safe range (or all zeros), else a power of two bringing the RMS near 1
    (exact to undo)."""
    peak = float(weight.abs().max())
    if peak == 0.0 or TINY_PEAK <= peak <= SAFE_PEAK:
        return 1.0
    exponent = round(math.log2(float(weight.double().pow(2).mean().sqrt())))
    return 2.0 ** (max(1, exponent) if peak > SAFE_PEAK else min(-1, exponent))



@dataclass(frozen=True)
class GradientFit(FitConfig):
    """Fit settings of the default fit: Adam on the reconstruction MSE over random row batches."""

    steps: int = field(default=500, metadata={"help": "Adam steps", "min": 0})
    batch_size: int = field(default=4096, metadata={"help": "rows per step", "min": 1})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (cosine-annealed to 0)", "min": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the row sampling"})


class CompressedEmbedding(nn.Module, Generic[C]):
    """Base class of every trainable compressed table; ``C`` is the method's config type."""

    Config: ClassVar[type[MethodConfig]]
    config: C
    #: The method's post hoc fit settings; :meth:`fit` validates every option against it.
    Fit: ClassVar[type[FitConfig]] = GradientFit
    #: The settings of the last :meth:`fit` (canonical values, resolved seeds), None if never fitted.
    fit_settings: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "export" in cls.__dict__:
            cls.export = _declaring_spec(cls.__dict__["export"])  # type: ignore[method-assign,assignment]

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        config: MethodConfig | str | None = None,
        padding_idx: int | None = None,
        layout: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_table_shape(num_embeddings, embedding_dim)
        config = self.Config() if config is None else parse_spec(config)
        if not isinstance(config, self.Config):
            raise SpecError(f"{type(self).__name__} needs a {self.Config.__name__} "
                            f"(method {self.Config.method!r}), got a config for {config.method!r}")
        _check_affordable(type(self), config, num_embeddings, embedding_dim)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.config = cast(C, config)

    # -- what each method implements ---------------------------------------------------------
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for a 1-D int64 tensor of valid ids, shape (N, embedding_dim)."""
        raise NotImplementedError

    def export(self) -> FrozenEmbedding:
        """The frozen inference module; its output equals this module's output in eval mode.

        Every subclass's ``export`` returns a module whose ``spec`` and ``fit_settings`` are this
        table's (set on the way out, so a method's export only builds the format)."""
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        """Values resolved from the table shape at construction (JSON), stored with the artifact."""
        return {}

    @classmethod
    def expected_bytes(cls, config: C, num_embeddings: int, embedding_dim: int) -> int:
        """Exact artifact bytes for this config and table shape, without building anything."""
        raise NotImplementedError

    @classmethod
    def budget_candidates(cls, num_embeddings: int, embedding_dim: int, base: C,
                          fit_time: float = 1.0) -> list[C]:
        """Configs to consider for a byte budget, best-quality-first among equal sizes.

        ``base`` carries the fields the user fixed; vary the size knobs. ``embcompress.budget``
        keeps the largest candidate that fits. ``fit_time``: how many times the default post hoc
        fit's time bound (about two CPU minutes) a candidate's default fit may take, for methods
        whose fit time grows with the setting (``codes``); the others ignore it.
        """
        raise NotImplementedError

    @classmethod
    def budget_note(cls, num_embeddings: int, embedding_dim: int, base: C) -> str:
        """Why a budget may be out of reach, added to the error when nothing fits ('' = nothing to add)."""
        return ""

    #: Fit options for a fast post hoc fit (the demo's); methods with a slow default fit override it.
    QUICK_FIT: ClassVar[dict[str, Any]] = {}

    @classmethod
    def quick_fit_options(cls) -> dict[str, Any]:
        """Options for ``from_pretrained`` that trade a little quality for a much faster fit."""
        return cls.Fit.parse(cls.QUICK_FIT).to_dict()

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last training forward (DPQ-VQ's centroid term), else None."""
        return None

    def fit(self: E, weight: torch.Tensor, settings: FitLike = None, *,
            progress: bool | None = None, row_weights: torch.Tensor | None = None, **options: Any) -> E:
        """Fit the parameters to ``weight`` (V, d) post hoc.

        ``settings`` (a ``Fit`` config, ``"key=value,..."`` or a dict) and keyword ``options`` are
        checked against the method's ``Fit`` (a misspelt name is an error naming the valid ones);
        the resolved settings are kept in :attr:`fit_settings`. ``row_weights`` (V,) weighs each
        row's error (token counts) for the methods that take it (:func:`row_weighted_methods`);
        a tensor, not a setting, so it is not recorded. Uniform weights are the unweighted objective
        and take the unweighted fit (the same draws, the same result).
        """
        resolved = self.Fit.parse(settings, **options)
        if getattr(resolved, "seed", 0) is None:  # drawn now, so the table records a seed that reproduces it
            resolved = resolved.replace(seed=int(torch.randint(0, 2**31 - 1, ())))
        weights = None if row_weights is None else self._check_row_weights(row_weights)
        if weights is None or bool((weights == weights[0]).all()):  # uniform weights: the unweighted objective
            used = self._fit(weight, resolved, progress)
        else:
            used = self._fit_weighted(weight, resolved, progress, weights)
        self.fit_settings = used.to_dict()
        return self

    #: True for methods whose fit takes ``row_weights`` (they override :meth:`_fit_weighted`).
    TAKES_ROW_WEIGHTS: ClassVar[bool] = False

    def _fit_weighted(self, weight: torch.Tensor, settings: Any, progress: bool | None,
                      row_weights: torch.Tensor) -> FitConfig:
        """Fit minimizing sum_i w_i ||e_i||^2 (w = ``row_weights``, checked); methods that support it override."""
        raise NotImplementedError

    def _check_row_weights(self, row_weights: torch.Tensor) -> torch.Tensor:
        if not self.TAKES_ROW_WEIGHTS:
            raise ValueError(f"{self.config.method} takes no row_weights; methods whose fit does: "
                             f"{', '.join(row_weighted_methods())}")
        if not isinstance(row_weights, torch.Tensor) or tuple(row_weights.shape) != (self.num_embeddings,):
            got = tuple(row_weights.shape) if isinstance(row_weights, torch.Tensor) else type(row_weights).__name__
            raise ValueError(f"row_weights must be a ({self.num_embeddings},) tensor (one weight per row), got {got}")
        weights = row_weights.detach().float().cpu()
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool((weights > 0).any()):
            raise ValueError("row_weights must be finite and >= 0, with at least one row above 0")
        return weights

    def _fit(self, weight: torch.Tensor, settings: Any, progress: bool | None) -> FitConfig:
        """Fit with validated settings (this method's ``Fit``); return them as used. Default: Adam on the MSE."""
        gradient = cast(GradientFit, settings)
        self.fit_by_gradient(weight, steps=gradient.steps, batch_size=gradient.batch_size, lr=gradient.lr,
                             seed=gradient.seed, progress=progress)
        return gradient

    # -- shared behaviour --------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return self.config.to_spec()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (*) of any integer dtype -> (*, embedding_dim)."""
        check_ids(ids, self.num_embeddings)
        flat = ids.reshape(-1).long()
        out = self.lookup(flat)
        if self.padding_idx is not None:
            # A mask, not an in-place write: the padding row gets zero gradient too.
            out = out * (flat != self.padding_idx).unsqueeze(1).to(out.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    @torch.no_grad()
    def materialize(self, chunk: int = 65536) -> torch.Tensor:
        """The dense table (num_embeddings, embedding_dim) as the module decodes it in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(torch.arange(s, min(s + chunk, self.num_embeddings)))
                              for s in range(0, self.num_embeddings, chunk)])
        finally:
            self.train(was_training)

    def num_bytes(self) -> int:
        """Exact bytes of the exported artifact's tensors."""
        return self.export().num_bytes()

    def dense_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * 4

    def compression_ratio(self) -> float:
        """Exported bytes against the fp32 dense table."""
        return self.dense_bytes() / max(1, self.num_bytes())

    def training_bytes(self) -> int:
        """Bytes of parameters and buffers held while training (differs from the artifact)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, spec={self.spec!r}{pad}"

    @classmethod
    def from_pretrained(
        cls: type[E],
        weight: torch.Tensor,
        config: MethodConfig | str | None = None,
        padding_idx: int | None = None,
        fit: FitLike = None,
        *,
        progress: bool | None = None,
        row_weights: torch.Tensor | None = None,
        **fit_options: Any,
    ) -> E:
        """Compress a given (V, d) matrix post hoc; ``fit``, ``row_weights`` and ``fit_options`` as in :meth:`fit`.

        Example:
            >>> from embcompress.methods.lowrank import LowRankEmbedding
            >>> table = LowRankEmbedding.from_pretrained(torch.randn(100, 8), "lowrank:rank=4")
            >>> table.compression_ratio() > 1
            True
        """
        weight = check_weight(weight)
        module = cls(weight.shape[0], weight.shape[1], config, padding_idx=padding_idx)
        scale = fit_scale(weight)
        if scale != 1.0 and not module.can_rescale_output(scale):
            size, change = ("large", f"divide the table by {scale:g}") if scale > 1 else \
                ("small", f"multiply the table by {1 / scale:g}")
            raise ValueError(f"{module.config.method} cannot fit values this {size} (up to "
                             f"{float(weight.abs().max()):.3g}); {change} first, or use another method")
        module.fit(weight / scale if scale != 1.0 else weight, fit, progress=progress, row_weights=row_weights,
                   **fit_options)
        if scale != 1.0:
            module.rescale_output_(scale)
        module._check_finite_result(weight)
        return module

    # -- large inputs --------------------------------------------------------------------------
    def can_rescale_output(self, factor: float) -> bool:
        """True if :meth:`rescale_output_` can scale the output by ``factor`` (from_pretrained then fits
        huge tables scaled down)."""
        return type(self).rescale_output_ is not CompressedEmbedding.rescale_output_

    @torch.no_grad()
    def rescale_output_(self, factor: float) -> None:
        """Multiply every output row by ``factor`` in place (a power of two, so exactly).

        from_pretrained fits a table with huge values divided by ``factor`` (squares of 1e37 overflow
        float32) and folds the factor back here; the method scales the tensors its output is linear in.
        """
        raise NotImplementedError

    def _check_finite_result(self, weight: torch.Tensor) -> None:
        """Refuse a fit whose parameters or exported tensors are not finite (never hand back inf/NaN),
        and warn when the artifact is larger than the fp32 table it replaces."""
        peaks = {name: [abs(float(v)) for v in torch.aminmax(t.detach())]  # one pass; NaN propagates
                 for name, t in self.state_dict().items() if t.is_floating_point() and t.numel()}
        where = [name for name, peak in peaks.items() if not all(math.isfinite(v) for v in peak)]
        half = ""
        # Finite float32 parameters export to finite tensors unless float16 storage overflows, so the
        # export (codes recomputed for every row, for some methods) runs only when values pass fp16's range.
        if not where and any(max(peak) > torch.finfo(torch.float16).max for peak in peaks.values()):
            stored = self.export().stored_tensors()
            where = [f"exported {name}" for name, t in stored.items()
                     if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if any(t.dtype == torch.float16 for t in stored.values()):
                half = (" (float16 storage tops out at 65504: choose a float32 setting, e.g. "
                        "codes:codebook_dtype=float32 or scalar:bits=8)")
        if where:
            raise ValueError(f"{self.config.method}: the fit produced non-finite values in {', '.join(where[:3])} "
                             f"(input values up to {float(weight.abs().max()):.3g}){half}; divide the table by a "
                             "constant first, or use another method")
        try:
            size = type(self).expected_bytes(self.config, self.num_embeddings, self.embedding_dim)
        except NotImplementedError:
            return
        if size > self.dense_bytes():
            warnings.warn(f"{self.spec} stores {size:,} bytes, more than the fp32 table's {self.dense_bytes():,}; "
                          "choose a smaller setting or a byte budget (bits_per_row, ratio)", stacklevel=3)

    def fit_by_gradient(
        self,
        weight: torch.Tensor,
        *,
        steps: int = 500,
        batch_size: int = 4096,
        lr: float = 1e-2,
        progress: bool | None = None,
        parameters: list[nn.Parameter] | None = None,
        seed: int = 0,
    ) -> "CompressedEmbedding[C]":
        """Minimize the reconstruction MSE to ``weight`` over random row batches with Adam."""
        weight = self._check_fit_weight(weight)
        params = [p for p in (parameters or list(self.parameters())) if p.requires_grad]
        if not params or steps <= 0:
            return self
        step = self._reconstruction_step(weight, batch_size, torch.Generator().manual_seed(seed))
        was_training = self.training
        self.train()
        try:
            adam_steps(step, params, steps=steps, lr=lr, desc=f"fit {self.config.method}", progress=progress)
        finally:
            self.train(was_training)
        return self

    def _reconstruction_step(self, weight: torch.Tensor, batch_size: int, generator: torch.Generator,
                             row_weights: torch.Tensor | None = None) -> StepFn:
        """One gradient step's loss for :func:`adam_steps`: the MSE to ``weight`` (V, d) on random rows,
        plus the method's auxiliary loss. With ``row_weights`` rows are drawn with probability
        proportional to their weight, so the expected loss is the weighted one (rows of weight 0 never)."""
        batch = min(batch_size, self.num_embeddings)

        def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if row_weights is None:
                rows = torch.randint(0, self.num_embeddings, (batch,), generator=generator)
            else:
                rows = torch.multinomial(row_weights, batch, replacement=True, generator=generator)
            loss = (self.lookup(rows) - weight[rows]).pow(2).mean()
            aux = self.aux_loss()
            return (loss if aux is None else loss + aux), {"mse": loss}

        return step

    def _check_fit_weight(self, weight: torch.Tensor) -> torch.Tensor:
        weight = check_weight(weight)
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"weight has shape {tuple(weight.shape)} but this table is "
                             f"({self.num_embeddings}, {self.embedding_dim}); build the table with the "
                             "weight's shape or use from_pretrained(weight, spec)")
        return weight


def _declaring_spec(
        export: Callable[[CompressedEmbedding], FrozenEmbedding]) -> Callable[[CompressedEmbedding], FrozenEmbedding]:
    """Wrap a method's ``export`` so the frozen module declares the spec and fit settings it came from."""
    @functools.wraps(export)
    def wrapper(self: CompressedEmbedding) -> FrozenEmbedding:
        frozen = export(self)
        frozen.spec = self.spec
        frozen.fit_settings = None if self.fit_settings is None else dict(self.fit_settings)
        return frozen
    return wrapper


def row_weighted_methods() -> list[str]:
    """Names of the registered methods whose fit takes ``row_weights``."""
    from .registry import get_method, list_methods

    return [name for name in list_methods() if get_method(name).TAKES_ROW_WEIGHTS]
