"""Every file the library writes: one bundle format, one atomic write protocol. No pickle, ever.

A *bundle* is a JSON header plus named tensors. The header always holds ``kind`` (``frozen``,
``trainable``, ``model`` for save_pretrained folders, ``checkpoint`` for distillation), the
format version, the library and torch versions, and ``sha256``: one digest of the canonical
JSON of the header (every field but ``sha256``) AND of the tensors (name, dtype, shape, bytes),
so one flipped byte anywhere, ``padding_idx`` and the spec included, is refused. The digest has
no key: it detects damage and edits, not a forger who recomputes it (that needs a signature or a
hash from a trusted channel). Two containers:

- a single file (``save`` / ``load``): safetensors with the header in its metadata;
- a folder (``save_pretrained``, checkpoints): a JSON file holding the header, pointing at a
  safetensors file of the tensors under a new name, written tensors first, so an interrupted
  save leaves the previous JSON and its tensors whole.

Files are read through safetensors' memory map (``safe_open``), header first: a foreign or
damaged file is refused before its tensors are read. Every header field is checked for its
JSON type and range before anything is built from it.

Writing (:func:`atomic_write`): a regular file at a new path, or replacing an existing regular
file only with ``overwrite=True``. Refused always: directories, devices, FIFOs, sockets,
symbolic links (neither replaced nor written through: write to the link's target instead) and
the input itself (same inode). Data goes to a short temporary name in the same folder, is
fsynced and renamed; the temporary file is removed on any error, Ctrl-C, or SIGTERM. No
non-finite float tensor is ever written, nor accepted when read.

Compatibility: format 1 files (release 0.x, before this module) load as before; their sha256
covers the tensors only, so their header is validated but not authenticated (save again to
upgrade). Files from a newer format version are refused with a hint to upgrade.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import signal
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ._version import __version__
from .base import CompressedEmbedding
from .config import SpecError
from .frozen import FrozenEmbedding, get_format
from .registry import get_method
from .validation import MAX_DIM, MAX_ROWS, json_int, json_object

__all__ = ["save", "load", "read_header", "ArtifactError", "OutputError", "FORMAT_VERSION", "atomic_write",
           "atomic_write_bytes", "check_output_path", "seal", "bundle_digest", "tensor_digest",
           "write_file_bundle", "read_file_bundle", "write_folder_bundle", "read_folder_bundle", "json_ready",
           "build_trainable", "check_table_header", "header_digest", "update_with_tensor", "unsealed_header"]

FORMAT_VERSION = 2  # 2: the digest covers the header too; kinds "model" and "checkpoint" share the format
HEADER_KEY = "embcompress"
MAX_HEADER_CHARS = 1 << 22  # a file's JSON header; real ones are a few KB
MAX_FOLDER_JSON_BYTES = 1 << 26  # a folder's JSON (a checkpoint keeps every step's loss)
_DIGEST_DOMAIN = b"embcompress-bundle-2\0"


class ArtifactError(ValueError):
    """A file that is not a valid embcompress artifact (foreign, truncated, damaged, too new)."""


class OutputError(ValueError):
    """An output path that writing would destroy or misuse (the input, a device, a link, an existing file)."""


# -- digests -------------------------------------------------------------------------------------
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's digest: the tensors only (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    _update_with_tensors(digest, tensors)
    return digest.hexdigest()


def _update_with_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        update_with_tensor(digest, name, tensor.dtype, tuple(tensor.shape), [data])


def update_with_tensor(digest: Any, name: str, dtype: torch.dtype, shape: tuple[int, ...],
                       chunks: Iterable[bytes]) -> None:
    """Add one tensor to a digest, its bytes given in pieces (a writer that streams them, in name order)."""
    digest.update(name.encode())
    digest.update(str(dtype).encode())
    digest.update(str(tuple(shape)).encode())
    for chunk in chunks:
        digest.update(chunk)


def _canonical(header: dict[str, Any]) -> bytes:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def bundle_digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """Format 2's digest: the canonical header JSON (all but ``sha256``) and the tensors."""
    digest = header_digest(header)
    _update_with_tensors(digest, tensors)
    return str(digest.hexdigest())


