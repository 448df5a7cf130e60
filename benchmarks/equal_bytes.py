"""Quality at equal TOTAL bytes: our methods against FAISS's codecs on GloVe 50d and MiniLM's table.

For each table (GloVe 6B 50d, 400,000 x 50; all-MiniLM-L6-v2's token table, 30,522 x 384) and each
ratio (10x, 20x, 40x against fp32), every candidate method is fitted at the largest setting whose
total bytes fit the budget: ours through ``config_for_budget`` (codes, codebooks, scales all counted),
FAISS's PQ, OPQ+PQ, residual (RQ) and LSQ additive quantizers at the setting with the most code bits
per row whose codes (``sa_code_size`` bytes per row, as FAISS stores them) plus fp32 codebooks plus
the OPQ rotation fit the same budget (ties go to the wider code; 2-8 bits per code). PQ (ours and
FAISS's) and RQ are fitted at each code width's largest setting and the best is kept; ``pq-pca`` is
our pq with ``rotation=pca`` (its d x d fp16 basis counted, so fewer code bits).

The best of ours and the best of FAISS's are chosen by relative MSE (the reconstruction objective
every fit minimizes), then compared on it and on the table's own downstream measure:
GloVe: WS353, SimLex-999, analogy (3CosAdd, 30k words), kNN@10 overlap; MiniLM: cosine of
sentence embeddings to the original model's and BBC / RT accuracy of a classifier trained on the
original model's embeddings (benchmarks/minilm.py's protocol, the decoded table swapped in).

Each fit runs in its own process (one thread, ``nice`` inherited) under a wall-clock limit; CPU
seconds of the fit (training plus encoding every row) are reported beside wall seconds, because
the machine is shared. Rows are cached in the JSON: a rerun fits only the missing or failed cells.

    python -m benchmarks.equal_bytes                              # everything (make bench-equal-bytes)
    python -m benchmarks.equal_bytes --tables glove --ratios 20 --methods codes faiss-rq
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = ["glove", "minilm"]
RATIOS = [10.0, 20.0, 40.0]
OURS = ["pq", "pq-pca", "dpq", "codes", "scalar", "lowrank"]
# Rows of ours that are a library method with fields fixed: name -> spec the budget sizes.
FIXED_SPECS = {"pq-pca": "pq:rotation=pca"}
FAISS = ["faiss-pq", "faiss-opq", "faiss-rq", "faiss-lsq"]
FAISS_NBITS = (8, 7, 6, 5, 4, 3, 2)
# Codecs cheap enough to fit at several code widths (the best by relative MSE is kept). LSQ, far slower,
# takes the width chosen for RQ (same byte counts); OPQ the width with the most code bits.
SCANNED_WIDTHS = {"faiss-pq": FAISS_NBITS, "faiss-rq": (8, 6, 4, 2)}
SCAN_SHARE = 0.85  # a scan fits only the widths whose largest setting has this share of the most code bits
TRAIN_ROWS = 65536  # FAISS's own default training subsample for PQ-style codecs; ours fit samples of similar size
# Post hoc fit options per table: the library's default fits (each bounded at <= 120 CPU s up to 50k x 1,024,
# benchmarks/results/fit_grid.md) except where a table's size makes one unaffordable. codes on GloVe's
# 400k rows: the default's start and least-squares rounds already run on a 65,536-row sample, but its four
# polish rounds run over all 400k rows (1,099 CPU s at 20x), so one polish round (about 190 CPU s at 20x).
FIT_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {"glove": {"codes": {"polish": 1}}}
# Our budget rules may choose settings whose default fit takes up to this many times the library's default
# bound (config_for_budget's fit_time; only codes' number of books depends on it), the order of the CPU time
# FAISS's RQ, OPQ and LSQ take on these tables: at 1.0 codes leaves a third of GloVe's 10x budget unused.
FIT_TIME = 4.0


# -- tables and fits (run in the cell's own process) -----------------------------------------------
def load_weight(table: str) -> tuple[torch.Tensor, list[str] | None]:
    from embcompress.data import load_table

    if table == "glove":
        loaded = load_table("glove-6b-50d")
    elif table == "minilm":
        from embcompress import hf

        loaded = load_table(hf.minilm_path(), key=f"{hf.WORD_EMBEDDINGS}.weight")
    else:
        raise SystemExit(f"unknown table {table!r}; use one of: {', '.join(TABLES)}")
    return loaded.weight.float(), loaded.words


def faiss_factory(kind: str, rows: int, dim: int, budget: int,
                  widths: tuple[int, ...] = FAISS_NBITS) -> tuple[str, int, float] | None:
    """(factory, total bytes, code bits per row) of the FAISS codec of ``kind`` with the most code bits
    per row whose total bytes fit ``budget`` (codes stored as FAISS does: whole bytes per row)."""
    best: tuple[float, int, str, int] | None = None
    for nbits in widths:
        for books in range(1, 8 * dim + 1):
            if kind in ("faiss-pq", "faiss-opq") and (dim % books or books > dim):
                continue
            codes = rows * math.ceil(books * nbits / 8)
            # PQ: books x 2^nbits centroids of width dim / books; RQ, LSQ: one full-width codebook per stage
            tables = 4 * (1 << nbits) * dim * (1 if kind in ("faiss-pq", "faiss-opq") else books)
            total = codes + tables + (4 * dim * dim if kind == "faiss-opq" else 0)
            if total > budget:
                if kind in ("faiss-rq", "faiss-lsq"):
                    break  # totals grow with books
                continue
            factory = {"faiss-pq": f"PQ{books}x{nbits}", "faiss-opq": f"OPQ{books},PQ{books}x{nbits}",
                       "faiss-rq": f"RQ{books}x{nbits}", "faiss-lsq": f"LSQ{books}x{nbits}"}[kind]
            key = (books * nbits, nbits)
            if best is None or key > best[:2]:
                best = (books * nbits, nbits, factory, total)
    return None if best is None else (best[2], best[3], float(best[0]))


def fit_faiss(kind: str, weight: torch.Tensor, budget: int, width: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The FAISS codec of ``kind`` for the budget: of code width ``width`` if given (bits per code), else
    the one of least relative MSE among the widths scanned for this kind, else the most code bits."""
    rows, dim = weight.shape
    if width < 0:  # no scan: the most code bits
        width = 0
    elif kind in SCANNED_WIDTHS and not width:  # each width's largest codec, the best by relative MSE
        choices = [c for nbits in SCANNED_WIDTHS[kind] if (c := faiss_factory(kind, rows, dim, budget, (nbits,)))]
        most = max((c[2] for c in choices), default=0)
        choices = [c for c in choices if c[2] >= SCAN_SHARE * most]
        return best_fit([lambda c=c: faiss_codec(weight, *c) for c in choices], weight)
    choice = faiss_factory(kind, rows, dim, budget, (width,) if width else FAISS_NBITS)
    if choice is None:
        raise ValueError("no codec of this kind fits the budget")
    return faiss_codec(weight, *choice)


