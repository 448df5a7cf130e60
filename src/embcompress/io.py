"""Artifacts: safetensors for tensors plus one JSON header in the safetensors metadata.

No pickle, ever. The header records the format version, library version, what kind of module
the file holds (a trainable table or a frozen inference module), the resolved spec and layout,
the table shape, and a SHA-256 of the tensor payload so truncated or tampered files are caught.
Files are written to a temporary name in the same folder and renamed, so a failed or
interrupted write (a full disk, Ctrl-C) never leaves a partial artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._version import __version__
from .base import CompressedEmbedding
from .frozen import FrozenEmbedding, get_format
from .registry import get_method

__all__ = ["save", "load", "read_header", "verify_payload", "ArtifactError", "FORMAT_VERSION", "atomic_write_bytes",
           "tensor_digest"]

FORMAT_VERSION = 1
HEADER_KEY = "embcompress"


class ArtifactError(ValueError):
    """A file that is not a valid embcompress artifact (foreign, truncated, tampered, too new)."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _payload(module: "CompressedEmbedding | FrozenEmbedding") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    common = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "num_embeddings": module.num_embeddings,
        "embedding_dim": module.embedding_dim,
        "padding_idx": module.padding_idx,
    }
    if isinstance(module, FrozenEmbedding):
        tensors = module.stored_tensors()
        header = {**common, "kind": "frozen", "format": module.format, "metadata": module.metadata(),
                  "num_bytes": module.num_bytes()}
        spec = getattr(module, "source_spec", None)
        if spec:
            header["spec"] = spec
    elif isinstance(module, CompressedEmbedding):
        tensors = module.state_dict()
        header = {**common, "kind": "trainable", "method": module.config.method, "spec": module.spec,
                  "layout": module.layout()}
    else:
        raise TypeError(f"save() takes a compressed table or an exported module, got {type(module).__name__}; "
                        "compress an nn.Embedding first with embcompress.from_pretrained")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header["sha256"] = tensor_digest(tensors)
    return tensors, header


def save(module: "CompressedEmbedding | FrozenEmbedding", path: "str | os.PathLike[str]") -> Path:
    """Save a trainable table or an exported frozen module as safetensors + JSON header.

    Example:
        >>> import embcompress
        >>> table = embcompress.from_pretrained(torch.randn(100, 8), "scalar:bits=8")
        >>> path = embcompress.save(table.export(), "table.emb")
        >>> embcompress.load(path).num_bytes()
        1200
    """
    tensors, header = _payload(module)
    data = st_save(tensors, metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    atomic_write_bytes(path, data)
    return Path(path)


def read_header(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no artifact at {path}")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if HEADER_KEY not in meta:
        raise ArtifactError(f"{path} is a safetensors file but not an embcompress artifact "
                            "(no embcompress header); create one with embcompress.save or `embcompress compress`")
    try:
        header = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: the embcompress header is not valid JSON ({exc})") from None
    verify_payload(header, tensors, FORMAT_VERSION, header_source=path, tensor_source=path)
    return header, tensors


def verify_payload(header: dict[str, Any], tensors: dict[str, torch.Tensor], max_version: int, *,
                   header_source: object, tensor_source: object) -> None:
    """Refuse a header from a newer format, and tensors whose checksum differs from the header's."""
    version = header.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise ArtifactError(f"{header_source} has format version {version!r}; this library reads up to "
                            f"{max_version} (upgrade embcompress)")
    if header.get("sha256") != tensor_digest(tensors):
        raise ArtifactError(f"{tensor_source}: tensor checksum mismatch, the file was modified or damaged")


def load(path: "str | os.PathLike[str]") -> "CompressedEmbedding | FrozenEmbedding":
    """Load what :func:`save` wrote: a frozen inference module or a trainable table."""
    header, tensors = read_header(path)
    try:
        shape = (int(header["num_embeddings"]), int(header["embedding_dim"]))
        padding_idx = header.get("padding_idx")
        if header["kind"] == "frozen":
            cls = get_format(header["format"])
            module = cls.from_stored(tensors, header.get("metadata", {}), *shape, padding_idx)
            if header.get("spec"):
                module.source_spec = header["spec"]
            return module
        if header["kind"] == "trainable":
            table = get_method(header["method"])(shape[0], shape[1], header["spec"], padding_idx=padding_idx,
                                                 layout=header.get("layout") or None)
            table.load_state_dict(tensors, strict=True)
            return table
        raise ArtifactError(f"{path}: unknown artifact kind {header['kind']!r}")
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: artifact does not match its header: {exc}") from None
