"""Speed and memory of the deployed formats and the training modules, as ratios to nn.Embedding.

Run with ``make bench-perf`` (or ``python -m benchmarks.perf``). The machine this runs on is
shared and noisy, so every figure is a ratio to ``nn.Embedding`` measured in the same process,
interleaved round by round (each round times the baseline right next to every contender), and
the reported ratio is the median over rounds.

Inference: lookups/s of each exported format against ``nn.Embedding`` (fp32), V = 1,000,000,
d = 128, 65,536 uniform random ids per call, all cores. The big tables are built directly
(random codes, codebooks, cores, factors into the frozen constructors): speed does not depend on
what the numbers are, and fitting 1M rows would take the benchmark's whole budget.

Bags: each format's ``bag(mode="mean")`` against ``nn.EmbeddingBag(mode="mean")``, 2,048 bags of 32
ids per call; with TorchRec installed, also its row-wise int8 / int4 / int2 quantized
EmbeddingBagCollection of nn.EmbeddingBag's own table (the tables a recommendation engineer picks
instead), with every contender's stored bytes per row.

Training: one SGD step (forward, backward, update) of a bag-of-embeddings classifier
(mean-pooled table rows -> linear head, cross entropy) with each method's training module,
against the same model on ``nn.Embedding(sparse=True)``. DPQ and compositional codes train a
(V, d) query table; they run with ``sparse=true`` so its gradient is sparse exactly like the
baseline's (plain SGD takes both). Peak memory is the process's peak
resident set growth while building and training the table, measured in a fresh subprocess per
method (the VmHWM high-water mark), so one method's allocations do not hide
another's. "dense V x d" says whether the training module holds any (V, d)-sized tensor
(parameter, buffer or gradient) while training; "dense V x d gradient" whether a gradient with
V x d stored values exists after a step (a sparse gradient counts only its rows).

Process environment (set here before torch loads, unless already set; recorded in the results):
- ``OMP_WAIT_POLICY=PASSIVE``: on a machine whose cores are busy with other work, OpenMP's default
  spin-waiting made EVERY parallel op cost ~12 ms (a scheduler timeslice) whatever its size, so
  a run measured the neighbours, not the code (index_select of 4k rows: 12 ms spinning, 0.07 ms
  passive).
- ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU allocator option): big allocations on huge pages.
- glibc ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)``: freed memory stays in the process and is
  reused, as it is in a serving process under jemalloc or tcmalloc (PyTorch's CPU tuning guide
  recommends either). Every lookup returns a fresh 65,536 x 128 float32 output; by default glibc
  maps those 32 MB afresh per call and the kernel zeroes them page by page: 2.2 ms of
  nn.Embedding's 4.3 ms on a quiet 2-core VM, the same for every format, so all ratios are
  squashed toward 1. With the memory reused nn.Embedding took 1.6 ms.
All apply to nn.Embedding and every contender alike; ``--plain-env`` turns them off. The inference
table also shows each ratio measured with the plain environment (a child run with ``--plain-env``),
so both the steady-state and the fresh-memory figures are on record.

Outputs: benchmarks/results/perf.json and perf.md, and the tables on stdout.
"""

from __future__ import annotations

import ctypes
import os
import sys
from benchmarks.results_io import write_json, write_text

BENCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap and never give freed memory back to the kernel."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


MEMORY_REUSED = False
if __name__ == "__main__" and "--plain-env" not in sys.argv and "torch" not in sys.modules:
    for _key, _value in BENCH_ENV.items():
        os.environ.setdefault(_key, _value)
    MEMORY_REUSED = keep_freed_memory()

import argparse  # noqa: E402 - the environment above must be set before torch loads
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import embcompress  # noqa: E402
from embcompress.frozen import (FrozenCodebook, FrozenFactors, FrozenHashed,  # noqa: E402
                                FrozenQR, FrozenScalar, FrozenTensorTrain, kernels)
from embcompress.hashing import HashFunction  # noqa: E402
from embcompress.methods.codes import CompositionalCodeEmbedding  # noqa: E402
from embcompress.methods.tt import TTConfig, resolve_shapes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Inference targets: minimum speed ratio (format lookups/s over nn.Embedding lookups/s).
INFERENCE_TARGETS = {"dpq": 1.5, "codes": 1.5, "pq": 1.5, "memcom": 1.5, "hash": 1.5,
                     "distilled": 0.5, "lowrank": 0.5, "tt": 0.25}
