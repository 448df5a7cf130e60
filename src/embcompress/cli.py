"""The ``embcompress`` command line: methods, compress, evaluate, inspect, demo."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch

from . import __version__
from .config import FitLike, SpecError, parse_spec
from .io import ArtifactError, _regular_file, atomic_write_bytes, check_output_path, load, read_header, save
from .progress import set_progress
from .registry import get_method, list_methods

__all__ = ["main", "format_table"]

EXAMPLES = """examples:
  embcompress methods
  embcompress compress glove-6b-50d --bits-per-row 80 -m codes -o glove.emb --json
  embcompress compress table.npy --spec "dpq:variant=vq,groups=16,codewords=32" -o table.emb
  embcompress compress ./my-bert-folder --ratio 10 -m distilled -o bert-words.emb
  embcompress compress-model ./my-bert-folder --ratio 10 --methods scalar pq dpq -o bert-compressed/
  embcompress evaluate glove.emb --against glove-6b-50d --json
  embcompress inspect glove.emb
  embcompress demo
"""

# Every method and baseline, each at the 80 bits/row budget of the demo.
DEMO_METHODS = ["codes", "dpq", "dpq:variant=vq", "tt", "memcom", "distilled",
                "pq", "lowrank", "qr", "hash", "scalar:bits=4"]
REPORT_COLUMNS = [("method", "method", "{}"), ("bytes", "bytes", "{:,}"), ("ratio", "ratio", "{:.1f}x"),
                  ("bits/row", "bits_per_row", "{:.0f}"), ("rel MSE", "rel_mse", "{:.3f}"),
                  ("cosine", "mean_cosine", "{:.3f}"), ("WS353", "ws353", "{:.3f}"),
                  ("SimLex", "simlex", "{:.3f}"), ("fit s", "seconds", "{:.1f}")]


def format_table(rows: Sequence[dict[str, Any]], columns=REPORT_COLUMNS) -> str:
    """A plain-text table; missing values show as '-'."""
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            line.append("-" if missing else fmt.format(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in cells]
    text.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(text)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr naming the problem and where to look, exit code 2."""

    def error(self, message: str) -> "NoReturn":
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    return {"bytes": args.bytes, "bits_per_row": args.bits_per_row, "ratio": args.ratio}


