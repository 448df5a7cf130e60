"""Run the claims benchmark (resumable) and write its report.

    python -m benchmarks.claims.run --size quick --fresh          # CI smoke run, a few minutes
    python -m benchmarks.claims.run --size full --jobs 2          # resumable; reruns only missing cells
    python -m benchmarks.claims.run --size full --measure         # one-epoch cost of every (claim, dataset, arm)
    python -m benchmarks.claims.run --claims memcom,dpq --stop-at 18:25

Results: ``benchmarks/results/claims[-quick]/<claim>.json`` (one record per cell, saved as each cell
finishes), ``plan.json`` (the measured cost per cell), ``report.md``; see ``report.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .experiments import EXPERIMENTS, SIZES, Cell, cell_record, settings
from benchmarks.results_io import write_json

RESULTS = Path(__file__).resolve().parents[1] / "results"
ORDER = ["memcom", "dpq", "codes", "distill", "tt"]  # the report's order
# The order cells run in, cheapest (claim, dataset) first by the measured plan (plan.json), so a run
# cut short has whole comparisons rather than a little of everything.
PRIORITY = [("dpq", "topic"), ("memcom", "movielens"), ("codes", "rotten"), ("memcom", "zipf"), ("distill", "lm"),
            ("codes", "womens"), ("tt", "womens"), ("dpq", "lm")]
MEASURE_BATCHES = 8

log = logging.getLogger("benchmarks.claims")


def out_dir_for(size: str) -> Path:
    return RESULTS / ("claims" if size == "full" else f"claims-{size}")


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        file = out_dir / f"{name}.json"
        if file.exists():
            for record in json.loads(file.read_text()):
                records[record["key"]] = record
    return records


def save_results(out_dir: Path, records: dict[str, dict[str, Any]], claim: str) -> None:
    items = sorted((r for r in records.values() if r["claim"] == claim), key=lambda r: r["key"])
    write_json(out_dir / f"{claim}.json", items, indent=0)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # parallelism is across cells
    os.environ.setdefault("EMBCOMPRESS_QUIET", "1")


def _run(cell: dict[str, Any], cache: str, max_batches: int | None) -> dict[str, Any]:
    from .experiments import run_cell

    c = Cell(**cell)
    try:
        return run_cell(c, Path(cache), max_batches)
    except Exception as exc:  # one failing cell must not stop the benchmark; the report lists it
        return {**cell_record(c), "status": "error", "reason": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=8)}


def phases(cells: list[Cell]) -> list[list[Cell]]:
    """Cells in the order they run, in phases a later phase may depend on: per (claim, dataset) in
    PRIORITY order, first the cells that fill the cache (the distilled claim's dense teachers, one
    cell per fitted codes table), then the rest, seed by seed so a run cut short has whole seeds."""
    out = []
    blocks = PRIORITY + sorted({(c.claim, c.dataset) for c in cells} - set(PRIORITY))
    for claim, dataset in blocks:
        mine = [c for c in cells if c.claim == claim and c.dataset == dataset]
        first, seen = [], set()
        for c in mine:
            fit_key = (c.dataset, c.arm)
            if (claim == "distill" and c.arm == "dense") or (
                    claim == "codes" and c.arm != "dense" and fit_key not in seen):
                first.append(c)
                seen.add(fit_key)
        rest = sorted((c for c in mine if c not in first), key=lambda c: (c.seed, c.arm))
        out += [p for p in (first, rest) if p]
    return out


def _past(stop_at: dt.datetime | None) -> bool:
    return stop_at is not None and dt.datetime.now(dt.timezone.utc) >= stop_at


def run(cells: list[Cell], out_dir: Path, jobs: int, stop_at: dt.datetime | None = None,
        max_batches: int | None = None, on_record: Callable[[dict[str, Any]], None] | None = None
        ) -> dict[str, dict[str, Any]]:
    """Run the cells missing from ``out_dir`` (errors are retried), saving after each one; no new
    cell starts after ``stop_at``. ``max_batches`` measures costs instead: records are handed to
    ``on_record`` and not saved as results."""
    records = {} if max_batches else load_results(out_dir)
    todo = [c for c in cells if c.key() not in records or records[c.key()]["status"] == "error"]
    log.info("%d cells, %d done, %d to run on %d worker(s)", len(cells), len(cells) - len(todo), len(todo), jobs)
    cache = str(out_dir / "cache")
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
        for phase in phases(todo):
            queue, running = list(phase), set()
            while queue or running:
                while queue and len(running) < jobs and not _past(stop_at):
                    running.add(pool.submit(_run, asdict(queue.pop(0)), cache, max_batches))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    record = future.result()
                    records[record["key"]] = record
                    if max_batches:
                        on_record(record)
                    else:
                        save_results(out_dir, records, record["claim"])
                    what = (f"test={record['test']:.4f} val={record['val']:.4f} epochs={len(record['val_history'])}"
                            if record["status"] == "ok" else record.get("reason", record["status"]))
                    log.info("[%.0fs] %s %s: %s", time.perf_counter() - start, record["key"], record["status"], what)
            if _past(stop_at):
                log.info("stop time reached: no new cells started")
                break
    return records


def measure(size: str, claims: list[str], out_dir: Path, jobs: int) -> list[dict[str, Any]]:
    """CPU seconds of one epoch (``MEASURE_BATCHES`` batches timed, times the batches of an epoch)
    and of building each table (post hoc fits), per (claim, dataset, arm); written to plan.json."""
    firsts = {}
    for claim in claims:
        for cell in EXPERIMENTS[claim].cells(size):
            firsts.setdefault((cell.claim, cell.dataset, cell.arm), cell)
    path = out_dir / "plan.json"

    def entry(cell: Cell, record: dict[str, Any]) -> dict[str, Any]:
        claim, dataset, arm = cell.claim, cell.dataset, cell.arm
        cfg = settings(claim, dataset, size)
        count = sum(1 for c in EXPERIMENTS[claim].cells(size) if c.dataset == dataset and c.arm == arm)
        epochs = cfg["finetune_epochs"] if claim == "distill" and arm != "dense" else cfg["epochs"]
        epoch = record.get("batch_cpu_seconds", 0.0) * record.get("batches_per_epoch", 0)
        return {"claim": claim, "dataset": dataset, "arm": arm, "cells": count, "max_epochs": epochs,
                "epoch_cpu_seconds": round(epoch, 2), "build_cpu_seconds": record.get("build_cpu_seconds"),
                "status": record.get("status", "missing"), "reason": record.get("reason"),
                # An upper bound: every cell runs to its epoch limit (early stopping ends most sooner).
                "planned_cpu_seconds": round(count * epochs * epoch, 1), "settings": _jsonable(cfg)}

    def save(record: dict[str, Any]) -> None:  # after every measurement: a run cut short keeps them
        cell = next(c for c in firsts.values() if c.key() == record["key"])
        old = json.loads(path.read_text()) if path.exists() else []
        keep = [p for p in old if (p["claim"], p["dataset"], p["arm"]) != (cell.claim, cell.dataset, cell.arm)]
        write_json(path, sorted(keep + [entry(cell, record)], key=_plan_order))

    run(list(firsts.values()), out_dir, jobs, max_batches=MEASURE_BATCHES, on_record=save)
    return json.loads(path.read_text()) if path.exists() else []


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    """Settings as plan.json stores them (tuples as lists), so a report can tell stale entries."""
    return json.loads(json.dumps(cfg))


def _plan_order(entry: dict[str, Any]) -> tuple[int, str, str]:
    return ORDER.index(entry["claim"]), entry["dataset"], entry["arm"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--claims", help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/claims[-<size>])")
    parser.add_argument("--fresh", action="store_true", help="rerun every cell, ignoring saved results (CI)")
    parser.add_argument("--measure", action="store_true", help="measure one epoch of each cell kind (plan.json)")
    parser.add_argument("--stop-at", help="UTC time HH:MM after which no new cell starts")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    claims = args.claims.split(",") if args.claims else ORDER
    unknown = [c for c in claims if c not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown claim(s) {unknown}; choose from {', '.join(ORDER)}")
    out_dir = args.out or out_dir_for(args.size)
    stop_at = None
    if args.stop_at:
        hour, minute = (int(x) for x in args.stop_at.split(":"))
        stop_at = dt.datetime.now(dt.timezone.utc).replace(hour=hour, minute=minute, second=0, microsecond=0)
    if args.fresh:
        for claim in claims:
            (out_dir / f"{claim}.json").unlink(missing_ok=True)
    if args.measure:
        measure(args.size, claims, out_dir, args.jobs)
    else:
        cells = [c for claim in claims for c in EXPERIMENTS[claim].cells(args.size)]
        records = run(cells, out_dir, args.jobs, stop_at)
        errors = [r for r in records.values() if r["status"] == "error"]
        for record in errors:
            print(f"error in {record['key']}: {record['reason']}\n{record.get('traceback', '')}", file=sys.stderr)
        if errors:
            return 1
    if not args.no_report:
        from .report import write_report

        write_report(out_dir, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