def header_digest(header: dict[str, Any]) -> Any:
    """Format 2's digest after the header: add the tensors in name order (``update_with_tensor``)."""
    digest = hashlib.sha256(_DIGEST_DOMAIN)
    body = _canonical(header)
    digest.update(len(body).to_bytes(8, "little"))
    digest.update(body)
    return digest


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON data (for headers): tuples become lists, other objects their repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    return repr(value)


def seal(kind: str, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The header of a bundle: ``fields`` plus kind, versions and the digest over header and tensors."""
    sealed = unsealed_header(kind, fields)
    sealed["sha256"] = bundle_digest(sealed, tensors)
    return sealed


def unsealed_header(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """:func:`seal`'s header before the digest (for writers that hash tensors as they stream them)."""
    header = {**fields, "kind": kind, "format_version": FORMAT_VERSION, "library_version": __version__,
              "torch_version": torch.__version__}
    unsealed: dict[str, Any] = json.loads(json.dumps(header))  # the exact values a reader will parse (tuples -> lists)
    return unsealed


def _verify(header: dict[str, Any], tensors: dict[str, torch.Tensor], source: object) -> None:
    """Refuse a header from a newer format, and a digest that does not match (rules per version)."""
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(f"{source} has format version {version!r}; this library reads 1 to {FORMAT_VERSION} "
                            "(a newer file needs a newer embcompress: pip install -U embcompress)")
    expected = tensor_digest(tensors) if version == 1 else bundle_digest(header, tensors)
    if header.get("sha256") != expected:
        what = "tensor" if version == 1 else "header or tensor"
        raise ArtifactError(f"{source}: {what} checksum mismatch, the file was modified or damaged")


def _non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(name, count) of the first float tensor holding NaN or infinite values, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name, int((~torch.isfinite(tensor)).sum())
    return None


def _check_tensors_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    found = _non_finite(tensors)
    if found:
        raise ValueError(f"refusing to write {what}: tensor {found[0]!r} holds {found[1]} NaN or infinite values "
                         "(the fit diverged or the input overflowed); scale the input down or lower the "
                         "learning rate, then compress again")


def _check_read_finite(tensors: dict[str, torch.Tensor], source: object) -> None:
    """Nothing writes non-finite tensors, so a file holding some was made or re-sealed elsewhere."""
    found = _non_finite(tensors)
    if found:
        raise ArtifactError(f"{source}: tensor {found[0]!r} holds {found[1]} NaN or infinite values, which "
                            "embcompress never writes; the file was not made by embcompress: compress again")


# -- writing -------------------------------------------------------------------------------------
def check_output_path(path: "str | os.PathLike[str]", *, overwrite: bool = False,
                      protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """Refuse an output path that writing would destroy or misuse; returns it as a Path.

    A new path is fine; an existing regular file only with ``overwrite``. Never: a directory,
    device, FIFO or socket, a symbolic link, or any of ``protect`` (the inputs; same inode).
    """
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise OutputError(f"output {str(path)!r} names no file; give a file path such as table.emb")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise OutputError(f"cannot use output {path}: {exc.strerror}") from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(f"output {path} is a symbolic link; embcompress neither replaces nor writes through "
                              f"links: write to its target ({os.path.realpath(path)}) or to another path")
        if stat.S_ISDIR(info.st_mode):
            raise OutputError(f"output {path} is a directory; give a file path such as {path / 'table.emb'}")
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"output {path} is a device, FIFO or socket, not a regular file; "
                              "write to a regular file path")
        for source in protect:
            with contextlib.suppress(OSError):
                if os.path.samestat(info, os.stat(source)):
                    raise OutputError(f"output {path} is the input {source}; writing would destroy it: "
                                      "write to another path")
        if not overwrite:
            raise OutputError(f"output {path} exists; pass overwrite=True (--force on the command line) "
                              "to replace it, or write to another path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    return path


class _Terminated(BaseException):
    """SIGTERM during a write: unwinds like Ctrl-C so the temporary file is removed."""


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While writing, turn a default (fatal) SIGTERM into an exception, then die of it after cleanup."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # another thread, or a handler of the caller's own: it decides what SIGTERM does
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # the temp file is gone: now die as the signal asked
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _temporary(folder: Path) -> Path:
    """A new empty file with a short name: a legal output name stays legal (NAME_MAX) beside it."""
    for _ in range(100):
        candidate = folder / f".ec{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode from the umask
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:  # e.g. /proc or /sys: the path exists but no file can be created beside it
            raise OutputError(f"cannot create a file in {folder} ({exc.strerror}); write to a folder on a "
                              f"regular file system") from None
    raise OutputError(f"could not create a temporary file in {folder}")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if not overwrite:
        try:
            os.link(tmp, path)  # atomic and never replaces: a file that appeared meanwhile is kept
            os.unlink(tmp)
            return
        except FileExistsError:
            raise OutputError(f"output {path} appeared while writing; pass overwrite=True to replace it") from None
        except OSError:
            pass  # no hard links on this file system: the checked rename below
    check_output_path(path, overwrite=overwrite)
    os.replace(tmp, path)


def atomic_write(path: "str | os.PathLike[str]", write: Callable[[Path], object], *, overwrite: bool = False,
                 protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """``write(temporary_path)`` then fsync and rename to ``path``; nothing partial is ever left.

    The output rules are :func:`check_output_path`'s.
    """
    protect = list(protect)
    path = check_output_path(path, overwrite=overwrite, protect=protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _terminate_cleanly():
        tmp: Path | None = None
        try:
            tmp = _temporary(path.parent)
            mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0o666 less the umask, as any new file
            write(tmp)
            os.chmod(tmp, mode)  # a writer that recreates the file (safetensors: 0o600) keeps the usual mode
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            _publish(tmp, path, overwrite)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes, *, overwrite: bool = True,
                       protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """:func:`atomic_write` of a bytes object (result files: replaced by default, never an input)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, protect=protect)


def _prepare(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    _check_tensors_finite(tensors, what)
    return tensors


def write_file_bundle(path: "str | os.PathLike[str]", kind: str, fields: dict[str, Any],
                      tensors: dict[str, torch.Tensor], *, overwrite: bool = False,
                      protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """One safetensors file holding the sealed header in its metadata."""
    tensors = _prepare(tensors, str(path))
    header = seal(kind, fields, tensors)
    metadata = {HEADER_KEY: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                        overwrite=overwrite, protect=protect)


def write_folder_bundle(folder: "str | os.PathLike[str]", json_name: str, tensor_name: "str | Callable[[str], str]",
                        kind: str, fields: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                        overwrite: bool = False, sweep: str | None = None) -> dict[str, Any]:
    """``folder/json_name`` (the sealed header) pointing at ``folder/<tensor file>``.

    ``tensor_name`` is a file name, or a function of the digest of the tensors (content
    addressing). Tensors first, then the JSON: an interrupted save leaves the previous pair whole.
    Files matching ``sweep`` other than the new tensor file are removed afterwards.
    """
    folder = Path(folder)
    check_output_path(folder / json_name, overwrite=overwrite)
    tensors = _prepare(tensors, str(folder))
    name = tensor_name(tensor_digest(tensors)) if callable(tensor_name) else tensor_name
    header = seal(kind, {**fields, "tensors": name}, tensors)
    text = json.dumps(header, indent=1, sort_keys=True) + "\n"
    tensor_path = folder / name
    existed = tensor_path.exists()
    with _terminate_cleanly():  # one span: a SIGTERM between the two writes is handled here too
        atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp)), overwrite=True)
        try:
            atomic_write(folder / json_name, lambda tmp: tmp.write_text(text), overwrite=overwrite)
        except BaseException:  # disk full, Ctrl-C, SIGTERM: no tensor file that no JSON points at
            if not existed:
                tensor_path.unlink(missing_ok=True)
            raise
    if sweep:
        for old in folder.glob(sweep):
            if old.name != name and old.is_file() and not old.is_symlink():
                old.unlink(missing_ok=True)
    return header


# -- reading -------------------------------------------------------------------------------------
def _regular_file(path: Path, what: str) -> None:
    """Refuse what is not a regular file before opening it (a FIFO would block the open)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        raise ArtifactError(f"{path} is {kind}, not a {what} file")


def _parse_json(text: "str | bytes", source: object, limit: int) -> dict[str, Any]:
    if len(text) > limit:
        raise ArtifactError(f"{source}: the embcompress header is {len(text):,} bytes, more than the {limit:,} "
                            "a real header can need; the file is damaged or not an artifact")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise ArtifactError(f"{source}: the embcompress header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{source}: the embcompress header must be a JSON object, got a "
                            f"{type(header).__name__}")
    return header


def _open_safetensors(path: Path, header_key: str | None) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(parsed header or None, tensors) of a safetensors file, read through the memory map."""
    _regular_file(path, "safetensors")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = None
            if header_key is not None:
                meta = handle.metadata() or {}
                if header_key not in meta:
                    raise ArtifactError(f"{path} is a safetensors file but not an embcompress artifact (no "
                                        "embcompress header); create one with embcompress.save or "
                                        "`embcompress compress`")
                header = _parse_json(meta[header_key], path, MAX_HEADER_CHARS)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        if isinstance(exc, ArtifactError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupt?): {reason}") from None
    return header, tensors


def _check_kind(header: dict[str, Any], kinds: Iterable[str], source: object) -> str:
    kinds = tuple(kinds)
    kind = header.get("kind")
    if kind not in kinds:
        raise ArtifactError(f"{source} holds kind {kind!r}, expected {' or '.join(map(repr, kinds))}")
    return str(kind)


def read_file_bundle(path: "str | os.PathLike[str]",
                     kinds: Iterable[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a single-file bundle, digest verified."""
    path = Path(path)
    header, tensors = _open_safetensors(path, HEADER_KEY)
    assert header is not None
    _verify(header, tensors, path)
    _check_kind(header, kinds, path)
    _check_read_finite(tensors, path)
    return header, tensors


def read_folder_bundle(folder: "str | os.PathLike[str]", json_name: str, kinds: Iterable[str],
                       ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a folder bundle written by :func:`write_folder_bundle`, digest verified."""
    folder = Path(folder)
    json_path = folder / json_name
    _regular_file(json_path, json_name)
    if json_path.stat().st_size > MAX_FOLDER_JSON_BYTES:
        raise ArtifactError(f"{json_path} is larger than {MAX_FOLDER_JSON_BYTES:,} bytes; not an embcompress file")
    header = _parse_json(json_path.read_bytes(), json_path, MAX_FOLDER_JSON_BYTES)
    name = header.get("tensors")
    if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
        raise ArtifactError(f"{json_path}: 'tensors' must name a file in {folder}, got {name!r}")
    tensor_path = folder / name
    if not tensor_path.exists():
        raise ArtifactError(f"{json_path} points at {name!r}, which is missing")
    _, tensors = _open_safetensors(tensor_path, None)
    _verify(header, tensors, json_path)
    if header["format_version"] >= 2:
        _check_kind(header, kinds, json_path)
    _check_read_finite(tensors, json_path)
    return header, tensors


# -- tables: save / load ----------------------------------------------------------------------------
def _table_fields(module: "CompressedEmbedding | FrozenEmbedding") -> dict[str, Any]:
    fields: dict[str, Any] = {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim,
                              "padding_idx": module.padding_idx}
    # How the table was made; absent (not null) for a format module built by hand, as in format 1.
    if module.spec is not None:
        fields["spec"] = module.spec
    if module.fit_settings is not None:
        fields["fit"] = json_ready(dict(module.fit_settings))
    return fields


def save(module: "CompressedEmbedding | FrozenEmbedding", path: "str | os.PathLike[str]", *,
         overwrite: bool = False, protect: Iterable["str | os.PathLike[str]"] = ()) -> Path:
    """Save a trainable table or an exported frozen module as one artifact file.

    The header records the resolved spec and the fit settings (``fit``) the module was made
    with. An existing file is replaced only with ``overwrite=True``; ``protect`` lists inputs the
    output must not be (see :func:`check_output_path`).

    Example:
        >>> import embcompress
        >>> table = embcompress.from_pretrained(torch.randn(100, 8), "scalar:bits=8")
        >>> path = embcompress.save(table.export(), "table.emb")
        >>> embcompress.load(path).num_bytes()
        1200
    """
    if isinstance(module, FrozenEmbedding):
        tensors = module.stored_tensors()
        fields = {**_table_fields(module), "format": module.format, "metadata": module.metadata(),
                  "num_bytes": module.num_bytes()}
        kind = "frozen"
    elif isinstance(module, CompressedEmbedding):
        tensors = module.state_dict()
        fields = {**_table_fields(module), "method": module.config.method, "layout": module.layout()}
        kind = "trainable"
    else:
        raise TypeError(f"save() takes a compressed table or an exported module, got {type(module).__name__}; "
                        "compress an nn.Embedding first with embcompress.from_pretrained")
    return write_file_bundle(path, kind, fields, tensors, overwrite=overwrite, protect=protect)


def read_header(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of an artifact file, verified and with every field checked (what ``inspect`` shows)."""
    header, tensors = read_file_bundle(path, ("frozen", "trainable"))
    try:
        check_table_header(header)
    except ValueError as exc:
        raise ArtifactError(f"{path}: invalid header: {exc}") from None
    return header, tensors


def check_table_header(header: dict[str, Any]) -> None:
    """Types and ranges of a table artifact's header fields (ValueError naming the field)."""
    rows = json_int(header, "num_embeddings", 1, MAX_ROWS)
    json_int(header, "embedding_dim", 1, MAX_DIM)
    json_int(header, "padding_idx", -rows, rows - 1, optional=True)
    if header.get("spec") is not None and not isinstance(header["spec"], str):
        raise ValueError(f"spec must be a string, got {header['spec']!r}")
    json_object(header, "fit", optional=True)
    if header["kind"] == "frozen":
        if not isinstance(header.get("format"), str):
            raise ValueError(f"format must be a string, got {header.get('format')!r}")
        json_object(header, "metadata")
        json_int(header, "num_bytes", 0, 1 << 62, optional=True)
    else:
        if not isinstance(header.get("method"), str) or not isinstance(header.get("spec"), str):
            raise ValueError("a trainable artifact needs string 'method' and 'spec' fields")
        json_object(header, "layout", optional=True)


def build_trainable(method: str, shape: tuple[int, int], spec: str, padding_idx: int | None,
                    layout: dict[str, Any] | None, state: dict[str, torch.Tensor]) -> CompressedEmbedding:
    """A trainable table from stored fields and its state dict, refused before any allocation
    when the tensors do not fit (a forged row count must not allocate terabytes)."""
    cls = get_method(method)
    with torch.device("meta"):  # shapes only: nothing is allocated
        dry_run = cls(*shape, spec, padding_idx=padding_idx, layout=layout)
    want = {name: tuple(t.shape) for name, t in dry_run.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"the tensors do not fit a {shape[0]} x {shape[1]} {spec} table (first differences, "
                         f"expected vs stored: {diff})")
    module = cls(*shape, spec, padding_idx=padding_idx, layout=layout)
    module.load_state_dict(state, strict=True)
    _check_trainable(module, layout)
    return module


def _check_trainable(module: CompressedEmbedding, layout: dict[str, Any] | None) -> None:
    """A trainable table rebuilt from a file: its layout as stored, and what it exports valid.

    Layouts hold ints and strings only; a method that coerces a stored value (2.5 -> 2) would
    no longer round-trip it. The export runs the deployed format's own checks (hash parameters,
    codes below K), so a trainable file is held to the frozen file's rules."""
    if layout is not None:
        text = json.dumps(layout, sort_keys=True)
        if _has_float(layout):
            raise ValueError(f"layout holds a float where sizes and names belong: {text[:200]}")
        if json.dumps(module.layout(), sort_keys=True) != text:
            raise ValueError(f"layout {text[:200]} does not describe the table it builds")
    frozen = module.export()
    type(frozen).check_metadata(frozen.metadata())
    frozen.check_stored()


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def load(path: "str | os.PathLike[str]") -> "CompressedEmbedding | FrozenEmbedding":
    """Load what :func:`save` wrote: a frozen inference module or a trainable table."""
    header, tensors = read_header(path)
    shape = (header["num_embeddings"], header["embedding_dim"])
    padding_idx = header.get("padding_idx")
    try:
        module: CompressedEmbedding | FrozenEmbedding
        if header["kind"] == "frozen":
            module = get_format(header["format"]).from_stored(tensors, header["metadata"], *shape, padding_idx)
            stored = header.get("num_bytes")
            if stored is not None and stored != module.num_bytes():
                raise ValueError(f"the header says {stored} bytes, the tensors hold {module.num_bytes()}")
        else:
            module = build_trainable(header["method"], shape, header["spec"], padding_idx,
                                     header.get("layout") or None, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, SpecError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc).splitlines()[0]
        raise ArtifactError(f"{path}: artifact does not match its header: {reason}") from None
    if isinstance(module, FrozenEmbedding):
        module.spec = header.get("spec")
    module.fit_settings = header.get("fit")
    return module
