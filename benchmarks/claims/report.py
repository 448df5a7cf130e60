"""The claims report: per claim, the paper's setting next to ours, every arm's validation-chosen
grid point, and each comparison's paired-bootstrap interval and verdict; plus the README table.

    python -m benchmarks.claims.report benchmarks/results/claims

Selection never looks at test data: each arm's grid point (lr, weight decay) is the one with the
best mean validation score over seeds, and its epoch was picked by early stopping on validation.
A comparison gets a verdict only when every planned cell of both arms on that dataset has run;
otherwise it reads "not run yet" (or "running" with the cells done).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .experiments import EXPERIMENTS, SIZES, Comparison, settings
from .run import ORDER, _jsonable, load_results
from .stats import MEASURES, decisive_size, paired_bootstrap, verdict
from benchmarks.results_io import write_json, write_text

README_BEGIN = "<!-- claims-table:begin -->"
README_END = "<!-- claims-table:end -->"


@dataclass
class ArmResult:
    """An arm on one dataset at its validation-chosen grid point."""

    arm: str
    lr: float
    wd: float
    records: list[dict[str, Any]]  # one per seed, sorted by seed
    done: int                      # cells of this arm that ran (all grid points)
    planned: int

    @property
    def complete(self) -> bool:
        return self.done == self.planned

    def mean(self, field: str) -> float:
        return statistics.fmean(r[field] for r in self.records)


def choose(claim: str, dataset: str, arm: str, records: dict[str, dict[str, Any]], size: str) -> ArmResult | None:
    """The arm's grid point with the best mean validation score over its seeds (None if no cell ran)."""
    exp = EXPERIMENTS[claim]
    planned = [c for c in exp.cells(size) if c.dataset == dataset and c.arm == arm]
    ok = [records[c.key()] for c in planned if records.get(c.key(), {}).get("status") == "ok"]
    if not ok:
        return None
    higher = exp.score_is_higher_better(dataset) if hasattr(exp, "score_is_higher_better") else True
    points: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in ok:
        points.setdefault((r["lr"], r["wd"]), []).append(r)
    sign = 1 if higher else -1
    (lr, wd), chosen = max(points.items(), key=lambda kv: sign * statistics.fmean(r["val"] for r in kv[1]))
    return ArmResult(arm, lr, wd, sorted(chosen, key=lambda r: r["seed"]), len(ok), len(planned))


def _measure(exp: Any, comparison: Comparison, dataset: str) -> tuple[str, float]:
    if comparison.measure == "auto":
        return exp.measure_for(dataset)
    return comparison.measure, comparison.tolerance


def compare(claim: str, dataset: str, comparison: Comparison, arms: dict[str, ArmResult | None]) -> dict[str, Any]:
    """A comparison's interval and verdict, or why it has none yet."""
    exp = EXPERIMENTS[claim]
    measure, tolerance = _measure(exp, comparison, dataset)
    out = {"claim": claim, "dataset": dataset, "what": comparison.what, "arm": comparison.arm,
           "reference": comparison.reference, "measure": measure, "unit": MEASURES[measure][1], "tolerance": tolerance}
    a, b = arms.get(comparison.arm), arms.get(comparison.reference)
    if a is None or b is None or not (a.complete and b.complete):
        done = sum(x.done for x in (a, b) if x is not None)
        planned = sum(x.planned for x in (a, b) if x is not None) or None
        out["verdict"] = "running" if done else "not run yet"
        out["progress"] = f"{done} of {planned or 'all'} cells" if done else ""
        return out
    seeds = sorted({r["seed"] for r in a.records} & {r["seed"] for r in b.records})
    arm_scores = np.array([next(r for r in a.records if r["seed"] == s)["examples"] for s in seeds])
    ref_scores = np.array([next(r for r in b.records if r["seed"] == s)["examples"] for s in seeds])
    interval = paired_bootstrap(arm_scores, ref_scores, measure)
    out.update(estimate=interval.estimate, low=interval.low, high=interval.high, seeds=len(seeds),
               examples=interval.examples, verdict=verdict(interval, tolerance))
    if out["verdict"] == "inconclusive":
        out["decisive_examples"] = decisive_size(interval, tolerance)
    return out


def analyse(records: dict[str, dict[str, Any]], size: str) -> dict[str, Any]:
    claims = {}
    for claim in ORDER:
        exp, cfg = EXPERIMENTS[claim], SIZES[size][claim]
        per_dataset = {}
        for dataset in cfg["datasets"]:
            arms = {arm: choose(claim, dataset, arm, records, size) for arm in exp.arms_for(dataset)}
            per_dataset[dataset] = {"arms": arms,
                                    "comparisons": [compare(claim, dataset, c, arms) for c in exp.comparisons]}
        claims[claim] = per_dataset
    return claims


