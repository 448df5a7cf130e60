"""Seed noise of the equal-bytes comparison: is our best ahead of FAISS's best by more than a refit moves it?

benchmarks/equal_bytes.py fits each setting once (seed 0). Where the two sides land close together, this
refits the two settings it chose, ours and FAISS's, with several seeds each (the k-means starts and the
training sample; FAISS: its clustering seed and its 65,536-row training draw) and reports the mean relative
MSE of each side, the relative error reduction 1 - ours / FAISS's, and a 95% Welch t interval of it (the
two sides' seeds are independent). Reads the chosen specs from benchmarks/results/equal_bytes.json.

    python -m benchmarks.equal_bytes_seeds                         # MiniLM at 10x, 20x, 40x, 5 seeds each
    python -m benchmarks.equal_bytes_seeds --tables glove --ratios 20 40   # the published GloVe rows
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import embcompress
from benchmarks import equal_bytes
from benchmarks.results_io import write_json, write_text


def welch_interval(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    """Relative error reduction 1 - mean(ours) / mean(theirs) and its 95% interval (Welch t on the
    difference of means, divided by FAISS's mean)."""
    from scipy import stats

    diff = theirs.mean() - ours.mean()
    va, vb = ours.var(ddof=1) / len(ours), theirs.var(ddof=1) / len(theirs)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(ours) - 1) + vb ** 2 / (len(theirs) - 1)) if se > 0 else 1.0
    half = float(stats.t.ppf(0.975, dof)) * se
    scale = float(theirs.mean())
    return diff / scale, (diff - half) / scale, (diff + half) / scale


def chosen_rows(results: list[dict[str, Any]], table: str, ratio: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our best row, FAISS's best row) of a cell, by relative MSE, from the equal-bytes results."""
    rows = [r for r in results if r["table"] == table and r["ratio"] == ratio and "rel_mse" in r]
    if not rows:
        raise SystemExit(f"no equal-bytes results for {table} {ratio:g}x; run python -m benchmarks.equal_bytes first")
    ours = min((r for r in rows if not r["method"].startswith("faiss-")), key=lambda r: r["rel_mse"])
    theirs = min((r for r in rows if r["method"].startswith("faiss-")), key=lambda r: r["rel_mse"])
    return ours, theirs


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Seed noise of the equal-bytes comparison (benchmarks/equal_bytes_seeds.py)", "",
             "Each side's chosen setting (benchmarks/results/equal_bytes.md) refitted with every seed; relative "
             "MSE as there. Error reduction = 1 - mean(ours) / mean(FAISS's), positive where we win, with a 95% "
             "Welch t interval (the sides' seeds are independent). An interval containing 0 is a tie at this "
             "many seeds.", "",
             "| table | ratio | ours | FAISS | seeds | rel MSE ours (mean ± sd) | rel MSE FAISS (mean ± sd) | "
             "error reduction [95% CI] | CPU s (ours / FAISS, mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = np.array(r["ours_rel_mse"]), np.array(r["faiss_rel_mse"])
        mid, low, high = welch_interval(ours, theirs)
        lines.append(f"| {r['table']} | {r['ratio']:g}x | `{equal_bytes.short_spec(r['ours'])}` | `{r['faiss']}` | "
                     f"{len(ours)} | {ours.mean():.4f} ± {ours.std(ddof=1):.4f} | "
                     f"{theirs.mean():.4f} ± {theirs.std(ddof=1):.4f} | {mid:+.1%} [{low:+.1%}, {high:+.1%}] | "
                     f"{np.mean(r['ours_cpu']):.0f} / {np.mean(r['faiss_cpu']):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["minilm"], choices=equal_bytes.TABLES)
    parser.add_argument("--ratios", nargs="+", type=float, default=equal_bytes.RATIOS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=equal_bytes.RESULTS / "equal_bytes_seeds")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (an interval needs two fits per side)")
    torch.set_num_threads(1)
    results = json.loads(equal_bytes.RESULTS.joinpath("equal_bytes.json").read_text())["runs"]
    json_path = args.out.with_suffix(".json")
    rows: list[dict[str, Any]] = json.loads(json_path.read_text()) if json_path.is_file() else []
    for table in args.tables:
        weight, _ = equal_bytes.load_weight(table)
        for ratio in args.ratios:
            ours, theirs = chosen_rows(results, table, ratio)
            config = embcompress.parse_spec(ours["spec"])
            row: dict[str, Any] = {"table": table, "ratio": ratio, "ours": ours["spec"], "faiss": theirs["spec"],
                                   "ours_rel_mse": [], "faiss_rel_mse": [], "ours_cpu": [], "faiss_cpu": []}
            for seed in range(args.seeds):
                for side in ("ours", "faiss"):
                    cpu = time.process_time()
                    approx, _ = (equal_bytes.fit_config(config, table, weight, seed) if side == "ours" else
                                 equal_bytes.faiss_codec(weight, theirs["spec"], theirs["bytes"], theirs["code_bits"],
                                                         seed))
                    row[f"{side}_cpu"].append(round(time.process_time() - cpu, 1))
                    row[f"{side}_rel_mse"].append(equal_bytes.relative_mse(torch.from_numpy(approx), weight))
                print(json.dumps({k: row[k] for k in ("table", "ratio", "ours_rel_mse", "faiss_rel_mse")}), flush=True)
            rows = [r for r in rows if (r["table"], r["ratio"]) != (table, ratio)] + [row]
            write_json(json_path, rows)
            write_text(args.out.with_suffix(".md"), markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
