"""Shared test helpers."""

import torch


def synthetic_table(rows: int = 256, dim: int = 24, rank: int = 6, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """Rows near a low-dimensional subspace, so every method can compress them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g) / rank**0.5 \
        + noise * torch.randn(rows, dim, generator=g)


def relative_mse(approx: torch.Tensor, target: torch.Tensor) -> float:
    return float((approx - target).pow(2).mean() / (target - target.mean(0)).pow(2).mean())
