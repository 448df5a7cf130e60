"""k-means in torch (k-means++ seeding, Lloyd iterations), batched over independent groups.

Used to start product quantizers (one k-means per sub-vector group), residual / additive codes,
and DPQ's post hoc fit.
"""

from __future__ import annotations

import torch

from . import kernels

__all__ = ["kmeans", "assign", "squared_distances", "fit_sample", "POINTS_PER_CENTROID", "SEED_POINTS_PER_CENTROID",
           "MIN_FIT_ROWS"]

#: Rows per centroid a k-means fits on at most (FAISS's ``max_points_per_centroid``): more rows
#: barely move the centroids, while the Lloyd iterations cost grows with them.
POINTS_PER_CENTROID = 256
#: Rows per centroid k-means++ seeds from at most: seeding is sequential (one pass over the rows per
#: centroid), so its cost grows with rows x K; the Lloyd iterations then use every fit row.
SEED_POINTS_PER_CENTROID = 64
#: Rows a k-means always may use for seeding and fitting (small k: cheap, and sampling would only add noise).
MIN_FIT_ROWS = 16384
#: Elements of one (G, rows, K) block of distances on torch's path (64 MB of float32).
BLOCK_ELEMENTS = 1 << 24


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Batched ||x_i - c_k||^2: x (G, N, w), centroids (G, K, w) -> (G, N, K)."""
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ centroids.transpose(1, 2)
            + centroids.pow(2).sum(-1).unsqueeze(1)).clamp_min_(0)


def fit_sample(codewords: int, limit: int = 65536) -> int:
    """Rows a k-means with ``codewords`` centroids fits on: :data:`POINTS_PER_CENTROID` each (at least
    :data:`MIN_FIT_ROWS`), at most ``limit``."""
    return min(limit, max(MIN_FIT_ROWS, POINTS_PER_CENTROID * codewords))


def assign(x: torch.Tensor, centroids: torch.Tensor, x_t: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest centroid per row (the first on ties), x (G, N, w) -> codes (G, N).

    The C kernel scans the centroids per row without materializing the (G, N, K) distances; it reads
    x laid out (G, w, N), which a caller assigning the same rows again passes as ``x_t``. Torch's
    path computes the distances in blocks of rows, without the row norms (they do not change the argmin)."""
    x = x.float()
    if kernels.dpq_supported(x, centroids):
        x_t = x.transpose(1, 2).contiguous() if x_t is None else x_t
        return kernels.dpq_vq_codes(x_t, centroids.float().contiguous()).t()
    groups, n, _ = x.shape
    chunk = max(1, BLOCK_ELEMENTS // (groups * centroids.shape[1]))
    norms = centroids.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K)
    books = centroids.transpose(1, 2)
    return torch.cat([torch.baddbmm(norms, x[:, s:s + chunk], books, alpha=-2).argmin(-1)
                      for s in range(0, n, chunk)], 1) if n else torch.zeros(groups, 0, dtype=torch.long)


def _plus_plus(x: torch.Tensor, k: int, generator: torch.Generator,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding: each next centroid is a row drawn with chance ~ (weight x) squared distance
    to the nearest centroid so far. Drawn by inverting the cumulative sum with one uniform per group:
    torch.multinomial draws a random number per row and dominated the fit of wide tables."""
    groups, n, _ = x.shape
    every = torch.arange(groups)
    first = torch.randint(0, n, (groups,), generator=generator)
    centroids = [x[every, first]]
    norms = x.pow(2).sum(-1)  # (G, n), reused by every distance update

    def distances(new: torch.Tensor) -> torch.Tensor:  # (G, w) -> (G, n)
        return torch.baddbmm((norms + new.pow(2).sum(-1, keepdim=True)).unsqueeze(-1), x, new.unsqueeze(-1),
                             alpha=-2).squeeze(-1).clamp_min_(0)

    closest = distances(centroids[0])
    for _ in range(1, k):
        chance = closest + 1e-12 if weights is None else closest * weights + 1e-12
        total = chance.cumsum(1)
        target = torch.rand(groups, 1, generator=generator) * total[:, -1:]
        pick = torch.searchsorted(total, target).squeeze(1).clamp_(max=n - 1)
        new = x[every, pick]
        centroids.append(new)
        closest = torch.minimum(closest, distances(new))
    return torch.stack(centroids, 1)


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    sample: int | None = 65536,
    seed: int = 0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each group of rows independently.

    Args:
        x: (N, w) or (G, N, w) float tensor.
        k: clusters per group.
        iters: Lloyd iterations.
        sample: fit on at most this many rows (then assign all rows); None uses all.
        seed: seeds the sampling and k-means++.
        weights: optional (N,) row weights (token counts): weighted means and weighted seeding,
            i.e. Lloyd on sum_i w_i ||x_i - c(i)||^2.
    Returns:
        centroids (G, k, w) and codes (G, N) (without the G axis for 2-D input).
    """
    squeeze = x.dim() == 2
    x = x.unsqueeze(0) if squeeze else x
    x = x.float()
    groups, n, width = x.shape
    generator = torch.Generator().manual_seed(seed)
    fit_rows = x
    fit_weights = None if weights is None else weights.float().clamp_min(0)
    if sample is not None and n > sample:
        keep = torch.randperm(n, generator=generator)[:sample]
        fit_rows = x[:, keep]
        fit_weights = None if fit_weights is None else fit_weights[keep]
    if k >= fit_rows.shape[1]:  # fewer rows than clusters: every row its own centroid
        pad = fit_rows[:, torch.randint(0, fit_rows.shape[1], (k - fit_rows.shape[1],), generator=generator)]
        centroids = torch.cat([fit_rows, pad], 1)
    else:
        seed_rows, seed_weights = fit_rows, fit_weights
        seed_limit = max(MIN_FIT_ROWS, SEED_POINTS_PER_CENTROID * k)
        if fit_rows.shape[1] > seed_limit:
            keep = torch.randperm(fit_rows.shape[1], generator=generator)[:seed_limit]
            seed_rows, seed_weights = fit_rows[:, keep], None if fit_weights is None else fit_weights[keep]
        centroids = _plus_plus(seed_rows, k, generator, seed_weights)
        fit_t = fit_rows.transpose(1, 2).contiguous() if iters and kernels.dpq_supported(fit_rows, centroids) else None
        for _ in range(iters):
            codes = assign(fit_rows, centroids, fit_t)
            # index_add_ over (G*K, w) rows: several times faster than scatter_add_ with an index
            # expanded to (G, N, w), which dominated residual k-means at d = 300.
            flat = (codes + torch.arange(groups).unsqueeze(1) * k).reshape(-1)
            rows = fit_rows if fit_weights is None else fit_rows * fit_weights.unsqueeze(1)
            sums = torch.zeros(groups * k, width).index_add_(0, flat, rows.reshape(-1, width)).reshape(groups, k, width)
            mass = None if fit_weights is None else fit_weights.repeat(groups)
            counts = torch.bincount(flat, weights=mass, minlength=groups * k).reshape(groups, k).float()
            empty = counts == 0
            centroids = torch.where(empty.unsqueeze(-1), centroids, sums / counts.clamp_min(1).unsqueeze(-1))
    codes = assign(x, centroids)
    return (centroids[0], codes[0]) if squeeze else (centroids, codes)
