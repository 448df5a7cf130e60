"""Distilled embedding (Lioutas, Rashid, Kumar, Haidar, Rezagholizadeh; Findings of EMNLP 2020, arXiv 1910.06720).

A low-rank factorization with a non-linearity on the codes, E ~ f(U) W + b, fitted to the
pretrained table by an autoencoder (stage 1, this file's :meth:`fit`), then fine-tuned end to
end with knowledge distillation from the uncompressed model (stage 2, done by the training loop
that uses the table). Tied input/output embeddings use :meth:`output_logits`.

Shapes (V rows, d dim, r = rank):
    codes  U (V, r)   encoder pre-activations, one row per entity (f is applied at lookup)
    basis  W (r, d)   decoder weights
    bias   b (d,)     decoder bias (optional, on by default)
Row i = f(U_i) W + b. Ratio = V*d / (V*r + r*d [+ d]). Exported to the ``factors`` format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..config import FitConfig, SpecError
from ..frozen.factors import ACTIVATIONS
from ..registry import register
from ..training import adam_steps
from .shared import FactorsConfig, FactorsTable

__all__ = ["DistilledConfig", "DistilledFit", "DistilledEmbedding"]


@dataclass(frozen=True)
class DistilledConfig(FactorsConfig):
    method: ClassVar[str] = "distilled"
    activation: Literal["relu", "tanh", "gelu", "identity"] = field(
        default="relu", metadata={"help": "non-linearity f on the r-dim codes (paper: ReLU)"})
    bias: bool = field(default=True, metadata={
        "help": "decoder bias b (d floats); with it the fit starts exactly at the centered SVD for any f"})


@dataclass(frozen=True)
class DistilledFit(FitConfig):
    method: ClassVar[str] = "distilled"
    steps: int = field(default=500, metadata={"help": "Adam steps of the stage-1 autoencoder", "min": 0})
    batch_size: int = field(default=4096, metadata={"help": "rows per step", "min": 1})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (cosine-annealed to 0)", "min": 0.0})
    seed: int | None = field(default=None, metadata={"help": "seed of the row sampling; none = drawn"})


@register
class DistilledEmbedding(FactorsTable[DistilledConfig]):
    """E = f(U) W + b with U the encoder pre-activations of the stage-1 autoencoder."""

    Config = DistilledConfig
    Fit = DistilledFit

    @torch.no_grad()
    def _fit(self, weight: torch.Tensor, settings: DistilledFit, progress: bool | None) -> DistilledFit:
        """Stage 1: an autoencoder on the rows (encoder d -> r then f, decoder r -> d, MSE, Adam).

        It starts from the truncated SVD (centered when there is a bias) placed in a near-linear
        region of f, so its start reproduces ``lowrank`` at the same rank, and training only keeps
        a result that lowers the full-table MSE. ``steps`` Adam steps (default 500) of
        ``batch_size`` random rows. U = encoder pre-activations of every row; W, b = decoder.
        """
        weight = self._check_fit_weight(weight)
        ids = torch.arange(self.num_embeddings)
        if self.padding_idx is not None:  # the padding row decodes to 0 anyway: leave it out of the fit
            ids = ids[ids != self.padding_idx]
        x = weight[ids]
        start = _svd_start(x, self.config.rank, self.activation, self.bias is not None)
        params = {name: tensor.clone().requires_grad_(True) for name, tensor in start.trainable.items()}
        f = ACTIVATIONS[self.activation]

        def decode(rows: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
            pre = (rows @ p["encoder"] + p["encoder_bias"]) * start.scale + start.shift
            out = f(pre) @ (p["decoder"] / (start.slope * start.scale).unsqueeze(1))
            return out + p["decoder_bias"] if "decoder_bias" in p else out

        def full_mse(p: dict[str, torch.Tensor]) -> float:
            return sum(float((decode(c, p) - c).pow(2).sum()) for c in x.split(65536)) / x.numel()

        best, best_mse = {k: v.detach().clone() for k, v in params.items()}, full_mse(params)
        if settings.steps > 0:
            assert settings.seed is not None  # fit() draws it
            generator = torch.Generator().manual_seed(settings.seed)
            batch = min(settings.batch_size, len(x))

            def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                rows = x[torch.randint(0, len(x), (batch,), generator=generator)]
                loss = (decode(rows, params) - rows).pow(2).mean()
                return loss, {"mse": loss}

            adam_steps(step, params.values(), steps=settings.steps, lr=settings.lr, desc="fit distilled",
                       progress=progress)
            trained = full_mse(params)
            if trained < best_mse:
                best, best_mse = {k: v.detach() for k, v in params.items()}, trained
        # Keep U = pre-activations of every row (the padding row included), W and b = the decoder.
        pre = [(c @ best["encoder"] + best["encoder_bias"]) * start.scale + start.shift for c in weight.split(65536)]
        self.codes.copy_(torch.cat(pre))
        self.basis.copy_(best["decoder"] / (start.slope * start.scale).unsqueeze(1))
        if self.bias is not None:
            self.bias.copy_(best["decoder_bias"])
        return settings


@dataclass
class _Start:
    """The autoencoder's starting point, in a parameterization Adam sees at the data's scale.

    pre = (x @ encoder + encoder_bias) * scale + shift,  row = f(pre) @ (decoder / (slope * scale)) + b.
    With f(shift + scale * u) ~ f(shift) + slope * scale * u, the start decodes to the SVD fit.
    """

    trainable: dict[str, torch.Tensor]
    scale: torch.Tensor
    shift: torch.Tensor
    slope: torch.Tensor


def _svd_start(x: torch.Tensor, rank: int, activation: str, bias: bool) -> _Start:
    mean = x.mean(0) if bias else torch.zeros(x.shape[1])
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    directions = torch.zeros(rank, x.shape[1])
    directions[: min(rank, vh.shape[0])] = vh[:rank]
    codes = (x - mean) @ directions.T  # (n, r): the SVD codes U_r S_r
    spread = codes.abs().amax(0).clamp_min(1e-12)
    ones, zeros = torch.ones(rank), torch.zeros(rank)
    if activation == "identity":
        scale, shift, slope, level = ones, zeros, ones, zeros
    elif activation == "relu" and bias:
        # Shift every code column to be non-negative: relu is then exactly the identity, and the
        # decoder bias absorbs the shift (b = mean - shift @ W).
        scale, shift, slope = ones, -codes.amin(0).clamp_max(0), ones
        level = shift
    elif activation == "relu":
        # No bias to absorb a shift: flip each column's sign so relu keeps its larger half.
        sign = torch.where(codes.clamp_min(0).pow(2).sum(0) >= codes.clamp_max(0).pow(2).sum(0), 1.0, -1.0)
        directions = directions * sign.unsqueeze(1)
        scale, shift, slope, level = ones, zeros, ones, zeros
    elif activation == "gelu" and bias:
        # gelu(5 + z) = 5 + z to within 1e-5 for |z| <= 1.
        scale, shift = 1.0 / spread, torch.full((rank,), 5.0)
        slope, level = ones, ACTIVATIONS["gelu"](shift)
    elif activation in ("tanh", "gelu"):
        # Near 0: tanh(z) ~ z and gelu(z) ~ z / 2, to within ~1% for |z| <= 0.01.
        scale, shift, level = 0.01 / spread, zeros, zeros
        slope = ones if activation == "tanh" else ones * 0.5
    else:
        raise SpecError(f"distilled: unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    trainable = {"encoder": directions.T.contiguous(), "encoder_bias": -(mean @ directions.T),
                 "decoder": directions.clone()}
    if bias:
        decoder = directions / (slope * scale).unsqueeze(1)
        trainable["decoder_bias"] = mean - level @ decoder
    return _Start(trainable, scale, shift, slope)
