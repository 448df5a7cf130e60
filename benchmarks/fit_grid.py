"""Post hoc fit time and quality over a grid of table shapes and budgets, beside FAISS codecs.

Every method's default (or quick) post hoc fit, chosen for the budget by ``config_for_budget``,
on synthetic tables with a word-vector-like spectrum (power-law singular values, log-normal row
norms), from 10k x 64 to 50k x 1,024, at 10x-40x against fp32. FAISS PQ, OPQ+PQ, residual (RQ)
and LSQ additive quantizers run at equal TOTAL bytes (codes + codebooks + the OPQ rotation).
Each cell runs in its own process with one thread under a CPU-time limit (RLIMIT_CPU; a cut
cell is recorded with the reason); CPU seconds are reported beside wall seconds because the
machine is shared (CPU seconds ~ a dedicated core). A FAISS codec cut at a shape is not tried at
larger shapes of the same ratio. Rerunning runs only the missing cells.

    python -m benchmarks.fit_grid --shapes 10000x64 20000x300 --ratios 10 40   # a reduced grid
    python -m benchmarks.fit_grid --quick --shapes 50000x1024 --methods pq dpq  # quick fits
    make bench-fit                                                             # the full grid
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmarks.results_io import write_json, write_text

SHAPES = ["10000x64", "20000x300", "30000x384", "50000x1024"]
RATIOS = [10.0, 20.0, 40.0]
METHODS = ["scalar", "lowrank", "pq", "pq:rotation=pca", "dpq", "codes"]
FAISS = ["faiss-pq", "faiss-opq", "faiss-rq", "faiss-lsq"]
LIMITS = {"default": 120.0, "quick": 30.0}  # CPU seconds a fit of ours may take (issue #15)


def synthetic(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Rows with power-law singular values (s_i ~ i^-0.6) and log-normal norms, like word vectors."""
    g = torch.Generator().manual_seed(seed)
    rank = min(dim, 256)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g))
    spectrum = torch.arange(1, rank + 1).float().pow(-0.6)
    weight = (torch.randn(rows, rank, generator=g) * spectrum) @ basis.t()
    weight = weight + 0.02 * torch.randn(rows, dim, generator=g)
    return weight * torch.exp(0.3 * torch.randn(rows, 1, generator=g))


