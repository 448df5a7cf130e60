"""Drop-in replacements for TorchRec's EmbeddingBagCollection and EmbeddingCollection.

Tables are described the TorchRec way (``EmbeddingBagConfig`` / ``EmbeddingConfig``) plus an
embcompress spec per table. Each table's per-row part (see :mod:`.rows`) is a table of a child
``EmbeddingCollection`` under ``rows`` (one per row width, as an EmbeddingCollection holds one
width; the TorchRec table has the compressed table's name), which ``DistributedModelParallel``
shards with its stock sharder; the rest are ordinary parameters under ``tables``, which DMP's DDP
wrapper all-reduces.

Forward, per table (N ids in the batch for its features, U distinct):
    ids (N,) -> distinct ids (U,) -> TorchRec lookup of their per-row part (U, r)
             -> the method decodes (U, d) -> (N, d) -> pooled per bag (B, d) or jagged per id
Looking up distinct ids only is also what the methods do on their own (DPQ's batch statistics are
over distinct rows), so a split table computes what the plain method computes.

Example:
    >>> ebc = CompressedEmbeddingBagCollection(tables, {"items": "dpq:groups=16", "default": "tt:rank=8"})
    >>> model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, ...)   # unchanged
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, cast

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from ...base import CompressedEmbedding
from ...config import MethodConfig, SpecError, parse_spec
from .rows import RowSupplied, build_split, row_part

__all__ = ["CompressedEmbeddingBagCollection", "CompressedEmbeddingCollection"]

DEFAULT_KEY = "default"


class _CompressedCollection(nn.Module):
    """Tables, their per-row parts in a TorchRec EmbeddingCollection, and the per-id decode."""

    def __init__(self, tables: Sequence[BaseEmbeddingConfig], specs: Mapping[str, "str | MethodConfig"],
                 device: "torch.device | str | None" = None, min_sharded_rows: int = 0) -> None:
        super().__init__()
        if not tables:
            raise ValueError("give at least one table config")
        names = [config.name for config in tables]
        if len(set(names)) != len(names) or "" in names:
            raise ValueError(f"table names must be unique and non-empty, got {names}")
        for name in names:
            if "." in name or hasattr(nn.ModuleDict(), name):  # TorchRec's own ModuleDict refuses these too
                raise ValueError(f"table {name!r}: a table name must not contain '.' nor be a ModuleDict "
                                 "attribute (items, keys, values, ...); rename it, e.g. "
                                 f"{name.replace('.', '_')}_table")
        unknown = sorted(set(specs) - set(names) - {DEFAULT_KEY})
        if unknown:
            raise SpecError(f"specs name tables that do not exist: {unknown}; tables are {names} "
                            f"(or use {DEFAULT_KEY!r})")
        device = torch.device(device) if device is not None else torch.device("cpu")
        small_device = torch.device("cpu") if device.type == "meta" else device
        self._configs = list(tables)
        self.tables = nn.ModuleDict()
        row_configs = []
        for config in self._configs:
            if not config.feature_names:
                config.feature_names = [config.name]  # TorchRec's own default
            # Small tables keep their per-row part as a plain parameter: a DDP all-reduce of a few
            # hundred kB costs less than TorchRec's lookup all-to-alls.
            split = config.num_embeddings >= min_sharded_rows
            self.tables[config.name] = _build_table(config, specs, split).to(small_device)
            part = row_part(cast(CompressedEmbedding, self.tables[config.name]))
            if part is not None:
                # One feature per table, named like the table: plans and constraints use the table names.
                row_configs.append(EmbeddingConfig(num_embeddings=config.num_embeddings, embedding_dim=part.dim,
                                                   name=config.name, feature_names=[config.name],
                                                   init_fn=part.init))
        self._row_tables = [config.name for config in row_configs]
        # An EmbeddingCollection holds tables of one width only: one collection per width.
        # A meta device leaves the per-row parts unallocated until DMP builds (and initializes) the shards.
        self._row_groups: dict[str, list[str]] = {}  # child of ``rows`` -> its tables (kept: DMP swaps the child)
        for config in row_configs:
            self._row_groups.setdefault(f"width{config.embedding_dim}", []).append(config.name)
        self.rows = nn.ModuleDict({key: EmbeddingCollection(
            [config for config in row_configs if config.name in members], device=device)
            for key, members in self._row_groups.items()})

    def describe(self) -> list[dict[str, Any]]:
        """Every table's name, shape, features and resolved spec (compared across ranks before sharding)."""
        return [{"name": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim, "features": list(c.feature_names),
                 "spec": self.tables[c.name].spec, "pooling": str(getattr(c, "pooling", ""))} for c in self._configs]

    @torch.no_grad()
    def rescale_output_(self, table: str, factor: float) -> None:
        """Multiply every output row of ``table`` by ``factor`` in place (see
        ``CompressedEmbedding.rescale_output_``), its TorchRec-held per-row part included: when sharded,
        every rank scales its own shards (call it on every rank)."""
        if table not in self.tables:
            raise KeyError(f"no table {table!r}; tables are {list(self.tables)}")
        if table not in self._row_tables:
            cast(CompressedEmbedding, self.tables[table]).rescale_output_(factor)
            return
        module = cast(RowSupplied, self.tables[table])
        if module.rows_scale_with_output():
            group = next(group for group, names in self._row_groups.items() if table in names)
            for rows in _local_rows(self.rows[group].state_dict()[f"embeddings.{table}.weight"]):
                rows.mul_(factor)
        module.rescale_held_(factor)

    def _per_id_rows(self, features: KeyedJaggedTensor) -> dict[str, list[torch.Tensor]]:
        """table name -> decoded rows (N_f, d) of each of its features, in ``feature_names`` order."""
        present = set(features.keys())
        per_table: dict[str, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}
        for config in self._configs:
            missing = [name for name in config.feature_names if name not in present]
            if missing:
                raise KeyError(f"table {config.name!r}: feature(s) {missing} are missing from the KeyedJaggedTensor "
                               f"(its keys: {sorted(present)})")
            parts = [features[name].values() for name in config.feature_names]
            ids = torch.cat(parts) if len(parts) > 1 else parts[0]
            _check_range(config, ids)
            unique, inverse = torch.unique(ids.long(), return_inverse=True)
            per_table[config.name] = (parts, unique, inverse)
        looked_up = self._lookup_rows({name: per_table[name][1] for name in self._row_tables})
        out: dict[str, list[torch.Tensor]] = {}
        for config in self._configs:
            parts, unique, inverse = per_table[config.name]
            table = cast(Any, self.tables[config.name])  # a split table (rows.py) or a method's own
            decoded = table.decode(unique, looked_up[config.name]) if config.name in looked_up else table(unique)
            rows = decoded.index_select(0, inverse)
            out[config.name] = list(rows.split([part.numel() for part in parts]))
        return out

    def _lookup_rows(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """TorchRec lookups of the per-row parts of every split table's distinct ids (one bag per table)."""
        out: dict[str, torch.Tensor] = {}
        for group, keys in self._row_groups.items():
            kjt = KeyedJaggedTensor(keys=keys, values=torch.cat([ids[key] for key in keys]),
                                    lengths=torch.tensor([ids[key].numel() for key in keys], dtype=torch.int32))
            jagged = self.rows[group](kjt)
            out.update((key, jagged[key].values()) for key in keys)
        return out


class CompressedEmbeddingBagCollection(_CompressedCollection):
    """``EmbeddingBagCollection`` with compressed tables: KeyedJaggedTensor in, pooled KeyedTensor out.

    Args:
        tables: TorchRec ``EmbeddingBagConfig`` s (SUM or MEAN pooling).
        specs: table name -> embcompress spec (``"dpq:groups=16,codewords=16"``); ``"default"`` for the rest.
        device: device of the per-row parts; ``"meta"`` defers them to DMP's shards (large tables).
        min_sharded_rows: tables with fewer rows keep their per-row part as a plain (DDP) parameter.

    Example:
        >>> ebc = CompressedEmbeddingBagCollection(
        ...     [EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=10**6, feature_names=["f"])],
        ...     {"t": "memcom:buckets=10000"})
        >>> ebc(kjt).to_dict()["f"].shape        # (batch, 64)
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], specs: Mapping[str, "str | MethodConfig"],
                 is_weighted: bool = False, device: "torch.device | str | None" = None,
                 min_sharded_rows: int = 0) -> None:
        for config in tables:
            if config.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {config.name!r}: pooling {config.pooling} is not supported; use SUM or MEAN")
        super().__init__(tables, specs, device, min_sharded_rows)
        self._is_weighted = is_weighted
        self._embedding_names = [name for names in get_embedding_names_by_table(self._configs) for name in names]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        rows = self._per_id_rows(features)
        pooled, dims = [], []
        for config in self._configs:
            for name, per_id in zip(config.feature_names, rows[config.name]):
                jagged = features[name]
                weights = jagged.weights_or_none() if self._is_weighted else None
                pooled.append(_pool(per_id, jagged.lengths(), weights, config.pooling))
                dims.append(config.embedding_dim)
        return KeyedTensor(keys=self._embedding_names, length_per_key=dims, values=torch.cat(pooled, dim=1))


class CompressedEmbeddingCollection(_CompressedCollection):
    """``EmbeddingCollection`` with compressed tables: KeyedJaggedTensor in, dict of JaggedTensor out.

    Args:
        tables: TorchRec ``EmbeddingConfig`` s.
        specs: table name -> embcompress spec; ``"default"`` for the rest.
        device: device of the per-row parts; ``"meta"`` defers them to DMP's shards.
        min_sharded_rows: tables with fewer rows keep their per-row part as a plain (DDP) parameter.
    """

    def __init__(self, tables: Sequence[EmbeddingConfig], specs: Mapping[str, "str | MethodConfig"],
                 device: "torch.device | str | None" = None, min_sharded_rows: int = 0) -> None:
        super().__init__(tables, specs, device, min_sharded_rows)
        self._embedding_names = [name for names in get_embedding_names_by_table(self._configs) for name in names]

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        rows = self._per_id_rows(features)
        out: dict[str, JaggedTensor] = {}
        names = iter(self._embedding_names)
        for config in self._configs:
            for feature, per_id in zip(config.feature_names, rows[config.name]):
                out[next(names)] = JaggedTensor(values=per_id, lengths=features[feature].lengths())
        return out


def _build_table(config: BaseEmbeddingConfig, specs: Mapping[str, "str | MethodConfig"], split: bool) -> nn.Module:
    spec = specs.get(config.name, specs.get(DEFAULT_KEY))
    if spec is None:
        raise SpecError(f"table {config.name!r} has no spec; give specs[{config.name!r}] or specs[{DEFAULT_KEY!r}] "
                        "(tables left dense belong in a plain EmbeddingBagCollection / EmbeddingCollection)")
    try:
        return build_split(parse_spec(spec), config.num_embeddings, config.embedding_dim, split)
    except (SpecError, ValueError) as exc:
        raise SpecError(f"table {config.name!r} ({config.num_embeddings} x {config.embedding_dim}) cannot take "
                        f"spec {spec!r}: {exc}") from exc


def _local_rows(weight: Any) -> list[torch.Tensor]:
    """This rank's rows of a plain, sharded (ShardedTensor) or DTensor weight, as views of the storage the
    lookups read (in-place writes reach the table)."""
    if hasattr(weight, "local_shards"):
        return [shard.tensor for shard in weight.local_shards()]
    if hasattr(weight, "to_local"):
        return [weight.to_local()]
    return [weight]


def _check_range(config: BaseEmbeddingConfig, ids: torch.Tensor) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.num_embeddings):
        raise IndexError(f"table {config.name!r}: ids must be in [0, {config.num_embeddings}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def _pool(rows: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
          pooling: PoolingType) -> torch.Tensor:
    """Per-id rows (N, d) -> per-bag (B, d), bags given by ``lengths`` (B,), as EmbeddingBag pools them."""
    bags = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.long())
    if weights is not None:
        rows = rows * weights.unsqueeze(1)
    pooled = rows.new_zeros(lengths.numel(), rows.shape[1]).index_add_(0, bags, rows)
    if pooling == PoolingType.MEAN:
        pooled = pooled / lengths.clamp_min(1).unsqueeze(1).to(pooled.dtype)
    return pooled
