"""Model surgery: swap every embedding table of a model for a compressed one, in place.

Like ``torchao.quantization.quantize_``: ``compress_(model, spec)`` walks the model, replaces
each ``nn.Embedding`` / ``nn.EmbeddingBag`` and returns a report. Ties are found by identity
(``is`` on the Parameter), never by name:

- modules that share one weight Parameter (or one module reached under several names) become
  one compressed table, still shared;
- an ``nn.Linear`` whose weight IS a replaced table's weight (a language-model head, the
  distilled-embedding setting of Lioutas et al. 2020, Sec. 3) becomes a :class:`TiedOutput`
  computing its logits from the compressed table, or gets an explicit copy with ``untie=True``;
- any other holder of that Parameter is an error: silently breaking a tie is a bug.

``decompress_`` reverses the swap with the materialized tables, restoring ties by identity;
``save_pretrained`` / ``load_pretrained`` store only what the surgery created (the compressed
tables' tensors and tied heads' biases) as safetensors + JSON, no pickle.

Example:
    >>> import embcompress
    >>> model = nn.ModuleDict({"tok": nn.Embedding(1000, 32), "pos": nn.Embedding(64, 32),
    ...                        "tags": nn.Embedding(500, 32)})
    >>> report = embcompress.compress_(model, {"tok": "dpq:groups=8,codewords=16", r".*pos.*": "skip",
    ...                                        "default": "lowrank:rank=16"})
    >>> report.specs["tok"], type(model["pos"]).__name__
    ('dpq:variant=sx,groups=8,codewords=16,shared=false,batchnorm=true,tau=1.0,sparse=false', 'Embedding')
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedEmbedding
from .config import FitConfig, MethodConfig, SpecError, parse_spec
from .io import ArtifactError, build_trainable, json_ready, read_folder_bundle, write_folder_bundle
from .registry import get_method, list_methods
from .tied_logits import (calibration_batches, fit_output_aware_module, head_second_moments, output_metric,
                          supports_output_aware)
from .validation import MAX_DIM, MAX_ROWS, check_bag, json_choice, json_int, json_int_list, json_object

__all__ = [
    "compress_", "decompress_", "save_pretrained", "load_pretrained", "CompressionReport", "TableReport",
    "CompressedEmbeddingBag", "TiedOutput", "compressed_tables", "iter_tables",
]

log = logging.getLogger(__name__)

SpecLike = Union[str, MethodConfig]
SpecMapping = Mapping[str, Union[SpecLike, None]]
SKIP = "skip"
CONFIG_NAME = "embcompress.json"
_DROPPED_EMBEDDING_OPTIONS = ("max_norm", "scale_grad_by_freq", "sparse")


# -- modules the surgery puts in place ---------------------------------------------------------
class CompressedEmbeddingBag(nn.Module):
    """A compressed table behind ``nn.EmbeddingBag``'s call signature.

    ``forward(input, offsets=None, per_sample_weights=None)`` with ``mode`` in sum/mean/max and
    ``include_last_offset`` as on the module it replaces; ids equal to ``padding_idx`` are left
    out of their bag (they do not count in a mean), as in ``nn.EmbeddingBag``.
    """

    def __init__(self, table: CompressedEmbedding, mode: str = "mean", include_last_offset: bool = False) -> None:
        super().__init__()
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.table = table
        self.mode = mode
        self.include_last_offset = include_last_offset

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.table.padding_idx

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """input (B, L), or 1-D with offsets (B,) -> (B, embedding_dim)."""
        include_last = self.include_last_offset and isinstance(input, torch.Tensor) and input.dim() == 1
        input, offsets, per_sample_weights = check_bag(input, offsets, per_sample_weights, self.mode,
                                                       self.num_embeddings, include_last)
        # Decode each distinct id once; the bag then reduces rows of that small table.
        unique, inverse = torch.unique(input, return_inverse=True)
        rows = self.table(unique)
        pad = None
        if self.padding_idx is not None:
            pad = unique.numel()
            inverse = inverse.masked_fill(input == self.padding_idx, pad)
            rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=include_last, padding_idx=pad)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, include_last_offset={self.include_last_offset}"


class TiedOutput(nn.Module):
    """Logits from a compressed table that an output layer shares with the input: h E^T + b.

    Uses ``table.output_logits(hidden)`` when the method has one (low-rank / distilled
    embeddings compute (h W^T) f(U)^T without building the V x d table, Lioutas et al. Sec. 3);
    otherwise decodes the table with gradients and multiplies. Gradients reach the table, so
    training the table moves the logits, exactly as with a tied ``nn.Linear``.
    """

    def __init__(self, table: CompressedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.table = table
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.table.embedding_dim

    @property
    def out_features(self) -> int:
        return self.table.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (*, d) -> logits (*, V)."""
        output_logits = getattr(self.table, "output_logits", None)
        logits: torch.Tensor
        if callable(output_logits):
            logits = output_logits(hidden)
            pad = self.table.padding_idx
            if pad is not None:
                # The table's padding row decodes to zero (base contract); keep the head consistent
                # with it, and with the nn.Linear that decompress_ builds from materialize().
                keep = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
                keep[pad] = 0
                logits = logits * keep
        else:
            ids = torch.arange(self.table.num_embeddings, device=hidden.device)
            logits = hidden @ self.table(ids).t()
        return logits if self.bias is None else logits + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# -- the report ------------------------------------------------------------------------------