def _metric(claim: str, dataset: str) -> str:
    if claim == "distill" or (claim == "dpq" and dataset == "lm"):
        return "perplexity"
    return "nDCG@10" if claim == "memcom" else "accuracy (%)"


def _fmt_score(value: float, claim: str, dataset: str) -> str:
    if claim in ("distill",) or (claim == "dpq" and dataset == "lm"):
        return f"{value:.1f}"
    if claim == "memcom":
        return f"{value:.4f}"
    return f"{100 * value:.2f}"


def _bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else (f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{n:.0f} B")


def _interval_text(c: dict[str, Any]) -> str:
    if "estimate" not in c:
        return "-"
    return f"{c['estimate']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] {c['unit']}"


def _verdict_text(c: dict[str, Any]) -> str:
    v = c["verdict"]
    if v == "inconclusive":
        need = c.get("decisive_examples")
        return f"inconclusive (~{need:,} test examples would decide)" if need else "inconclusive"
    if v in ("running", "not run yet"):
        return f"not run yet ({c['progress']} done)" if c.get("progress") else "not run yet"
    return f"**{v}**"


def _plan_table(out_dir: Path, size: str) -> list[str]:
    path = out_dir / "plan.json"
    if not path.exists():
        return ["_No plan measured yet (`python -m benchmarks.claims.run --size full --measure`)._", ""]
    plan = json.loads(path.read_text())
    lines = ["| claim | dataset | arm | cells | max epochs | CPU s / epoch | build CPU s | "
             "planned CPU s (upper bound) |",
             "|---|---|---|---|---|---|---|---|"]
    total, stale = 0.0, 0
    for p in plan:
        build = p.get("build_cpu_seconds") or 0.0
        planned = p["planned_cpu_seconds"] + build
        total += planned
        old = p.get("settings") != _jsonable(settings(p["claim"], p["dataset"], size))
        stale += old
        lines.append(f"| {p['claim']} | {p['dataset']} | {p['arm']}{' *' if old else ''} | {p['cells']} | "
                     f"{p['max_epochs']} | {p['epoch_cpu_seconds']:.1f} | {build:.1f} | {planned:,.0f} |")
    lines += ["", f"Planned total (every cell to its epoch limit): {total / 3600:.1f} CPU hours; early stopping "
              "ends most cells sooner. Epoch seconds are measured over a few batches at one torch thread "
              "on the shared 2-core machine (load from other jobs included), times the batches of an epoch; "
              "build seconds are the post hoc fits (cached and reused by every seed)."]
    ran = [r for r in load_results(out_dir).values() if r.get("size") == size and r.get("status") == "ok"]
    if ran:
        spent = sum(r.get("cpu_seconds") or 0.0 for r in ran)
        lines.append(f"Spent: {spent / 3600:.1f} CPU hours over the {len(ran)} cells run (each cell's recorded "
                     "CPU seconds).")
    if stale:
        lines.append(f"Rows marked * ({stale}) were measured at other settings than the current ones (the first "
                     "sizing, which these measurements cut to fit the budget: see each setting record); "
                     "`--measure` re-measures them.")
    lines.append("")
    return lines


def write_report(out_dir: Path, size: str = "full") -> Path:
    records = load_results(out_dir)
    claims = analyse(records, size)
    lines = [f"# Claims benchmark ({size})", "",
             "Each paper's claim in a setting as close to the paper's as offline data allows. Every choice "
             "(learning rate and weight decay from a grid of equal size for every arm, dense included; the "
             "epoch by early stopping) is made on validation. Intervals: 95% paired bootstrap over test "
             "examples and seeds of the loss against the reference (positive = worse). Verdict: **holds** "
             "when the interval lies below the tolerance, **fails** when it lies above, inconclusive "
             "otherwise (with the test size that would decide at the same estimate).", ""]
    errors = [r for r in records.values() if r["status"] == "error"]
    readme = ["| claim | our setting | result (95% CI of the loss) | verdict |", "|---|---|---|---|"]
    for claim in ORDER:
        exp = EXPERIMENTS[claim]
        lines += [f"## {exp.title}", "", "| | setting |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in exp.setting.items()]
        lines.append("")
        for dataset, result in claims[claim].items():
            lines += [f"### {dataset}", "",
                      f"| arm | spec | bytes | ratio | chosen lr, wd | test {_metric(claim, dataset)} mean ± sd | "
                      "val mean | best epoch | seeds (cells done) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for arm, a in result["arms"].items():
                if a is None:
                    lines.append(f"| {arm} | | | | | not run yet | | | 0 |")
                    continue
                tests = [r["test"] for r in a.records]
                sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
                ratio = a.records[0].get("ratio")
                lines.append(
                    f"| {arm} | `{a.records[0]['spec']}` | {_bytes(a.records[0]['bytes'])} | "
                    f"{f'{ratio:.1f}x' if ratio else '-'} | {a.lr:g}, {a.wd:g} | "
                    f"{_fmt_score(statistics.fmean(tests), claim, dataset)} ± {_fmt_score(sd, claim, dataset)} | "
                    f"{_fmt_score(a.mean('val'), claim, dataset)} | "
                    f"{statistics.fmean(r['best_epoch'] for r in a.records):.1f} | "
                    f"{len(a.records)} ({a.done}/{a.planned}) |")
            lines += ["", "| comparison | loss of arm vs reference, 95% CI | tolerance | verdict |",
                      "|---|---|---|---|"]
            for c in result["comparisons"]:
                lines.append(f"| {c['what']} | {_interval_text(c)} | < {c['tolerance']:g} {c['unit']} | "
                             f"{_verdict_text(c)} |")
                arm = result["arms"].get(c["arm"])
                ratio = arm.records[0].get("ratio") if arm is not None else None
                at = f"{ratio:.1f}x: " if ratio and "estimate" in c else ""
                readme.append(f"| {c['what']} | {exp.short[dataset]} | {at}{_interval_text(c)} | {_verdict_text(c)} |")
            lines.append("")
    lines += ["## Plan (measured cost per cell)", ""] + _plan_table(out_dir, size)
    spent = {}
    for r in records.values():
        if r["status"] == "ok":
            n, cpu = spent.get(r["claim"], (0, 0.0))
            spent[r["claim"]] = (n + 1, cpu + r.get("cpu_seconds", 0.0))
    planned = {claim: len(EXPERIMENTS[claim].cells(size)) for claim in ORDER}
    lines += ["Run so far: " + "; ".join(f"{claim} {spent.get(claim, (0, 0))[0]} of {planned[claim]} cells "
                                         f"({spent.get(claim, (0, 0.0))[1]:,.0f} CPU s)" for claim in ORDER) + ".", ""]
    if errors:
        lines += ["## Errors", ""] + [f"- `{r['key']}`: {r['reason']}" for r in errors] + [""]
    _plot(claims, out_dir)
    if (out_dir / "claims.png").exists():
        lines += ["![loss intervals per comparison](claims.png)", ""]
    write_text(out_dir / "readme_section.md", "\n".join(readme) + "\n")
    write_json(out_dir / "comparisons.json", [c for per in claims.values() for r in per.values()
                                               for c in r["comparisons"]])
    return write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _plot(claims: dict[str, Any], out_dir: Path) -> None:
    """One horizontal interval per decided comparison, its tolerance marked (needs matplotlib)."""
    rows = [c for per in claims.values() for r in per.values() for c in r["comparisons"] if "estimate" in c]
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    for i, c in enumerate(rows):
        color = {"holds": "#2ca02c", "fails": "#d62728"}.get(c["verdict"], "#7f7f7f")
        ax.plot([c["low"], c["high"]], [i, i], color=color, lw=3)
        ax.plot([c["estimate"]], [i], "o", color=color)
        ax.plot([c["tolerance"]], [i], "|", color="black", ms=14)
    ax.set_yticks(range(len(rows)), [f"{c['claim']}/{c['dataset']}: {c['arm']} vs {c['reference']} ({c['unit']})"
                                     for c in rows], fontsize=7)
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel("loss against the reference (95% CI); | = the claim's tolerance")
    fig.tight_layout()
    tmp = out_dir / "claims.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(out_dir / "claims.png")


def update_readme(readme: Path, section: Path) -> bool:
    """Replace the table between the claims-table markers of the README; False if the markers are absent."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    write_text(readme, head + README_BEGIN + "\n" + section.read_text() + README_END + tail)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--readme", type=Path, help="also write the claims table into this README")
    args = parser.parse_args(argv)
    print(write_report(args.out_dir, args.size))
    if args.readme and not update_readme(args.readme, args.out_dir / "readme_section.md"):
        print(f"{args.readme} has no {README_BEGIN} / {README_END} markers; table not written")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