TT_VS_TLTORCH_TARGET = 5.0
# Training targets: maximum step-time ratio over nn.Embedding(sparse=True).
TRAINING_TARGETS = {"dpq": 3.0, "dpq-vq": 3.0, "codes": 3.0, "codes-fixed": 3.0, "tt": 5.0, "memcom": 1.5}
FIXED_CODES = {"codes-fixed"}  # built in the fixed state with random codes

# Training-module specs for the step-time benchmark (sizes as a 1M x 128 table would use them).
TRAIN_SPECS = {
    # sparse=true: the query tables take sparse gradients, the same way the nn.Embedding(sparse=True)
    # baseline does (plain SGD takes them; so do SparseAdam and Adagrad).
    "dpq": "dpq:variant=sx,groups=32,codewords=16,sparse=true",
    "dpq-vq": "dpq:variant=vq,groups=32,codewords=16,sparse=true",
    "codes": "codes:books=16,codewords=32,sparse=true",
    # The paper's downstream training: codes learned once (post hoc or frozen), codebooks trained.
    "codes-fixed": "codes:books=16,codewords=32",
    "pq": "pq:groups=16,codewords=256",
    "memcom": "memcom:buckets=10000",
    "hash": "hash:buckets=10000,hash=universal",
    "tt": "tt:cores=3,rank=16",
    "distilled": "distilled:rank=16",
    "lowrank": "lowrank:rank=16",
    "qr": "qr:buckets=1000",
    "scalar": "scalar:bits=8",
}


# -- building the big frozen tables ------------------------------------------------------------

def _codebook(rows: int, dim: int, books: int, codewords: int, combine: str, gen: torch.Generator,
              shared: bool = False) -> FrozenCodebook:
    width = dim // books if combine == "concat" else dim
    codes = torch.randint(0, codewords, (rows, books), generator=gen)
    codebooks = torch.randn(1 if shared else books, codewords, width, generator=gen)
    return FrozenCodebook.from_codes(codes, codebooks, combine)


