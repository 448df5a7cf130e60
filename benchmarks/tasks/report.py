"""Turn task-benchmark JSON records into a Markdown report and quality-versus-bytes plots.

    python -m benchmarks.tasks.report benchmarks/results/tasks-quick

Per task: one table (method, resolved spec, exact bytes, ratio, metric mean +- std over seeds,
change against the dense reference) and one PNG (log-scale bytes). Then each paper claim of
issue 5 with a plain verdict computed from the records.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASK_TITLES = {
    "sentiment": "Sentiment: Rotten Tomatoes, GloVe-initialized CNN (accuracy)",
    "topic": "Topic: BBC News, bag of embeddings (accuracy)",
    "lm": "Language model: BBC + Lee + Wikipedia, word LSTM (test perplexity, lower is better)",
    "rec": "Recommendation: MovieLens-100K, MF + BPR, leave-last-out (nDCG@10 over all items)",
}
HIGHER_IS_BETTER = {"accuracy": True, "perplexity": False, "ndcg@10": True}
ACCURACY_TOLERANCE = 0.005  # "no / negligible loss" on accuracy: within half a point ...
PERPLEXITY_TOLERANCE = 0.02  # ... and within 2% relative perplexity


@dataclass
class Row:
    task: str
    procedure: str
    label: str
    method: str
    target: float | None
    spec: str
    bytes: float
    ratio: float
    metric: str
    scores: list[float]
    extra: dict[str, list[float]]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


def aggregate(records: dict[str, dict[str, Any]]) -> tuple[list[Row], list[dict[str, Any]]]:
    """Rows (one per task x procedure x choice, seeds pooled) and the records that did not run."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    skipped = []
    for record in records.values():
        if record["status"] != "ok":
            skipped.append(record)
            continue
        groups.setdefault((record["task"], record["procedure"], record["label"]), []).append(record)
    rows = []
    for (task, procedure, label), items in sorted(groups.items()):
        first = items[0]
        specs = "; ".join(f"{name}: {t['spec']}" if len(first["tables"]) > 1 else t["spec"]
                          for name, t in first["tables"].items())
        extra: dict[str, list[float]] = {}
        for item in items:
            for key, value in item["test"].items():
                extra.setdefault(key, []).append(value)
        rows.append(Row(task, procedure, label, first["method"], first.get("target_ratio"), specs,
                        statistics.fmean(i["bytes"] for i in items), statistics.fmean(i["ratio"] for i in items),
                        first["metric"], [i["score"] for i in items], extra))
    # The same resolved spec reached from two targets is one configuration: keep the first.
    unique, seen = [], set()
    for row in sorted(rows, key=lambda r: (r.task, r.procedure, r.method, r.target or 0)):
        key = (row.task, row.procedure, row.spec)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique, skipped


def _reference(rows: list[Row], task: str) -> Row | None:
    return next((r for r in rows if r.task == task and r.method == "full"), None)


def _change(row: Row, ref: Row | None) -> str:
    if ref is None:
        return ""
    if row.metric == "accuracy":
        return f"{100 * (row.mean - ref.mean):+.1f} pt"
    return f"{100 * (row.mean / ref.mean - 1):+.1f}%"


def _fmt(value: float, metric: str) -> str:
    return f"{100 * value:.1f}" if metric == "accuracy" else (f"{value:.1f}" if metric == "perplexity" else f"{value:.4f}")


