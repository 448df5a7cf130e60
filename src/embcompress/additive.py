"""Additive quantization: a row is approximated by the SUM of one codeword from each of M codebooks.

The post hoc fitting toolkit of the ``codes`` method (and usable on its own): residual k-means
with a beam (the residual quantizer of FAISS), beam-search encoding, least-squares codebooks,
ICM code updates and the iterated local search of LSQ++ (Martinez et al., ECCV 2018).

Shapes: x (V, d) rows, codes (V, M) int64 in [0, K), codebooks (M, K, d).
"""

from __future__ import annotations

import torch

from .frozen.codebook import decode_codes
from .kmeans import fit_sample, kmeans

__all__ = ["additive_refine", "beam_encode", "best_codes", "icm_codes", "improve_codes", "least_squares_codebooks",
           "local_search_codes", "relative_error", "residual_kmeans", "row_errors"]


def _sum_codewords(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    return decode_codes(codes, codebooks, "sum")


def _beam_step(residual: torch.Tensor, codes: torch.Tensor, book: torch.Tensor,
               beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend each row's partial solutions by one book and keep the ``beam`` best.
    residual (n, b, d), codes (n, b, m), book (K, d) -> residual (n, beam', d), codes (n, beam', m + 1)."""
    n, b, d = residual.shape
    k = book.shape[0]
    error = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(-1)  # (n, b, K)
    top = error.reshape(n, b * k).topk(min(beam, b * k), dim=1, largest=False).indices
    parent, word = top // k, top % k
    residual = torch.gather(residual, 1, parent.unsqueeze(-1).expand(-1, -1, d)) - book[word]
    codes = torch.gather(codes, 1, parent.unsqueeze(-1).expand(-1, -1, codes.shape[2]))
    return residual, torch.cat([codes, word.unsqueeze(-1)], 2)


@torch.no_grad()
def beam_encode(x: torch.Tensor, codebooks: torch.Tensor, beam: int = 8, chunk: int = 8192,
                order: str = "energy") -> torch.Tensor:
    """Additive codes by beam search (greedy when beam = 1). -> (V, M).

    ``order="energy"`` visits books by decreasing energy (mean squared codeword norm): least-squares
    codebooks lose the residual order, and a beam decides best when the large terms come first.
    ``order="stored"`` visits them as stored, the order residual k-means built them in.
    Neither is safe alone with many books: least-squares codebooks can hold large codewords that
    cancel across books, and a greedy pass over them can end worse than the zero vector, so
    callers compare candidates with :func:`best_codes` and polish with :func:`icm_codes`.
    """
    if order not in ("energy", "stored"):
        raise ValueError(f"order must be 'energy' or 'stored', got {order!r}")
    books = codebooks.shape[0]
    visit = (codebooks.pow(2).sum(-1).mean(-1).argsort(descending=True) if order == "energy"
             else torch.arange(books))
    out = []
    for start in range(0, x.shape[0], chunk):
        residual = x[start:start + chunk].unsqueeze(1)
        codes = torch.zeros(residual.shape[0], 1, 0, dtype=torch.long)
        for m in visit.tolist():
            residual, codes = _beam_step(residual, codes, codebooks[m], beam)
        out.append(codes[:, 0])
    if not out:
        return torch.zeros(0, books, dtype=torch.long)
    return torch.cat(out)[:, visit.argsort()]


@torch.no_grad()
def best_codes(x: torch.Tensor, candidates: list[torch.Tensor], codebooks: torch.Tensor) -> torch.Tensor:
    """Per row, the candidate code (each (V, M)) with the smallest error under ``codebooks``."""
    errors = torch.stack([row_errors(x, c, codebooks) for c in candidates])  # (C, V)
    pick = errors.argmin(0)
    return torch.stack(candidates)[pick, torch.arange(x.shape[0])]


@torch.no_grad()
def residual_kmeans(x: torch.Tensor, books: int, codewords: int, beam: int = 1, iters: int = 15,
                    seed: int = 0, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual quantization: book m is k-means on what books < m left.

    With ``beam`` > 1 each row keeps its ``beam`` best partial codes and k-means runs on all their
    residuals (the residual quantizer of FAISS). ``weights`` (V,) weigh each row's residuals in the
    k-means (token counts). -> codebooks (M, K, d), codes (V, M).
    """
    residual = x.unsqueeze(1)
    codes = torch.zeros(x.shape[0], 1, 0, dtype=torch.long)
    centroids = []
    for m in range(books):
        mass = None if weights is None else weights.repeat_interleave(residual.shape[1])  # row-major, like reshape
        book, _ = kmeans(residual.reshape(-1, x.shape[1]), codewords, iters=iters, seed=seed + m,
                         sample=fit_sample(codewords), weights=mass)
        residual, codes = _beam_step(residual, codes, book, beam)
        centroids.append(book)
    return torch.stack(centroids), codes[:, 0]


@torch.no_grad()
def least_squares_codebooks(x: torch.Tensor, codes: torch.Tensor, codewords: int,
                            ridge: float = 1e-4, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Codebooks minimizing sum_i w_i ||sum_m C[m, codes_im] - x_i||^2 for fixed codes (normal equations;
    w = 1 without ``weights``).

    B is the (V, M*K) one-hot code matrix; B^T W B is built from per-pair (weighted) code co-occurrence
    counts, so the cost is O(V M^2) rather than O(V (MK)^2). The system is singular (a constant can move
    between books) and unused codewords have no data: a small ridge picks the minimum-norm answer.
    """
    rows, books = codes.shape
    size = books * codewords
    flat = codes + torch.arange(books) * codewords  # (V, M) column index in B
    gram = torch.zeros(size, size, dtype=torch.float64)
    w64 = None if weights is None else weights.double()
    for m in range(books):
        for n in range(m, books):
            counts = torch.bincount(codes[:, m] * codewords + codes[:, n], weights=w64,
                                    minlength=codewords * codewords)
            block = counts.reshape(codewords, codewords).double()
            gram[m * codewords:(m + 1) * codewords, n * codewords:(n + 1) * codewords] = block
            if n != m:
                gram[n * codewords:(n + 1) * codewords, m * codewords:(m + 1) * codewords] = block.T
    rhs = torch.zeros(size, x.shape[1], dtype=torch.float64)
    x64 = x.double() if weights is None else x.double() * weights.double().unsqueeze(1)
    for m in range(books):  # one book at a time: a (V * M, d) repeat of x is GBs for wide tables
        rhs.index_add_(0, flat[:, m], x64)
    scale = float(gram.diagonal().mean()) if rows else 1.0
    gram.diagonal().add_(ridge * scale + 1e-12)
    solution = torch.linalg.solve(gram, rhs)
    return solution.float().reshape(books, codewords, x.shape[1])


@torch.no_grad()
def icm_codes(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, sweeps: int = 1,
              chunk: int = 32768) -> torch.Tensor:
    """Coordinate descent on the codes (iterated conditional modes): each book in turn takes the
    codeword nearest to what the other books leave. Never increases the error. Returns new codes."""
    codes = codes.clone()
    norms = codebooks.pow(2).sum(-1)  # (M, K)
    for start in range(0, x.shape[0], chunk):
        xs, cs = x[start:start + chunk], codes[start:start + chunk]
        _icm_sweeps(xs - _sum_codewords(cs, codebooks), cs, codebooks, norms, sweeps)
    return codes


def _icm_sweeps(residual: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, norms: torch.Tensor,
                sweeps: int) -> torch.Tensor:
    """ICM in place: ``sweeps`` times, each book in turn takes the codeword nearest to what the other
    books leave. ``residual`` (n, d) = rows - decode(codes); updates ``codes`` and ``residual``."""
    for _ in range(sweeps):
        for m in range(codebooks.shape[0]):
            residual += codebooks[m][codes[:, m]]
            pick = (norms[m] - 2 * residual @ codebooks[m].T).argmin(1)
            codes[:, m] = pick
            residual -= codebooks[m][pick]
    return residual


@torch.no_grad()
def additive_refine(x: torch.Tensor, codes: torch.Tensor, codewords: int, rounds: int = 3,
                    beam: int = 8, sweeps: int = 2,
                    weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate least-squares codebooks with code updates (beam search, then ICM), keeping for
    each row the better of its old and new codes, so the error never increases. With ``weights``
    the codebooks minimize the row-weighted error (each row's codes are its own best either way)."""
    codebooks = least_squares_codebooks(x, codes, codewords, weights=weights)
    for _ in range(rounds):
        codes = improve_codes(x, codes, codebooks, beam=beam, sweeps=sweeps)
        codebooks = least_squares_codebooks(x, codes, codewords, weights=weights)
    return codebooks, codes


@torch.no_grad()
def improve_codes(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, beam: int = 8,
                  sweeps: int = 2) -> torch.Tensor:
    """Best per row of the given codes and fresh beam searches in both book orders, then ICM sweeps.
    Never increases any row's error."""
    if beam > 0:
        codes = best_codes(x, [codes, beam_encode(x, codebooks, beam), beam_encode(x, codebooks, beam, order="stored")],
                           codebooks)
    return icm_codes(x, codes, codebooks, sweeps=sweeps)


@torch.no_grad()
def local_search_codes(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, iters: int = 4,
                       perturb: int = 2, sweeps: int = 1, generator: torch.Generator | None = None,
                       chunk: int = 32768) -> torch.Tensor:
    """Iterated local search of LSQ++ (Martinez et al., ECCV 2018, section 3): ``iters`` times, give
    ``perturb`` random books of each row a random codeword, run ``sweeps`` ICM sweeps, and keep the
    result for the rows it improved. Escapes the local optima plain ICM stops in; never increases
    the error. Returns new codes."""
    codes = codes.clone()
    books, codewords, _ = codebooks.shape
    perturb = min(perturb, books)
    norms = codebooks.pow(2).sum(-1)
    for start in range(0, x.shape[0], chunk):
        xs, best = x[start:start + chunk], codes[start:start + chunk]
        error = (xs - _sum_codewords(best, codebooks)).pow(2).sum(1)
        for _ in range(iters):
            trial = best.clone()
            if perturb:
                where = torch.rand(trial.shape, generator=generator).argsort(1)[:, :perturb]
                trial.scatter_(1, where, torch.randint(0, codewords, where.shape, generator=generator))
            residual = _icm_sweeps(xs - _sum_codewords(trial, codebooks), trial, codebooks, norms, sweeps)
            trial_error = residual.pow(2).sum(1)
            better = trial_error < error
            best[better] = trial[better]
            error = torch.where(better, trial_error, error)
        codes[start:start + chunk] = best
    return codes


@torch.no_grad()
def row_errors(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([(x[s:s + chunk] - _sum_codewords(codes[s:s + chunk], codebooks)).pow(2).sum(1)
                      for s in range(0, x.shape[0], chunk)])


def relative_error(row_errors: torch.Tensor, x: torch.Tensor) -> float:
    return float(row_errors.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))
