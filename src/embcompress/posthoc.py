"""Post hoc compression of a pretrained table, with the report people compare.

    >>> from embcompress.data import load_table
    >>> table = load_table("glove-6b-50d", limit=2000)
    >>> result = compress_table(table, "pq", bits_per_row=80, fit_options="iters=5", neighbours=False, analogy=False)
    >>> result.report["spec"], round(result.report["ratio"], 1), 0 < result.report["rel_mse"] < 1
    ('pq:groups=10,codewords=32,rotation=none', 21.2, True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .base import CompressedEmbedding, fit_scale
from .budget import config_for_budget
from .config import FitLike, MethodConfig, parse_spec
from .data import MappedTable, Table
from .evaluate import quality_report
from .frozen import FrozenEmbedding
from .registry import get_method

__all__ = ["CompressionResult", "compress_table", "evaluate_module", "resolve_config"]


@dataclass
class CompressionResult:
    module: CompressedEmbedding | None  # None when the table was streamed
    frozen: FrozenEmbedding
    report: dict[str, Any] = field(default_factory=dict)


def resolve_config(spec: "str | MethodConfig", rows: int, dim: int, *, bytes: int | None = None,
                   bits_per_row: float | None = None, ratio: float | None = None) -> MethodConfig:
    """The spec as given, or the method's config chosen for a byte budget."""
    if bytes is None and bits_per_row is None and ratio is None:
        return parse_spec(spec)
    return config_for_budget(spec, rows, dim, bytes=bytes, bits_per_row=bits_per_row, ratio=ratio)


def evaluate_module(frozen: FrozenEmbedding, table: Table, *, words: bool = True, neighbours: bool = True,
                    analogy: bool = True) -> dict[str, Any]:
    """Size figures and quality of a frozen table against the original."""
    start = time.perf_counter()
    approx = frozen.materialize()
    names = table.words if words else None
    report: dict[str, Any] = {
        "bytes": frozen.num_bytes(),
        "dense_bytes": frozen.dense_bytes(),
        "ratio": frozen.compression_ratio(),
        "bits_per_row": 8 * frozen.num_bytes() / frozen.num_embeddings,
    }
    # The measures are scale-free; huge or tiny tables are compared rescaled so their squares stay finite
    # and normal.
    scale = fit_scale(table.weight)
    report.update(quality_report(approx / scale, table.weight / scale, names, sample=1000 if neighbours else 0,
                                 analogy=analogy))
    report["eval_seconds"] = time.perf_counter() - start
    return report


def compress_table(table: "Table | MappedTable", spec: "str | MethodConfig", *, bytes: int | None = None,
                   bits_per_row: float | None = None, ratio: float | None = None,
                   evaluate: bool = True, fit_options: FitLike = None, progress: bool | None = None,
                   **eval_options: bool) -> CompressionResult:
    """Fit a method to ``table`` (hyperparameters from the spec or a budget), export, and report.

    ``fit_options``: the method's fit settings (its ``Fit`` config, ``"key=value,..."`` or a dict,
    checked by name); the report's ``"fit"`` holds them as resolved.
    A :class:`~embcompress.data.MappedTable` (``data.open_table_mmap``) is compressed without reading
    it into memory (``streaming.compress_mapped``): ``module`` is then None (no trainable state is
    built) and the report's quality figures are rel_mse and mean_cosine, computed chunk by chunk.
    """
    if isinstance(table, MappedTable):
        from .streaming import compress_mapped

        streamed = compress_mapped(table, spec, bytes=bytes, bits_per_row=bits_per_row, ratio=ratio,
                                   fit_options=fit_options, progress=progress)
        assert streamed.frozen is not None  # no output file: the frozen module is returned
        return CompressionResult(None, streamed.frozen, streamed.report)
    rows, dim = table.weight.shape
    config = resolve_config(spec, rows, dim, bytes=bytes, bits_per_row=bits_per_row, ratio=ratio)
    if isinstance(fit_options, dict) and "progress" in fit_options:  # accepted among the options, as before
        fit_options = dict(fit_options)
        progress = fit_options.pop("progress")
    start = time.perf_counter()
    module = get_method(config.method).from_pretrained(table.weight, config, None, fit_options, progress=progress)
    frozen = module.export()
    seconds = time.perf_counter() - start
    report: dict[str, Any] = {"method": config.method, "spec": module.spec, "fit": module.fit_settings,
                              "table": table.name, "rows": rows, "dim": dim, "seconds": seconds}
    if evaluate:
        report.update(evaluate_module(frozen, table, **eval_options))
    else:
        report.update({"bytes": frozen.num_bytes(), "dense_bytes": frozen.dense_bytes(),
                       "ratio": frozen.compression_ratio(), "bits_per_row": 8 * frozen.num_bytes() / rows})
    return CompressionResult(module, frozen, report)
