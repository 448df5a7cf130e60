"""Larger than memory, post hoc: compress a 20M x 128 fp32 table (10 GB) on a 24 GB machine.

    python -m benchmarks.stream --dir /work/tmp-scale            # generate (once), compress, report
    python -m benchmarks.stream --dir /tmp/s --rows 400000 --compare-rows 100000 --specs pq:groups=32,codewords=16

The table is synthetic and Zipf-ordered: row i is looked up with frequency ~ 1 / (i + 1), and, as
in trained tables, frequent rows have larger norms (row 0 three times the tail's). Rows are a
mixture of 256 clusters with anisotropic spread, so codebooks have structure to find. It is
written chunk by chunk as a .npy (never held whole). Every compression runs in a child process
under ``/usr/bin/time -v``: its peak RSS is reported twice, as the child reads it (VmHWM, mapped
file pages included) and as the kernel accounts it to the child (``Maximum resident set size``).
The quality check compresses the first ``--compare-rows`` rows both in memory and streamed.
Results: benchmarks/results/stream.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchmarks.results_io import write_json, write_text

RESULTS = Path(__file__).parent / "results"
CLUSTERS = 256


def generate(path: Path, rows: int, dim: int, *, chunk: int = 1 << 20, seed: int = 0) -> None:
    """Write the synthetic Zipf-ordered table to ``path`` (.npy) chunk by chunk, atomically."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)
    spread = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim) * 0.6).astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
            for start in range(0, rows, chunk):
                n = min(chunk, rows - start)
                block = centers[rng.integers(0, CLUSTERS, n)]
                block += rng.standard_normal((n, dim), dtype=np.float32) @ spread
                scale = 1.0 + 2.0 / np.sqrt(1.0 + np.arange(start, start + n, dtype=np.float32) / 1000.0)
                block *= scale[:, None]
                handle.write(block.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def timed_compress(source: Path, spec: str, output: Path, *extra: str) -> dict:
    """`embcompress compress` in a child under /usr/bin/time -v: its JSON report plus the kernel's max RSS.

    ``spec`` may carry CLI options after it ("memcom:buckets=100000 --steps 2")."""
    spec, *options = shlex.split(spec)
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "embcompress.cli", "-q", "compress", str(source),
               "--spec", spec, "-o", str(output), "--json", *options, *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    report["time_max_rss_bytes"] = int(match.group(1)) * 1024 if match else None
    # CPU seconds: on a shared machine, wall time measures the load as much as the code
    cpu = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", done.stderr) for kind in ("User", "System")]
    report["cpu_seconds"] = sum(float(m.group(1)) for m in cpu) if all(cpu) else None
    report["load_average"] = os.getloadavg()[0]
    report["wall_seconds"] = wall
    report["options"] = options
    output.unlink(missing_ok=True)
    return report


def planned(specs: list[str], orders: list[str]) -> set[tuple[str, str]]:
    return {(spec.split(":")[0], order) for spec in specs for order in orders}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="scratch folder for the table (outside the repo)")
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--compare-rows", type=int, default=500_000)
    parser.add_argument("--specs", nargs="+", default=["pq:groups=32,codewords=16"])
    parser.add_argument("--sample-orders", nargs="+", default=["uniform", "frequency"])
    parser.add_argument("--compare-specs", nargs="+", default=None, help="default: --specs")
    parser.add_argument("--skip-large", action="store_true", help="only the in-memory comparison")
    parser.add_argument("--skip-compare", action="store_true",
                        help="only the large table (keeps the comparison of an earlier run's results)")
    parser.add_argument("--out", default="stream", help="results name under benchmarks/results/")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    table = args.dir / f"zipf-{args.rows}x{args.dim}.npy"
    small = args.dir / f"zipf-{args.compare_rows}x{args.dim}.npy"
    results: dict = {"rows": args.rows, "dim": args.dim, "table_bytes": args.rows * args.dim * 4,
                     "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                     "cpus": os.cpu_count(), "large": [], "compare": []}
    previous = RESULTS / f"{args.out}.json"
    if previous.exists():  # a partial rerun keeps the results of the runs it does not repeat
        old = json.loads(previous.read_text())
        results["large"] = [r for r in old.get("large", []) if args.skip_large or
                            (r["spec"].split(":")[0], r["sample_order"]) not in planned(args.specs, args.sample_orders)]
        rerun = {s.split(":")[0] for s in args.compare_specs or args.specs}
        results["compare"] = [r for r in old.get("compare", [])
                              if args.skip_compare or r["spec"].split(":")[0] not in rerun]
    needed = (([] if args.skip_large else [(table, args.rows)])
              + ([] if args.skip_compare else [(small, args.compare_rows)]))
    for path, rows in needed:
        if not path.exists():
            started = time.perf_counter()
            generate(path, rows, args.dim)
            results.setdefault("generate_seconds", {})[path.name] = time.perf_counter() - started
            print(f"generated {path} in {time.perf_counter() - started:.0f} s", flush=True)
    output = args.dir / f"out-{os.getpid()}.emb"  # concurrent runs write apart
    for spec in [] if args.skip_compare else args.compare_specs or args.specs:
        for mode in ("--no-stream", "--stream"):
            report = timed_compress(small, spec, output, mode)
            results["compare"].append(report)
            print(f"{spec} {mode}: rel MSE {report.get('rel_mse', float('nan')):.4f}, "
                  f"max RSS {report['time_max_rss_bytes'] / 2**20:,.0f} MiB, {report['wall_seconds']:.0f} s",
                  flush=True)
    if not args.skip_large:
        for spec in args.specs:
            for order in args.sample_orders:
                report = timed_compress(table, spec, output, "--stream", "--sample-order", order)
                results["large"].append(report)
                print(f"{spec} {order}: rel MSE {report['rel_mse']:.4f} (zipf {report['rel_mse_zipf1']:.4f}), "
                      f"VmHWM {report['peak_rss_bytes'] / 2**20:,.0f} MiB, "
                      f"time -v {report['time_max_rss_bytes'] / 2**20:,.0f} MiB, "
                      f"{report['rows_per_second']:,.0f} rows/s", flush=True)
    write_json(RESULTS / f"{args.out}.json", results, indent=2)
    write_text(RESULTS / f"{args.out}.md", markdown(results))
    print(f"wrote {RESULTS / args.out}.json and .md")
    return 0


def markdown(results: dict) -> str:
    gib = 2**30
    lines = [f"# Streamed post hoc compression: {results['rows']:,} x {results['dim']} fp32 "
             f"({results['table_bytes'] / 1e9:.1f} GB) on a {results['machine_memory_bytes'] / gib:.0f} GiB, "
             f"{results['cpus']}-core machine", ""]
    if results["large"]:
        lines += ["| spec | sample | rel MSE | rel MSE, Zipf(1)-weighted | bytes | ratio | peak RSS (VmHWM) | "
                  "max RSS (time -v) | rows/s | rows per CPU s | fit s | encode s | total s | load |",
                  "|" + "---|" * 14]
        for r in results["large"]:
            cpu = r.get("cpu_seconds")
            per_cpu = f"{r['rows'] / cpu:,.0f}" if cpu else "-"
            load = f"{r['load_average']:.0f}" if r.get("load_average") is not None else "-"
            lines.append(f"| {r['spec']} | {r['sample_order']} {r['sample_rows']:,} | {r['rel_mse']:.4g} | "
                         f"{r['rel_mse_zipf1']:.4f} | {r['bytes']:,} | {r['ratio']:.1f}x | "
                         f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['time_max_rss_bytes'] / gib:.2f} GiB | "
                         f"{r['rows_per_second']:,.0f} | {per_cpu} | {r.get('fit_seconds', 0):.0f} | "
                         f"{r['encode_seconds']:.0f} | {r['seconds']:.0f} | {load} |")
        lines += ["", "rows/s: all rows over the whole run (sample read, fit, encode, write) in wall time on the "
                  "shared machine; rows per CPU s: the same over the process's user + system CPU time; load: "
                  "the 1-minute load average at the end of the run (2 cores).", ""]
    if results["compare"]:
        lines += ["In memory against streamed on a smaller table from the same generator (small enough for both):", "",
                  "| spec | rows | path | rel MSE | mean cosine | max RSS (time -v) | wall s |", "|" + "---|" * 7]
        for r in results["compare"]:
            path = "streamed" if r.get("streamed") else "in memory"
            lines.append(f"| {r['spec']} | {r['rows']:,} | {path} | {r.get('rel_mse', float('nan')):.4g} | "
                         f"{r.get('mean_cosine', float('nan')):.4f} | {r['time_max_rss_bytes'] / gib:.2f} GiB | "
                         f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
