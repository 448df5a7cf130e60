"""Sharding compressed collections with TorchRec's planner, and gathering trained tables for export.

Nothing here moves training data: DMP's stock ``EmbeddingCollectionSharder`` shards each
collection's ``rows`` child and DMP's DDP wrapper all-reduces the rest. These helpers pass the
planner what it cannot guess on CPU:

- ``ParameterConstraints`` per per-row table: the fused compute kernel, and only the sharding
  types an unpooled EmbeddingCollection survives on CPU (table-, row- and column-wise for query
  tables; table- and row-wise for MEmCom's scalar columns);
- a ``Topology`` with the host's memory (``ddr_cap``), since the planner otherwise assumes 128 GB
  per rank.

Train with ``torchrec.optim.apply_optimizer_in_backward`` on the ``rows`` parameters before DMP:
without it the fused kernel silently trains them with SGD at lr 0.01.

Example:
    >>> plan = sharding_plan(model, ddr_cap=8 << 30)          # on every rank, after init_process_group
    >>> model = DistributedModelParallel(model, plan=plan, device=torch.device("cpu"))
    >>> tables = compressed_tables(model)                      # rank 0: name -> method module
    >>> frozen = {name: table.export() for name, table in tables.items()}
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingPlan

from ...base import CompressedEmbedding
from .collection import _CompressedCollection
from .rows import row_part, to_plain

__all__ = ["sharding_constraints", "sharding_plan", "compressed_tables", "check_same_on_all_ranks", "first_difference"]


def _collections(model: nn.Module) -> list[tuple[str, _CompressedCollection]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, _CompressedCollection)]


def sharding_constraints(model: nn.Module) -> dict[str, ParameterConstraints]:
    """Planner constraints for every per-row table of every compressed collection in ``model``."""
    constraints: dict[str, ParameterConstraints] = {}
    for _, collection in _collections(model):
        for name in collection._row_tables:
            part = row_part(cast(CompressedEmbedding, collection.tables[name]))
            assert part is not None  # _row_tables holds only the tables with a per-row part
            constraints[name] = ParameterConstraints(sharding_types=list(part.sharding_types),
                                                     compute_kernels=[EmbeddingComputeKernel.FUSED.value])
    return constraints


def check_same_on_all_ranks(model: nn.Module, group: "dist.ProcessGroup | None" = None) -> None:
    """Raise, naming the table, if any rank built its compressed collections differently."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    mine = {prefix: collection.describe() for prefix, collection in _collections(model)}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        problem = first_difference(mine, theirs)
        if problem:
            raise ValueError(f"rank {dist.get_rank(group)} and rank {rank} built different tables: {problem}; "
                             "build the same tables and specs on every rank")


def first_difference(mine: dict[str, list[dict[str, Any]]], theirs: dict[str, list[dict[str, Any]]]) -> str:
    """'' if two ranks' ``describe()`` s (by collection path) agree, else the first table that differs."""
    for prefix in sorted(set(mine) | set(theirs)):
        ours, other = mine.get(prefix, []), theirs.get(prefix, [])
        for index in range(max(len(ours), len(other))):
            a = ours[index] if index < len(ours) else None
            b = other[index] if index < len(other) else None
            if a != b:
                name = cast(dict[str, Any], a or b)["name"]
                return f"table {name!r} of {prefix or 'the model'!r} is {a} here and {b} there"
    return ""


def sharding_plan(model: nn.Module, *, ddr_cap: int, batch_size: int | None = None,
                  constraints: dict[str, ParameterConstraints] | None = None,
                  group: "dist.ProcessGroup | None" = None) -> ShardingPlan:
    """TorchRec's planner run collectively over ``group`` with CPU-safe constraints and real memory.

    Args:
        model: the unsharded model holding compressed collections (and any TorchRec modules).
        ddr_cap: bytes of memory per rank the planner may use.
        batch_size: per-rank batch size for the planner's cost model (TorchRec's default if None).
        constraints: extra or overriding constraints by table name (e.g. to pin a plan by hand).
    """
    check_same_on_all_ranks(model, group)
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    merged = {**sharding_constraints(model), **(constraints or {})}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu", ddr_cap=ddr_cap),
                                       batch_size=batch_size, constraints=merged, debug=False)
    sharders = get_default_sharders()
    if dist.is_initialized():
        return planner.collective_plan(model, sharders, group)
    return planner.plan(model, sharders)


def compressed_tables(model: nn.Module, dst: int = 0,
                      group: "dist.ProcessGroup | None" = None) -> dict[str, CompressedEmbedding]:
    """Every compressed table of ``model`` as the ordinary method module, per-row parts gathered whole.

    Collective when the model is sharded (call it on every rank); the tables are returned on rank
    ``dst`` and an empty dict elsewhere. ``table.export()`` then gives the usual frozen artifact.
    Keys are the table names, prefixed by the collection's path when the model has several.
    """
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    collections = _collections(model)
    out: dict[str, CompressedEmbedding] = {}
    for prefix, collection in collections:
        rows_state = {f"{name}.{key}": value for name, rows in collection.rows.items()
                      for key, value in rows.state_dict().items()}
        group_of = {name: group for group, names in collection._row_groups.items() for name in names}
        for config in collection._configs:
            table = collection.tables[config.name]
            rows = None
            if config.name in group_of:
                rows = _gather(rows_state[f"{group_of[config.name]}.embeddings.{config.name}.weight"], dst, rank)
            if rank == dst:
                key = f"{prefix}.{config.name}" if len(collections) > 1 and prefix else config.name
                out[key] = to_plain(cast(CompressedEmbedding, table), rows)
    return out


def _gather(weight: Any, dst: int, rank: int) -> torch.Tensor | None:
    """A whole (V, r) table on rank ``dst`` from a plain, sharded (ShardedTensor) or DTensor weight."""
    if type(weight) in (torch.Tensor, nn.Parameter):  # not sharded
        return weight.detach().clone()
    if hasattr(weight, "full_tensor"):  # DTensor
        full = weight.full_tensor()
        return full.detach().clone() if rank == dst else None
    with warnings.catch_warnings():  # TorchRec 1.8's state dicts hold ShardedTensors, which torch deprecates
        warnings.simplefilter("ignore", FutureWarning)
        full = torch.empty(weight.size(), dtype=weight.dtype) if rank == dst else None
        weight.gather(dst=dst, out=full)
    return full
