"""Post hoc compression of GloVe 6B 50d: every method and baseline at equal total bytes.

Usage:
    python benchmarks/posthoc.py                      # 80 and 40 bits per row, all methods
    python benchmarks/posthoc.py --bits 80 --methods codes dpq --rows 100000
    python benchmarks/posthoc.py --methods codes --no-faiss --update   # re-run rows, keep the others

Budgets count every byte the artifact holds (codes, codebooks, cores, scalars). FAISS codecs
(PQ, OPQ+PQ, residual quantizer) run side by side when faiss-cpu is installed; their totals count
fp32 codebooks the same way. Results: benchmarks/results/posthoc_glove.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from embcompress.cli import format_table
from embcompress.config import SpecError
from embcompress.data import load_table
from embcompress.evaluate import quality_report
from embcompress.posthoc import compress_table

RESULTS = Path(__file__).parent / "results"
METHODS = ["codes", "dpq", "dpq:variant=vq", "tt", "memcom", "distilled", "pq", "lowrank", "qr", "hash",
           "scalar:bits=4"]
COLUMNS = [("method", "method", "{}"), ("spec", "spec", "{}"), ("bytes", "bytes", "{:,}"),
           ("ratio", "ratio", "{:.1f}x"), ("code bits/row", "code_bits", "{:.0f}"),
           ("rel MSE", "rel_mse", "{:.3f}"), ("cosine", "mean_cosine", "{:.3f}"),
           ("kNN@10", "knn_overlap@10", "{:.3f}"), ("WS353", "ws353", "{:.3f}"), ("SimLex", "simlex", "{:.3f}"),
           ("analogy", "analogy", "{:.3f}"), ("fit s", "seconds", "{:.0f}")]


def faiss_rows(table, bits: int) -> list[dict]:
    """FAISS codecs at `bits` code bits per row (8-bit sub-quantizers), if faiss is installed."""
    try:
        import faiss
    except ImportError:
        print("faiss-cpu not installed: skipping the FAISS side-by-side (pip install faiss-cpu)", file=sys.stderr)
        return []
    x = table.weight.numpy()
    rows, dim = x.shape
    books = bits // 8
    codecs = {f"faiss PQ{books}x8": f"PQ{books}x8", f"faiss OPQ+PQ{books}x8": f"OPQ{books},PQ{books}x8",
              f"faiss RQ{books}x8": f"RQ{books}x8"}
    out = []
    for name, factory in codecs.items():
        if "PQ" in factory and dim % books:
            continue
        start = time.perf_counter()
        index = faiss.index_factory(dim, factory)
        sample = np.random.default_rng(0).permutation(rows)[:65536]  # FAISS subsamples PQ training alike
        index.train(np.ascontiguousarray(x[sample]))
        codes = index.sa_encode(x)
        approx = torch.from_numpy(index.sa_decode(codes))
        seconds = time.perf_counter() - start
        code_bytes = codes.nbytes
        extra = 4 * 256 * dim + (4 * dim * dim if factory.startswith("OPQ") else 0)
        if factory.startswith("RQ"):
            extra = 4 * 256 * dim * books  # one full-width codebook per stage
        report = {"method": name, "spec": factory, "bytes": code_bytes + extra, "ratio": 4 * rows * dim / (code_bytes + extra),
                  "code_bits": 8 * code_bytes / rows, "seconds": seconds}
        report.update(quality_report(approx, table.weight, table.words))
        out.append(report)
        print(f"  {name:22s} rel MSE {report['rel_mse']:.3f}  ({seconds:.0f} s)", flush=True)
    return out


def code_bits(result) -> float:
    """Bits per row spent on per-row data (codes, scalars), excluding shared codebooks."""
    stored = result.frozen.stored_tensors()
    per_row = sum(t.numel() * t.element_size() for name, t in stored.items()
                  if name in ("packed", "scale", "bias", "codes", "values"))
    return 8 * per_row / result.frozen.num_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[80, 40])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "posthoc_glove")
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows re-run here (same method and budget) in an existing --out JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = load_table("glove-6b-50d", limit=args.rows)
    rows, dim = table.weight.shape
    results = []
    for bits in args.bits:
        print(f"== {bits} bits per row: {rows * bits // 8:,} bytes for {rows:,} x {dim}", flush=True)
        for spec in args.methods:
            try:
                result = compress_table(table, spec, bits_per_row=bits)
            except SpecError as exc:
                print(f"  {spec:22s} cannot reach this budget: {exc}", flush=True)
                continue
            report = {**result.report, "method": spec, "budget_bits": bits, "code_bits": code_bits(result)}
            results.append(report)
            print(f"  {spec:22s} {report['spec']}: rel MSE {report['rel_mse']:.3f}, WS353 {report.get('ws353', math.nan):.3f} "
                  f"({report['seconds']:.0f} s)", flush=True)
        if not args.no_faiss:
            results.extend({**r, "budget_bits": bits} for r in faiss_rows(table, bits))
    if args.update and args.out.with_suffix(".json").exists():
        rerun = {(r["method"], r["budget_bits"]) for r in results}
        kept = [r for r in json.loads(args.out.with_suffix(".json").read_text())
                if (r["method"], r["budget_bits"]) not in rerun]
        results = _merge_in_order(kept, results)
        args.bits = sorted({r["budget_bits"] for r in results}, reverse=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    lines = [f"# Post hoc compression of GloVe 6B 50d ({rows:,} x {dim})", "",
             "Budgets count every stored byte (codes, codebooks, cores, scalars). Full table: WS353 0.503, "
             "SimLex 0.265, analogy 0.497.", ""]
    for bits in args.bits:
        lines += [f"## {bits} bits per row ({rows * bits // 8:,} bytes)", "",
                  _markdown([r for r in results if r["budget_bits"] == bits]), ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def _merge_in_order(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """Kept rows with the fresh ones in the benchmark's method order (FAISS rows last)."""
    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(kept + fresh, key=lambda r: (-r["budget_bits"], rank.get(r["method"], len(rank))))


def _markdown(rows: list[dict]) -> str:
    text = format_table(rows, COLUMNS).splitlines()
    header, rule, body = text[0], text[1], text[2:]
    return "\n".join(f"| {line} |" for line in [header, rule.replace("-|-", "-|-"), *body])


if __name__ == "__main__":
    main()
