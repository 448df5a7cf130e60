"""Post hoc compression of GloVe 6B 50d: every method and baseline at equal total bytes.

Usage:
    python benchmarks/posthoc.py                      # 80 and 40 bits per row, all methods
    python benchmarks/posthoc.py --bits 80 --methods codes dpq --rows 100000
    python benchmarks/posthoc.py --methods codes --no-faiss --update   # re-run rows, keep the others
    python -m benchmarks.posthoc --fbgemm --no-faiss  # at TorchRec's int8/int4/int2 tables' exact bytes

Budgets count every byte the artifact holds (codes, codebooks, cores, scalars). FAISS codecs
(PQ, OPQ+PQ, residual quantizer) run side by side when faiss-cpu is installed; their totals count
fp32 codebooks the same way. Results: benchmarks/results/posthoc_glove.{json,md}.

With --fbgemm (TorchRec installed; run as a module), the budgets are the bytes of TorchRec's own
row-wise quantized tables (FBGEMM int8 / int4 / int2, fp16 or fp32 scale and bias per row, rows padded
to 16 bytes), which sit beside our methods at those budgets: benchmarks/results/posthoc_glove_fbgemm.*.
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
from benchmarks.results_io import write_json, write_text

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


def fbgemm_rows(table) -> list[dict]:
    """TorchRec's row-wise int8 / int4 / int2 tables of ``table``, quantized by TorchRec (FBGEMM ops) and
    read back through its own lookup, with their stored bytes; [] without TorchRec."""
    try:
        from torchrec import KeyedJaggedTensor

        from benchmarks.perf import build_torchrec_quantized
    except ImportError:
        print("TorchRec not installed: skipping its quantized tables (pip install 'embcompress[torchrec]')",
              file=sys.stderr)
        return []
    weight = table.weight
    rows, dim = weight.shape
    # FBGEMM's int2 rows must fill whole fp16 words (d a multiple of 8): pad with zero columns, counted.
    padded = torch.nn.functional.pad(weight, (0, -dim % 8))
    start = time.perf_counter()
    quantized = build_torchrec_quantized(padded)
    quantize_seconds = (time.perf_counter() - start) / len(quantized)
    out = []
    for name, (module, stored) in quantized.items():
        start = time.perf_counter()
        with torch.no_grad():
            approx = torch.cat([module(KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32)))
                                .values()[:, :dim] for ids in torch.arange(rows).split(65536)])
        report = {"method": name, "spec": f"FBGEMM row-wise, d padded to {padded.shape[1]}", "bytes": stored,
                  "ratio": 4 * rows * dim / stored, "code_bits": 8 * stored / rows,
                  "seconds": quantize_seconds + time.perf_counter() - start}
        report.update(quality_report(approx, weight, table.words))
        out.append(report)
        print(f"  {name:22s} {stored / rows:.0f} B/row: rel MSE {report['rel_mse']:.4f}", flush=True)
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
    parser.add_argument("--fbgemm", action="store_true",
                        help="budgets = the bytes of TorchRec's int8/int4/int2 tables, which join the comparison")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows re-run here (same method and budget) in an existing --out JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    table = load_table("glove-6b-50d", limit=args.rows)
    rows, dim = table.weight.shape
    args.out = args.out or RESULTS / ("posthoc_glove_fbgemm" if args.fbgemm else "posthoc_glove")
    results = []
    if args.fbgemm:
        baselines = fbgemm_rows(table)
        if not baselines:
            return
        args.bits = sorted({round(r["code_bits"]) for r in baselines}, reverse=True)
        results.extend({**r, "budget_bits": round(r["code_bits"])} for r in baselines)
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
    write_json(args.out.with_suffix(".json"), results, indent=2)
    full = quality_report(table.weight, table.weight, table.words, sample=0)  # the uncompressed table's scores
    lines = [f"# Post hoc compression of GloVe 6B 50d ({rows:,} x {dim})", "",
             f"Budgets count every stored byte (codes, codebooks, cores, scalars). Full table: WS353 {full.get('ws353', math.nan):.3f}, "
             f"SimLex {full.get('simlex', math.nan):.3f}, analogy {full.get('analogy', math.nan):.3f}.", ""]
    if args.fbgemm:
        lines += ["Budgets are the stored bytes of TorchRec's row-wise quantized tables (torchrec-int*, quantized "
                  "by TorchRec's FBGEMM ops and read back through its lookup; d = 50 padded to 56 for FBGEMM).", ""]
    for bits in args.bits:
        lines += [f"## {bits} bits per row ({rows * bits // 8:,} bytes)", "",
                  _markdown([r for r in results if r["budget_bits"] == bits]), ""]
    write_text(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


def _merge_in_order(kept: list[dict], fresh: list[dict]) -> list[dict]:
    """Kept rows with the fresh ones in the benchmark's method order (TorchRec's first, FAISS rows last)."""
    rank = {m: i for i, m in enumerate(METHODS)}

    def order(row: dict) -> int:
        return -1 if row["method"].startswith("torchrec-") else rank.get(row["method"], len(rank))
    return sorted(kept + fresh, key=lambda r: (-r["budget_bits"], order(r)))


def _markdown(rows: list[dict]) -> str:
    text = format_table(rows, COLUMNS).splitlines()
    header, rule, body = text[0], text[1], text[2:]
    return "\n".join(f"| {line} |" for line in [header, rule.replace("-|-", "-|-"), *body])


if __name__ == "__main__":
    main()