def relative_mse(approx: torch.Tensor, target: torch.Tensor) -> float:
    return float((approx - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


def run_method(method: str, weight: torch.Tensor, ratio: float, quick: bool) -> dict:
    import embcompress
    from embcompress.budget import config_for_budget

    rows, dim = weight.shape
    config = config_for_budget(method, rows, dim, ratio=ratio)
    cls = embcompress.get_method(config.method)
    options = cls.quick_fit_options() if quick else {}
    wall, cpu = time.perf_counter(), time.process_time()
    module = cls.from_pretrained(weight, config, **options)
    frozen = module.export()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"spec": config.to_spec(), "bytes": frozen.num_bytes(), "seconds": wall, "cpu_seconds": cpu,
            "rel_mse": relative_mse(frozen.materialize(), weight)}


def faiss_factory(kind: str, rows: int, dim: int, budget: int) -> tuple[str, int] | None:
    """The FAISS codec with the most TOTAL bytes within budget: (factory string, bytes)."""
    best = None
    for books in range(1, dim + 1):
        if kind in ("faiss-pq", "faiss-opq") and dim % books:
            continue
        codes = rows * books  # 8-bit codes
        books_bytes = 4 * 256 * dim if kind in ("faiss-pq", "faiss-opq") else 4 * 256 * dim * books
        extra = 4 * dim * dim if kind == "faiss-opq" else 0
        total = codes + books_bytes + extra
        if total <= budget:  # "np": no polysemous training (a code reordering; the reconstruction is the same)
            factory = {"faiss-pq": f"PQ{books}x8np", "faiss-opq": f"OPQ{books},PQ{books}x8np",
                       "faiss-rq": f"RQ{books}x8", "faiss-lsq": f"LSQ{books}x8"}[kind]
            best = (factory, total)
    return best


def run_faiss(kind: str, weight: torch.Tensor, ratio: float) -> dict:
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(1)
    rows, dim = weight.shape
    choice = faiss_factory(kind, rows, dim, int(rows * dim * 4 / ratio))
    if choice is None:
        return {"error": "no codec of this kind fits the budget"}
    factory, total = choice
    x = np.ascontiguousarray(weight.numpy())
    wall, cpu = time.perf_counter(), time.process_time()
    index = faiss.index_factory(dim, factory)
    index.train(x[np.random.default_rng(0).permutation(rows)[:65536]])
    approx = torch.from_numpy(index.sa_decode(index.sa_encode(x)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"spec": factory, "bytes": total, "seconds": wall, "cpu_seconds": cpu,
            "rel_mse": relative_mse(approx, weight)}


def run_cell(method: str, shape: str, ratio: float, quick: bool) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the fits draw their seeds from torch's generator
    rows, dim = map(int, shape.split("x"))
    weight = synthetic(rows, dim)
    try:
        if method.startswith("faiss"):
            return run_faiss(method, weight, ratio)
        return run_method(method, weight, ratio, quick)
    except Exception as exc:  # a method that cannot reach this budget is a result, not a crash
        return {"error": str(exc).split(";")[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--methods", nargs="+", default=METHODS + FAISS)
    parser.add_argument("--quick", action="store_true", help="each method's quick fit options")
    parser.add_argument("--cpu-limit", type=float, default=300.0, help="CPU seconds per cell of ours before it is cut")
    parser.add_argument("--faiss-cpu-limit", type=float, default=150.0, help="CPU seconds per FAISS cell")
    parser.add_argument("--timeout", type=float, default=3600.0, help="wall seconds per cell before it is cut")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fit_grid"))
    parser.add_argument("--cell", nargs=3, metavar=("METHOD", "SHAPE", "RATIO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], args.cell[1], float(args.cell[2]), args.quick)))
        return
    json_path = args.out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.is_file() else []
    fit = "quick" if args.quick else "default"
    for shape in args.shapes:
        for ratio in args.ratios:
            for method in args.methods:
                if method.startswith("faiss") and args.quick:
                    continue  # FAISS has one fit
                done = {(r["method"], r["shape"], r["ratio"], r["fit"]) for r in results}
                if (method, shape, ratio, "default" if method.startswith("faiss") else fit) in done:
                    continue
                row = cut_before(results, method, shape, ratio) or run_in_process(method, shape, ratio, args)
                row.update({"method": method, "shape": shape, "ratio": ratio,
                            "fit": "default" if method.startswith("faiss") else fit, "load": os.getloadavg()[0]})
                print(json.dumps(row), flush=True)
                # Re-read before writing: several grid runs (different shapes) may share one results file.
                results = json.loads(json_path.read_text()) if json_path.is_file() else []
                results.append(row)
                write_json(json_path, results)
                write_text(args.out.with_suffix(".md"), markdown(results))


def cut_before(results: list[dict], method: str, shape: str, ratio: float) -> dict | None:
    """A FAISS codec cut at a smaller shape of this ratio is not tried again (its fit only grows)."""
    rows, dim = map(int, shape.split("x"))
    for r in results:
        smaller = [int(v) for v in r["shape"].split("x")]
        if (method.startswith("faiss") and r["method"] == method and r["ratio"] == ratio
                and r.get("error", "").startswith("cut") and smaller[0] <= rows and smaller[1] <= dim):
            return {"error": f"cut: already cut at {r['shape']}", "cell_wall": 0.0}
    return None


def run_in_process(method: str, shape: str, ratio: float, args: argparse.Namespace) -> dict:
    """One cell in a fresh one-thread process, killed past ``args.cpu_limit`` CPU seconds."""
    command = [sys.executable, "-m", "benchmarks.fit_grid", "--cell", method, shape, str(ratio)]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBCOMPRESS_QUIET": "1"}
    limit = int(args.faiss_cpu_limit if method.startswith("faiss") else args.cpu_limit)

    def cpu_limit() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))

    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env,
                              preexec_fn=cpu_limit)
    except subprocess.TimeoutExpired:
        return {"error": f"cut after {args.timeout:.0f} s wall", "cell_wall": time.perf_counter() - started}
    lines = done.stdout.strip().splitlines()
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        row = {"error": f"cut after {limit} CPU s"}
    else:
        row = json.loads(lines[-1]) if lines else {"error": done.stderr.strip()[-300:]}
    return {**row, "cell_wall": time.perf_counter() - started}


def markdown(results: list[dict]) -> str:
    lines = ["# Post hoc fit time and quality (benchmarks/fit_grid.py)", "",
             "Synthetic word-vector-like tables; budgets are TOTAL bytes against fp32 (FAISS: codes + codebooks "
             "+ the OPQ rotation). CPU s = the fit's CPU time on one thread (encoding every row included); wall s "
             "ran on a shared machine (load = 1-minute load average of 2 cores). A cell past its CPU limit is cut.",
             ""]
    ours = [r for r in results if not r["method"].startswith("faiss")]
    for fit, limit in LIMITS.items():
        cells = [r for r in ours if r["fit"] == fit]
        timed = [r for r in cells if "cpu_seconds" in r]
        over = [f"{r['method']} {r['shape']} {r['ratio']:g}x ({r['cpu_seconds']:.0f} s)" for r in timed
                if r["cpu_seconds"] > limit]
        over += [f"{r['method']} {r['shape']} {r['ratio']:g}x ({r['error']})" for r in cells
                 if r.get("error", "").startswith("cut")]
        if cells:
            worst = max((r["cpu_seconds"] for r in timed), default=0.0)
            verdict = "yes" if not over else "NO: " + "; ".join(over)
            lines.append(f"- Every {fit} fit of ours within {limit:.0f} CPU s ({len(cells)} cells, slowest "
                         f"{worst:.1f} s): {verdict}.")
    lines.append("")
    for shape in sorted({r["shape"] for r in results}, key=lambda s: [int(v) for v in s.split("x")]):
        rows, dim = map(int, shape.split("x"))
        lines += [f"## {shape}", "", "| ratio | method | fit | spec | ratio got | rel MSE | CPU s | wall s | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        order = {m: i for i, m in enumerate(METHODS + FAISS)}
        for r in sorted((r for r in results if r["shape"] == shape),
                        key=lambda r: (r["ratio"], r["fit"] != "default", order.get(r["method"], 99))):
            if "error" in r:
                lines.append(f"| {r['ratio']:g}x | {r['method']} | {r['fit']} | {r['error'][:70]} | - | - | - | - "
                             f"| {r['load']:.1f} |")
                continue
            lines.append(f"| {r['ratio']:g}x | {r['method']} | {r['fit']} | `{r['spec'][:56]}` | "
                         f"{rows * dim * 4 / r['bytes']:.1f}x | {r['rel_mse']:.4f} | {r['cpu_seconds']:.1f} | "
                         f"{r['seconds']:.1f} | {r['load']:.1f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
