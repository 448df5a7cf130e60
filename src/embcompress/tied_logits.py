"""Logits of a tied output layer computed from the compressed form, and output-aware calibration.

A decoder LM with tied embeddings reads its token table twice: rows at the input, and the whole
table at the output (logits = h E^T). Decoding all V rows at every step throws the compression
away at the head; the formats allow cheaper scores:

- codes + codebooks (DPQ, PQ: ``concat``; compositional codes: ``sum``): per position j the scores
  s_j = h_j C_j^T of the K codewords (h_j = the j-th slice of h for concat, all of h for sum),
  then logit_v = sum_j s_j[code_vj]: one sparse (V x MK) one-hot matrix times (MK x N) scores;
- factors (low-rank / distilled): logits = f(U) (h B^T)^T (+ h b), never the V x d product;
- anything else decodes the table once per call.

Output-aware calibration: hidden states H that meet the head give its second moment
S = H^T H / n; the logit error of a row error e_v is e_v^T S e_v. :func:`output_metric` returns
the metric A = a I + b S / (tr S / d) that blends input and output error, and
:func:`metric_factor` a factor L with L L^T = A for fitting in the transformed space (GPTQ/AWQ
weight a layer's quantization error by its inputs' second moment in the same way).

Example:
    >>> import embcompress, torch
    >>> frozen = embcompress.from_pretrained(torch.randn(300, 16), "pq:groups=4,codewords=8").export()
    >>> head = CompressedLogits(frozen)
    >>> hidden = torch.randn(5, 16)
    >>> head.path, tuple(head(hidden).shape)
    ('codebook-scores', (5, 300))
    >>> torch.allclose(head(hidden), hidden @ frozen.materialize().T, atol=1e-4)
    True
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, cast

import torch
from torch import nn

from .base import CompressedEmbedding
from .config import MethodConfig, parse_spec
from .frozen import FrozenCodebook, FrozenFactors, FrozenEmbedding
from .frozen.factors import ACTIVATIONS
from .methods.codes import CompositionalCodeEmbedding
from .methods.dpq import DPQEmbedding
from .methods.pq import ProductQuantizedEmbedding
from .methods.shared import FactorsTable
from .registry import get_method

#: Methods whose deployed rows are a product (concat) of per-group codewords: the metric is applied
#: block-diagonally per group so the product structure survives the change of space.
_CONCAT_METHODS = {"pq": "groups", "dpq": "groups"}

__all__ = ["CompressedLogits", "compressed_logits", "hidden_second_moment", "calibration_batches",
           "head_second_moments", "output_metric",
           "metric_factor",
           "fit_output_aware", "fit_output_aware_module", "map_rows_", "metric_relative_error",
           "supports_output_aware"]


class CompressedLogits(nn.Module):
    """``hidden (*, d) -> logits (*, V)`` from a frozen table, through its compressed form where it has one."""

    def __init__(self, frozen: FrozenEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.frozen = frozen
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._onehot: torch.Tensor | None = None  # (V, books * K) sparse CSR, built on first use
        self._activated: torch.Tensor | None = None

    @property
    def path(self) -> str:
        """Which computation the head uses: 'codebook-scores', 'factors' or 'decode'."""
        if isinstance(self.frozen, FrozenCodebook):
            return "codebook-scores"
        if isinstance(self.frozen, FrozenFactors):
            return "factors"
        return "decode"

    def _codebook_onehot(self) -> torch.Tensor:
        if self._onehot is None:
            f = cast(FrozenCodebook, self.frozen)  # only the codebook-scores path builds it
            ids = torch.arange(f.num_embeddings)
            codes = f.codes(ids) + torch.arange(f.books) * f.codewords  # column of (position, codeword)
            crow = torch.arange(0, f.num_embeddings * f.books + 1, f.books)
            values = torch.ones(codes.numel())
            with warnings.catch_warnings():  # CSR support is "beta"; the matrix is valid by construction
                warnings.simplefilter("ignore", UserWarning)
                self._onehot = torch.sparse_csr_tensor(crow, codes.reshape(-1), values,
                                                       (f.num_embeddings, f.books * f.codewords),
                                                       check_invariants=False)
        return self._onehot

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1]).float()
        f = self.frozen
        if isinstance(f, FrozenCodebook):  # the codebook-scores path
            if f.rotation is not None:  # rows are coded rows @ R^T, so h . row = (h @ R) . coded row
                h = h @ f.rotation.float()
            books = f.codebooks.float()
            if books.shape[0] == 1 and f.books > 1:
                books = books.expand(f.books, -1, -1)
            if f.combine == "concat":
                scores = torch.einsum("nmw,mkw->nmk", h.reshape(h.shape[0], f.books, -1), books)
            else:
                scores = torch.einsum("nd,mkd->nmk", h, books)
            logits = torch.sparse.mm(self._codebook_onehot(), scores.reshape(h.shape[0], -1).t()).t()
        elif isinstance(f, FrozenFactors):  # the factors path
            if self._activated is None:
                self._activated = ACTIVATIONS[f.activation](f.codes)
            logits = (h @ f.basis.t()) @ self._activated.t()
            if f.bias is not None:
                logits = logits + (h @ f.bias).unsqueeze(1)
        else:
            logits = h @ f.materialize().t()
        if f.padding_idx is not None:
            logits[:, f.padding_idx] = 0  # the padding row decodes to zero
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*shape, -1)


def compressed_logits(frozen: FrozenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    """One-off ``hidden @ frozen.materialize().T`` through the compressed form (see :class:`CompressedLogits`)."""
    return CompressedLogits(frozen)(hidden)


@torch.no_grad()
def hidden_second_moment(hidden_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """S = sum h h^T / n over every hidden state (rows of each (*, d) batch) that reaches the head."""
    total, count = None, 0
    for h in hidden_batches:
        h = h.reshape(-1, h.shape[-1]).double()
        total = h.t() @ h if total is None else total + h.t() @ h
        count += h.shape[0]
    if total is None:
        raise ValueError("no hidden states given; pass at least one (*, d) batch")
    return (total / count).float()


def calibration_batches(calibration: Any) -> list[Any]:
    """The calibration inputs as a list of batches: one tensor or dict is one batch; any other iterable
    (a generator too) is read once, so every later pass sees the same batches."""
    batches = [calibration] if isinstance(calibration, (torch.Tensor, dict)) else list(calibration)
    if not batches:
        raise ValueError("calibration is empty; pass token-id batches (batch, seq) or dicts of model inputs")
    return batches


@torch.no_grad()
def head_second_moments(model: nn.Module, heads: Iterable[nn.Module], calibration: Any) -> dict[int, torch.Tensor]:
    """id(head) -> second moment of the hidden states that reach ``head`` while ``model`` reads ``calibration``.

    ``calibration``: a LongTensor of token ids (batch, seq), or a sequence of them, or of dicts of
    model inputs (``{"input_ids": ..., "attention_mask": ...}``); tensors are passed positionally
    (``model(ids)``, as Hugging Face models take ``input_ids``), dicts as keywords. Padding
    positions (attention_mask 0) still reach the head and are counted: pass unpadded batches to
    leave them out. The model runs in eval mode and is put back in its mode afterwards.
    """
    heads = list(heads)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        h = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().cpu()
        key = id(module)
        sums[key] = h.t() @ h if key not in sums else sums[key] + h.t() @ h
        counts[key] = counts.get(key, 0) + h.shape[0]

    batches = calibration_batches(calibration)
    handles = [head.register_forward_pre_hook(hook) for head in heads]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, torch.Tensor) and not batch.is_floating_point():
                model(batch.reshape(1, -1) if batch.dim() == 1 else batch)
            else:
                raise ValueError(f"calibration batches must be token-id tensors or dicts of model inputs, got "
                                 f"{type(batch).__name__}{' of floats' if isinstance(batch, torch.Tensor) else ''}")
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [head for head in heads if id(head) not in sums]
    if missing:
        raise ValueError(f"the calibration inputs never reached {len(missing)} tied head(s) "
                         f"({type(missing[0]).__name__}); run inputs through the model's forward that computes logits")
    return {key: (total / counts[key]).float() for key, total in sums.items()}


def output_metric(second_moment: torch.Tensor, output_weight: float = 1.0, input_weight: float = 1.0) -> torch.Tensor:
    """A = input_weight I + output_weight S / (tr S / d): the row-error metric of the blended objective.

    S is scaled to mean eigenvalue 1 so the two weights are comparable whatever the hidden norm."""
    dim = second_moment.shape[0]
    scale = float(torch.trace(second_moment)) / dim
    return input_weight * torch.eye(dim) + output_weight * second_moment / max(scale, 1e-30)


def metric_factor(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L^-1) with ||e L||^2 = e A e^T for the metric A: fit in the space W L, map back with L^-1."""
    eigenvalues, vectors = torch.linalg.eigh(metric.double())
    root = eigenvalues.clamp_min(1e-12).sqrt()
    factor = (vectors * root) @ vectors.t()
    inverse = (vectors / root) @ vectors.t()
    return factor.float(), inverse.float()