def build_formats(rows: int, dim: int, seed: int = 0) -> dict[str, tuple[str, nn.Module]]:
    """name -> (description, frozen module) at the benchmark shape, with random stored tensors."""
    gen = torch.Generator().manual_seed(seed)
    tt_config = TTConfig(cores=3, rank=16)
    vocab, dims = resolve_shapes(tt_config, rows, dim)
    ranks = [1, 16, 16, 1]
    cores = {f"core{k}": torch.randn(ranks[k], vocab[k], dims[k], ranks[k + 1], generator=gen) * 0.3
             for k in range(3)}
    buckets = 10_000
    universal = HashFunction.create("universal", buckets, gen).to_dict()
    return {
        "dpq": ("codebook concat, 32 books x 16 codewords (4-bit codes)",
                _codebook(rows, dim, 32, 16, "concat", gen)),
        "pq": ("codebook concat, 16 books x 256 codewords (8-bit codes)",
               _codebook(rows, dim, 16, 256, "concat", gen)),
        "codes": ("codebook sum, 16 books x 32 codewords (5-bit codes)",
                  _codebook(rows, dim, 16, 32, "sum", gen)),
        "codes-k16": ("codebook sum, 16 books x 16 codewords (4-bit codes)",
                      _codebook(rows, dim, 16, 16, "sum", gen)),
        "memcom": (f"hashed, {buckets} buckets x d + per-row scale",
                   FrozenHashed(rows, dim, hash=universal, table=torch.randn(buckets, dim, generator=gen),
                                scale=torch.randn(rows, generator=gen))),
        "hash": (f"hashed, {buckets} buckets x d (universal hash)",
                 FrozenHashed(rows, dim, hash=universal, table=torch.randn(buckets, dim, generator=gen))),
        "distilled": ("factors rank 16, tanh",
                      FrozenFactors(rows, dim, activation="tanh", codes=torch.randn(rows, 16, generator=gen),
                                    basis=torch.randn(16, dim, generator=gen),
                                    bias=torch.randn(dim, generator=gen))),
        "lowrank": ("factors rank 16, identity",
                    FrozenFactors(rows, dim, activation="identity",
                                  codes=torch.randn(rows, 16, generator=gen),
                                  basis=torch.randn(16, dim, generator=gen))),
        "tt": (f"tt 3 cores, rank 16, vocab {vocab}, dims {dims}",
               FrozenTensorTrain(rows, dim, vocab_shape=vocab, dim_shape=dims, **cores)),
        "qr": ("qr mult, 1000 remainder rows",
               FrozenQR(rows, dim, combine="mult", quotient=torch.randn(-(-rows // 1000), dim, generator=gen),
                        remainder=torch.randn(1000, dim, generator=gen))),
        "scalar8": ("scalar int8 + per-row scale",
                    FrozenScalar(rows, dim, bits=8,
                                 values=torch.randint(-127, 128, (rows, dim), generator=gen, dtype=torch.int8),
                                 scale=torch.rand(rows, generator=gen))),
    }


def build_tltorch(rows: int, dim: int) -> nn.Module | None:
    """tensorly-torch's FactorizedEmbedding (TT-matrix, 3 modes, rank 16), or None if not installed."""
    try:
        import tltorch  # noqa: PLC0415 - optional benchmark extra
    except ImportError:
        return None
    vocab, dims = resolve_shapes(TTConfig(cores=3, rank=16), rows, dim)
    # tltorch requires prod(vocab) == num_embeddings exactly: give it the padded row count.
    return tltorch.FactorizedEmbedding(math.prod(vocab), dim, auto_tensorize=False,
                                       tensorized_num_embeddings=vocab, tensorized_embedding_dim=dims,
                                       factorization="blocktt", rank=16)


# -- timing ------------------------------------------------------------------------------------

def _time_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved_ratios(baseline: Callable[[], Any], contenders: dict[str, Callable[[], Any]],
                       rounds: int, calls: int = 1, warmup: int = 2, settle: int = 0) -> dict[str, dict[str, float]]:
    """Per round, time the baseline right before each contender; ratio = baseline time / contender time.

    ``settle`` untimed calls precede each timed batch, so each side is timed in its own steady
    state rather than right after the other has flushed the caches.
    Returns name -> {ratio (median over rounds), seconds (median per call), baseline_seconds}.
    """
    for fn in [baseline, *contenders.values()]:
        for _ in range(warmup):
            fn()
    per: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            for _ in range(settle):
                baseline()
            base = _time_call(baseline, calls)
            for _ in range(settle):
                fn()
            mine = _time_call(fn, calls)
            per[name].append((base, mine))
    out = {}
    for name, pairs in per.items():
        out[name] = {"ratio": statistics.median(b / m for b, m in pairs),
                     "seconds": statistics.median(m for _, m in pairs),
                     "baseline_seconds": statistics.median(b for b, _ in pairs)}
    return out


@torch.no_grad()
def bench_inference(rows: int, dim: int, batch: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 1)
    dense = nn.Embedding(rows, dim)
    formats = build_formats(rows, dim, seed)
    ids = torch.randint(0, rows, (batch,), generator=gen)
    contenders = {name: (lambda m=module: m(ids)) for name, (_, module) in formats.items()}
    tl = build_tltorch(rows, dim)
    if tl is not None:
        contenders["tltorch-tt"] = lambda: tl(ids)
    # Warm: each side's timed call follows one untimed call of its own. Cold, a 5 MB hashed table
    # or a 10 MB tt cache was re-read from DRAM after every nn.Embedding call had swept the L3
    # cache with 32 MB of random rows, which a serving process repeating lookups does not see.
    results = interleaved_ratios(lambda: dense(ids), contenders, rounds, settle=1)
    for name, (description, module) in formats.items():
        results[name]["format"] = description
        results[name]["bytes"] = module.num_bytes()
        if hasattr(module, "cache_bytes"):  # tt: half tables derived at load time, not in the artifact
            results[name]["cache_bytes"] = module.cache_bytes()
        results[name]["compression"] = module.compression_ratio()
        results[name]["target"] = INFERENCE_TARGETS.get(name)
    if tl is not None:
        results["tltorch-tt"]["format"] = "tensorly-torch FactorizedEmbedding blocktt, same shape and rank"
        results["tltorch-tt"]["target"] = None
        tt_over_tl = results["tltorch-tt"]["seconds"] / results["tt"]["seconds"]
        results["tt"]["vs_tltorch"] = tt_over_tl
    lookups = batch / statistics.median(r["baseline_seconds"] for r in results.values())
    return {"rows": rows, "dim": dim, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
            "dense_lookups_per_s": lookups, "tltorch_installed": tl is not None, "formats": results}


# TorchRec's row-wise quantized EmbeddingBagCollection (FBGEMM TBE): what a recommendation engineer
# picks instead of a compressed table. name -> torch dtype the quantization observer is given.
TORCHREC_QUANTIZED = {"torchrec-int8": "qint8", "torchrec-int4": "quint4x2", "torchrec-int2": "quint2x4"}


def build_torchrec_quantized(weight: torch.Tensor) -> dict[str, tuple[nn.Module, int]] | None:
    """name -> (TorchRec quantized EmbeddingBagCollection of ``weight``, mean pooling; its stored bytes),
    or None without TorchRec. Bytes are FBGEMM's storage: per row the N-bit values, an fp16 scale and
    bias, padded to 16 bytes (int4 at d = 64: 32 + 4 -> 48 B)."""
    try:
        import torch.ao.quantization as quant  # noqa: PLC0415
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType  # noqa: PLC0415
        from torchrec.modules.embedding_configs import QuantConfig  # noqa: PLC0415
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC  # noqa: PLC0415
    except ImportError:
        return None
    rows, dim = weight.shape
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows,
                                                     feature_names=["f"], pooling=PoolingType.MEAN)])
    ebc.embedding_bags["t"].weight.data.copy_(weight)
    out = {}
    for name, dtype in TORCHREC_QUANTIZED.items():
        ebc.qconfig = QuantConfig(activation=quant.PlaceholderObserver.with_args(dtype=torch.float),
                                  weight=quant.PlaceholderObserver.with_args(dtype=getattr(torch, dtype)))
        module = QuantEBC.from_float(ebc)
        stored = sum(tbe.weights_host.numel() for tbe in module._emb_modules)
        out[name] = (module, stored)
    return out


