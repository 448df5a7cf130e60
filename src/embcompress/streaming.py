"""Post hoc compression of tables larger than memory: fit on a sample, encode in chunks, write as you go.

The fp32 table stays on disk (:class:`~embcompress.data.MappedTable`, a memory map whose pages are
released after every read). Memory holds the sample, one chunk of rows and the fitted parameters,
never the table; the output goes to disk as it is made (or, for ``from_pretrained``, into the
returned frozen module):

1. **Fit** on a sample of rows (``sample`` rows, default 2^18), read in file order:
   - ``sample_order="uniform"``: rows drawn uniformly without replacement, as the in-memory fits draw
     their batches and k-means samples (the reconstruction error they minimize weighs rows equally);
   - ``sample_order="frequency"``, for a table ordered by lookup frequency (row 0 the most frequent,
     as word vectors and most ID tables are): the first half of the sample is the head of the table,
     the second half uniform over the rest. Under Zipf(1) lookups over 20M rows the first 131k rows
     serve 71% of lookups, so the codebooks are fit where most lookups land while still seeing the
     bulk of the rows.
2. **Encode** every row in chunks with the fitted parameters, per deployed format: codebooks with
   ``concat`` (DPQ, PQ) take the nearest codeword of each group (the least-squares codes for the
   stored codebooks); ``sum`` (compositional codes) beam search + ICM + LSQ++ local search as the
   in-memory fit's final stages; ``scalar`` quantizes each row; ``hashed`` (hash, MEmCom) computes
   its shared table in passes over the chunks (bucket means, then MEmCom's alternating least
   squares: one pass per round) and solves each row's scale (and bias) against the final table.
3. **Write** the artifact incrementally (:class:`IncrementalArtifactWriter`): header space is
   reserved, tensor bytes go straight to io's temporary file beside the output, the header sealed
   with io's digest is written last, and io's atomic write renames the file into place or removes it
   on any error. :func:`embcompress.load` reads the result like any other artifact.

Example:
    >>> import numpy as np
    >>> from embcompress.data import open_table_mmap
    >>> np.save("items.npy", np.random.rand(5000, 16).astype(np.float32))
    >>> with open_table_mmap("items.npy") as table:
    ...     report = compress_mapped(table, "pq", bits_per_row=32, output="items.emb", sample=2000).report
    >>> report["rows"], report["bits_per_row"] <= 32
    (5000, True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, cast

import numpy as np
import torch
import torch.nn.functional as F

from .additive import best_codes, beam_encode, icm_codes, local_search_codes
from .bitpack import pack_codes, packed_size
from .config import FitConfig, FitLike, MethodConfig
from .data import MappedTable
from .frozen import FrozenEmbedding, get_format, kernels
from .frozen.codebook import FrozenCodebook
from .frozen.codebook import decode_codes
from .frozen.scalar import dequantize, quantize_rows
from .hashing import HashFunction
from .io import (HEADER_KEY, atomic_write, check_output_path, header_digest, json_ready, unsealed_header,
                 update_with_tensor)
from .kmeans import assign
from .methods.memcom import TINY, row_scales
from .methods.scalar import ScalarConfig
from .methods.shared import HashedRowsConfig
from .progress import progress_bar
from .registry import get_method
from .validation import normalize_padding_idx

__all__ = ["STREAMING_METHODS", "StreamResult", "compress_mapped", "sample_ids", "IncrementalArtifactWriter",
           "check_streamable", "peak_rss_bytes", "should_stream", "write_incrementally"]

STREAMING_METHODS = ("codes", "dpq", "pq", "scalar", "hash", "memcom")
SAMPLE_ORDERS = ("uniform", "frequency")
DEFAULT_SAMPLE = 1 << 18
DEFAULT_CHUNK = 1 << 16

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.uint8: "U8", torch.int8: "I8",
              torch.int32: "I32", torch.int64: "I64", torch.bfloat16: "BF16", torch.float64: "F64"}


def check_streamable(method: str) -> None:
    if method not in STREAMING_METHODS:
        raise ValueError(f"{method} cannot be compressed in chunks (its fit needs the whole table in memory); "
                         f"streaming methods: {', '.join(STREAMING_METHODS)}")


def _proc_kib(file: str, field: str) -> int | None:
    """A "Field: N kB" line of a /proc file, in bytes (None where there is no /proc)."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), else physical memory."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


#: Stream when the table file exceeds this share of available memory: the in-memory fits hold the
#: table plus working copies of it (DPQ and codes a query table as large again).
AUTO_STREAM_SHARE = 0.5