def best_fit(fits: list, weight: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    """Run every fit; keep the one of least relative MSE (the others' specs and errors in "tried")."""
    if not fits:
        raise ValueError("no setting fits the budget")
    done = [fit() for fit in fits]
    errors = [relative_mse(torch.from_numpy(approx), weight) for approx, _ in done]
    approx, meta = done[int(np.argmin(errors))]
    meta["tried"] = {m["spec"]: round(e, 5) for (_, m), e in zip(done, errors)}
    return approx, meta


def relative_mse(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx - weight).pow(2).sum() / (weight - weight.mean(0)).pow(2).sum())


def faiss_codec(weight: torch.Tensor, factory: str, total: int, bits: float,
                seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Train and apply one FAISS codec; ``seed`` (None: FAISS's default clustering seed, training draw 0)
    sets the training draw and the PQ / RQ clustering seed (benchmarks/equal_bytes_seeds.py)."""
    import faiss

    faiss.omp_set_num_threads(1)
    rows, dim = weight.shape
    x = np.ascontiguousarray(weight.numpy())
    train = x[np.random.default_rng(0 if seed is None else seed).permutation(rows)[:TRAIN_ROWS]]
    index = faiss.index_factory(dim, factory)
    if seed is not None:
        quantizer = faiss.downcast_index(index.index if hasattr(index, "chain") else index)
        for part in ("pq", "rq"):
            if hasattr(quantizer, part):
                getattr(quantizer, part).cp.seed = seed
    index.train(train)
    codes = index.sa_encode(x)
    if codes.shape[1] != math.ceil(bits / 8):
        raise RuntimeError(f"{factory}: FAISS stores {codes.shape[1]} bytes per row, counted {math.ceil(bits / 8)}")
    return index.sa_decode(codes), {"spec": factory, "bytes": total, "code_bits": bits}


def fit_ours(method: str, table: str, weight: torch.Tensor, budget: int,
             scan: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    from embcompress.bitpack import bits_for
    from embcompress.budget import config_for_budget
    from embcompress.config import SpecError

    rows, dim = weight.shape
    spec = FIXED_SPECS.get(method, method)
    if method in ("pq", "pq-pca") and scan:  # every code width's largest PQ within the budget, the best by rel MSE
        configs = []
        for codewords in (256, 128, 64, 32, 16, 8, 4, 2):
            try:
                fixed = f"{spec}{',' if ':' in spec else ':'}codewords={codewords}"
                configs.append(config_for_budget(fixed, rows, dim, bytes=budget, fit_time=FIT_TIME))
            except SpecError:
                continue
        most = max((c.groups * bits_for(c.codewords) for c in configs), default=0)
        configs = [c for c in configs if c.groups * bits_for(c.codewords) >= SCAN_SHARE * most]
        return best_fit([lambda c=c: fit_config(c, table, weight) for c in configs], weight)
    return fit_config(config_for_budget(spec, rows, dim, bytes=budget, fit_time=FIT_TIME), table, weight)


def fit_config(config: Any, table: str, weight: torch.Tensor,
               seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit ``config`` with the table's FIT_OPTIONS; ``seed`` (None: drawn from torch's generator) also
    seeds the fit where its method takes a seed (benchmarks/equal_bytes_seeds.py)."""
    import embcompress

    rows = weight.shape[0]
    method = embcompress.get_method(config.method)
    options = dict(FIT_OPTIONS.get(table, {}).get(config.method, {}))
    if seed is not None:
        torch.manual_seed(seed)
        if "seed" in {f.name for f in dataclasses.fields(method.Fit)}:
            options["seed"] = seed
    module = method.from_pretrained(weight, config, fit=options, progress=False)
    frozen = module.export()
    stored = frozen.stored_tensors()
    per_row = sum(t.numel() * t.element_size() for name, t in stored.items()
                  if name in ("packed", "scale", "bias", "codes", "values", "minimum", "scales", "offsets"))
    return frozen.materialize().numpy(), {"spec": module.spec, "bytes": frozen.num_bytes(),
                                          "code_bits": 8 * per_row / rows, "fit": options}


def run_cell(table: str, ratio: float, method: str, out: Path, width: int = 0) -> None:
    torch.set_num_threads(1)
    weight, _ = load_weight(table)
    rows, dim = weight.shape
    budget = int(rows * dim * 4 / ratio)
    torch.manual_seed(0)
    wall, cpu = time.perf_counter(), time.process_time()
    if method.startswith("faiss-"):
        approx, meta = fit_faiss(method, weight, budget, width)
    else:
        approx, meta = fit_ours(method, table, weight, budget, scan=width >= 0)
    meta.update(seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu, budget=budget)
    np.save(out / "approx.npy", np.ascontiguousarray(approx, dtype=np.float32))
    (out / "meta.json").write_text(json.dumps(meta))


# -- downstream measures (the parent process) ------------------------------------------------------
class GloveScores:
    def __init__(self) -> None:
        self.weight, self.words = load_weight("glove")

    def __call__(self, approx: torch.Tensor) -> dict[str, float]:
        from embcompress.evaluate import quality_report

        return quality_report(approx, self.weight, self.words, sample=1000, analogy=True)


class MiniLMScores:
    """benchmarks/minilm.py's evaluation (same splits and sizes), with the decoded table swapped in."""

    def __init__(self, seed: int = 0) -> None:
        from benchmarks import minilm
        from embcompress import hf

        self.model, tokenizer = hf.load_minilm()
        self.table = self.model.get_submodule(hf.WORD_EMBEDDINGS)
        self.weight = self.table.weight.detach().clone()
        bbc_train, bbc_test, _ = minilm.split_corpus(minilm.bbc_articles(), 450, 150, seed)
        rt_train, rt_test, _ = minilm.split_corpus(minilm.rt_snippets(), 1000, 350, seed)
        corpora = {"bbc": {"train": minilm.by_length(bbc_train), "test": minilm.by_length(bbc_test)},
                   "rt": {"train": minilm.by_length(rt_train), "test": minilm.by_length(rt_test)}}
        self.evaluator = minilm.Evaluator(self.model, tokenizer, corpora, max_length=32, batch_size=16)
        self.original = self.evaluator.score(None)

    def __call__(self, approx: torch.Tensor) -> dict[str, float]:
        from embcompress.evaluate import reconstruction_metrics

        report = reconstruction_metrics(approx, self.weight, sample=1000)
        with torch.no_grad():
            self.table.weight.copy_(approx)
            try:
                report.update(self.evaluator.score(self.model))
            finally:
                self.table.weight.copy_(self.weight)
        return report


def children_cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def fit_in_process(table: str, ratio: float, method: str, timeout: float, width: int = 0) -> tuple[dict[str, Any], Any]:
    """Run one fit in a child process; (meta or error, approx table or None)."""
    with tempfile.TemporaryDirectory(prefix="equal-bytes-") as folder:
        command = [sys.executable, "-m", "benchmarks.equal_bytes", "--cell", table, str(ratio), method, folder,
                   "--width", str(width)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBCOMPRESS_QUIET": "1"}
        before = children_cpu_seconds()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:  # run() kills and reaps the child, so its CPU time is counted
            return {"error": f"cut after {timeout:.0f} s wall ({children_cpu_seconds() - before:.0f} CPU s)"}, None
        meta_path = Path(folder) / "meta.json"
        if done.returncode != 0 or not meta_path.is_file():
            lines = done.stderr.strip().splitlines()
            return {"error": (lines[-1] if lines else f"exit code {done.returncode}")[:200]}, None
        return json.loads(meta_path.read_text()), torch.from_numpy(np.load(Path(folder) / "approx.npy"))


# -- report ----------------------------------------------------------------------------------------
DOWNSTREAM = {"glove": [("WS353", "ws353"), ("SimLex", "simlex"), ("analogy", "analogy"), ("kNN@10", "knn_overlap@10")],
              "minilm": [("cosine", "cosine"), ("BBC acc", "accuracy_bbc"), ("RT acc", "accuracy_rt")]}
SHAPE_FIELDS = {"groups", "codewords", "books", "bits", "block", "offset", "rank", "variant"}
TITLES = {"glove": "GloVe 6B 50d (400,000 x 50)", "minilm": "all-MiniLM-L6-v2 token table (30,522 x 384)"}


def best(rows: list[dict[str, Any]], faiss: bool) -> dict[str, Any] | None:
    side = [r for r in rows if "rel_mse" in r and r["method"].startswith("faiss-") == faiss]
    return min(side, key=lambda r: r["rel_mse"]) if side else None


def summary(results: list[dict[str, Any]], references: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per table and ratio: our best against FAISS's best (both chosen by relative MSE)."""
    out = []
    for table in TABLES:
        for ratio in sorted({r["ratio"] for r in results if r["table"] == table}):
            rows = [r for r in results if r["table"] == table and r["ratio"] == ratio]
            ours, theirs = best(rows, False), best(rows, True)
            if ours is None or theirs is None:
                continue
            entry = {"table": table, "ratio": ratio, "ours": ours["method"], "ours_spec": ours["spec"],
                     "faiss": theirs["method"], "faiss_spec": theirs["spec"], "ours_bytes": ours["bytes"],
                     "faiss_bytes": theirs["bytes"], "ours_rel_mse": ours["rel_mse"],
                     "faiss_rel_mse": theirs["rel_mse"],
                     # > 0: our error is that share lower than FAISS's
                     "rel_mse_reduction": 1 - ours["rel_mse"] / theirs["rel_mse"],
                     "ours_cpu_seconds": ours["cpu_seconds"], "faiss_cpu_seconds": theirs["cpu_seconds"]}
            for _, key in DOWNSTREAM[table]:
                entry[f"ours_{key}"], entry[f"faiss_{key}"] = ours.get(key), theirs.get(key)
                if ours.get(key) is not None and theirs.get(key) is not None:
                    entry[f"delta_{key}"] = ours[key] - theirs[key]
            out.append(entry)
    return out


def markdown(results: list[dict[str, Any]], references: dict[str, dict[str, float]], setup: dict[str, Any]) -> str:
    lines = ["# Quality at equal total bytes: ours vs FAISS (benchmarks/equal_bytes.py)", "",
             "Budgets are TOTAL bytes against fp32 (codes + codebooks + scales + rotations). FAISS codecs: the "
             "setting with the most code bits per row within the budget (codes as FAISS stores them, whole bytes "
             "per row; fp32 codebooks; OPQ's d x d rotation). Best of each side chosen by relative MSE. Every fit "
             f"in its own 1-thread process (CPU s = fit + encoding every row); FAISS trains on {TRAIN_ROWS:,} rows. "
             f"Our fit options: {json.dumps(FIT_OPTIONS)} (else the library's defaults); our budget rules may "
             f"choose settings whose default fit takes up to {FIT_TIME:g}x the library's default bound "
             "(`config_for_budget(fit_time=...)`; only codes' books depend on it). Load average at start "
             f"{setup.get('load', '-')}.", "",
             *([f"Kept from earlier runs with other fit options: {stale}.", ""]
               if (stale := stale_fits(results)) else []),
             *([f"Cut from this run: {setup['cut']}", ""] if setup.get("cut") else []),
             "## Summary: our best vs FAISS's best", "",
             "| table | ratio | ours | FAISS | bytes (ours / FAISS) | rel MSE (ours / FAISS) | error reduction | "
             "downstream (ours / FAISS) | fit CPU s (ours / FAISS) |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary(results, references):
        down = "; ".join(f"{name} {s[f'ours_{key}']:.3f} / {s[f'faiss_{key}']:.3f}"
                         for name, key in DOWNSTREAM[s["table"]] if s.get(f"ours_{key}") is not None
                         and s.get(f"faiss_{key}") is not None)
        lines.append(f"| {s['table']} | {s['ratio']:g}x | `{short_spec(s['ours_spec'])}` | `{s['faiss_spec']}` | "
                     f"{s['ours_bytes']:,} / {s['faiss_bytes']:,} | "
                     f"{s['ours_rel_mse']:.4f} / {s['faiss_rel_mse']:.4f} | "
                     f"{100 * s['rel_mse_reduction']:+.1f}% | {down} | {s['ours_cpu_seconds']:.0f} / "
                     f"{s['faiss_cpu_seconds']:.0f} |")
    lines += ["", "Error reduction = 1 - (our rel MSE / FAISS's): positive where we win.", "",
              f"Where FAISS's best is ahead of ours: {faiss_ahead(summary(results, references))}.", ""]
    for table in TABLES:
        rows = [r for r in results if r["table"] == table]
        if not rows:
            continue
        ref = references.get(table, {})
        lines += [f"## {TITLES[table]}", "", "Uncompressed: " + ", ".join(
            f"{name} {ref[key]:.3f}" for name, key in DOWNSTREAM[table] if key in ref) + ".", "",
            "| ratio | method | spec | bytes | ratio got | code bits/row | rel MSE | "
            + " | ".join(name for name, _ in DOWNSTREAM[table]) + " | CPU s | wall s |",
            "|---" * (9 + len(DOWNSTREAM[table])) + "|"]
        for r in sorted(rows, key=lambda r: (r["ratio"], r["method"].startswith("faiss"), r.get("rel_mse", 9))):
            if "error" in r:
                lines.append(f"| {r['ratio']:g}x | {r['method']} | {r['error'].split('Error: ')[-1][:90]} |"
                             + " - |" * (7 + len(DOWNSTREAM[table])))
                continue
            down = " | ".join(f"{r[key]:.3f}" if key in r else "-" for _, key in DOWNSTREAM[table])
            lines.append(f"| {r['ratio']:g}x | {r['method']} | `{short_spec(r['spec'])}` | {r['bytes']:,} | "
                         f"{r['dense_bytes'] / r['bytes']:.1f}x | {r['code_bits']:.0f} | {r['rel_mse']:.4f} | {down} | "
                         f"{r['cpu_seconds']:.0f} | {r['seconds']:.0f} |")
        tried = [f"{r['ratio']:g}x {r['method']}: " + ", ".join(f"{spec} {err:.4f}" for spec, err in r["tried"].items())
                 for r in rows if r.get("tried")]
        lines += ["", "Settings tried (relative MSE; the least kept): " + "; ".join(tried) + "." if tried else "", ""]
    return "\n".join(lines)


def faiss_ahead(entries: list[dict[str, Any]]) -> str:
    """Every (table, ratio, measure) of the summary where FAISS's best beats ours (all measures: higher is
    better, but relative MSE), or "nowhere"."""
    ahead = []
    for s in entries:
        where = f"{s['table']} {s['ratio']:g}x"
        if s["rel_mse_reduction"] < 0:
            ahead.append(f"{where} rel MSE {s['faiss_rel_mse']:.4f} vs ours {s['ours_rel_mse']:.4f}")
        ahead += [f"{where} {name} {s[f'faiss_{key}']:.3f} vs ours {s[f'ours_{key}']:.3f}"
                  for name, key in DOWNSTREAM[s["table"]] if s.get(f"delta_{key}", 0) < 0]
    return "; ".join(ahead) or "nowhere"


def stale_fits(results: list[dict[str, Any]]) -> str:
    """Our cached rows whose fit options differ from today's FIT_OPTIONS (named with the options they ran)."""
    import embcompress

    def library(row: str) -> str:  # "pq-pca" -> "pq"
        return embcompress.parse_spec(FIXED_SPECS.get(row, row)).method

    def settings(row: str, options: dict[str, Any]) -> Any:
        return embcompress.get_method(library(row)).Fit(**options)  # defaults filled in: equal settings compare equal

    return "; ".join(f"{r['table']} {r['ratio']:g}x {r['method']} {json.dumps(r['fit'])}" for r in results
                     if "fit" in r and settings(r["method"], r["fit"])
                     != settings(r["method"], FIT_OPTIONS.get(r["table"], {}).get(library(r["method"]), {})))


def short_spec(spec: str) -> str:
    """The spec's shape fields (and a float16 codebook), without the training-only defaults."""
    method, _, fields = spec.partition(":")
    keep = [f for f in fields.split(",") if f.split("=")[0] in SHAPE_FIELDS or f in ("codebook_dtype=float16",
                                                                                    "rotation=pca")]
    return f"{method}:{','.join(keep)}" if fields else spec


def write(out: Path, results: list[dict[str, Any]], references: dict[str, dict[str, float]],
          setup: dict[str, Any]) -> None:
    from benchmarks.results_io import write_json, write_text

    payload = {"setup": setup, "references": references, "summary": summary(results, references), "runs": results}
    write_json(out.with_suffix(".json"), payload)
    write_text(out.with_suffix(".md"), markdown(results, references, setup) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES)
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS)
    parser.add_argument("--methods", nargs="+", default=OURS + FAISS)
    parser.add_argument("--timeout", type=float, default=900.0, help="wall seconds per fit before it is cut")
    parser.add_argument("--fresh", action="store_true", help="refit the cells asked for even if cached")
    parser.add_argument("--out", type=Path, default=RESULTS / "equal_bytes")
    parser.add_argument("--cut", default=None, help="record cells left out of this run and why (in the report)")
    parser.add_argument("--report", action="store_true", help="rewrite the report from the JSON, fitting nothing")
    parser.add_argument("--no-scan", action="store_true",
                        help="fit PQ and RQ at one setting each (ours: the budget rule's; FAISS: the most code bits)")
    parser.add_argument("--cell", nargs=4, metavar=("TABLE", "RATIO", "METHOD", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # A stopped run (SIGTERM) unwinds, so the fit's child is killed and its temporary folder removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.cell:
        run_cell(args.cell[0], float(args.cell[1]), args.cell[2], Path(args.cell[3]), args.width)
        return 0
    json_path = args.out.with_suffix(".json")
    saved = json.loads(json_path.read_text()) if json_path.is_file() else {}
    results: list[dict[str, Any]] = saved.get("runs", [])
    references: dict[str, dict[str, float]] = saved.get("references", {})
    setup = {**saved.get("setup", {}), "load": round(os.getloadavg()[0], 1), "torch": torch.__version__}
    if args.cut is not None:
        setup["cut"] = args.cut
    if args.report:
        write(args.out, results, references, setup)
        return 0
    for table in args.tables:
        scorer = GloveScores() if table == "glove" else MiniLMScores()
        references[table] = scorer(scorer.weight)
        if table == "minilm":
            references[table].update(scorer.original)
        rows, dim = scorer.weight.shape
        for ratio in args.ratios:
            for method in args.methods:
                key = (table, ratio, method)
                cached = [r for r in results if (r["table"], r["ratio"], r["method"]) == key and "error" not in r]
                if cached and not args.fresh:
                    continue
                rq = [r for r in results if (r["table"], r["ratio"], r["method"]) == (table, ratio, "faiss-rq")
                      and "spec" in r]
                width = int(rq[0]["spec"].split("x")[-1]) if method == "faiss-lsq" and rq else -1 if args.no_scan else 0
                meta, approx = fit_in_process(table, ratio, method, args.timeout, width)
                row: dict[str, Any] = {"table": table, "ratio": ratio, "method": method, **meta,
                                       "dense_bytes": rows * dim * 4, "load": round(os.getloadavg()[0], 1)}
                if approx is not None:
                    row.update(scorer(approx))
                results = [r for r in results if (r["table"], r["ratio"], r["method"]) != key] + [row]
                print(json.dumps({k: v for k, v in row.items() if k != "fit"}), flush=True)
                write(args.out, results, references, setup)
    write(args.out, results, references, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