@torch.no_grad()
def bench_bags(rows: int, dim: int, bags: int, length: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Exported formats' ``bag(mode="mean")`` and TorchRec's quantized bags against
    nn.EmbeddingBag(mode="mean"), same ids, same table (the quantized ones quantize nn.EmbeddingBag's)."""
    gen = torch.Generator().manual_seed(seed + 2)
    dense = nn.EmbeddingBag(rows, dim, mode="mean")
    formats = build_formats(rows, dim, seed)
    ids = torch.randint(0, rows, (bags, length), generator=gen)
    contenders = {name: (lambda m=module: m.bag(ids, mode="mean")) for name, (_, module) in formats.items()}
    quantized = build_torchrec_quantized(dense.weight.detach())
    if quantized is not None:
        from torchrec import KeyedJaggedTensor  # noqa: PLC0415
        kjt = KeyedJaggedTensor(keys=["f"], values=ids.reshape(-1), lengths=torch.full((bags,), length, dtype=torch.int32))
        contenders.update({name: (lambda m=module: m(kjt)) for name, (module, _) in quantized.items()})
    results = interleaved_ratios(lambda: dense(ids), contenders, rounds, settle=1)
    for name, (_, module) in formats.items():
        results[name]["bytes_per_row"] = module.num_bytes() / rows
    for name, (_, stored) in (quantized or {}).items():
        results[name]["bytes_per_row"] = stored / rows
    return {"rows": rows, "dim": dim, "bags": bags, "bag_length": length, "rounds": rounds,
            "threads": torch.get_num_threads(), "torchrec_installed": quantized is not None, "formats": results}


# -- training ----------------------------------------------------------------------------------

class BagModel(nn.Module):
    """Mean of the rows of each bag, then a linear classifier."""

    def __init__(self, table: nn.Module, dim: int, classes: int) -> None:
        super().__init__()
        self.table = table
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (B, L)
        return self.head(self.table(ids).mean(1))


class SparseBagModel(nn.Module):
    """The baseline: nn.EmbeddingBag-free, same pooling, with a sparse-gradient nn.Embedding."""

    def __init__(self, rows: int, dim: int, classes: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, dim, sparse=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(1))


def holds_dense_table(module: nn.Module, rows: int, dim: int) -> bool:
    """True if any parameter, buffer or gradient of ``module`` has rows * dim or more elements."""
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    return any(t.numel() >= rows * dim for t in tensors)


def holds_dense_gradient(module: nn.Module, rows: int, dim: int) -> bool:
    """True if a gradient with rows * dim or more stored values exists (sparse gradients count their values)."""
    for param in module.parameters():
        grad = param.grad
        if grad is not None and (grad._values() if grad.is_sparse else grad).numel() >= rows * dim:
            return True
    return False


def make_step(model: nn.Module, lr: float = 0.05) -> Callable[[torch.Tensor, torch.Tensor], None]:
    # Plain SGD: the one optimizer that takes sparse and dense gradients alike, so every
    # model pays the same update rule.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids), labels) + embcompress.aux_loss(model)
        loss.backward()
        optimizer.step()

    return step


def training_table(name: str, rows: int, dim: int) -> nn.Module:
    """The training module benchmarked as ``name`` (TRAIN_SPECS; FIXED_CODES in the fixed state)."""
    if name not in FIXED_CODES:
        return embcompress.build(TRAIN_SPECS[name], rows, dim)
    table = CompositionalCodeEmbedding(rows, dim, TRAIN_SPECS[name], layout={"state": "fixed"})
    gen = torch.Generator().manual_seed(1)
    table.codes.copy_(torch.randint(0, table.config.codewords, table.codes.shape, generator=gen))
    return table


def bench_training(rows: int, dim: int, bags: int, length: int, rounds: int, methods: list[str],
                   seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (bags, length), generator=gen)
    labels = torch.randint(0, 10, (bags,), generator=gen)
    torch.manual_seed(seed)
    baseline_model = SparseBagModel(rows, dim, 10)
    base_step = make_step(baseline_model)
    models, contenders = {}, {}
    for name in methods:
        model = BagModel(training_table(name, rows, dim), dim, 10).train()
        models[name] = model
        step = make_step(model)
        contenders[name] = lambda s=step: s(ids, labels)
    results = interleaved_ratios(lambda: base_step(ids, labels), contenders, rounds, warmup=2)
    for name, model in models.items():
        r = results[name]
        r["ratio"] = 1.0 / r["ratio"]  # step time over the baseline's: lower is better
        r["spec"] = TRAIN_SPECS[name]
        r["target"] = TRAINING_TARGETS.get(name)
        r["training_bytes"] = model.table.training_bytes()
        r["dense_vxd"] = holds_dense_table(model.table, rows, dim)
        r["dense_vxd_grad"] = holds_dense_gradient(model.table, rows, dim)
    return {"rows": rows, "dim": dim, "bags": bags, "bag_length": length, "rounds": rounds,
            "optimizer": "SGD lr=0.05", "baseline": "nn.Embedding(sparse=True)", "methods": results}


def _peak_rss_child(name: str, rows: int, dim: int, bags: int, length: int, steps: int) -> None:
    """In a fresh process: peak RSS growth (bytes) of building and training one table; prints JSON."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (bags, length), generator=gen)
    labels = torch.randint(0, 10, (bags,), generator=gen)
    before = _peak_rss()
    if name == "nn.Embedding":
        model: nn.Module = SparseBagModel(rows, dim, 10)
    else:
        model = BagModel(training_table(name, rows, dim), dim, 10).train()
    step = make_step(model)
    for _ in range(steps):
        step(ids, labels)
    print(json.dumps({"peak_bytes": _peak_rss() - before}))


def _peak_rss() -> int:
    """Peak resident set of this process in bytes.

    Linux: VmHWM, which starts afresh at exec (ru_maxrss does not: a child started by a big
    parent would report the parent's peak). Elsewhere: ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def bench_memory(rows: int, dim: int, bags: int, length: int, methods: list[str], steps: int = 3) -> dict[str, int]:
    out = {}
    for name in ["nn.Embedding", *methods]:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--peak-child", name, "--rows", str(rows),
                               "--dim", str(dim), "--bags", str(bags), "--bag-length", str(length),
                               "--steps", str(steps)], capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"peak memory run for {name} failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
    return out


def bench_inference_plain_env(rows: int, dim: int, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    """The inference table again in a child process with the plain environment (see the docstring)."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.perf", "--plain-env", "--skip-training",
                               "--skip-plain", "--rows", str(rows), "--dim", str(dim), "--batch", str(batch),
                               "--rounds", str(rounds), "--threads", str(threads), "--out", out],
                              capture_output=True, text=True, timeout=1800,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise RuntimeError(f"plain-environment inference run failed:\n{proc.stderr[-2000:]}")
        return json.loads((Path(out) / "perf.json").read_text())["inference"]


# -- report ------------------------------------------------------------------------------------

def _verdict(ratio: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return "-"
    met = ratio >= target if higher_is_better else ratio <= target
    return "met" if met else "MISSED"


def markdown(report: dict[str, Any]) -> str:
    inf = report["inference"]
    env = ", ".join(f"{k}={v}" for k, v in report.get("env", {}).items()) or "default"
    loads = [report.get(k) for k in ("load_average_start", "load_average_end")]
    load = " -> ".join(f"{l[0]:.1f}" for l in loads if l)
    plain = report.get("inference_plain_env")
    reused = "freed memory reused (glibc mallopt)" if report.get("memory_reused") else "glibc defaults"
    kernel = "on" if report.get("c_kernels") else "off (torch path)"
    lines = [f"Machine: {report.get('cpus', '?')} CPUs, torch {report['torch']}, environment {env}, {reused}; "
             f"C lookups {kernel}; 1-minute load average {load} (start -> end of the run; the machine is shared).",
             "",
             f"### Inference: lookups/s vs nn.Embedding (V={inf['rows']:,}, d={inf['dim']}, "
             f"{inf['batch']:,} random ids per call, {inf['threads']} threads, median of {inf['rounds']} rounds)",
             "",
             f"nn.Embedding: {inf['dense_lookups_per_s'] / 1e6:.1f} M lookups/s on this run"
             + (f" ({plain['dense_lookups_per_s'] / 1e6:.1f} M with fresh memory per call)." if plain else "."),
             "",
             "| format | stored as | compression | speed vs nn.Embedding | target | | fresh memory per call |",
             "|---|---|---:|---:|---:|---|---:|"]
    for name, r in inf["formats"].items():
        target = r.get("target")
        comp = f"{r['compression']:.0f}x" if "compression" in r else "-"
        fresh = plain["formats"].get(name, {}).get("ratio") if plain else None
        lines.append(f"| {name} | {r['format']} | {comp} | {r['ratio']:.2f}x | "
                     f"{'>= %.2gx' % target if target else '-'} | {_verdict(r['ratio'], target, True)} | "
                     f"{'%.2fx' % fresh if fresh else '-'} |")
    if "vs_tltorch" in inf["formats"].get("tt", {}):
        v = inf["formats"]["tt"]["vs_tltorch"]
        lines += ["", f"tt vs tensorly-torch FactorizedEmbedding (same shape and rank): **{v:.2f}x faster** "
                      f"(target >= {TT_VS_TLTORCH_TARGET:g}x: {_verdict(v, TT_VS_TLTORCH_TARGET, True)})."]
    tt = inf["formats"].get("tt", {})
    if "cache_bytes" in tt:
        lines += ["", f"tt's lookup cache (both half products, rebuilt from the cores at load time, not stored): "
                      f"{tt['cache_bytes'] / 2**20:.1f} MiB; the artifact (cores) is {tt['bytes'] / 2**10:.0f} KiB."]
    elif not inf["tltorch_installed"]:
        lines += ["", "tensorly-torch is not installed: the tt vs tensorly-torch comparison was not run."]
    bag = report.get("bags")
    if bag:
        lines += ["", f"### Bags: `bag(mode=\"mean\")` vs nn.EmbeddingBag(mode=\"mean\") ({bag['bags']:,} bags x "
                      f"{bag['bag_length']} ids, V={bag['rows']:,}, d={bag['dim']}, {bag.get('threads', '?')} threads, "
                      f"median of {bag['rounds']} rounds)", "",
                  "TorchRec's row-wise quantized EmbeddingBagCollection (FBGEMM int8 / int4 / int2, fp16 scale and "
                  "bias per row, rows padded to 16 bytes) pools the same ids over nn.EmbeddingBag's own table.", "",
                  "| format | bytes per row | compression | speed vs nn.EmbeddingBag |", "|---|---:|---:|---:|"]
        dense_row = 4 * bag["dim"]
        lines += [f"| {name} | {r['bytes_per_row']:.1f} | {dense_row / r['bytes_per_row']:.0f}x | {r['ratio']:.2f}x |"
                  if "bytes_per_row" in r else f"| {name} | - | - | {r['ratio']:.2f}x |"
                  for name, r in bag["formats"].items()]
        if not bag.get("torchrec_installed", False):
            lines += ["", "TorchRec is not installed: its quantized bags were not run."]
    tr = report.get("training")
    if tr:
        mem = report.get("memory", {})
        lines += ["", f"### Training: step time vs nn.Embedding(sparse=True) (V={tr['rows']:,}, d={tr['dim']}, "
                      f"{tr['bags']} bags x {tr['bag_length']} ids, mean pooling, {tr['optimizer']}, "
                      f"median of {tr['rounds']} rounds)", ""]
        base_mem = mem.get("nn.Embedding")
        if base_mem is not None:
            lines.append(f"nn.Embedding(sparse=True) peak memory: {base_mem / 2**20:.0f} MiB.")
            lines.append("")
        lines += ["| method | spec | step time vs nn.Embedding | target | | peak memory | holds dense V x d "
                  "| dense V x d gradient |",
                  "|---|---|---:|---:|---|---:|---|---|"]
        for name, r in tr["methods"].items():
            target = r.get("target")
            peak = f"{mem[name] / 2**20:.0f} MiB" if name in mem else "-"
            lines.append(f"| {name} | `{r['spec']}` | {r['ratio']:.2f}x | "
                         f"{'<= %.2gx' % target if target else '-'} | {_verdict(r['ratio'], target, False)} | "
                         f"{peak} | {'yes' if r['dense_vxd'] else 'no'} | "
                         f"{'yes' if r.get('dense_vxd_grad') else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bags", type=int, default=512)
    parser.add_argument("--bag-length", type=int, default=32)
    parser.add_argument("--bag-count", type=int, default=2048, help="bags per call in the bag benchmark")
    parser.add_argument("--train-rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--methods", default=",".join(TRAIN_SPECS), help="training methods, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-plain", action="store_true",
                        help="do not repeat the inference table with the plain environment in a child run")
    parser.add_argument("--plain-env", action="store_true",
                        help=f"leave {', '.join(BENCH_ENV)} as they are (see the module docstring)")
    args = parser.parse_args(argv)
    if args.peak_child:
        _peak_rss_child(args.peak_child, args.rows, args.dim, args.bags, args.bag_length, args.steps)
        return 0
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"torch": torch.__version__, "machine": platform.machine(),
                              "cpus": os.cpu_count(), "env": {k: os.environ.get(k) for k in BENCH_ENV},
                              "memory_reused": MEMORY_REUSED, "c_kernels": kernels.enabled(),
                              "load_average_start": list(os.getloadavg()),
                              "inference": bench_inference(args.rows, args.dim, args.batch, args.rounds)}
    report["bags"] = bench_bags(args.rows, args.dim, args.bag_count, args.bag_length, args.rounds)
    if not args.skip_plain:
        report["inference_plain_env"] = bench_inference_plain_env(args.rows, args.dim, args.batch, args.rounds,
                                                                  args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if not args.skip_training:
        report["training"] = bench_training(args.rows, args.dim, args.bags, args.bag_length, args.train_rounds,
                                            methods)
        if not args.skip_memory:
            report["memory"] = bench_memory(args.rows, args.dim, args.bags, args.bag_length, methods, args.steps)
    report["load_average_end"] = list(os.getloadavg())
    write_json(args.out / "perf.json", report, indent=2)
    text = markdown(report)
    write_text(args.out / "perf.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