def _add_budget(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bits-per-row", type=positive_float, help="total budget in bits per row (codebooks included)")
    group.add_argument("--ratio", type=positive_float, help="total budget as a compression ratio against fp32")
    group.add_argument("--bytes", type=positive_int, help="total budget in bytes")


def cmd_methods(args: argparse.Namespace) -> int:
    for name in list_methods():
        cls = get_method(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}")
        if args.verbose:
            for f in dataclasses.fields(cls.Config):
                print(f"    {f.name}={f.default!r}: {f.metadata.get('help', '')}")
            for f in dataclasses.fields(cls.Fit):
                print(f"    fit {f.name}={f.default!r}: {f.metadata.get('help', '')}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .data import load_table
    from .posthoc import compress_table
    from .streaming import should_stream

    spec = args.spec or args.method
    if not spec:
        raise SpecError("give a method with -m (see `embcompress methods`) or a full --spec")
    method = parse_spec(spec).method
    if args.spec and args.method and method != args.method:
        raise SpecError(f"-m {args.method} and --spec {args.spec!r} name different methods; give one")
    fit = get_method(method).Fit.parse(args.fit, steps=args.steps)  # typos fail before the table loads
    check_output_path(args.output, overwrite=args.force, protect=[args.source])  # before the fit, not after
    if args.stream or (args.stream is None and not args.trainable and should_stream(args.source)):
        return _compress_streamed(args, spec, fit)
    table = load_table(args.source, key=args.key, limit=args.limit)
    protect = [args.source, *table.files]  # a model folder's weights and vocabulary, not only the folder
    check_output_path(args.output, overwrite=args.force, protect=protect)
    result = compress_table(table, spec, fit_options=fit, evaluate=not args.no_eval,
                            analogy=False, **_budget(args))
    module = result.module if args.trainable else result.frozen
    assert module is not None  # an in-memory table: both are built
    try:
        save(module, args.output, overwrite=args.force, protect=protect)
    except OSError as exc:  # name the output, not the temporary file the write went through
        raise OSError(exc.errno, exc.strerror or str(exc), str(args.output)) from None
    report = {**result.report, "output": str(args.output), "file_bytes": Path(args.output).stat().st_size}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table([report]))
        print(f"wrote {args.output} ({report['file_bytes']:,} bytes on disk, {report['bytes']:,} in tensors)")
    return 0


def _compress_streamed(args: argparse.Namespace, spec: str, fit: FitLike) -> int:
    """Larger than memory: fit on a sample, encode in chunks, write the artifact as it is made."""
    from .data import open_table_mmap
    from .streaming import compress_mapped

    if args.trainable:
        raise ValueError("--stream writes the frozen artifact only (a trainable table holds a full-size "
                         "query table or codes); drop --trainable, or use --no-stream on a table that fits in memory")
    with open_table_mmap(args.source, key=args.key, limit=args.limit) as table:
        result = compress_mapped(table, spec, output=args.output, sample=args.sample, sample_order=args.sample_order,
                                 fit_options=fit, overwrite=args.force, **_budget(args))
    report = {**result.report, "output": str(args.output), "file_bytes": Path(args.output).stat().st_size}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table([report], REPORT_COLUMNS[:5] + REPORT_COLUMNS[-1:]))
        print(f"wrote {args.output} ({report['file_bytes']:,} bytes on disk) streaming {report['rows']:,} rows at "
              f"{report['rows_per_second']:,.0f} rows/s, peak RSS {report['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .base import CompressedEmbedding
    from .data import load_table
    from .posthoc import evaluate_module

    module = load(args.artifact)
    frozen = module.export() if isinstance(module, CompressedEmbedding) else module
    table = load_table(args.against, key=args.key, limit=frozen.num_embeddings if args.limit else None)
    if tuple(table.weight.shape) != (frozen.num_embeddings, frozen.embedding_dim):
        limited = frozen.num_embeddings < table.weight.shape[0]
        hint = " (the artifact was made with --limit: add --limit)" if limited else ""
        raise ValueError(f"{args.artifact} is ({frozen.num_embeddings}, {frozen.embedding_dim}) but {args.against} "
                         f"is {tuple(table.weight.shape)}{hint}")
    header, _ = read_header(args.artifact)
    spec = header.get("spec")
    report = {"method": header.get("method") or (parse_spec(spec).method if spec else header["format"]),
              "spec": header.get("spec"), "artifact": str(args.artifact),
              **evaluate_module(frozen, table, analogy=not args.no_analogy)}
    print(json.dumps(report, indent=2) if args.json else format_table([report], REPORT_COLUMNS[:-1]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if not args.artifact.is_file():
        raise FileNotFoundError(f"no artifact at {args.artifact}; create one with `embcompress compress`"
                                if not args.artifact.exists()
                                else f"{args.artifact} is not a file; give an artifact (.emb) path")
    header, tensors = read_header(args.artifact)
    load(args.artifact)  # refuse what load refuses (metadata, shapes, stored codes), not only a bad header
    info = {**header, "tensors": {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                                         "bytes": t.numel() * t.element_size()} for name, t in tensors.items()}}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("kind", "method", "format", "spec", "fit", "num_embeddings", "embedding_dim", "padding_idx",
                "library_version", "format_version"):
        if header.get(key) is not None:
            print(f"{key:16s} {json.dumps(header[key]) if key == 'fit' else header[key]}")
    total = sum(v["bytes"] for v in info["tensors"].values())
    dense = header["num_embeddings"] * header["embedding_dim"] * 4
    versus = f"{dense / total:.1f}x smaller than" if total < dense else f"{total / max(dense, 1):.1f}x the size of"
    print(f"{'tensor bytes':16s} {total:,} ({versus} fp32)")
    for name, t in info["tensors"].items():
        print(f"  {name:14s} {t['dtype']:8s} {str(tuple(t['shape'])):18s} {t['bytes']:,} bytes")
    return 0


def cmd_compress_model(args: argparse.Namespace) -> int:
    """Every embedding table of a Hugging Face model folder into one budget, chosen by the planner."""
    import os

    from .hf import require_transformers
    from .surgery import compress_, save_pretrained

    transformers = require_transformers()
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only
    if not (args.folder / "config.json").is_file():
        raise FileNotFoundError(f"{args.folder} has no config.json; give a Hugging Face model folder")
    budget = {k: v for k, v in _budget(args).items() if v is not None}
    if not budget:
        raise ValueError("give a budget: --ratio, --bits-per-row or --bytes (for all tables together)")
    fit_options = {"steps": args.steps} if args.steps else None
    skip = {name: "skip" for name in args.skip or []}
    # The arguments are checked before the model loads (a large model takes a while to load).
    calibration = _calibration_ids(transformers, args.folder, args.calibration, args.calibration_lines) \
        if args.calibration else None
    config = transformers.AutoConfig.from_pretrained(str(args.folder), local_files_only=True)
    # A causal LM is loaded with its head, so a head tied to the token table stays tied (and is
    # computed from the compressed table); load_pretrained needs the same class.
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = loader.from_pretrained(str(args.folder), local_files_only=True)
    report = compress_(model, skip or None, budget=budget, methods=args.methods, fit_options=fit_options,
                       calibration=calibration, fit_time=args.fit_time)
    save_pretrained(model, args.output)
    if args.json:
        print(json.dumps({**report.to_dict(), "output": str(args.output), "model_class": loader.__name__}, indent=2))
    else:
        print(report)
        print(f"wrote {args.output} (load with {loader.__name__}.from_pretrained(folder) then "
              f"embcompress.load_pretrained(model, {str(args.output)!r}))")
    return 0


def _calibration_ids(transformers: Any, folder: Path, path: Path, lines: int) -> list[torch.Tensor]:
    """The first ``lines`` non-empty lines of a text file, each through the folder's tokenizer (128 tokens at most)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} has no tokenizer to read --calibration texts with ({exc}); save the "
                         "model's tokenizer into the folder") from None
    _regular_file(path, "--calibration text")  # a device or FIFO would never end
    texts: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:  # only the lines used are read (at most 64 KiB each)
            for line in iter(lambda: handle.readline(65536), ""):
                if line.strip():
                    texts.append(line.rstrip("\r\n"))
                    if len(texts) == lines:
                        break
    except UnicodeDecodeError as exc:
        raise ValueError(f"--calibration {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "give a UTF-8 text file, one text per line") from None
    if not texts:
        raise ValueError(f"--calibration {path} has no non-empty lines; give one text per line")
    ids = [tokenizer(t, truncation=True, max_length=128, return_tensors="pt")["input_ids"] for t in texts]
    return [i for i in ids if i.numel()]


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import load_table
    from .evaluate import word_metrics
    from .posthoc import compress_table

    torch.manual_seed(0)
    table = load_table("glove-6b-50d", limit=args.rows)
    rows, dim = table.weight.shape
    print(f"GloVe 6B 50d: {rows:,} x {dim} fp32 = {rows * dim * 4 / 1e6:.1f} MB; budget {args.bits_per_row:g} "
          f"bits per row = {rows * args.bits_per_row / 8 / 1e6:.2f} MB, everything counted", flush=True)
    full = {"method": "full fp32", "bytes": rows * dim * 4, "ratio": 1.0, "bits_per_row": dim * 32.0,
            "rel_mse": 0.0, "mean_cosine": 1.0, **word_metrics(table.weight, table.words or [], analogy=False)}
    results = [full]
    for spec in args.methods:
        started = time.perf_counter()
        try:
            # Each method's quick fit keeps the demo to a few minutes; bench-posthoc runs the full fits.
            fit_options = {} if args.full_fit else get_method(parse_spec(spec).method).quick_fit_options()
            result = compress_table(table, spec, bits_per_row=args.bits_per_row, fit_options=fit_options,
                                    neighbours=False, analogy=False)
        except SpecError as exc:  # e.g. a baseline that cannot go this small
            print(f"  {spec:16s} skipped: {exc}", flush=True)
            continue
        report = result.report
        report["method"] = spec
        results.append(report)
        print(f"  {spec:16s} {report['spec']:60s} rel MSE {report['rel_mse']:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print(format_table(results))
    if args.json:
        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode(), protect=table.files)  # replaced
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="embcompress", description="Compress embedding tables 10x-1000x.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"embcompress {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("methods", help="list the methods and their settings")
    p.add_argument("-v", "--verbose", action="store_true", help="show every config field with its help")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("compress", help="compress a pretrained table into an artifact",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="glove-6b-50d, a .npy/.safetensors/word2vec text file, or a HF model folder")
    p.add_argument("-m", "--method", help="method name (hyperparameters from the budget)")
    p.add_argument("--spec", help='full spec, e.g. "codes:books=16,codewords=32"')
    _add_budget(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="artifact path (.emb)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at the output path")
    p.add_argument("--key", help="tensor name inside a .safetensors file or model folder")
    p.add_argument("--limit", type=positive_int, help="keep only the first N rows")
    p.add_argument("--steps", type=positive_int, help="override the method's number of fitting steps")
    p.add_argument("--fit", help='the method\'s fit settings, e.g. "iters=30,seed=0" '
                                 "(`embcompress methods -v` lists them)")
    p.add_argument("--trainable", action="store_true", help="save the trainable module (for fine-tuning) "
                                                           "instead of the frozen inference artifact")
    p.add_argument("--no-eval", action="store_true", help="skip the quality report")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="never read the table into memory: fit on a sample, encode in chunks (.npy/.safetensors; "
                        "codes, dpq, pq, scalar, hash, memcom); default: stream files larger than half the "
                        "available memory")
    p.add_argument("--sample", type=int, default=1 << 18, help="rows the streamed fit sees (default 262144)")
    p.add_argument("--sample-order", choices=["uniform", "frequency"], default="uniform",
                   help="frequency: the table is sorted by lookup frequency; half the sample is its head")
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser("compress-model", help="fit all embedding tables of a model folder into one budget",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a Hugging Face model folder (config.json + safetensors)")
    _add_budget(p)
    p.add_argument("--methods", nargs="+", help="candidate methods, names or specs with fields fixed "
                                                "(default: scalar lowrank pq pq:rotation=pca dpq codes)")
    p.add_argument("--skip", nargs="+", help="module names to leave uncompressed (e.g. position embeddings)")
    p.add_argument("--steps", type=int, help="override the methods' number of fitting steps")
    p.add_argument("--fit-time", type=positive_float, default=1.0,
                   help="let the chosen settings' fits take this many times the default bound of about two CPU "
                        "minutes per table (codes then gets more books on narrow tables)")
    p.add_argument("--calibration", type=Path, metavar="TEXT_FILE",
                   help="texts (one per line) read by the model through its tokenizer: a table tied to an output "
                        "layer is fitted and measured for its logits (hidden-state metric) and weighted by token "
                        "counts")
    p.add_argument("--calibration-lines", type=positive_int, default=256, help="lines of --calibration used")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for embcompress.json + tables")
    p.add_argument("--json", action="store_true", help="print a machine-readable report")
    p.set_defaults(run=cmd_compress_model)

    p = sub.add_parser("evaluate", help="quality of an artifact against the original table")
    p.add_argument("artifact", type=Path)
    p.add_argument("--against", required=True, help="the original table (same sources as compress)")
    p.add_argument("--key", help="tensor name inside a .safetensors file or model folder")
    p.add_argument("--limit", action="store_true", help="compare with the first rows only (for --limit artifacts)")
    p.add_argument("--no-analogy", action="store_true", help="skip the (slower) analogy benchmark")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("inspect", help="what an artifact holds, byte by byte")
    p.add_argument("artifact", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("demo", help="compress GloVe 6B 50d with every method at one budget and compare")
    p.add_argument("--bits-per-row", type=positive_float, default=80.0)
    p.add_argument("--rows", type=positive_int, default=None, help="use only the first N rows (default: all 400k)")
    p.add_argument("--methods", nargs="+", default=DEMO_METHODS)
    p.add_argument("--full-fit", action="store_true", help="each method's default fit (slower) instead of the "
                                                          "demo's lighter settings")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(run=cmd_demo)
    return parser


# What to try for the file system errors a user can meet (errno -> advice).
_OS_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere with -o",
    errno.EDQUOT: "free some space or write elsewhere with -o",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENOTDIR: "choose an output inside a folder",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter name",
}


def _os_message(exc: OSError) -> str:
    if exc.strerror is None:  # raised with a message of ours (e.g. FileNotFoundError("no table at ..."))
        return str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    advice = _OS_ADVICE.get(exc.errno) if exc.errno is not None else None
    problem = exc.strerror[:1].lower() + exc.strerror[1:]  # "No space left" -> "no space left", paths kept
    return f"{problem}{where}" + (f"; {advice}" if advice else "")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one line each, without the source line Python would print under them."""
    print(f"embcompress: warning: {message}", file=sys.stderr)


def _stdout_closed() -> int:
    """The reader of our output went away (`embcompress inspect x.emb | head -1`): stop quietly.

    Point stdout at /dev/null so the interpreter's final flush cannot raise again, and exit as a
    process killed by SIGPIPE would (128 + 13), without a message."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        set_progress(False)
    command = f"embcompress {args.command}"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print("interrupted; no partial output was written", file=sys.stderr)
        return 130
    except (SpecError, ArtifactError, ValueError, KeyError, IndexError, TypeError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # file system: missing, a directory, no permission, disk full, read-only
        print(f"{command}: error: {_os_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback on request
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # torch's allocator: RuntimeError
            print(f"{command}: error: out of memory; use --limit, a smaller setting, or a machine with more memory",
                  file=sys.stderr)
            return 2
        if os.environ.get("EMBCOMPRESS_DEBUG"):
            raise
        print(f"{command}: internal error: {type(exc).__name__}: {exc} (rerun with EMBCOMPRESS_DEBUG=1 for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