def should_stream(source: "str | os.PathLike[str]") -> bool:
    """Whether ``embcompress compress`` streams this source when neither --stream nor --no-stream is given."""
    path = Path(source)
    return (path.suffix in (".npy", ".safetensors") and path.is_file()
            and path.stat().st_size > AUTO_STREAM_SHARE * available_memory_bytes())


def peak_rss_bytes() -> int:
    """Peak resident set of this process as the OS counts it (mapped file pages included): VmHWM."""
    peak = _proc_kib("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sample_ids(rows: int, size: int, order: str = "uniform", seed: int = 0) -> np.ndarray:
    """Sorted row ids to fit on: all rows when ``size >= rows``; see the module docstring for ``order``."""
    if order not in SAMPLE_ORDERS:
        raise ValueError(f"sample_order must be one of {', '.join(SAMPLE_ORDERS)}, got {order!r}")
    if size < 1:
        raise ValueError(f"sample must be at least 1 row, got {size}")
    if size >= rows:
        return np.arange(rows)
    rng = np.random.default_rng(seed)
    if order == "uniform":
        return np.sort(rng.choice(rows, size, replace=False))
    head = size // 2
    tail = head + rng.choice(rows - head, size - head, replace=False)
    return np.concatenate([np.arange(head), np.sort(tail)])


# -- sinks: where the compressed tensors go -----------------------------------------------------------
class _MemorySink:
    """Collects the tensors in memory (for ``from_pretrained``); per-row tensors filled piece by piece."""

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.tensors = {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in layout.items()}
        self._cursor = dict.fromkeys(layout, 0)

    def append(self, name: str, piece: torch.Tensor) -> None:
        data = piece.contiguous().view(-1).view(torch.uint8)
        flat = self.tensors[name].view(-1).view(torch.uint8)
        start = self._cursor[name]
        if start + data.numel() > flat.numel():
            raise ValueError(f"tensor {name!r} overflows its {flat.numel():,} bytes")
        flat[start:start + data.numel()] = data
        self._cursor[name] = start + data.numel()

    def check_complete(self) -> None:
        for name, tensor in self.tensors.items():
            if self._cursor[name] != tensor.numel() * tensor.element_size():
                raise RuntimeError(f"tensor {name!r} got {self._cursor[name]:,} of "
                                   f"{tensor.numel() * tensor.element_size():,} bytes")


class IncrementalArtifactWriter:
    """A safetensors artifact written tensor piece by tensor piece (see :func:`write_incrementally`).

    The tensor sizes are known up front, so the data offsets are too: the header is reserved at the
    start of the file (safetensors allows a space-padded JSON header), each tensor's bytes are
    written at its offset as they come, and :meth:`finish` hashes the tensors by reading them back
    in the order io's digest defines (pieces of several tensors arrive interleaved), then writes the
    sealed header. Header and digest are io's: the file is an ordinary artifact for ``load``.
    """

    def __init__(self, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], kind: str,
                 fields: dict[str, Any]) -> None:
        self.layout = dict(layout)
        self.header = unsealed_header(kind, fields)
        self._offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for name in sorted(layout):  # the digest's order, so the read-back is one sequential pass
            dtype, shape = layout[name]
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            self._offsets[name] = (position, position + size)
            position += size
        self._data_bytes = position
        self._cursor = dict.fromkeys(layout, 0)
        # The digest is a fixed-length hex string: a placeholder of the same length sizes the header.
        self._header_len = len(self._header_json("0" * 64))
        self._header_len += (-self._header_len) % 8  # tensor data 8-byte aligned, as safetensors writes it
        self._fd: int | None = None

    def _header_json(self, digest: str) -> bytes:
        entries: dict[str, Any] = {"__metadata__": {HEADER_KEY: json.dumps({**self.header, "sha256": digest},
                                                                            sort_keys=True)}}
        for name, (begin, end) in self._offsets.items():
            dtype, shape = self.layout[name]
            entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        return json.dumps(entries, separators=(",", ":")).encode()

    def open(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR)
        os.ftruncate(self._fd, 8 + self._header_len + self._data_bytes)

    def append(self, name: str, piece: torch.Tensor) -> None:
        """Write the next bytes of tensor ``name`` (pieces arrive in row order)."""
        data = piece.contiguous().view(-1).view(torch.uint8).numpy()
        begin, end = self._offsets[name]
        start = begin + self._cursor[name]
        if start + data.nbytes > end:
            raise ValueError(f"tensor {name!r} overflows its {end - begin:,} bytes")
        assert self._fd is not None, "open() the writer first"
        os.pwrite(self._fd, data.data, 8 + self._header_len + start)
        self._cursor[name] += data.nbytes

    def _pieces(self, name: str, block: int = 1 << 24) -> Iterator[bytes]:
        begin, end = self._offsets[name]
        for start in range(begin, end, block):
            assert self._fd is not None
            yield os.pread(self._fd, min(block, end - start), 8 + self._header_len + start)

    def finish(self) -> None:
        for name, (begin, end) in self._offsets.items():
            if self._cursor[name] != end - begin:
                raise RuntimeError(f"tensor {name!r} got {self._cursor[name]:,} of {end - begin:,} bytes")
        digest = header_digest(self.header)
        for name in sorted(self.layout):
            dtype, shape = self.layout[name]
            update_with_tensor(digest, name, dtype, shape, self._pieces(name))
        header = self._header_json(digest.hexdigest())
        header += b" " * (self._header_len - len(header))
        assert self._fd is not None
        os.pwrite(self._fd, self._header_len.to_bytes(8, "little") + header, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_incrementally(path: "str | os.PathLike[str]", writer: IncrementalArtifactWriter,
                        produce: Callable[[IncrementalArtifactWriter], None], *, overwrite: bool = False,
                        protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """``produce(writer)`` appends every tensor's bytes; the file appears at ``path`` only when complete.

    io's atomic write protocol (its output rules, a temporary file removed on any error, Ctrl-C or
    SIGTERM, fsync and rename) around the whole encoding pass.
    """
    def write(tmp: Path) -> None:
        writer.open(tmp)
        try:
            produce(writer)
            writer.finish()
        finally:
            writer.close()

    return atomic_write(path, write, overwrite=overwrite, protect=protect)


# -- encoders: one per deployed format ------------------------------------------------------------------
class _Encoder:
    """What a deployed format needs to be built chunk by chunk."""

    format: str

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Every stored tensor's dtype and shape."""
        raise NotImplementedError

    def fixed(self) -> dict[str, torch.Tensor]:
        """Tensors known before the encoding pass (codebooks, shared tables)."""
        return {}

    def prepare(self, table: MappedTable, chunk: int, progress: bool | None) -> None:
        """Passes over the table before the encoding pass (hashed tables)."""

    def encode(self, rows: torch.Tensor, start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows [start, start + n) -> pieces of the per-row tensors, and the rows as they decode."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        raise NotImplementedError


class _CodebookEncoder(_Encoder):
    format = "codebook"

    def __init__(self, fitted: FrozenCodebook, rows: int, fit: FitConfig) -> None:
        self.fitted, self.rows = fitted, rows
        self.books, self.bits, self.combine = fitted.books, fitted.bits, fitted.combine
        self.codebooks = fitted.codebooks.float()  # the stored values (fp16 ones decode in float32)
        # pq with rotation=pca codes rows @ R and decodes codewords @ R^T (R as stored, fp16 values)
        self.rotation = None if fitted.rotation is None else fitted.rotation.float()
        settings = fitted.fit_settings or {}  # codes: the beam and search of its own fit's last stages
        self.beam = int(settings.get("beam", 8))
        self.search = int(settings.get("search", 4))
        self.generator = torch.Generator().manual_seed(int(settings.get("seed") or 0))

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out = {"codebooks": (self.fitted.codebooks.dtype, tuple(self.fitted.codebooks.shape)),
               "packed": (torch.uint8, (packed_size(self.rows, self.books, self.bits),))}
        if self.fitted.rotation is not None:
            out["rotation"] = (self.fitted.rotation.dtype, tuple(self.fitted.rotation.shape))
        return out

    def fixed(self) -> dict[str, torch.Tensor]:
        out = {"codebooks": self.fitted.codebooks}
        if self.fitted.rotation is not None:
            out["rotation"] = self.fitted.rotation
        return out

    def _codes(self, rows: torch.Tensor) -> torch.Tensor:
        books, codebooks = self.books, self.codebooks
        if self.combine == "concat":  # nearest codeword per group
            centroids = codebooks.expand(books, -1, -1).contiguous()
            if kernels.dpq_supported(rows, centroids):  # DPQ-VQ's C code search: 8x torch's at 32 x 16 x 4
                return kernels.dpq_vq_codes(rows.t().contiguous().view(books, -1, rows.shape[0]), centroids)
            return assign(rows.view(rows.shape[0], books, -1).transpose(0, 1), centroids).T
        # sum: the in-memory fit's last stages (best of two beam searches, ICM, LSQ++ local search)
        codes = best_codes(rows, [beam_encode(rows, codebooks, self.beam),
                                  beam_encode(rows, codebooks, self.beam, order="stored")], codebooks)
        codes = icm_codes(rows, codes, codebooks, sweeps=1)
        return local_search_codes(rows, codes, codebooks, iters=self.search, generator=self.generator)

    def encode(self, rows: torch.Tensor, start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.rotation is not None:
            rows = rows @ self.rotation
        codes = self._codes(rows)
        decoded = decode_codes(codes, self.codebooks, self.combine)
        if self.rotation is not None:
            decoded = decoded @ self.rotation.t()
        return {"packed": pack_codes(codes, self.bits)}, decoded

    def metadata(self) -> dict[str, Any]:
        return self.fitted.metadata()


class _ScalarEncoder(_Encoder):
    format = "scalar"

    def __init__(self, bits: int, rows: int, dim: int) -> None:
        self.bits, self.rows, self.dim = bits, rows, dim

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if self.bits == 16:
            return {"values": (torch.float16, (self.rows, self.dim))}
        width = self.dim if self.bits == 8 else (self.dim + 1) // 2
        return {"values": (torch.int8 if self.bits == 8 else torch.uint8, (self.rows, width)),
                "scale": (torch.float32, (self.rows,))}

    def encode(self, rows: torch.Tensor, start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        values, scale = quantize_rows(rows, self.bits)
        pieces = {"values": values} if scale is None else {"values": values, "scale": scale}
        return pieces, dequantize(values, scale, self.bits, self.dim)

    def metadata(self) -> dict[str, Any]:
        return {"bits": self.bits}


class _HashedEncoder(_Encoder):
    """hash: bucket means; memcom: alternating least squares, one pass over the table per round."""

    format = "hashed"

    def __init__(self, config: HashedRowsConfig, rows: int, dim: int, padding_idx: int | None, fit: FitConfig) -> None:
        self.rows, self.dim, self.padding_idx = rows, dim, padding_idx
        self.memcom = config.method == "memcom"
        self.bias = self.memcom and bool(getattr(config, "bias", False))
        self.hash = HashFunction.create(config.hash, config.buckets)
        self.rounds = fit.steps if self.memcom else 0
        self.table = torch.zeros(config.buckets, dim)

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"table": (torch.float32, (self.hash.buckets, self.dim))}
        if self.memcom:
            out["scale"] = (torch.float32, (self.rows,))
        if self.bias:
            out["bias"] = (torch.float32, (self.rows,))
        return out

    def fixed(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def _members(self, start: int, n: int) -> torch.Tensor:
        """Rows of the chunk that shape the table (MEmCom leaves the padding row out, as its fit does)."""
        keep = torch.ones(n, dtype=torch.bool)
        if self.memcom and self.padding_idx is not None and start <= self.padding_idx < start + n:
            keep[self.padding_idx - start] = False
        return keep

    def prepare(self, table: MappedTable, chunk: int, progress: bool | None) -> None:
        m = self.hash.buckets
        sums, count = torch.zeros(m, self.dim, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
        for start, rows in _chunks(table, chunk, progress, "bucket means"):
            keep = self._members(start, rows.shape[0])
            bucket = self.hash(torch.arange(start, start + rows.shape[0]))[keep]
            sums.index_add_(0, bucket, rows[keep].double())
            count.index_add_(0, bucket, torch.ones(bucket.shape[0], dtype=torch.float64))
        self.table = (sums / count.clamp_min(1).unsqueeze(1)).float()
        occupied = count > 0
        for round_ in range(self.rounds):
            num, den = torch.zeros(m, self.dim, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
            for start, rows in _chunks(table, chunk, progress, f"memcom round {round_ + 1}/{self.rounds}"):
                keep = self._members(start, rows.shape[0])
                bucket = self.hash(torch.arange(start, start + rows.shape[0]))[keep]
                x = rows[keep]
                w, b = row_scales(x, self.table[bucket], self.bias)
                target = x if b is None else x - b.unsqueeze(1)
                num.index_add_(0, bucket, (target * w.unsqueeze(1)).double())
                den.index_add_(0, bucket, (w * w).double())
            update = (den > TINY) & occupied
            self.table = torch.where(update.unsqueeze(1), (num / den.clamp_min(TINY).unsqueeze(1)).float(), self.table)

    def encode(self, rows: torch.Tensor, start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        t = self.table[self.hash(torch.arange(start, start + rows.shape[0]))]
        if not self.memcom:
            return {}, t
        w, b = row_scales(rows, t, self.bias)
        keep = self._members(start, rows.shape[0])
        w = torch.where(keep, w, torch.ones_like(w))  # the padding row keeps the initial scale 1, bias 0
        decoded = t * w.unsqueeze(1)
        if b is None:
            return {"scale": w}, decoded
        b = torch.where(keep, b, torch.zeros_like(b))
        return {"scale": w, "bias": b}, decoded + b.unsqueeze(1)

    def metadata(self) -> dict[str, Any]:
        return {"hash": self.hash.to_dict()}


def _chunks(table: MappedTable, chunk: int, progress: bool | None, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    rows = table.shape[0]
    for start in progress_bar(range(0, rows, chunk), desc=desc, enabled=progress):
        yield start, table.rows(start, min(start + chunk, rows))


# -- the driver ---------------------------------------------------------------------------------------------
@dataclass
class StreamResult:
    """The report, and the frozen module when no output file was given (else None)."""

    frozen: FrozenEmbedding | None
    report: dict[str, Any] = field(default_factory=dict)


class _Quality:
    """rel_mse and mean_cosine as ``evaluate.reconstruction_metrics`` defines them, accumulated by chunk,
    plus the error weighted by 1 / (row + 1): the lookup mix of a Zipf(1) frequency-ordered table."""

    def __init__(self, dim: int) -> None:
        self.error = self.zipf_error = self.cosine = self.zipf_weight = self.zipf_sq = 0.0
        self.col_sum = torch.zeros(dim, dtype=torch.float64)
        self.zipf_col_sum = torch.zeros(dim, dtype=torch.float64)
        self.sq = 0.0
        self.rows = 0

    def add(self, rows: torch.Tensor, decoded: torch.Tensor, start: int) -> None:
        # Per-row sums in float32 (d terms each), totals in float64: no float64 copy of the chunk.
        err = (decoded - rows).pow_(2).sum(1).double()
        sq = rows.pow(2).sum(1).double()
        weight = 1.0 / torch.arange(start + 1, start + rows.shape[0] + 1, dtype=torch.float64)
        self.error += float(err.sum())
        self.zipf_error += float((err * weight).sum())
        self.cosine += float(F.cosine_similarity(decoded, rows, dim=1).double().sum())
        self.col_sum += rows.sum(0).double()
        self.zipf_col_sum += (weight.float() @ rows).double()
        self.sq += float(sq.sum())
        self.zipf_sq += float((sq * weight).sum())
        self.zipf_weight += float(weight.sum())
        self.rows += rows.shape[0]

    def report(self) -> dict[str, float]:
        mean = self.col_sum / self.rows
        spread = max(self.sq - self.rows * float(mean.pow(2).sum()), 1e-30)
        # sum_i w_i |x_i - mean|^2 = sum w_i |x_i|^2 - 2 mean . sum w_i x_i + |mean|^2 sum w_i
        zipf_spread = self.zipf_sq - 2 * float(mean @ self.zipf_col_sum) + float(mean.pow(2).sum()) * self.zipf_weight
        return {"rel_mse": self.error / spread, "mean_cosine": self.cosine / self.rows,
                "rel_mse_zipf1": self.zipf_error / max(zipf_spread, 1e-30)}


def _encoder(config: MethodConfig, table: MappedTable, padding_idx: int | None, sample: int, sample_order: str,
             seed: int, fit: FitConfig, progress: bool | None, report: dict[str, Any]) -> _Encoder:
    rows, dim = table.shape
    if config.method == "scalar":
        return _ScalarEncoder(cast(ScalarConfig, config).bits, rows, dim)
    if config.method in ("hash", "memcom"):
        return _HashedEncoder(cast(HashedRowsConfig, config), rows, dim, padding_idx, fit)
    ids = sample_ids(rows, sample, sample_order, seed)
    started = time.perf_counter()
    weight = table.take(ids)
    report["sample_read_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    fitted = cast(FrozenCodebook, get_method(config.method).from_pretrained(weight, config, None, fit,
                                                                           progress=progress).export())
    report["fit_seconds"] = time.perf_counter() - started
    del weight
    report["fit"] = fitted.fit_settings
    return _CodebookEncoder(fitted, rows, fit)


def compress_mapped(table: MappedTable, spec: "str | MethodConfig", *, output: "str | os.PathLike[str] | None" = None,
                    bytes: int | None = None, bits_per_row: float | None = None, ratio: float | None = None,
                    padding_idx: int | None = None, sample: int = DEFAULT_SAMPLE, sample_order: str = "uniform",
                    chunk: int = DEFAULT_CHUNK, seed: int = 0, fit_options: FitLike = None,
                    progress: bool | None = None, overwrite: bool = False) -> StreamResult:
    """Compress a memory-mapped table without reading it into memory (see the module docstring).

    Writes the frozen artifact to ``output`` (atomically, by io's rules: an existing file is
    replaced only with ``overwrite``) or, without ``output``, returns the frozen module in
    :attr:`StreamResult.frozen`. ``fit_options`` go to the method's fit on the sample (``steps``
    is also MEmCom's number of rounds, each a pass over the table).
    """
    from .posthoc import resolve_config  # posthoc imports this module lazily: import it lazily too

    rows, dim = table.shape
    config = resolve_config(spec, rows, dim, bytes=bytes, bits_per_row=bits_per_row, ratio=ratio)
    check_streamable(config.method)
    if chunk < 8:
        raise ValueError(f"chunk must be at least 8 rows, got {chunk}")
    if output is not None:
        check_output_path(output, overwrite=overwrite, protect=[table.path])  # before the fit, not after
    chunk -= chunk % 8  # packed codes of a chunk then end on a byte boundary
    padding_idx = normalize_padding_idx(padding_idx, rows)
    fit = get_method(config.method).Fit.parse(fit_options)
    report: dict[str, Any] = {"method": config.method, "spec": config.to_spec(), "table": table.name, "rows": rows,
                              "dim": dim, "streamed": True, "sample_rows": min(sample, rows),
                              "sample_order": sample_order, "chunk_rows": chunk}
    started = time.perf_counter()
    torch.manual_seed(seed)  # the fits draw their k-means seeds from the global generator
    encoder = _encoder(config, table, padding_idx, sample, sample_order, seed, fit, progress, report)
    settings = {**(report.get("fit") or dataclasses.asdict(fit)),
                "stream": {"sample": min(sample, rows), "sample_order": sample_order, "chunk": chunk, "seed": seed}}
    report["fit"] = settings
    prepared = time.perf_counter()
    encoder.prepare(table, chunk, progress)
    report["pass_seconds"] = time.perf_counter() - prepared
    layout = encoder.layout()
    num_bytes = sum(int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
                    for dtype, shape in layout.values())
    quality = _Quality(dim)

    def produce(sink: "IncrementalArtifactWriter | _MemorySink") -> None:
        for name, tensor in encoder.fixed().items():
            sink.append(name, tensor.to(layout[name][0]))
        for start, chunk_rows in _chunks(table, chunk, progress, f"encode {config.method}"):
            pieces, decoded = encoder.encode(chunk_rows, start)
            for name, piece in pieces.items():
                sink.append(name, piece.to(layout[name][0]))
            if padding_idx is not None and start <= padding_idx < start + chunk_rows.shape[0]:
                decoded[padding_idx - start] = 0.0  # the frozen lookup zeroes the padding row
            quality.add(chunk_rows, decoded, start)

    encoding = time.perf_counter()
    frozen = None
    if output is None:
        memory = _MemorySink(layout)
        produce(memory)
        memory.check_complete()
        frozen = get_format(encoder.format).from_stored(memory.tensors, encoder.metadata(), rows, dim, padding_idx)
        frozen.spec, frozen.fit_settings = config.to_spec(), settings
    else:
        fields = {"num_embeddings": rows, "embedding_dim": dim, "padding_idx": padding_idx,
                  "spec": config.to_spec(), "fit": json_ready(settings), "format": encoder.format,
                  "metadata": encoder.metadata(), "num_bytes": num_bytes}
        writer = IncrementalArtifactWriter(layout, "frozen", fields)
        write_incrementally(output, writer, produce, overwrite=overwrite, protect=[table.path])
    report["encode_seconds"] = time.perf_counter() - encoding
    seconds = time.perf_counter() - started
    report.update({"seconds": seconds, "rows_per_second": rows / seconds, "bytes": num_bytes,
                   "dense_bytes": rows * dim * 4, "ratio": rows * dim * 4 / max(1, num_bytes),
                   "bits_per_row": 8 * num_bytes / rows, **quality.report(), "peak_rss_bytes": peak_rss_bytes()})
    return StreamResult(frozen, report)
