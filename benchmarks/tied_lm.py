"""Decoder LM with a tied head: perplexity of post hoc compressed token tables, 4x..30x, per method.

A small Llama-style model (transformers' LlamaForCausalLM built from a config, tied input/output
table) is trained on the offline LM text (benchmarks/tasks/datasets.py, word level, 10k vocab);
then its token table is compressed post hoc with each method at each ratio (the head computes
its logits from the compressed table), and validation perplexity is measured. Block-wise scalar
quantization is the baseline every method must beat at equal bytes. Also: the speed of logits
computed from the compressed form against the dense head.

Variants per method and ratio: ``plain`` (the default post hoc fit), ``output-aware`` (the
hidden-state metric of ``tied_logits.output_metric`` with token-count row weights) and, at 10x,
``weighted`` (token-count row weights alone), which separates what the metric and the weights
each bring.

    python -m benchmarks.tied_lm                    # the published run: 600 steps, hidden 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

import embcompress
from benchmarks.tasks.datasets import lm_corpus
from embcompress.budget import config_for_budget
from embcompress.config import SpecError
from embcompress.tied_logits import CompressedLogits, fit_output_aware, hidden_second_moment, output_metric
from benchmarks.results_io import write_json, write_text

TABLE = "model.embed_tokens"


def build_model(vocab: int, hidden: int = 128, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from embcompress.hf import require_transformers

    transformers = require_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def batches(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
        yield torch.stack([stream[s:s + length] for s in starts.tolist()])


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int, batch: int = 16, length: int = 64,
          lr: float = 3e-3, log_every: int = 50) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    data = batches(stream, batch, length, torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for step in range(steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model: torch.nn.Module, stream: torch.Tensor, length: int = 128, tokens: int = 32768) -> float:
    model.eval()
    stream = stream[: tokens + 1]
    total, count = 0.0, 0
    for start in range(0, stream.numel() - length - 1, length):
        ids = stream[start:start + length].unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (length - 1)
        count += length - 1
    return math.exp(total / count)


def trained_model(cache: Path, steps: int, hidden: int, layers: int) -> tuple[torch.nn.Module, object]:
    from safetensors.torch import load_file, save_file

    data = lm_corpus()
    model = build_model(len(data.vocab), hidden, layers)
    path = cache / f"llama-tied-h{hidden}-l{layers}-s{steps}.safetensors"
    if path.is_file():
        state = load_file(str(path))
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.eval()
    else:
        train(model, data.train, steps)
        cache.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    return model, data


@torch.no_grad()
def calibration_moment(model: torch.nn.Module, stream: torch.Tensor, windows: int = 64, length: int = 128) -> torch.Tensor:
    """Second moment of the hidden states that reach the head, on training text."""
    starts = torch.randint(0, stream.numel() - length, (windows,), generator=torch.Generator().manual_seed(1))
    ids = torch.stack([stream[s:s + length] for s in starts.tolist()])
    return hidden_second_moment([model.model(input_ids=ids).last_hidden_state])


def with_table(model: torch.nn.Module, frozen: torch.nn.Module, stream: torch.Tensor, tokens: int) -> float:
    """Perplexity with the frozen table at the input and its compressed-form logits at the head."""
    embed, head = model.model.embed_tokens, model.lm_head
    model.model.embed_tokens, model.lm_head = frozen, CompressedLogits(frozen)
    try:
        return perplexity(model, stream, tokens=tokens)
    finally:
        model.model.embed_tokens, model.lm_head = embed, head


def head_speed(frozen: torch.nn.Module, weight: torch.Tensor, rows: int = 256, reps: int = 7) -> dict:
    """Median seconds of the compressed-form head vs the dense head on (rows, d) hidden states."""
    hidden = torch.randn(rows, weight.shape[1])
    head = CompressedLogits(frozen)
    head(hidden)  # builds the one-hot matrix once

    def median(fn) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2]

    dense, compressed = median(lambda: hidden @ weight.t()), median(lambda: head(hidden))
    return {"path": head.path, "dense_s": dense, "compressed_s": compressed, "speed_ratio": dense / compressed}


def logit_error(approx: torch.Tensor, weight: torch.Tensor, moment: torch.Tensor,
                counts: torch.Tensor | None = None) -> float:
    """sum_v w_v e_v S e_v^T / sum_v w_v t_v S t_v^T: the head's relative logit error on the calibration
    hidden states (w = 1, or token counts: rows the text reads often)."""
    w = torch.ones(weight.shape[0]) if counts is None else counts
    error = approx - weight
    return float((w * torch.einsum("vd,de,ve->v", error, moment, error)).sum()
                 / (w * torch.einsum("vd,de,ve->v", weight, moment, weight)).sum())


def cross_group_share(approx: torch.Tensor, weight: torch.Tensor, moment: torch.Tensor, groups: int,
                      counts: torch.Tensor) -> float:
    """Share of the count-weighted logit error that sits in the cross-group terms e_g S_gh e_h (g != h),
    which a product quantizer's output-aware fit (block-diagonal per group) does not see."""
    error = approx - weight
    width = weight.shape[1] // groups
    full = (counts * torch.einsum("vd,de,ve->v", error, moment, error)).sum()
    block = sum((counts * torch.einsum("vd,de,ve->v", error[:, g * width:(g + 1) * width],
                                       moment[g * width:(g + 1) * width, g * width:(g + 1) * width],
                                       error[:, g * width:(g + 1) * width])).sum() for g in range(groups))
    return float(1 - block / full)