def _bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else (f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{n:.0f} B")


def task_table(rows: list[Row], task: str, procedure: str = "scratch") -> str:
    ref = _reference(rows, task)
    chosen = sorted((r for r in rows if r.task == task and r.procedure == procedure),
                    key=lambda r: (r.method != "full", r.method, -r.bytes))
    if not chosen:
        return "_no results_\n"
    metric = chosen[0].metric
    unit = " (%)" if metric == "accuracy" else ""
    extra_key = "hr@10" if metric == "ndcg@10" else None
    head = f"| method | target | spec | bytes | ratio | {metric}{unit} mean ± std | vs full | seeds |"
    if extra_key:
        head += " HR@10 |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in chosen:
        target = f"{r.target:g}x" if r.target else "-"
        line = (f"| {r.method} | {target} | `{r.spec}` | {int(round(r.bytes)):,} ({_bytes(r.bytes)}) | {r.ratio:.1f}x | "
                f"{_fmt(r.mean, metric)} ± {_fmt(r.std, metric)} | {_change(r, ref) if r.method != 'full' else 'ref'} | "
                f"{len(r.scores)} |")
        if extra_key:
            line += f" {statistics.fmean(r.extra[extra_key]):.4f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_task(rows: list[Row], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.task == task]
    if not chosen:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = _reference(rows, task)
    scale = 100.0 if chosen[0].metric == "accuracy" else 1.0
    if ref is not None:
        ax.axhline(ref.mean * scale, color="black", linestyle="--", linewidth=1, label=f"full ({_bytes(ref.bytes)})")
    series: dict[tuple[str, str], list[Row]] = {}
    for r in chosen:
        if r.method != "full":
            series.setdefault((r.method, r.procedure), []).append(r)
    for (method, procedure), items in sorted(series.items()):
        items.sort(key=lambda r: r.bytes)
        label = method if procedure == "scratch" else f"{method} (two-stage)"
        ax.errorbar([r.bytes for r in items], [r.mean * scale for r in items], yerr=[r.std * scale for r in items],
                    marker="o" if procedure == "scratch" else "s", markersize=4, capsize=2, label=label,
                    linestyle="-" if procedure == "scratch" else ":")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of the embedding table(s), log scale")
    ax.set_ylabel(chosen[0].metric + (" (%)" if scale == 100 else ""))
    if chosen[0].metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(TASK_TITLES.get(task, task), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- claims ------------------------------------------------------------------------------------

def _loss(row: Row, ref: Row) -> float:
    """Quality lost against the reference, positive = worse (accuracy points, or relative)."""
    if HIGHER_IS_BETTER[row.metric]:
        return (ref.mean - row.mean) if row.metric == "accuracy" else (ref.mean - row.mean) / ref.mean
    return row.mean / ref.mean - 1


def _loss_text(row: Row, ref: Row) -> str:
    loss = _loss(row, ref)
    if row.metric == "accuracy":
        return f"{100 * loss:.1f} points"
    return f"{100 * loss:.1f}% relative"


def _tolerance(metric: str, ref: Row) -> float:
    if metric == "accuracy":
        return max(ACCURACY_TOLERANCE, ref.std)
    return PERPLEXITY_TOLERANCE if metric == "perplexity" else 0.0


def _best_within(rows: list[Row], task: str, method: str, min_ratio: float, procedure: str = "scratch") -> Row | None:
    """The best-scoring row of a method at or above a ratio."""
    cands = [r for r in rows if r.task == task and r.method == method and r.procedure == procedure and r.ratio >= min_ratio]
    if not cands:
        return None
    return max(cands, key=lambda r: r.mean if HIGHER_IS_BETTER[r.metric] else -r.mean)


def _largest_ok(rows: list[Row], task: str, method: str, ref: Row, tol: float) -> str:
    ok = [r for r in rows if r.task == task and r.method == method and r.procedure == "scratch" and _loss(r, ref) <= tol]
    return f"{max(r.ratio for r in ok):.1f}x" if ok else "none of the ratios run"


def _no_loss_claim(rows: list[Row], task: str, method: str, min_ratio: float, tol: float | None,
                   what: str, closing: str) -> str:
    ref = _reference(rows, task)
    if ref is None:
        return f"- **{what}** on {task}: not measured (no dense reference in these results).\n"
    tol = _tolerance(ref.metric, ref) if tol is None else tol
    best = _best_within(rows, task, method, min_ratio)
    tol_text = f"{100 * tol:.1f} points" if ref.metric == "accuracy" else f"{100 * tol:.0f}% relative"
    if best is None:
        return (f"- **{what}** on {task}: **not tested**: `{method}` has no result at >= {min_ratio:g}x here "
                f"(not registered, unreachable, or not in this run's ratios).\n")
    loss = _loss(best, ref)
    holds = loss <= tol
    verdict = "**holds**" if holds else "**fails**"
    text = (f"- **{what}** on {task}: {verdict}. Best `{method}` at >= {min_ratio:g}x is {best.ratio:.1f}x "
            f"(`{best.spec}`): {_fmt(best.mean, ref.metric)} vs {_fmt(ref.mean, ref.metric)} dense, a loss of "
            f"{_loss_text(best, ref)} (tolerance {tol_text}, {len(best.scores)} seed(s)).")
    if not holds:
        text += (f" Largest ratio within tolerance: {_largest_ok(rows, task, method, ref, tol)}. "
                 f"What would close it: {closing}")
    return text + "\n"


def claims(rows: list[Row]) -> str:
    out = ["## Paper claims, checked on these results\n",
           f"Tolerances: 'no / negligible loss' = within {100 * ACCURACY_TOLERANCE:.1f} accuracy points "
           f"(or the dense model's seed std if larger) and within {100 * PERPLEXITY_TOLERANCE:.0f}% perplexity. "
           "Ratios count every byte the exported table holds.\n"]
    out.append(_no_loss_claim(
        rows, "sentiment", "codes", 20.0, None, "Compositional codes: >= 95% smaller with no accuracy loss",
        "more code capacity per byte is not available at 20x on a 50-dim table, so the levers are training: a longer "
        "post hoc fit of the codes to GloVe (the paper runs 200 epochs) and more task epochs; the paper's IMDB "
        "documents are ~10x longer than these snippets, which makes single-word errors matter less."))
    for task in ("topic", "lm"):
        out.append(_no_loss_claim(
            rows, task, "dpq", 14.0, None, "DPQ: >= 14x at negligible loss",
            "DPQ trains its codes end to end, so it needs more steps than this budget gives (the paper trains for "
            "tens of epochs on 100k+ documents); larger K with fewer groups at equal bytes, or a warm start from a "
            "trained dense table, are the next things to try."))
    out.append(_memcom_claim(rows))
    out.append(_no_loss_claim(
        rows, "sentiment", "tt", 70.0, 0.01, "Tensor-train: ~100x with at most a point of accuracy lost",
        "the paper's tables are 25k x 256; at d = 50 a TT with rank 16 cannot reach 100x, so the rank has to drop "
        "and quality with it. A wider embedding (d = 256) or TT-SVD warm start followed by longer training would "
        "be the fair test."))
    out.append(_distilled_claim(rows))
    return "\n".join(out)


def _memcom_claim(rows: list[Row]) -> str:
    ref = _reference(rows, "rec")
    if ref is None:
        return "- **MEmCom**: not measured (no recommendation reference).\n"
    memcom = [r for r in rows if r.task == "rec" and r.method == "memcom" and r.procedure == "scratch"]
    hashing = {r.target: r for r in rows if r.task == "rec" and r.method == "hash" and r.procedure == "scratch"}
    if not memcom:
        return "- **MEmCom (<= 4% relative nDCG@10 loss at 16x; beats hashing at equal bytes)**: **not tested** (no memcom results).\n"
    near16 = min(memcom, key=lambda r: abs(math.log(r.ratio / 16)))
    loss = _loss(near16, ref)
    verdict = "**holds**" if loss <= 0.04 else "**fails**"
    text = (f"- **MEmCom: <= 4% relative nDCG@10 loss at 16x**: {verdict} at {near16.ratio:.1f}x (`{near16.spec}`): "
            f"nDCG@10 {near16.mean:.4f} vs {ref.mean:.4f} dense ({100 * loss:+.1f}% relative loss).")
    if loss > 0.04:
        text += (" What would close it: MEmCom's per-entity weight can only rescale a shared direction; with 943 "
                 "users and 1,682 items the collisions at 16x are dense. The paper's datasets have millions of "
                 "entities with a long tail where collisions cost little; a popularity-aware hash (frequent IDs "
                 "get their own bucket) would be the fair fix here.")
    pairs = [(r, hashing[r.target]) for r in memcom if r.target in hashing]
    if pairs:
        wins = [f"{r.target:g}x: {r.mean:.4f} vs {h.mean:.4f} ({'better' if r.mean > h.mean else 'worse'})"
                for r, h in pairs]
        better = sum(r.mean > h.mean for r, h in pairs)
        text += (f" **Better than the hashing trick at equal bytes**: {'**holds**' if better == len(pairs) else ('**partly**' if better else '**fails**')}"
                 f" ({better}/{len(pairs)} budgets; memcom vs hash nDCG@10 at the same byte budget: {'; '.join(wins)}).")
    return text + "\n"


def _distilled_claim(rows: list[Row]) -> str:
    out = []
    for procedure in ("two-stage", "scratch"):
        for task in sorted({r.task for r in rows}):
            dist = {r.target: r for r in rows if r.task == task and r.procedure == procedure and r.method == "distilled"}
            low = {r.target: r for r in rows if r.task == task and r.procedure == procedure and r.method == "lowrank"}
            common = sorted(set(dist) & set(low) - {None})
            if not common:
                continue
            sign = 1 if HIGHER_IS_BETTER[dist[common[0]].metric] else -1
            wins = sum(sign * (dist[t].mean - low[t].mean) > 0 for t in common)
            detail = "; ".join(f"{t:g}x: {_fmt(dist[t].mean, dist[t].metric)} ({_bytes(dist[t].bytes)}) vs "
                               f"{_fmt(low[t].mean, low[t].metric)} ({_bytes(low[t].bytes)})" for t in common)
            verdict = "**holds**" if wins == len(common) else ("**partly**" if wins else "**fails**")
            out.append(f"  - {task}, {procedure}: {verdict}, distilled better at {wins}/{len(common)} budgets ({detail}).")
    if not out:
        return "- **Distilled embedding better than plain low-rank at equal bytes**: **not tested** (no paired results).\n"
    closing = ("  Where it fails, what would close it: the non-linearity costs nothing in bytes, so a loss means the "
               "stage-1 autoencoder or stage-2 distillation under-trained; more distillation epochs and an "
               "embedding-level MSE term (``table_weight``) toward the teacher's table are the levers.")
    return ("- **Distilled embedding better than plain low-rank (`lowrank`) at equal bytes** "
            "(two-stage = the paper's procedure for both; scratch = both trained from scratch):\n" + "\n".join(out)
            + "\n" + closing + "\n")


def write_report(out_dir: Path, records: dict[str, dict[str, Any]]) -> Path:
    rows, skipped = aggregate(records)
    parts = [f"# Task benchmarks ({out_dir.name})\n",
             "Generated by `python -m benchmarks.tasks.report`; do not edit by hand. Every cell trains the task "
             "model from scratch with the compressed table in place of the dense one (the sentiment table starts "
             "from GloVe via `from_pretrained`); the test score is taken at the best validation epoch. Bytes are "
             "the exact `export().num_bytes()` of each table (the dense reference counts fp32). Mean ± std over "
             "seeds; specs were chosen by `config_for_budget` for the target ratio.\n"]
    for task in [t for t in TASK_TITLES if any(r.task == t for r in rows)]:
        plot = out_dir / f"{task}.png"
        plot_task(rows, task, plot)
        parts.append(f"## {TASK_TITLES[task]}\n")
        parts.append(task_table(rows, task))
        if any(r.task == task and r.procedure == "two-stage" for r in rows):
            parts.append("\nDistilled method's full procedure (task 5: stage-1 fit to the trained dense table, "
                         "stage-2 `embcompress.distill` from the dense model), with `lowrank` through the same "
                         "procedure as its equal-bytes baseline:\n")
            parts.append(task_table(rows, task, "two-stage"))
        parts.append(f"\n![{task}]({plot.name})\n")
    parts.append(claims(rows))
    if skipped:
        parts.append("\n## Cells that did not run\n")
        seen = set()
        for record in sorted(skipped, key=lambda r: r["key"]):
            key = (record["task"], record["procedure"], record["label"], record["status"])
            if key in seen:
                continue
            seen.add(key)
            parts.append(f"- {record['task']} / {record['procedure']} / {record['label']}: {record['status']}: "
                         f"{record.get('reason', '')[:300]}")
    path = out_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from .run import load_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results folder written by benchmarks.tasks.run")
    args = parser.parse_args(argv)
    print(write_report(args.results, load_results(args.results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