def _block_diagonal(metric: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, T^-1): block-diagonal factors of the metric's diagonal blocks, one per group of columns."""
    dim = metric.shape[0]
    width = dim // groups
    forward, inverse = torch.zeros(dim, dim), torch.zeros(dim, dim)
    for g in range(groups):
        cols = slice(g * width, (g + 1) * width)
        forward[cols, cols], inverse[cols, cols] = metric_factor(metric[cols, cols])
    return forward, inverse


@torch.no_grad()
def map_rows_(module: CompressedEmbedding, inverse: torch.Tensor) -> CompressedEmbedding:
    """In place: the table whose decoded rows are ``rows @ inverse`` (block-diagonal per group for
    pq and dpq), by a change of its codebooks / values / basis; codes stay. Exact for every format
    whose rows are linear in those parameters."""
    if isinstance(module, FactorsTable):  # f(U) W + b: linear in W and b whatever f is
        module.basis.copy_(module.basis @ inverse)
        if module.bias is not None:
            module.bias.copy_(module.bias @ inverse)
    elif isinstance(module, CompositionalCodeEmbedding) and module.state == "fixed":
        module.codebooks.copy_(module.codebooks @ inverse)
    elif isinstance(module, ProductQuantizedEmbedding) and module.rotation is not None:
        # rows = codewords @ R^T, so rows @ inverse = codewords @ (inverse^T R)^T: the basis takes the whole
        # map (any inverse, not only a block-diagonal one), rounded to fp16 as the artifact stores it.
        module.rotation.copy_((inverse.t() @ module.rotation).half().float())
    elif isinstance(module, (ProductQuantizedEmbedding, DPQEmbedding)):
        # SX's codes come from the query and keys, which stay in the fitted space: only the
        # deployed values move (VQ's keys ARE its values, so its codes would move with them).
        books = module.codebooks if isinstance(module, ProductQuantizedEmbedding) else module.values
        width = books.shape[-1]
        blocks = torch.stack([inverse[g * width:(g + 1) * width, g * width:(g + 1) * width]
                              for g in range(books.shape[0])])
        books.copy_(torch.einsum("gkw,gwv->gkv", books, blocks))
    else:
        raise ValueError(f"{module.spec}: no exact change of space; {OUTPUT_AWARE_HINT}")
    return module