def run(model: torch.nn.Module, data, args: argparse.Namespace) -> None:
    weight = model.get_input_embeddings().weight.detach().clone()
    rows, dim = weight.shape
    counts = torch.bincount(data.train, minlength=rows).float() + 1.0
    moment = calibration_moment(model, data.train)
    metric = output_metric(moment, output_weight=args.output_weight)
    base = perplexity(model, data.val, tokens=args.eval_tokens)
    test_base = perplexity(model, data.test, tokens=args.eval_tokens)
    results = [{"method": "dense", "variant": "fp32", "ratio": 1.0, "perplexity": base, "test_perplexity": test_base}]
    if args.resume and args.out.with_suffix(".json").is_file():  # keep the cells an interrupted run measured
        results += [r for r in json.loads(args.out.with_suffix(".json").read_text())["results"] if r["method"] != "dense"]
    done = {(r["method"], r["variant"], r["ratio"]) for r in results}
    print(f"dense perplexity {base:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for ratio in args.ratios:
        for method in args.methods:
            try:
                config = config_for_budget(method, rows, dim, ratio=ratio)
            except SpecError as exc:
                reason = str(exc).split(";")[0]
                if (method, "plain", ratio) not in done:
                    results.append({"method": method, "variant": "plain", "ratio": ratio, "no_setting": reason})
                print(f"{method} {ratio}x: {reason}", flush=True)
                continue
            options = embcompress.get_method(method).quick_fit_options()
            variants = ["plain"] + (["weighted"] if method != "scalar" and ratio == 10 else []) \
                + (["output-aware"] if method != "scalar" else [])
            for variant in [v for v in variants if (method, v, ratio) not in done]:
                start = time.process_time()
                torch.manual_seed(0)
                if variant == "output-aware":
                    frozen = fit_output_aware(weight, config, metric, row_weights=counts, **options)
                else:
                    frozen = embcompress.from_pretrained(weight, config, row_weights=counts if variant == "weighted"
                                                         else None, **options).export()
                seconds = time.process_time() - start
                ppl = with_table(model, frozen, data.val, args.eval_tokens)
                test_ppl = with_table(model, frozen, data.test, args.eval_tokens)
                approx = frozen.materialize()
                row = {"method": method, "variant": variant, "ratio": ratio, "spec": config.to_spec(),
                       "bytes": frozen.num_bytes(), "ratio_got": rows * dim * 4 / frozen.num_bytes(),
                       "perplexity": ppl, "change": ppl / base - 1, "test_perplexity": test_ppl,
                       "test_change": test_ppl / test_base - 1, "fit_cpu_s": seconds,
                       "rel_mse": float((approx - weight).pow(2).sum() / (weight - weight.mean(0)).pow(2).sum()),
                       "logit_rel_mse": logit_error(approx, weight, moment),
                       "weighted_logit_rel_mse": logit_error(approx, weight, moment, counts)}
                if method in ("pq", "dpq"):
                    row["cross_group_share"] = cross_group_share(approx, weight, moment, config.groups, counts)
                if variant == "plain" and method != "scalar" and ratio == 10:
                    row["head_speed"] = head_speed(frozen, weight)
                results.append(row)
                print(json.dumps(row), flush=True)
                write(results, args, rows, dim)


#: The issue's target for a tied decoder LM at 10x.
TARGET_CHANGE = 0.05


def _curve(results: list[dict], methods: list[str]) -> list[str]:
    """Test perplexity change per target ratio and method, of the variant (plain / output-aware) with the
    lower validation perplexity."""
    ratios = sorted({r["ratio"] for r in results if r["method"] != "dense"})
    lines = ["| target | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for ratio in ratios:
        cells = []
        for method in methods:
            rows = [r for r in results if r["method"] == method and r["ratio"] == ratio and "perplexity" in r
                    and r["variant"] != "weighted"]
            if not rows:
                missing = [r for r in results if r["method"] == method and r["ratio"] == ratio]
                cells.append("no setting" if missing else "-")
                continue
            best = min(rows, key=lambda r: r["perplexity"])  # chosen on validation, reported on test
            aware = ", aware" if best["variant"] == "output-aware" else ""
            cells.append(f"{100 * best['test_change']:+.1f}% ({best['ratio_got']:.1f}x{aware})")
        lines.append(f"| {ratio:g}x | " + " | ".join(cells) + " |")
    return lines


def _verdict(results: list[dict]) -> str:
    at10 = [r for r in results if r.get("ratio") == 10 and "perplexity" in r and r["variant"] != "weighted"]
    if not at10:
        return "No 10x result."
    best = min(at10, key=lambda r: r["perplexity"])  # chosen on validation, reported on test
    within = [f"{r['method']} {r['variant']} ({100 * r['test_change']:+.1f}%)" for r in at10
              if r["test_change"] <= TARGET_CHANGE]
    met = "met" if best["test_change"] <= TARGET_CHANGE else "NOT met"
    return (f"Target at 10x (at most {100 * TARGET_CHANGE:+.0f}% test perplexity): {met}; best on validation "
            f"{best['method']} {best['variant']}, test {100 * best['test_change']:+.1f}% at {best['ratio_got']:.1f}x. "
            f"Within the target on test: {', '.join(within) or 'none'}.")


def _cross_terms(results: list[dict]) -> str:
    at10 = [r for r in results if r.get("ratio") == 10 and "cross_group_share" in r]
    if not at10:
        return ""
    shares = ", ".join(f"{r['method']} {r['variant']} {100 * r['cross_group_share']:+.0f}%" for r in at10)
    return ("Share of the count-weighted logit error in cross-group terms e_g S_gh e_h (g != h), which the "
            f"block-diagonal output-aware fit of pq / dpq does not see, at 10x: {shares}.")


def write(results: list[dict], args: argparse.Namespace, rows: int, dim: int) -> None:
    payload = {"model": {"vocab": rows, "hidden": dim, "layers": args.layers, "train_steps": args.steps,
                         "eval_tokens": args.eval_tokens, "output_weight": args.output_weight}, "results": results}
    write_json(args.out.with_suffix(".json"), payload)
    methods = [m for m in args.methods if any(r["method"] == m for r in results)]
    lines = [f"# Tied-head Llama-style LM ({rows} x {dim} tied table, {args.layers} layers, {args.steps} training "
             f"steps on the offline LM text): perplexity after post hoc compression", "",
             "Every choice (the best method, plain or output-aware) is made on validation perplexity; the changes "
             "quoted are on the held-out test split.", "",
             "Quick fits; the head computes its logits from the compressed table. `output-aware` = fit under the "
             f"metric I + {args.output_weight:g} S/(tr S/d) (S = hidden-state second moment on training text) with "
             "token-count row weights; `weighted` = the token-count row weights alone (10x only). Logit errors are "
             "relative, on the calibration hidden states, unweighted and weighted by token counts.", "",
             _verdict(results), "", _cross_terms(results), "",
             "Test perplexity change against dense per target ratio (of plain / output-aware, the one with the lower "
             "validation perplexity; the ratio reached):", "",
             *_curve(results, methods), "",
             "| method | variant | target | got | val ppl | val change | test ppl | test change | rel MSE | "
             "logit rel MSE | weighted logit rel MSE | fit CPU s |", "|---" * 12 + "|"]
    for r in sorted(results, key=lambda r: r["ratio"]):
        if r["method"] == "dense":
            lines.append(f"| dense fp32 | - | 1x | 1x | {r['perplexity']:.2f} | - | {r['test_perplexity']:.2f} | - "
                         "| - | - | - | - |")
        elif "no_setting" in r:
            lines.append(f"| {r['method']} | - | {r['ratio']:g}x | - | {r['no_setting']} | | | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['variant']} | {r['ratio']:g}x | {r['ratio_got']:.1f}x | "
                         f"{r['perplexity']:.2f} | {100 * r['change']:+.1f}% | {r['test_perplexity']:.2f} | "
                         f"{100 * r['test_change']:+.1f}% | {r['rel_mse']:.4f} | "
                         f"{r['logit_rel_mse']:.4f} | {r['weighted_logit_rel_mse']:.5f} | {r['fit_cpu_s']:.1f} |")
    speeds = [r for r in results if "head_speed" in r]
    if speeds:
        lines += ["", "Head speed at 10x, 256 hidden states (dense = one fp32 matmul):", "",
                  "| method | path | dense ms | compressed ms | speed ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['head_speed']['path']} | {1e3 * r['head_speed']['dense_s']:.2f} | "
                  f"{1e3 * r['head_speed']['compressed_s']:.2f} | {r['head_speed']['speed_ratio']:.2f}x |" for r in speeds]
    measured = {r["ratio"] for r in results}
    missing = [f"{r:g}x" for r in args.ratios if r not in measured]
    if missing:
        lines += ["", f"Not measured (the run was stopped at the session's end): {', '.join(missing)}."]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "embcompress" / "tied_lm")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --out, measure the rest")
    parser.add_argument("--methods", nargs="+", default=["scalar", "dpq", "pq", "lowrank", "codes"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[4, 6, 8, 10, 15, 20, 30])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--output-weight", type=float, default=8.0, help="b in the metric I + b S/(tr S/d)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tied_lm"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.report_only:
        payload = json.loads(args.out.with_suffix(".json").read_text())
        write(payload["results"], args, payload["model"]["vocab"], payload["model"]["hidden"])
        return
    torch.set_num_threads(int(os.environ.get("EMBCOMPRESS_BENCH_THREADS", "2")))
    start = time.perf_counter()
    model, data = trained_model(args.cache, args.steps, args.hidden, args.layers)
    print(f"model ready in {time.perf_counter() - start:.0f} s", flush=True)
    if args.train_only:
        return
    run(model, data, args)


if __name__ == "__main__":
    main()
