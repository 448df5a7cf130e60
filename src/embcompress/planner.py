"""Fit several tables into one byte budget: a method and a size per table, chosen by measured quality.

``budget.py`` turns one method and one byte count into a config; this module sits above it and
chooses among methods and sizes. For every table it measures candidate settings (each method at a
ladder of sizes around the overall target), keeps the Pareto front of (bytes, error), and then
spends the bytes greedily by marginal quality per byte across tables (the convex-hull greedy of
bit allocation, as in rate-distortion optimized quantizer allocation). The report says, per
table, what was chosen, its bytes and error, and why every other method lost.

Quality is the relative MSE of the table (optionally row-weighted: rows a model reads often
count more), measured on a fit to a row sample for methods whose rows are encoded independently
of each other (the sample fit uses the same hyperparameters the full table will get); tables
count in the total error by their dense size. A table that is also a tied output layer can be
given a metric A (``tied_logits.output_metric`` of the hidden states that reach the head): its
error is then the relative error under A (input and logit error together), and the methods with
an output-aware fit are measured with it.

Example:
    >>> import torch
    >>> tables = {"tok": torch.randn(500, 16) @ torch.randn(16, 32), "pos": torch.randn(64, 32)}
    >>> plan = plan_budget(tables, ratio=8, methods=["scalar", "pq"])
    >>> sorted(plan.specs)            # a spec per table; print(plan) also says why the others lost
    ['pos', 'tok']
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .budget import budget_bytes, config_for_budget
from .config import MethodConfig, SpecError, parse_spec
from .registry import get_method
from .tied_logits import fit_output_aware_module, metric_relative_error, supports_output_aware

__all__ = ["DEFAULT_METHODS", "Candidate", "TablePlan", "Plan", "plan_budget", "weighted_relative_error",
           "parse_budget", "total_budget", "measure_table", "pareto_front", "allocate"]

log = logging.getLogger(__name__)

#: Methods tried when none are named: the ones whose post hoc fits are fast at every shape (pq in the
#: table's balanced principal axes too: on correlated tables it halves the error at equal bytes).
DEFAULT_METHODS = ("scalar", "lowrank", "pq", "pq:rotation=pca", "dpq", "codes")
#: Methods whose rows are encoded independently (per-row codes over shared codebooks / bases), so a fit
#: to a row sample measures the quality the full fit reaches; hashed and tensor-train tables are fitted whole.
ROW_LOCAL = frozenset({"scalar", "lowrank", "distilled", "pq", "dpq", "codes"})
#: Sizes tried per table, as multiples of the overall target size (the allocation moves bytes between tables).
LADDER = (0.5, 0.71, 0.84, 1.0, 1.19, 1.41, 2.0)


@dataclass
class Candidate:
    """One measured setting of one method on one table."""

    method: str
    spec: str
    bytes: int
    error: float  # relative MSE (row-weighted when weights are given; under the table's metric when it has one)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "spec": self.spec, "bytes": self.bytes, "error": self.error,
                "seconds": self.seconds}


@dataclass
class TablePlan:
    """The choice for one table and every setting that was measured for it."""

    name: str
    shape: tuple[int, int]
    choice: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # method -> why it could not run at all

    @property
    def dense_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def why_others_lost(self) -> dict[str, str]:
        """Per other method, the reason in one line: worse at the same bytes, or no setting fits."""
        out = dict(self.rejected)
        for method in sorted({c.method for c in self.candidates} - {self.choice.method}):
            within = [c for c in self.candidates if c.method == method and c.bytes <= self.choice.bytes]
            if not within:
                smallest = min(c.bytes for c in self.candidates if c.method == method)
                out[method] = f"its smallest measured setting needs {smallest:,} B > {self.choice.bytes:,} B"
                continue
            best = min(within, key=lambda c: c.error)
            out[method] = (f"error {best.error:.4f} at {best.bytes:,} B ({best.spec}) vs {self.choice.error:.4f} "
                           f"at {self.choice.bytes:,} B")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "choice": self.choice.to_dict(),
                "ratio": self.dense_bytes / max(1, self.choice.bytes),
                "candidates": [c.to_dict() for c in self.candidates], "why_others_lost": self.why_others_lost()}


@dataclass
class Plan:
    """Choices for every table of a budget; ``specs`` feeds ``compress_``."""

    tables: list[TablePlan]
    budget_bytes: int

    @property
    def specs(self) -> dict[str, str]:
        return {t.name: t.choice.spec for t in self.tables}

    @property
    def total_bytes(self) -> int:
        return sum(t.choice.bytes for t in self.tables)

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes,
                "ratio": self.dense_bytes / max(1, self.total_bytes), "tables": [t.to_dict() for t in self.tables]}

    def __str__(self) -> str:
        lines = [f"budget {self.budget_bytes:,} B for {self.dense_bytes:,} B of fp32 tables; planned "
                 f"{self.total_bytes:,} B ({self.dense_bytes / max(1, self.total_bytes):.1f}x)"]
        for t in self.tables:
            lines.append(f"{t.name} ({t.shape[0]} x {t.shape[1]}): {t.choice.spec}  {t.choice.bytes:,} B "
                         f"({t.dense_bytes / max(1, t.choice.bytes):.1f}x), measured error {t.choice.error:.4f}")
            lines += [f"    {method}: {why}" for method, why in t.why_others_lost().items()]
        return "\n".join(lines)


def parse_budget(budget: Any) -> dict[str, Any]:
    """A budget as keyword arguments of :func:`embcompress.budget.budget_bytes`.

    Accepts ``{"ratio": 10}`` / ``{"bytes": ...}`` / ``{"bits_per_row": 80}``, an int (bytes), or a
    string: ``"10x"`` (ratio), ``"80bpr"`` (bits per row), ``"4MB"`` / ``"500KB"`` / ``"1234B"``.
    """
    if isinstance(budget, Mapping):
        unknown = set(budget) - {"bytes", "ratio", "bits_per_row"}
        if unknown or len(budget) != 1:
            raise ValueError(f"budget must have exactly one of bytes, ratio, bits_per_row; got {dict(budget)}")
        return dict(budget)
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"budget must be bytes (int), a mapping or a string like '10x', got {budget!r}")
    if isinstance(budget, int):
        return {"bytes": budget}
    if isinstance(budget, str):
        text = budget.strip().lower().replace(" ", "")
        units = (("bpr", "bits_per_row", 1), ("x", "ratio", 1), ("gb", "bytes", 1 << 30), ("mb", "bytes", 1 << 20),
                 ("kb", "bytes", 1 << 10), ("b", "bytes", 1))
        for suffix, key, scale in units:
            if text.endswith(suffix):
                try:
                    value = float(text[: -len(suffix)])
                except ValueError:
                    break
                return {key: int(value * scale) if key == "bytes" else value}
    raise ValueError(f"cannot read budget {budget!r}; use e.g. '10x', '4MB', '80bpr', an int of bytes, "
                     "or {'ratio': 10}")


def total_budget(rows: int, dense_bytes: int, *, bytes: int | None = None, ratio: float | None = None,
                 bits_per_row: float | None = None) -> int:
    """Bytes for all tables together: given, the fp32 bytes / ratio, or bits per row over every row."""
    # budget_bytes speaks for one (V, d) table: bits per row count every row, a ratio every fp32 value.
    if bits_per_row is not None:
        return budget_bytes(rows, 1, bytes=bytes, ratio=ratio, bits_per_row=bits_per_row)
    return budget_bytes(1, dense_bytes // 4, bytes=bytes, ratio=ratio, bits_per_row=bits_per_row)


def weighted_relative_error(approx: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """sum_i w_i ||approx_i - target_i||^2 / sum_i w_i ||target_i - mean_w||^2 (w = 1 without weights)."""
    if weights is None:
        weights = torch.ones(target.shape[0])
    w = weights.float().clamp_min(0)
    mean = (w.unsqueeze(1) * target).sum(0) / w.sum().clamp_min(1e-12)
    num = (w * (approx - target).pow(2).sum(1)).sum()
    den = (w * (target - mean).pow(2).sum(1)).sum().clamp_min(1e-30)
    return float(num / den)


def _sample(weight: torch.Tensor, weights: torch.Tensor | None, rows: int | None,
            seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if rows is None or weight.shape[0] <= rows:
        return weight, weights
    index = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    return weight[index], None if weights is None else weights[index]


def _measure(method: str, config: MethodConfig, weight: torch.Tensor, weights: torch.Tensor | None,
             fit_options: Mapping[str, Any], full_shape: tuple[int, int],
             metric: torch.Tensor | None = None) -> Candidate:
    cls = get_method(config.method)
    fit_weights = weights if cls.TAKES_ROW_WEIGHTS else None
    start = time.perf_counter()
    if metric is not None and supports_output_aware(config):
        module = fit_output_aware_module(weight, config, metric, row_weights=fit_weights, **fit_options)
    else:
        module = cls.from_pretrained(weight, config, row_weights=fit_weights, **fit_options)
    seconds = time.perf_counter() - start
    approx = module.materialize()
    error = weighted_relative_error(approx, weight, weights) if metric is None else \
        metric_relative_error(approx, weight, metric, weights)
    return Candidate(method, config.to_spec(), cls.expected_bytes(config, *full_shape), error, seconds)


def measure_table(weight: torch.Tensor, target_bytes: int, methods: Sequence[str], *,
                  weights: torch.Tensor | None = None, sample_rows: int | None = 8192, quick: bool = True,
                  ladder: Sequence[float] = LADDER, seed: int = 0, metric: torch.Tensor | None = None,
                  fit_time: float = 1.0) -> tuple[list[Candidate], dict[str, str]]:
    """Every method at every ladder size around ``target_bytes``: measured candidates and the methods
    that could not run (with the reason). With ``metric`` (d, d) the error is measured under it and
    fits that can are output-aware (see the module docstring). ``fit_time``: as in
    :func:`embcompress.budget.config_for_budget`."""
    rows, dim = weight.shape
    candidates: list[Candidate] = []
    rejected: dict[str, str] = {}
    sample, sample_weights = _sample(weight, weights, sample_rows, seed)
    for method in methods:
        cls = get_method(parse_spec(method).method)
        options = cls.quick_fit_options() if quick else {}
        fitted: set[str] = set()
        for step in ladder:
            try:
                config = config_for_budget(method, rows, dim, bytes=max(1, int(target_bytes * step)),
                                           fit_time=fit_time)
            except SpecError as exc:
                rejected.setdefault(method, str(exc).split(";")[0])
                continue
            if config.to_spec() in fitted:
                continue
            fitted.add(config.to_spec())
            local = config.method in ROW_LOCAL
            candidates.append(_measure(method, config, sample if local else weight,
                                       sample_weights if local else weights, options, (rows, dim), metric))
        if any(c.method == method for c in candidates):
            rejected.pop(method, None)
    return candidates, rejected


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both bytes and error, by increasing bytes."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.bytes, c.error)):
        if not front or c.error < front[-1].error:
            front.append(c)
    return front


def allocate(fronts: Mapping[str, Sequence[Candidate]], importance: Mapping[str, float],
             limit: int) -> dict[str, Candidate]:
    """Greedy by marginal quality per byte: start every table at its smallest setting, then take the
    upgrade with the largest importance-weighted error drop per extra byte that still fits."""
    choice = {name: front[0] for name, front in fronts.items()}
    spent = sum(c.bytes for c in choice.values())
    if spent > limit:
        floor = ", ".join(f"{n}: {c.bytes:,} B ({c.method})" for n, c in choice.items())
        raise SpecError(f"the budget of {limit:,} B is below the smallest measured settings ({floor}; "
                        f"{spent:,} B together); raise the budget or add methods that go smaller (e.g. 'codes', 'pq')")
    while True:
        best, best_gain = None, 0.0
        for name, front in fronts.items():
            current = choice[name]
            for c in front:
                extra = c.bytes - current.bytes
                if extra <= 0 or spent + extra > limit:
                    continue
                gain = importance[name] * (current.error - c.error) / extra
                if gain > best_gain:
                    best, best_gain = (name, c), gain
        if best is None:
            return choice
        name, c = best
        spent += c.bytes - choice[name].bytes
        choice[name] = c


def plan_budget(tables: Mapping[str, torch.Tensor], *, bytes: int | None = None, ratio: float | None = None,
                bits_per_row: float | None = None, methods: Sequence[str] | None = None,
                weights: Mapping[str, torch.Tensor] | None = None, sample_rows: int | None = 8192,
                quick: bool = True, seed: int = 0, metrics: Mapping[str, torch.Tensor] | None = None,
                fit_time: float = 1.0) -> Plan:
    """Choose a method and a size for every table so that all of them together fit the budget.

    Args:
        tables: name -> (V, d) weight.
        bytes / ratio / bits_per_row: one budget for all tables together (ratio against fp32,
            bits per row over the rows of all tables).
        methods: candidate method names, or specs with fields fixed (``"pq:rotation=pca"``; the
            budget sizes the rest), each measured as its own candidate (default :data:`DEFAULT_METHODS`).
        weights: name -> (V,) row weights (token counts); rows read often count more in the error.
        sample_rows: row-local methods are measured on a fit to this many sampled rows (None = all).
        quick: measure with each method's quick fit options (the final fit is the caller's).
        metrics: name -> (d, d) row-error metric for tables that are tied output layers
            (``tied_logits.output_metric``): their error is input + logit error, and the methods
            with an output-aware fit are measured with it.
        fit_time: how many times the default fit-time bound (about two CPU minutes per table) the
            chosen settings' default fits may take (see :func:`embcompress.budget.config_for_budget`;
            ``codes`` gets more books on narrow tables).
    """
    if not tables:
        raise ValueError("no tables to plan; pass at least one name -> weight")
    methods = list(methods or DEFAULT_METHODS)
    for method in methods:
        parse_spec(method)  # a name or a spec with fixed fields; raises the error with a suggestion
    rows = sum(w.shape[0] for w in tables.values())
    dense = sum(w.shape[0] * w.shape[1] * 4 for w in tables.values())
    limit = total_budget(rows, dense, bytes=bytes, ratio=ratio, bits_per_row=bits_per_row)
    target_share = limit / dense
    fronts: dict[str, list[Candidate]] = {}
    measured: dict[str, tuple[list[Candidate], dict[str, str]]] = {}
    for name, weight in tables.items():
        weight = weight.detach().float().cpu()
        row_weights = None if weights is None or name not in weights else weights[name].detach().float().cpu()
        target = int(target_share * weight.shape[0] * weight.shape[1] * 4)
        metric = None if metrics is None else metrics.get(name)
        candidates, rejected = measure_table(weight, target, methods, weights=row_weights, sample_rows=sample_rows,
                                             quick=quick, seed=seed, metric=metric, fit_time=fit_time)
        if not candidates:
            raise SpecError(f"no method among {methods} fits table {name!r} {tuple(weight.shape)} near {target:,} B: "
                            f"{rejected}; raise the budget or add methods")
        log.info("planner: %s measured %d settings", name, len(candidates))
        measured[name] = (candidates, rejected)
        fronts[name] = pareto_front(candidates)
    importance = {name: w.shape[0] * w.shape[1] * 4 / dense for name, w in tables.items()}
    choice = allocate(fronts, importance, limit)
    plans = [TablePlan(name, (tables[name].shape[0], tables[name].shape[1]), choice[name], *measured[name])
             for name in tables]
    return Plan(plans, limit)