#: What fit_output_aware takes, for error messages.
OUTPUT_AWARE_HINT = "output-aware fits take pq, dpq (variant=sx, shared=false), codes, lowrank or distilled"


def supports_output_aware(config: MethodConfig) -> bool:
    """Whether :func:`fit_output_aware` can fit this config (an exact change of space exists)."""
    if config.method == "dpq":
        return getattr(config, "variant", "") == "sx" and not getattr(config, "shared", True)
    return config.method in ("pq", "codes", "lowrank", "distilled")


def fit_output_aware_module(weight: torch.Tensor, spec: "str | MethodConfig", metric: torch.Tensor, *,
                            row_weights: torch.Tensor | None = None, padding_idx: int | None = None,
                            fit: Any = None, progress: bool | None = None,
                            **fit_options: Any) -> CompressedEmbedding:
    """The trainable table fitted to ``weight`` minimizing sum_v w_v e_v A e_v^T for the metric A
    (see :func:`output_metric`); :func:`fit_output_aware` returns its export.

    The table is fitted in the space W T (T T^T = A; block-diagonal per group for product
    quantizers, whose cross-group terms are dropped, except pq with ``rotation=pca``, whose basis
    takes the whole T^-1), then mapped back with T^-1 (:func:`map_rows_`), which keeps the deployed
    format: codebooks, bases and rotations are linear in the rows.
    """
    config = parse_spec(spec)
    if not supports_output_aware(config):
        raise ValueError(f"{config.to_spec()}: {OUTPUT_AWARE_HINT}")
    if config.method in _CONCAT_METHODS and getattr(config, "rotation", "none") == "none":
        forward, inverse = _block_diagonal(metric, getattr(config, _CONCAT_METHODS[config.method]))
    else:
        forward, inverse = metric_factor(metric)
    module = get_method(config.method).from_pretrained(weight.detach().float().cpu() @ forward, config, padding_idx,
                                                       fit, progress=progress, row_weights=row_weights, **fit_options)
    return map_rows_(module, inverse)


def fit_output_aware(weight: torch.Tensor, spec: "str | MethodConfig", metric: torch.Tensor, *,
                     row_weights: torch.Tensor | None = None, padding_idx: int | None = None,
                     **fit_options: Any) -> FrozenEmbedding:
    """Fit ``spec`` to ``weight`` minimizing sum_v w_v e_v A e_v^T for the metric A (see :func:`output_metric`);
    the frozen table of :func:`fit_output_aware_module`."""
    return fit_output_aware_module(weight, spec, metric, row_weights=row_weights, padding_idx=padding_idx,
                                   **fit_options).export()


def metric_relative_error(approx: torch.Tensor, target: torch.Tensor, metric: torch.Tensor,
                          weights: torch.Tensor | None = None) -> float:
    """sum_v w_v e_v A e_v^T / sum_v w_v (t_v - mean_w) A (t_v - mean_w)^T: the relative row error under
    the metric A (A = I: the plain relative MSE; A from :func:`output_metric`: input and logit error)."""
    w = torch.ones(target.shape[0]) if weights is None else weights.float().clamp_min(0)
    mean = (w.unsqueeze(1) * target).sum(0) / w.sum().clamp_min(1e-12)
    error, centered = (approx - target).double(), (target - mean).double()
    a = metric.double()
    num = (w.double() * ((error @ a) * error).sum(1)).sum()
    den = (w.double() * ((centered @ a) * centered).sum(1)).sum().clamp_min(1e-30)
    return float(num / den)
