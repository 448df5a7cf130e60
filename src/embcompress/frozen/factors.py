"""Low-rank factors: the deployed format of distilled embedding and truncated SVD.

Shapes:
    codes    (V, r) float32      per-row low-dimensional codes U
    basis    (r, d) float32      shared projection W
    bias     (d,) float32, optional
Row i = f(U_i) @ W + bias, f in {identity, relu, tanh, gelu}.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..validation import json_choice
from .. import kernels
from .._deprecation import renamed_names
from .base import FrozenEmbedding, register_format

__all__ = ["FrozenFactors", "ACTIVATIONS"]

ACTIVATIONS = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}


@register_format
class FrozenFactors(FrozenEmbedding):
    format = "factors"
    codes: torch.Tensor  # registered buffers, declared for the type checker
    basis: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        activation: str,
        codes: torch.Tensor,
        basis: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        rank = basis.shape[0]
        if basis.dim() != 2 or rank < 1:
            raise ValueError(f"basis must be (rank >= 1, {embedding_dim}), got {tuple(basis.shape)}")
        if codes.shape != (num_embeddings, rank) or basis.shape != (rank, embedding_dim):
            raise ValueError(f"codes {tuple(codes.shape)} and basis {tuple(basis.shape)} do not factor a "
                             f"({num_embeddings}, {embedding_dim}) table")
        if bias is not None and bias.shape != (embedding_dim,):
            raise ValueError(f"bias must have shape ({embedding_dim},), got {tuple(bias.shape)}")
        self.activation = activation
        self.register_buffer("codes", codes.detach().float().contiguous())
        self.register_buffer("basis", basis.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def activated_codes(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.codes if ids is None else F.embedding(ids, self.codes)
        return ACTIVATIONS[self.activation](codes)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if kernels.usable(ids, self.codes) and all(t is None or t.dtype == torch.float32
                                                   for t in (self.codes, self.basis, self.bias)):
            # One fused pass per row: gather, activation, rank-r combination of the basis rows, bias.
            # gelu (erf) stays in torch on the small (N, r) gathered codes.
            if self.activation in kernels.FACTOR_ACTIVATIONS:
                return kernels.factors_lookup(ids.contiguous(), self.codes, self.basis, self.bias, self.activation)
            return kernels.factors_lookup(None, self.activated_codes(ids).contiguous(), self.basis, self.bias)
        codes = F.embedding(ids, self.codes)  # (N, r): fresh, so the activation may run in place
        if self.activation == "relu":
            codes = codes.relu_()
        elif self.activation == "tanh":
            codes = codes.tanh_()
        elif self.activation == "gelu":
            codes = F.gelu(codes)
        # addmm adds the bias inside the GEMM: one (N, d) output, no second pass over it.
        return codes @ self.basis if self.bias is None else torch.addmm(self.bias, codes, self.basis)

    def reference_lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The plain formula f(U_i) @ W + bias; the fast path's oracle."""
        out = self.activated_codes(ids) @ self.basis
        return out if self.bias is None else out + self.bias

    def metadata(self) -> dict[str, Any]:
        return {"activation": self.activation}

    @classmethod
    def check_metadata(cls, metadata: dict[str, Any]) -> None:
        if set(metadata) != {"activation"}:
            raise ValueError(f"factors metadata holds exactly 'activation', got {sorted(metadata)}")
        json_choice(metadata, "activation", tuple(ACTIVATIONS))


__getattr__ = renamed_names(__name__, {"FactorizedEmbedding": "FrozenFactors"})  # deprecated names