@dataclass
class TableReport:
    """One compressed table: every name it sits at, its resolved spec and sizes."""

    names: list[str]
    kind: str
    shape: tuple[int, int]
    spec: str
    bytes_before: int
    bytes_after: int
    padding_idx: int | None = None
    tied_heads: list[str] = field(default_factory=list)
    untied_heads: list[str] = field(default_factory=list)
    output_aware: bool = False  # fitted under the tied heads' hidden-state metric (calibration=)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)


@dataclass
class CompressionReport:
    """What :func:`compress_` (or :func:`load_pretrained`) replaced, and the bytes saved."""

    tables: list[TableReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    plan: Any = None  # the planner's Plan when compress_ was given a budget

    @property
    def bytes_before(self) -> int:
        return sum(t.bytes_before for t in self.tables)

    @property
    def bytes_after(self) -> int:
        return sum(t.bytes_after for t in self.tables)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)

    @property
    def replaced(self) -> list[str]:
        return [name for t in self.tables for name in t.names]

    @property
    def specs(self) -> dict[str, str]:
        return {name: t.spec for t in self.tables for name in t.names}

    def to_dict(self) -> dict[str, Any]:
        return {"tables": [dataclasses.asdict(t) | {"ratio": t.ratio} for t in self.tables],
                "skipped": [list(s) for s in self.skipped], "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "ratio": self.ratio,
                **({"plan": self.plan.to_dict()} if self.plan is not None else {})}

    def __str__(self) -> str:
        header = ("module", "shape", "spec", "before", "after", "ratio", "tied heads")
        rows = [(", ".join(t.names) + ("" if t.kind == "embedding" else f" ({t.kind})"),
                 f"{t.shape[0]} x {t.shape[1]}", t.spec, _human(t.bytes_before), _human(t.bytes_after),
                 f"{t.ratio:.1f}x", ", ".join([h + (" (output-aware fit)" if t.output_aware else "")
                                               for h in t.tied_heads]
                                              + [f"{h} (untied)" for h in t.untied_heads]) or "-")
                for t in self.tables]
        rows.append(("total", "", "", _human(self.bytes_before), _human(self.bytes_after), f"{self.ratio:.1f}x", ""))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

        def line(r: Sequence[object]) -> str:
            return "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()

        out = [line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
        out += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        if self.plan is not None:
            out += ["", str(self.plan)]
        return "\n".join(out)


def _human(num_bytes: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}"
    return f"{num_bytes} B"


# -- walking the model -----------------------------------------------------------------------
def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name it is reachable at (a shared module has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise TypeError("the model itself is an embedding table; compress it with embcompress.from_pretrained "
                        "(compress_ replaces tables inside a model)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> (module name, module, attribute) for every place that holds it."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((name, module, attr))
    return holders


def _resolve_spec(name: str, spec_or_mapping: "SpecLike | SpecMapping", used: set[str]) -> "MethodConfig | None | str":
    """The config for module ``name``: exact key, then the first regex key that fully matches, then default."""
    if not isinstance(spec_or_mapping, Mapping):
        return parse_spec(spec_or_mapping)
    choice: Any = "__unmatched__"
    if name in spec_or_mapping:
        used.add(name)
        choice = spec_or_mapping[name]
    else:
        for key, value in spec_or_mapping.items():
            if key == "default":
                continue
            try:
                matched = re.fullmatch(key, name) is not None
            except re.error:
                matched = False  # a plain name containing regex characters
            if matched:
                used.add(key)
                choice = value
                break
        else:
            if "default" in spec_or_mapping:
                used.add("default")
                choice = spec_or_mapping["default"]
    if choice == "__unmatched__":
        return "no matching key and no 'default'"
    if choice is None or (isinstance(choice, str) and choice.strip().lower() == SKIP):
        return None
    return parse_spec(choice)


def _split_fit_options(fit_options: Mapping[str, Any] | None, method: str) -> tuple[FitConfig, bool | None]:
    """The fit settings of one method's tables, and the progress choice.

    Flat options apply to every table; a method name key holds options for that method only.
    Every setting is checked against the method's ``Fit`` (per-method ones even when no table
    uses that method), so a misspelt name is an error naming the valid ones.
    """
    options = dict(fit_options or {})
    progress = options.pop("progress", None)
    methods = set(list_methods())
    specific: dict[str, Any] = {}
    for name in [k for k in options if k in methods and isinstance(options[k], Mapping)]:
        per_method = dict(options.pop(name))
        get_method(name).Fit.parse(per_method)
        if name == method:
            specific = per_method
    return get_method(method).Fit.parse({**options, **specific}), progress


def compressed_tables(model: nn.Module) -> list[tuple[list[str], CompressedEmbedding]]:
    """Every distinct compressed table in ``model`` with the names it sits at directly."""
    seen: dict[int, tuple[list[str], CompressedEmbedding]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedEmbedding):
            seen.setdefault(id(module), ([], module))[0].append(name)
    return list(seen.values())


def compress_(
    model: nn.Module,
    spec_or_mapping: "SpecLike | SpecMapping | None" = None,
    *,
    init: Literal["pretrained", "random"] = "pretrained",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    fit_options: Mapping[str, Any] | None = None,
    untie: bool = False,
    budget: Any = None,
    methods: Sequence[str] | None = None,
    row_weights: Mapping[str, torch.Tensor] | None = None,
    calibration: Any = None,
    output_weight: float = 8.0,
    fit_time: float = 1.0,
) -> CompressionReport:
    """Replace the ``nn.Embedding`` / ``nn.EmbeddingBag`` modules of ``model`` in place.

    Args:
        model: any module holding embedding tables (nested at any depth).
        spec_or_mapping: one spec (string or config) for every table, or a mapping from module
            name or regex (full match) to spec, with an optional ``"default"`` key; a value of
            None or ``"skip"`` leaves that table alone. Exact names win over regexes, regexes
            are tried in order, the default comes last.
        init: ``"pretrained"`` fits each table to its current weights (post hoc compression);
            ``"random"`` builds a fresh table for end-to-end training.
        filter_fn: ``filter_fn(module, name) -> bool``; tables it rejects are skipped.
        fit_options: fit settings for every fit (``{"steps": 300}``), or per method under the
            method's name (``{"dpq": {"steps": 300}}``), checked against each method's ``Fit``;
            ``"progress"`` turns the fits' progress bars on or off.
        untie: give output layers tied to a replaced table an independent copy of the weight
            instead of computing their logits from the compressed table.
        budget: one byte budget for all tables together (``"10x"``, ``"4MB"``, ``"80bpr"``, an int
            of bytes, or ``{"ratio": 10}``): :func:`embcompress.planner.plan_budget` chooses each
            table's method and size by measured quality; ``spec_or_mapping`` may then only skip tables.
        methods: candidate methods for ``budget``: names or specs with fields fixed, e.g.
            ``["pq", "pq:rotation=pca", "codes"]`` (default ``planner.DEFAULT_METHODS``).
        row_weights: module name -> (V,) row weights (token counts) for the planner's quality measure
            and the fits that take them.
        calibration: inputs for the model (token-id tensors (batch, seq), a list of them, or dicts
            of keyword inputs) that calibrate tables tied to an output layer: the second moment S
            of the hidden states reaching the head gives the row-error metric
            A = I + output_weight * S / (tr S / d) (input error plus logit error); such a table is
            fitted under A where its method allows (pq, dpq sx, codes, lowrank, distilled; others
            fit plainly) and the planner measures every candidate under A. Unless ``row_weights``
            names the table, its rows are weighted by the add-one smoothed counts of the calibration
            token ids. The head keeps computing its logits from the compressed table.
        output_weight: the logit error's weight in that metric (with ``calibration``).
        fit_time: with ``budget``, how many times the default fit-time bound (about two CPU minutes
            per table) the chosen settings' fits may take (``codes`` gets more books on narrow tables;
            see :func:`embcompress.budget.config_for_budget`).

    Returns:
        A :class:`CompressionReport`; ``print(report)`` shows a table.

    Example:
        >>> import embcompress
        >>> model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 2))
        >>> round(embcompress.compress_(model, "lowrank:rank=8").ratio, 1)
        7.5
    """
    if init not in ("pretrained", "random"):
        raise ValueError(f"init must be 'pretrained' or 'random', got {init!r}")
    if budget is None and fit_time != 1.0:
        raise ValueError("fit_time= sizes the settings the planner chooses for budget=; give budget= too, or "
                         "size a spec yourself with embcompress.budget.config_for_budget(..., fit_time=...)")
    if budget is not None:
        _check_budget_mapping(spec_or_mapping, init)
        # Every table the mapping does not skip resolves to a placeholder the planner then replaces.
        skips = dict(spec_or_mapping) if isinstance(spec_or_mapping, Mapping) else \
            {} if spec_or_mapping is None else {"default": spec_or_mapping}
        spec_or_mapping = {"default": "scalar", **skips}
    elif spec_or_mapping is None:
        raise SpecError("give a spec (or a mapping of specs), or budget= to let the planner choose")
    if isinstance(spec_or_mapping, Mapping):
        for value in spec_or_mapping.values():  # fail early on a bad spec, before any fitting
            if value is not None and not (isinstance(value, str) and value.strip().lower() == SKIP):
                parse_spec(value)
    names_of = _names_by_module(model)
    holders = _parameter_holders(model)
    report = CompressionReport()
    used_keys: set[str] = set()

    # Group embedding modules by the identity of their weight Parameter: one group, one table.
    # Embeddings inside a compressed table (the query tables of DPQ and codes) are its own parts.
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    visited = {id(part) for table in model.modules() if isinstance(table, CompressedEmbedding)
               for part in table.modules() if part is not table}
    for _, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or id(module) in visited:
            continue
        visited.add(id(module))
        for alias in names_of[id(module)]:
            groups.setdefault(id(module.weight), []).append((alias, module))

    kept: list[tuple[list[tuple[str, nn.Module]], dict[str, Any]]] = []
    for members in groups.values():
        names = [n for n, _ in members]
        if filter_fn is not None and not all(filter_fn(m, n) for n, m in members):
            report.skipped.extend((n, "rejected by filter_fn") for n in names)
            continue
        resolved = {n: _resolve_spec(n, spec_or_mapping, used_keys) for n in names}
        kept.append((members, resolved))
    metrics: dict[str, torch.Tensor] = {}
    if calibration is not None and init == "pretrained" and not untie:
        calibration = calibration_batches(calibration)  # read once: the metrics and the counts both use it
        metrics = _calibration_metrics(model, kept, holders, calibration, output_weight)
    if metrics:  # a tied table's rows are weighted by how often the calibration inputs read them
        row_weights = dict(row_weights or {})
        for members, _ in kept:
            names = [n for n, _ in members]
            if names[0] in metrics and not any(n in row_weights for n in names):
                counts = _calibration_counts(calibration, cast(nn.Embedding, members[0][1]).weight.shape[0])
                if counts is not None:
                    row_weights[names[0]] = counts
    if budget is not None:
        report.plan = _plan_tables(kept, budget, methods, row_weights, metrics, fit_time)

    for members, resolved in kept:
        names = [n for n, _ in members]
        distinct = {(r.to_spec() if isinstance(r, MethodConfig) else r) for r in resolved.values()}
        if len(distinct) > 1:
            raise SpecError(f"modules {names} share one weight Parameter but the mapping gives them different "
                            f"specs {sorted(map(str, distinct))}; give them one spec (or skip all of them)")
        config = resolved[names[0]]
        if not isinstance(config, MethodConfig):
            reason = config if isinstance(config, str) else "skipped by the mapping"
            report.skipped.extend((n, reason) for n in names)
            continue
        paddings = {m.padding_idx for _, m in members}
        if len(paddings) > 1:
            raise ValueError(f"modules {names} share a weight but have different padding_idx "
                             f"{sorted(map(str, paddings))}")
        weights = _table_row_weights(names, config, row_weights) if init == "pretrained" else None
        report.tables.append(_replace_group(model, members, config, init, fit_options, untie, holders, weights,
                                            metrics.get(names[0])))

    if isinstance(spec_or_mapping, Mapping):
        unused = [k for k in spec_or_mapping if k not in used_keys and k != "default"]
        if unused:
            tables = [n for t in report.tables for n in t.names] + [n for n, _ in report.skipped]
            warnings.warn(f"spec keys {unused} matched no embedding table; tables are: {tables}", stacklevel=2)
    log.info("compress_ replaced %d table(s): %s", len(report.tables), report.specs)
    return report


def _table_row_weights(names: list[str], config: MethodConfig,
                       row_weights: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """The table's row weights (under any of its names) if its method's fit takes them."""
    weights = next((row_weights[n] for n in names if n in row_weights), None) if row_weights else None
    return weights if weights is not None and get_method(config.method).TAKES_ROW_WEIGHTS else None


def _tied_heads(members: list[tuple[str, nn.Module]], holders: dict[int, list[tuple[str, nn.Module, str]]]
                ) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linear layers that hold this table's weight Parameter as their own (tied
    output layers). Every other holder must be one: anything else would be silently cut off from
    the compressed table."""
    member_ids = {id(m) for _, m in members}
    heads: list[tuple[str, nn.Linear]] = []
    for holder_name, holder, attr in holders.get(id(cast(nn.Embedding, members[0][1]).weight), []):
        if id(holder) in member_ids:
            continue
        if isinstance(holder, nn.Linear) and attr == "weight":
            heads.append((holder_name, holder))
            continue
        raise ValueError(f"the weight of {members[0][0]!r} is also held as {holder_name}.{attr} by a "
                         f"{type(holder).__name__}, which compress_ cannot rewire; skip this table in the "
                         "mapping, or make that module use the embedding module instead of its weight")
    return heads


def _calibration_metrics(model: nn.Module, kept: list[tuple[list[tuple[str, nn.Module]], dict[str, Any]]],
                         holders: dict[int, list[tuple[str, nn.Module, str]]], calibration: Any,
                         output_weight: float) -> dict[str, torch.Tensor]:
    """First name of each table tied to an output layer -> its row-error metric from the calibration inputs."""
    tied = {members[0][0]: list({id(h): h for _, h in _tied_heads(members, holders)}.values()) for members, _ in kept}
    tied = {name: heads for name, heads in tied.items() if heads}
    if not tied:
        warnings.warn("calibration= was given but no table is tied to an output layer; it is not used", stacklevel=3)
        return {}
    moments = head_second_moments(model, [h for heads in tied.values() for h in heads], calibration)
    return {name: output_metric(torch.stack([moments[id(h)] for h in heads]).mean(0), output_weight)
            for name, heads in tied.items()}


def _calibration_counts(batches: list[Any], rows: int) -> torch.Tensor | None:
    """Add-one smoothed counts of the calibration token ids (rows a model reads often count more), or
    None when the ids do not index a table of ``rows`` rows."""
    ids = [b["input_ids"] if isinstance(b, dict) else b for b in batches]
    ids = [t.reshape(-1).long().cpu() for t in ids if isinstance(t, torch.Tensor) and not t.is_floating_point()]
    if not ids or any(bool((t < 0).any() or (t >= rows).any()) for t in ids if t.numel()):
        return None
    return torch.bincount(torch.cat(ids), minlength=rows).float() + 1.0


def _check_budget_mapping(spec_or_mapping: Any, init: str) -> None:
    if init != "pretrained":
        raise SpecError("budget= measures fits to the current weights; it needs init='pretrained'")
    values = spec_or_mapping.values() if isinstance(spec_or_mapping, Mapping) else [spec_or_mapping]
    for value in values:
        skips = value is None or (isinstance(value, str) and value.strip().lower() == SKIP)
        if spec_or_mapping is not None and not skips:
            raise SpecError(f"with budget=, the mapping may only skip tables (None or 'skip'), got {value!r}; "
                            "name the candidate methods with methods=[...]")


def _plan_tables(kept: list[tuple[list[tuple[str, nn.Module]], dict[str, Any]]], budget: Any,
                 methods: Sequence[str] | None, row_weights: Mapping[str, torch.Tensor] | None,
                 metrics: Mapping[str, torch.Tensor] | None = None, fit_time: float = 1.0) -> Any:
    """Run the planner over the tables the mapping does not skip; their resolved configs become its choices."""
    from .planner import parse_budget, plan_budget  # the planner sits above surgery's per-table work

    planned = {members[0][0]: members for members, resolved in kept
               if all(isinstance(r, MethodConfig) for r in resolved.values())}
    if not planned:
        return None
    weights = {}
    for name, members in planned.items():
        for alias, _ in members:
            if row_weights is not None and alias in row_weights:
                weights[name] = row_weights[alias]
    tables = {name: cast(nn.Embedding, members[0][1]).weight.detach().float().cpu()
              for name, members in planned.items()}
    plan = plan_budget(tables, methods=methods, weights=weights or None, metrics=metrics or None,
                       fit_time=fit_time, **parse_budget(budget))
    for members, resolved in kept:
        if members[0][0] in planned:
            config = parse_spec(plan.specs[members[0][0]])
            resolved.update({n: config for n in resolved})
    return plan


def _replace_group(model: nn.Module, members: list[tuple[str, nn.Module]], config: MethodConfig, init: str,
                   fit_options: Mapping[str, Any] | None, untie: bool,
                   holders: dict[int, list[tuple[str, nn.Module, str]]],
                   row_weights: torch.Tensor | None = None, metric: torch.Tensor | None = None) -> TableReport:
    first = cast(Union[nn.Embedding, nn.EmbeddingBag], members[0][1])
    weight = first.weight
    padding_idx = first.padding_idx
    heads = _tied_heads(members, holders)

    for name, module in members:
        for option in _DROPPED_EMBEDDING_OPTIONS:
            value = getattr(module, option, None)
            if value not in (None, False):
                warnings.warn(f"{name}: {option}={value!r} has no compressed equivalent and is dropped", stacklevel=3)

    num_embeddings, embedding_dim = weight.shape
    device = weight.device
    output_aware = False
    if init == "pretrained":
        settings, progress = _split_fit_options(fit_options, config.method)
        output_aware = metric is not None and supports_output_aware(config)
        if output_aware:
            table = fit_output_aware_module(weight.detach().float().cpu(), config, cast(torch.Tensor, metric),
                                            row_weights=row_weights, padding_idx=padding_idx, fit=settings,
                                            progress=progress)
        else:
            table = get_method(config.method).from_pretrained(weight.detach().float().cpu(), config, padding_idx,
                                                              settings, progress=progress, row_weights=row_weights)
    else:
        table = get_method(config.method)(num_embeddings, embedding_dim, config, padding_idx=padding_idx)
    table = table.to(device)

    kinds = set()
    bag_wrappers: dict[int, nn.Module] = {}  # a bag shared under several names stays one module
    for name, module in members:
        if isinstance(module, nn.EmbeddingBag):
            kinds.add("embedding_bag")
            if id(module) not in bag_wrappers:
                bag_wrappers[id(module)] = CompressedEmbeddingBag(table, module.mode, module.include_last_offset)
            _set_module(model, name, bag_wrappers[id(module)])
        else:
            kinds.add("embedding")
            _set_module(model, name, table)

    tied, untied = [], []
    head_modules: dict[int, nn.Module] = {}
    for name, head in heads:
        if untie:
            if id(head) not in head_modules:
                head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                head_modules[id(head)] = head
            untied.append(name)
            continue
        if tuple(head.weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"{name} shares the table's weight with an unexpected shape {tuple(head.weight.shape)}")
        new = head_modules.setdefault(id(head), TiedOutput(table, head.bias))
        _set_module(model, name, new)
        tied.append(name)

    return TableReport(names=[n for n, _ in members], kind="+".join(sorted(kinds)),
                       shape=(num_embeddings, embedding_dim), spec=table.spec,
                       bytes_before=weight.numel() * weight.element_size(), bytes_after=table.num_bytes(),
                       padding_idx=padding_idx, tied_heads=tied, untied_heads=untied, output_aware=output_aware)


# -- back to dense -----------------------------------------------------------------------------
@torch.no_grad()
def decompress_(model: nn.Module) -> list[str]:
    """Turn compressed tables (and tied heads) back into ``nn.Embedding`` / ``nn.EmbeddingBag`` /
    ``nn.Linear`` holding the materialized weights; ties are restored by identity (the head's
    weight IS the embedding's weight again). Returns the names replaced.
    """
    weights: dict[int, nn.Parameter] = {}
    replaced: list[str] = []

    def weight_of(table: CompressedEmbedding) -> nn.Parameter:
        if id(table) not in weights:
            weights[id(table)] = nn.Parameter(table.materialize())
        return weights[id(table)]

    new_modules: dict[int, nn.Module] = {}
    new: nn.Module
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if any(name.startswith(p + ".") for p in replaced):
            continue  # the table inside a bag wrapper or tied head replaced already
        if id(module) in new_modules:
            _set_module(model, name, new_modules[id(module)])
            replaced.append(name)
            continue
        if isinstance(module, CompressedEmbeddingBag):
            table = module.table
            new = nn.EmbeddingBag(table.num_embeddings, table.embedding_dim, mode=module.mode,
                                  include_last_offset=module.include_last_offset, padding_idx=table.padding_idx)
            new.weight = weight_of(table)
        elif isinstance(module, TiedOutput):
            table = module.table
            new = nn.Linear(table.embedding_dim, table.num_embeddings, bias=module.bias is not None)
            new.weight = weight_of(table)
            if module.bias is not None:
                new.bias = module.bias
        elif isinstance(module, CompressedEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx)
            new.weight = weight_of(module)
        else:
            continue
        new_modules[id(module)] = new
        _set_module(model, name, new)
        replaced.append(name)
    return replaced


# -- saving and loading ------------------------------------------------------------------------
def _surgery_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tables = compressed_tables(model)
    index = {id(t): k for k, (_, t) in enumerate(tables)}
    entries: list[dict[str, Any]] = []
    for key, (_, table) in enumerate(tables):
        fit = None if table.fit_settings is None else json_ready(dict(table.fit_settings))
        entries.append({"key": f"tables.{key}", "method": table.config.method, "spec": table.spec,
                        "layout": table.layout(), "shape": [table.num_embeddings, table.embedding_dim],
                        "padding_idx": table.padding_idx, "fit": fit, "embeddings": [], "bags": [],
                        "tied_heads": []})
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, CompressedEmbedding):
            parent = name.rpartition(".")[0]
            owner = model.get_submodule(parent) if parent else None
            if isinstance(owner, (CompressedEmbeddingBag, TiedOutput)) and owner.table is module:
                continue  # recorded as the bag or head
            entries[index[id(module)]]["embeddings"].append(name)
        elif isinstance(module, CompressedEmbeddingBag):
            entries[index[id(module.table)]]["bags"].append(
                {"name": name, "mode": module.mode, "include_last_offset": module.include_last_offset})
        elif isinstance(module, TiedOutput):
            entry = entries[index[id(module.table)]]
            has_bias = module.bias is not None
            entry["tied_heads"].append({"name": name, "bias": has_bias})
            if module.bias is not None and id(module) not in seen:
                tensors[f"heads.{name}.bias"] = module.bias
        seen.add(id(module))
    for key, (_, table) in enumerate(tables):
        for pname, tensor in table.state_dict().items():
            tensors[f"tables.{key}.{pname}"] = tensor
    return tensors, {"tables": entries}


def save_pretrained(model: nn.Module, folder: "str | Path", *, overwrite: bool = False) -> Path:
    """Write the compressed tables of ``model`` (and tied heads' biases) to ``folder``.

    ``folder/tables-<digest>.safetensors`` holds the tensors; ``folder/embcompress.json`` the
    module names, resolved specs, fit settings, layouts, shapes, ties and versions (an
    ``embcompress.io`` bundle of kind "model"). A folder saved before is replaced only with
    ``overwrite=True``. Everything else in the model is the caller's (load it as usual, e.g.
    ``AutoModel.from_pretrained``), then :func:`load_pretrained`.
    """
    tensors, fields = _surgery_state(model)
    if not fields["tables"]:
        raise ValueError("the model holds no compressed table; run embcompress.compress_(model, spec) first")
    folder = Path(folder)
    write_folder_bundle(folder, CONFIG_NAME, lambda digest: f"tables-{digest[:12]}.safetensors", "model", fields,
                        tensors, overwrite=overwrite, sweep="tables-*.safetensors")
    return folder


def _read_pretrained(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}; write one with embcompress.save_pretrained")
    header, tensors = read_folder_bundle(folder, CONFIG_NAME, ("model",))
    try:
        _check_tables_header(header)
    except ValueError as exc:
        raise ArtifactError(f"{config_path}: invalid header: {exc}") from None
    return header, tensors


def _check_tables_header(header: dict[str, Any]) -> None:
    """Types and ranges of every field load_pretrained reads (ValueError naming the field)."""
    tables = header.get("tables")
    if not isinstance(tables, list):
        raise ValueError(f"tables must be a list, got {type(tables).__name__}")
    for n, entry in enumerate(tables):
        if not isinstance(entry, dict):
            raise ValueError(f"tables[{n}] must be a JSON object")
        for key in ("key", "method", "spec"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"tables[{n}].{key} must be a string, got {entry.get(key)!r}")
        rows, _ = json_int_list(entry, "shape", 1, MAX_ROWS, min_len=2, max_len=2)
        json_int({"embedding_dim": entry["shape"][1]}, "embedding_dim", 1, MAX_DIM)
        json_int(entry, "padding_idx", -rows, rows - 1, optional=True)
        json_object(entry, "layout", optional=True)
        json_object(entry, "fit", optional=True)
        for key in ("embeddings", "bags", "tied_heads"):
            if not isinstance(entry.get(key), list):
                raise ValueError(f"tables[{n}].{key} must be a list")
        if not all(isinstance(name, str) for name in entry["embeddings"]):
            raise ValueError(f"tables[{n}].embeddings must list module names")
        for bag in entry["bags"]:
            if not isinstance(bag, dict) or not isinstance(bag.get("name"), str):
                raise ValueError(f"tables[{n}].bags entries need a string 'name'")
            json_choice(bag, "mode", ("sum", "mean", "max"))
            json_choice(bag, "include_last_offset", (False, True))
        for head in entry["tied_heads"]:
            if not isinstance(head, dict) or not isinstance(head.get("name"), str):
                raise ValueError(f"tables[{n}].tied_heads entries need a string 'name'")
            json_choice(head, "bias", (False, True))
        if not (entry["embeddings"] or entry["bags"]):
            raise ValueError(f"tables[{n}] sits at no module")


def load_pretrained(model: nn.Module, folder: "str | Path") -> CompressionReport:
    """Rebuild the compressed modules saved by :func:`save_pretrained` inside a fresh, uncompressed
    instance of the same architecture (in place). Shapes are checked module by module.
    """
    header, tensors = _read_pretrained(Path(folder))
    report = CompressionReport()
    holders = _parameter_holders(model)
    for entry in header["tables"]:
        shape = tuple(entry["shape"])
        prefix = entry["key"] + "."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            table = build_trainable(entry["method"], shape, entry["spec"], entry["padding_idx"],
                                    entry.get("layout") or None, state)
        except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{folder}: tensors of {entry['key']} do not fit a {entry['spec']} table: "
                                f"{reason}") from None
        table.fit_settings = entry.get("fit")
        originals: list[torch.Tensor] = []
        device = torch.device("cpu")
        expected = ([(n, nn.Embedding) for n in entry["embeddings"]]
                    + [(b["name"], nn.EmbeddingBag) for b in entry["bags"]])
        for name, kind in expected:
            module = cast(Union[nn.Embedding, nn.EmbeddingBag], _existing(model, name, kind, folder))
            if tuple(module.weight.shape) != shape:
                raise ArtifactError(f"{name} in the model is {tuple(module.weight.shape)} but the saved table "
                                    f"is {shape}")
            originals.append(module.weight)
            device = module.weight.device
        table = table.to(device)
        for name in entry["embeddings"]:
            _set_module(model, name, table)
        for bag in entry["bags"]:
            _set_module(model, bag["name"], CompressedEmbeddingBag(table, bag["mode"], bag["include_last_offset"]))
        heads: dict[int, nn.Module] = {}
        tied_names = []
        for head in entry["tied_heads"]:
            linear = cast(nn.Linear, _existing(model, head["name"], nn.Linear, folder))
            bias = None
            if head["bias"]:
                saved = tensors.get(f"heads.{head['name']}.bias")
                if linear.bias is None or saved is None or saved.shape != linear.bias.shape:
                    raise ArtifactError(f"{head['name']}: bias mismatch between the model and the saved head")
                with torch.no_grad():
                    linear.bias.copy_(saved)
                bias = linear.bias
            new = heads.setdefault(id(linear), TiedOutput(table, bias))
            _set_module(model, head["name"], new)
            tied_names.append(head["name"])
        # Holders of the old weight that the save did not record as tied would be cut off silently.
        for original in {id(p): p for p in originals}.values():
            for holder_name, _, attr in holders.get(id(original), []):
                if holder_name in tied_names or holder_name in entry["embeddings"] or \
                        holder_name in [b["name"] for b in entry["bags"]]:
                    continue
                warnings.warn(f"{holder_name}.{attr} shared the weight of {expected[0][0]} in this model, but the "
                              "saved model had no tie there (it was untied); it keeps this model's own weights",
                              stacklevel=2)
        report.tables.append(TableReport(
            names=list(entry["embeddings"]) + [b["name"] for b in entry["bags"]],
            kind="+".join((["embedding"] if entry["embeddings"] else [])
                          + (["embedding_bag"] if entry["bags"] else [])),
            shape=shape, spec=table.spec, bytes_before=shape[0] * shape[1] * 4, bytes_after=table.num_bytes(),
            padding_idx=entry["padding_idx"], tied_heads=tied_names))
    return report


def _existing(model: nn.Module, name: str, kind: type, folder: Any) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"{folder} has a table at {name!r}, which this model does not have; load it into the "
                            "architecture it was saved from") from None
    if not isinstance(module, kind):
        raise ArtifactError(f"{name} is a {type(module).__name__} in this model, expected {kind.__name__}; "
                            "load_pretrained needs a fresh, uncompressed instance")
    return module


def iter_tables(model: nn.Module) -> Iterable[CompressedEmbedding]:
    """Distinct compressed tables of ``model``."""
    return (t for _, t in compressed_tables(model))
