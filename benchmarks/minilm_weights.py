"""What weighting MiniLM's word table by token counts changes, at 10x and 30x (issue 15, part 2).

all-MiniLM-L6-v2's 30522 x 384 word table is compressed post hoc twice per method and ratio: a
plain fit, and a fit with row weights = add-one smoothed token counts (``row_weights=``). The
counts come from a training split of the offline corpora (the BBC News articles and Rotten
Tomatoes snippets that are neither classifier training nor test texts), tokenized with MiniLM's
own tokenizer, untruncated; the scores come from held-out texts (minilm.py's Evaluator: mean
cosine of sentence embeddings to the original model's, and the accuracy of a classifier trained
on the original model's embeddings, on BBC topics and RT sentiment). No distillation here.

Fit options are the same for both variants and sized for 2 shared cores (FIT_OPTIONS: fewer
k-means iterations than the defaults). Writes benchmarks/results/minilm_weights.{json,md}.

    python -m benchmarks.minilm_weights                      # pq dpq codes lowrank at 10x and 30x
    python -m benchmarks.minilm_weights --methods lowrank --ratios 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

import embcompress
from benchmarks.minilm import Evaluator, bbc_articles, by_length, rt_snippets, split_corpus
from embcompress import hf
from embcompress.budget import config_for_budget
from embcompress.planner import weighted_relative_error
from benchmarks.results_io import write_json, write_text

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["pq", "dpq", "codes", "lowrank"]
#: Equal for both variants; cheaper than the defaults so 16 fits of a 30522 x 384 table fit the session
#: (DPQ: the weighted k-means start plus 50 refinement steps on batches drawn by weight).
FIT_OPTIONS = {"pq": {"iters": 8}, "dpq": {"steps": 50, "iters": 6},
               "codes": {"steps": 0, "beam": 1, "rounds": 1, "sample": 8192, "polish": 0}}


def token_counts(tokenizer, texts: list[str], rows: int) -> torch.Tensor:
    """Add-one smoothed counts of every token id the tokenizer gives ``texts`` (special tokens included)."""
    counts = torch.ones(rows)
    for start in range(0, len(texts), 256):
        encoded = tokenizer(texts[start:start + 256], truncation=False, verbose=False)["input_ids"]
        ids = torch.tensor([i for seq in encoded for i in seq], dtype=torch.long)
        counts += torch.bincount(ids, minlength=rows).float()
    return counts


def write(results: dict, out: Path) -> None:
    write_json(out.with_suffix(".json"), results)
    orig, setup = results["original"], results["setup"]
    lines = ["# MiniLM word table: plain vs token-count weighted post hoc fits", "",
             f"Counts: {setup['count_tokens']:,} tokens of {setup['count_texts']:,} training-split texts (BBC + RT, "
             f"MiniLM's tokenizer; {setup['seen_rows']:,} of {setup['rows']:,} rows seen). Scores on held-out texts "
             f"(BBC {setup['texts']['bbc'][1]}, RT {setup['texts']['rt'][1]}); classifiers trained on the original "
             "model's embeddings. Fit options (both variants): " + json.dumps(FIT_OPTIONS) + ".", "",
             "| method | target | spec | ratio | variant | cosine | BBC acc | RT acc | rel MSE | weighted rel MSE | "
             "fit CPU s |", "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| original | 1x | - | 1x | - | 1.0000 | {orig['accuracy_bbc']:.3f} | {orig['accuracy_rt']:.3f} "
             "| - | - | - |"]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target_ratio']:g}x | - | - | {r['variant']} | {r['error']} |||||| ")
            continue
        s = r["scores"]
        lines.append(f"| {r['method']} | {r['target_ratio']:g}x | `{r['spec'].split(':', 1)[1][:40]}` | "
                     f"{r['ratio']:.1f}x | {r['variant']} | {s['cosine']:.4f} | {s['accuracy_bbc']:.3f} | "
                     f"{s['accuracy_rt']:.3f} | {r['rel_mse']:.4f} | {r['weighted_rel_mse']:.4f} | "
                     f"{r['fit_cpu_s']:.0f} |")
    done = {(r["method"], r["target_ratio"]) for r in results["runs"] if r["variant"] == "weighted"}
    missing = [f"{m} {r:g}x" for r in setup.get("ratios", []) for m in setup.get("methods", []) if (m, r) not in done]
    if missing:
        lines += ["", f"Not measured (the run was stopped at the session's end): {', '.join(missing)}."]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[10, 30])
    parser.add_argument("--bbc", nargs=2, type=int, default=[450, 150], metavar=("TRAIN", "TEST"))
    parser.add_argument("--rt", nargs=2, type=int, default=[1000, 350], metavar=("TRAIN", "TEST"))
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "minilm_weights")
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        results["setup"].setdefault("methods", args.methods)
        results["setup"].setdefault("ratios", args.ratios)
        write(results, args.out)
        return 0
    torch.set_num_threads(args.threads)
    teacher, tokenizer = hf.load_minilm()
    bbc_train, bbc_test, bbc_rest = split_corpus(bbc_articles(), *args.bbc, args.seed)
    rt_train, rt_test, rt_rest = split_corpus(rt_snippets(), *args.rt, args.seed)
    corpora = {"bbc": {"train": by_length(bbc_train), "test": by_length(bbc_test)},
               "rt": {"train": by_length(rt_train), "test": by_length(rt_test)}}
    evaluator = Evaluator(teacher, tokenizer, corpora, args.max_length, args.batch_size)
    weight = teacher.get_submodule(hf.WORD_EMBEDDINGS).weight.detach().clone()
    rows, dim = weight.shape
    count_texts = bbc_rest + rt_rest  # the texts neither the classifiers nor the scores see
    random.Random(args.seed).shuffle(count_texts)
    counts = token_counts(tokenizer, count_texts, rows)
    results: dict = {"setup": {"rows": rows, "dim": dim, "texts": {"bbc": [len(bbc_train), len(bbc_test)],
                                                                    "rt": [len(rt_train), len(rt_test)]},
                               "count_texts": len(count_texts), "count_tokens": int(counts.sum() - rows),
                               "seen_rows": int((counts > 1).sum()), "fit_options": FIT_OPTIONS,
                               "threads": args.threads, "load_average": round(os.getloadavg()[0], 1),
                               "methods": args.methods, "ratios": args.ratios},
                     "original": evaluator.score(None), "runs": []}
    print(f"original {results['original']}; counts from {len(count_texts)} texts", flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            config = config_for_budget(method, rows, dim, ratio=ratio)
            for variant in ("plain", "weighted"):
                run = {"method": method, "target_ratio": ratio, "variant": variant, "spec": config.to_spec()}
                results["runs"].append(run)
                student = copy.deepcopy(teacher)
                cpu, wall = time.process_time(), time.perf_counter()
                torch.manual_seed(args.seed)
                report = embcompress.compress_(
                    student, {hf.WORD_EMBEDDINGS: config, "default": "skip"},
                    fit_options={**FIT_OPTIONS.get(method, {}), "progress": False},
                    row_weights={hf.WORD_EMBEDDINGS: counts} if variant == "weighted" else None)
                run.update(fit_cpu_s=time.process_time() - cpu, fit_wall_s=time.perf_counter() - wall,
                           bytes=report.bytes_after, ratio=report.ratio)
                approx = student.get_submodule(hf.WORD_EMBEDDINGS).materialize()
                run.update(rel_mse=weighted_relative_error(approx, weight),
                           weighted_rel_mse=weighted_relative_error(approx, weight, counts),
                           scores=evaluator.score(student))
                print(json.dumps(run), flush=True)
                write(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
