"""Peak memory per process and step time of a three-table DLRM on TorchRec, dense vs compressed.

Run with ``make bench-scale`` (or ``python -m benchmarks.scale``). Tables of 10M, 1M and 100k rows
at d = 64 (``--rows`` to shrink them), trained with DistributedModelParallel on CPU (gloo) in 1 and
2 processes, each process a fresh ``spawn`` so its peak resident set (VmHWM) is its own:

- ``dense``: TorchRec's own EmbeddingBagCollection, fused kernel, planner-chosen sharding;
- each method: ``CompressedEmbeddingBagCollection`` with one spec for all three tables; per-row
  parts (dpq/codes query tables, memcom's scale) are TorchRec tables DMP shards, the rest DDP.

TorchRec tables are built on the meta device, so each process allocates only its own shards.
Per step: each process pools ``--batch`` samples x ``--ids`` ids per feature, forward, backward,
fused SGD on the TorchRec tables and SGD on the rest. Reported: the largest VmHWM over the
processes, the median step time (the slowest rank per step), and how DMP sharded each table.
One torch thread per process. Outputs: benchmarks/results/scale.json and scale.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from benchmarks.results_io import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = {"big": 10_000_000, "mid": 1_000_000, "small": 100_000}
DIM = 64
# One spec per method, used for all three tables (sizes a d = 64 table would use).
SPECS = {
    "dense": None,
    "dpq": "dpq:groups=16,codewords=16",
    "codes": "codes:books=16,codewords=16",
    "memcom": "memcom:buckets=10000",
    "hash": "hash:buckets=100000",
    "qr": "qr:buckets=1000",
    "tt": "tt:cores=3,rank=16",
}


def _peak_rss() -> int:
    from benchmarks.perf import _peak_rss as peak  # noqa: PLC0415 - one VmHWM reader for every benchmark
    return peak()


def build_model(method: str, rows: dict[str, int]) -> torch.nn.Module:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: PLC0415
    from torchrec.models.dlrm import DLRM  # noqa: PLC0415

    from embcompress.integrations.torchrec import CompressedEmbeddingBagCollection  # noqa: PLC0415

    configs = [EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=v, feature_names=[f"f_{name}"])
               for name, v in rows.items()]
    if method == "dense":
        ebc = EmbeddingBagCollection(configs, device=torch.device("meta"))
    else:
        ebc = CompressedEmbeddingBagCollection(configs, {"default": SPECS[method]}, device="meta")
    return DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[64, DIM],
                over_arch_layer_sizes=[64, 1])


def worker(rank: int, world: int, port: int, method: str, rows: dict[str, int], batch: int, ids: int, steps: int,
           out_dir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist  # noqa: PLC0415
    from torchrec import KeyedJaggedTensor  # noqa: PLC0415
    from torchrec.distributed import DistributedModelParallel  # noqa: PLC0415
    from torchrec.distributed.planner.types import ParameterConstraints  # noqa: PLC0415
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: PLC0415
    from torchrec.optim.keyed import KeyedOptimizerWrapper  # noqa: PLC0415
    from torchrec.optim.optimizers import in_backward_optimizer_filter  # noqa: PLC0415

    from embcompress.integrations.torchrec import sharding_plan  # noqa: PLC0415

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    try:
        start_rss = _peak_rss()
        torch.manual_seed(0)
        model = build_model(method, rows)
        sparse = [p for name, p in model.named_parameters() if ".embedding_bags." in name or ".rows." in name]
        apply_optimizer_in_backward(torch.optim.SGD, sparse, {"lr": 0.01})
        dense_pins = {name: ParameterConstraints(compute_kernels=["fused"]) for name in rows} if method == "dense" else {}
        plan = sharding_plan(model, ddr_cap=16 << 30, constraints=dense_pins)
        model = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
        optimizer = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                          lambda params: torch.optim.SGD(params, lr=0.01))
        gen = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(steps):
            kjt = KeyedJaggedTensor(keys=[f"f_{name}" for name in rows],
                                    values=torch.cat([torch.randint(0, v, (batch * ids,), generator=gen)
                                                      for v in rows.values()]),
                                    lengths=torch.full((batch * len(rows),), ids, dtype=torch.int32))
            dense = torch.randn(batch, 13, generator=gen)
            labels = torch.randint(0, 2, (batch,), generator=gen).float()
            dist.barrier()
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - began)
        shardings = {f"{module}.{table}": option.sharding_type for module, per in plan.plan.items()
                     for table, option in per.items()}
        result = {"rank": rank, "peak_bytes": _peak_rss(), "import_peak_bytes": start_rss, "step_seconds": times,
                  "sharding": shardings}
        write_json(Path(out_dir, f"rank{rank}.json"), result, indent=None)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(method: str, world: int, rows: dict[str, int], batch: int, ids: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, method, rows, batch, ids, steps, out_dir))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            return {"error": f"worker exit codes {[p.exitcode for p in procs]}"}
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    warm = [max(rank["step_seconds"][s] for rank in ranks) for s in range(1, steps)]  # step 0 warms up
    return {"peak_bytes_per_process": max(rank["peak_bytes"] for rank in ranks),
            "peak_bytes_by_rank": [rank["peak_bytes"] for rank in ranks],
            "import_peak_bytes": max(rank["import_peak_bytes"] for rank in ranks),
            "step_seconds": statistics.median(warm), "sharding": ranks[0]["sharding"]}


def on_paper(rows: int = 10**9, dim: int = DIM, hosts: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Bytes of one (rows, dim) table per method, from the exact formulas, nothing allocated.

    artifact: ``expected_bytes`` (what is served); training: the per-row part TorchRec shards
    (split across hosts) and the rest, which every host holds (counted on the meta device).
    """
    from embcompress.config import parse_spec  # noqa: PLC0415
    from embcompress.integrations.torchrec.rows import build_split, row_part  # noqa: PLC0415
    from embcompress.registry import get_method  # noqa: PLC0415

    out = []
    for method, spec in SPECS.items():
        if spec is None:
            artifact, sharded, replicated = 4 * rows * dim, 4 * rows * dim, 0
        else:
            config = parse_spec(spec)
            artifact = get_method(config.method).expected_bytes(config, rows, dim)
            with torch.device("meta"):
                table = build_split(config, rows, dim)
            part = row_part(table)
            sharded = 4 * rows * part.dim if part else 0
            replicated = sum(t.numel() * t.element_size() for t in [*table.parameters(), *table.buffers()])
        out.append({"method": method, "spec": spec, "artifact_bytes": artifact, "sharded_bytes": sharded,
                    "replicated_bytes": replicated,
                    "training_bytes_per_host": {str(h): sharded / h + replicated for h in hosts}})
    return out


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def paper_markdown(table: list[dict[str, Any]], rows: int = 10**9, dim: int = DIM) -> str:
    hosts = list(table[0]["training_bytes_per_host"])
    lines = [f"Memory for one {rows:,} x {dim} table, from the exact byte formulas (`expected_bytes`; training "
             "parts counted on the meta device; fp32, no optimizer state):", "",
             "| method | spec | artifact (serving) | training, sharded by TorchRec | training, on every host | "
             + " | ".join(f"training per host, {h} host{'s' if h != '1' else ''}" for h in hosts) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(hosts)]
    for r in table:
        spec = f"`{r['spec']}`" if r["spec"] else "dense fp32"
        lines.append(f"| {r['method']} | {spec} | {_size(r['artifact_bytes'])} | {_size(r['sharded_bytes'])} | "
                     f"{_size(r['replicated_bytes'])} | "
                     + " | ".join(_size(r["training_bytes_per_host"][h]) for h in hosts) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    shape = ", ".join(f"{name} {v:,}" for name, v in rows.items())
    lines = [f"Tables: {shape} rows, d = {DIM}; {report['batch']} samples x {report['ids']} ids per feature per "
             f"process and step; median of {report['steps'] - 1} steps after one warm-up; 1 torch thread per "
             f"process, gloo on one {report['cpus']}-CPU host (shared; load {report['load_average'][0]:.1f} at the start).",
             "", f"A process that imports torch and TorchRec and starts gloo peaks at "
             f"{report['import_peak_bytes'] / 2**20:.0f} MiB before any table exists.", "",
             "| method | spec | processes | peak memory per process | step time | sharding (TorchRec tables) |",
             "|---|---|---:|---:|---:|---|"]
    for method, per_world in report["results"].items():
        for world, r in per_world.items():
            if "error" in r:
                lines.append(f"| {method} | `{SPECS[method]}` | {world} | {r['error']} | - | - |")
                continue
            shards = ", ".join(f"{k.split('.')[-1]}: {v}" for k, v in sorted(r["sharding"].items())) or "none (all DDP)"
            spec = f"`{SPECS[method]}`" if SPECS[method] else "TorchRec EmbeddingBagCollection"
            lines.append(f"| {method} | {spec} | {world} | {r['peak_bytes_per_process'] / 2**20:,.0f} MiB | "
                         f"{r['step_seconds'] * 1e3:.0f} ms | {shards} |")
    return "\n".join(lines) + "\n\n" + paper_markdown(report["on_paper"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(str(v) for v in TABLES.values()),
                        help="rows of the three tables, comma-separated")
    parser.add_argument("--methods", default=",".join(SPECS))
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--ids", type=int, default=4, help="ids per feature per sample")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite scale.md (and the on-paper table in scale.json) from the measured scale.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        report = json.loads((args.out / "scale.json").read_text())
        report["on_paper"] = on_paper()
        write_json(args.out / "scale.json", report, indent=2)
        write_text(args.out / "scale.md", markdown(report))
        return 0
    rows = dict(zip(TABLES, (int(v) for v in args.rows.split(","))))
    report: dict[str, Any] = {"rows": rows, "dim": DIM, "batch": args.batch, "ids": args.ids, "steps": args.steps,
                              "cpus": os.cpu_count(), "torch": torch.__version__,
                              "load_average": list(os.getloadavg()), "results": {}}
    for method in args.methods.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            result = run(method, world, rows, args.batch, args.ids, args.steps)
            report["results"].setdefault(method, {})[str(world)] = result
            print(method, world, {k: v for k, v in result.items() if k != "sharding"}, flush=True)
    report["on_paper"] = on_paper()
    report["import_peak_bytes"] = min(r["import_peak_bytes"] for per in report["results"].values()
                                      for r in per.values() if "import_peak_bytes" in r)
    write_json(args.out / "scale.json", report, indent=2)
    text = markdown(report)
    write_text(args.out / "scale.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
